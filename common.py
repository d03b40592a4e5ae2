"""common.py -- everything method-agnostic, shared by finetune.py and the four method scripts.

Nothing in here is one method's decision. Contents, in file order:

  1. The command line and a run's set-up: user errors (one line, exit code 2) and `cli_main`;
     the shared flags (`common_parser`); `finalize_args`, which fills every default from a
     script's DEFAULTS table (MTIL | toy); `HParams`, one task's resolved optimisation settings;
     seeding and device; `check_data`, `load_tasks`, `setup_model`.
  2. CLIP through open_clip (the only file that imports open_clip): `load_clip` for tags, local
     weight files and OpenAI's TorchScript `.pt`, QuickGELU (`wants_quick_gelu`), the toy
     benchmark's tiny CLIP (its recipe is in data.py's toy section; pretrained here once and
     cached); `ClipView`, open_clip's CLIP where every weight the methods adapt (attention q, k,
     v, out; MLP c_fc, c_proj; the visual projection) is a plain `nn.Linear` that is really
     called, with a canonical named iteration over them (`ClipView.layers()`).
  3. The training loop's parts: seeded loaders (`forever`: endless, workers started once per
     task), ZSCL's warm-up + cosine lr, precision (autocast, TF32, the fp16 grad scaler), the
     step losses kept on the device and checked for NaN every 50 steps (`LossLog`), progress
     bars, the trainable-parameter count.
  4. Input statistics and linear algebra: forward hooks on module inputs, Gram accumulation,
     orthonormalisation.
  5. Evaluation and metrics: class prompts, zero-shot heads, which prompts each protocol uses
     (`eval_templates`), accuracy rows, the alignment diagnostics on held-out image-caption pairs
     (`Alignment`: modality gap, image<->text Recall@1), ZSCL's Transfer / Average / Last, the
     table, the heatmap.
  6. The run folder (`Run`): owned by one live process (`claim_run_folder`, the lock file
     run.lock), config.json (with each task's resolved HParams), acc_matrix.csv/png, summary.json
     (`complete`, `tasks_done`), the atomic per-task checkpoint, `--resume`, the warning after a
     task that learnt nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import fcntl
import hashlib
import json
import logging
import math
import os
import random
import socket
import sys
import tempfile
import time
import warnings
import weakref
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import open_clip  # noqa: E402  (besides data.py's ImageNet class names, the only import of open_clip)

import data  # data.py never imports common.py

# ---------------------------------------------------------------------------------------------
# ---- 1. The command line and a run's set-up (errors, flags, defaults, seeding, device, data, model) ----
# ---------------------------------------------------------------------------------------------


# OpenMP threads: each script sets OMP_WAIT_POLICY=PASSIVE (unless the environment sets it) before
# it imports torch, as tests/conftest.py and CI do: idle OpenMP threads sleep instead of spinning.
# On a busy 2-core machine spinning threads fight the other jobs for the cores and the tiny toy
# model's steps, each too short to keep two threads busy, wait for them. Measured there (load 4.7-5.8):
# 30 toy pretraining steps took 64-91 s spinning, 21 s passive; the README's first run (pretraining
# + 6 tasks) 58 min 21 s as it was (load ~9.0) and 20 min 21 s passive (~8.5, at the same time).

class UserError(Exception):
    """A mistake the user can fix (bad flag, missing data, missing weights). Printed as one
    message without a traceback; exit code 2."""

    exit_code = 2

class NonFiniteLoss(Exception):
    """The loss became NaN/inf. Everything saved before this step stays on disk. Printed as one
    line with what to do next (it depends on what the run folder holds); exit code 2."""

    exit_code = 2

# Set by cli_main: the run folder is claimed as soon as the model is about to load (setup_model),
# so that a second run into a folder in use fails at once. Code that calls a script's `main` or
# `setup` directly (tests, notebooks) claims the folder when it creates the Run.
_CLI = False

def cli_main(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run `main(argv)`; turn user errors into one line on stderr + exit code 2 (no traceback),
    each with a next step that works as printed."""
    global _CLI
    _CLI = True
    try:
        _main_with_messages(main, argv)
    finally:
        _CLI = False

def _main_with_messages(main: Callable[[list[str] | None], None], argv: list[str] | None) -> None:
    try:
        main(argv)
    except (UserError, data.MissingDataError) as e:
        hint = ("\n(no data at hand? every script also runs offline on the toy benchmark: --benchmark toy, "
                "and the toy versions of CIL and X-TAIL: toy-cil, toy-xtail)"
                if isinstance(e, data.MissingDataError) else "")
        _release_claims(failed=True)
        print(f"error: {e}{hint}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as e:
        print(f"error: {e}; {_next_step_after_failure('lower')}", file=sys.stderr)
        _release_claims(failed=True)
        sys.exit(2)
    except KeyboardInterrupt:
        where = "during the toy CLIP's pretraining (nothing cached)" if _PRETRAINING else ""
        print(f"interrupted{' ' + where if where else ''}; {_next_step_after_failure('again')}", file=sys.stderr)
        _release_claims(failed=True)
        sys.exit(130)

def _next_step_after_failure(kind: str) -> str:
    """What a run that stopped early can do next, from what its run folder holds: `--resume`
    needs a checkpoint and the same flags. kind: "again" (interrupted: the same command once
    more) or "lower" (diverged: a lower --lr, which --resume refuses)."""
    claim = _ACTIVE_CLAIM() if _ACTIVE_CLAIM is not None else None
    out = claim.out if claim is not None else None
    done = _tasks_done(out) if out is not None else 0
    if kind == "lower":
        if done:
            return (f"tasks 1-{done} are saved in {out}, and --resume continues them only with the same flags: "
                    f"to retry with a lower --lr, start again with another --out (or delete {out})")
        return "nothing was saved: run again with a lower --lr"
    if done:
        return (f"tasks 1-{done} are saved in {out}: continue with the same command"
                + ("" if claim.resume else " plus --resume"))
    return "nothing to resume yet: run the same command again" + (" without --resume" if claim and claim.resume else "")

def common_parser(method: str, doc: str | None = None) -> argparse.ArgumentParser:
    """The flags every script accepts (DESIGN.md "The shared command line"). A method script
    adds its own under a `# method` group. `--iterations/--batch-size/--lr` default to None and
    are resolved per benchmark/order/task by each script (the paper's values)."""
    p = argparse.ArgumentParser(prog=f"{method}.py", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("common")
    g.add_argument("--benchmark", choices=BENCHMARKS, default="mtil",
                   help="mtil / toy (task-incremental, one head per dataset); cil-cifar100, cil-tinyimagenet, "
                        "toy-cil (class-incremental: steps of new classes, one head over the classes seen); "
                        "xtail, toy-xtail (domains in turn, one head over every domain's classes)")
    g.add_argument("--steps", type=int, default=None,
                   help="CIL steps: cil-cifar100 10 | 20 | 50, cil-tinyimagenet 5 | 10 | 20 after 100 base "
                        f"classes (default 10 for both), toy-cil {data.TOY_CIL_STEPS}")
    g.add_argument("--order", choices=["I", "II"], default="I")
    g.add_argument("--data-root", default=os.environ.get("MTIL_DATA", "./data"))
    g.add_argument("--model", default=None,
                   help="open_clip model name (default: ViT-B-16 for mtil, the toy tiny CLIP for toy)")
    g.add_argument("--pretrained", default=None,
                   help="open_clip tag or a local weights file (default: openai for mtil, the "
                        "cached toy pretraining for toy; 'none' = random init)")
    g.add_argument("--few-shot", type=int, default=None,
                   help=f"K images per class; 0 = full data (default 0; X-TAIL: {data.XTAIL_SHOTS}, its shots)")
    g.add_argument("--iterations", type=int, default=None, help="steps per task (default: paper)")
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--lr", type=float, default=None, help="one lr for every task (default: paper)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers (default: mtil one per CPU core but one, 1 to 8; toy 0)")
    g.add_argument("--max-tasks", type=int, default=None,
                   help="stop after training this many tasks (every dataset is still evaluated)")
    g.add_argument("--eval-batch-size", type=int, default=128)
    g.add_argument("--align-n", type=int, default=None,
                   help="held-out image-caption pairs for the modality gap and image<->text Recall@1 after "
                        "every task (toy: the toy world's held-out split; mtil: ImageNet train images, skipped "
                        "without ImageNet); 0 = off")
    g.add_argument("--amp", choices=["official", "off", "tf32", "fp16", "bf16"], default="official",
                   help="precision of training and evaluation on CUDA (CPU runs stay fp32): official = the "
                        "method's official code (off = fp32 for all but KeepLoRA's fp16 autocast); tf32 "
                        "(fp32 with TF32 matrix products) and bf16 (autocast) are speed options")
    g.add_argument("--eval-prompts", choices=["official", "ensemble"], default="official",
                   help="zero-shot heads: official = the method's official code; ensemble = ZSCL's "
                        "template ensemble for every dataset (one protocol shared by all scripts)")
    g.add_argument("--quick-gelu", choices=["auto", "on", "off"], default="auto",
                   help="QuickGELU activation: auto = on for OpenAI weights (the openai tag, OpenAI's .pt, or "
                        "a state-dict file for a model with an openai tag) and for tags trained with it")
    g.add_argument("--out", default=None, help="run folder (default runs/<method>-<benchmark>-order<o>-seed<s>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out after its last finished task")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars (auto-off when stderr is not a TTY)")
    return p
# the common flags that are resolved per task by each script's `hparams` (not by finalize_args)
PER_TASK_FLAGS = ("iterations", "batch_size", "lr")

# ---- the benchmarks: MTIL and the two protocols without task identity (notes/protocols.md) ----
# protocol "mtil": one head per dataset, the task id known (ZSCL); "cil": a dataset cut into steps of
# new classes, one head over every class seen so far (MoE-Adapters' cil/); "xtail": domains in turn,
# one head over the classes of all domains (RAIL). Each has a real and a toy benchmark.
BENCHMARKS = ["mtil", "toy", "cil-cifar100", "cil-tinyimagenet", "xtail", "toy-cil", "toy-xtail"]
_PROTOCOL = {"mtil": "mtil", "toy": "mtil", "cil-cifar100": "cil", "cil-tinyimagenet": "cil", "toy-cil": "cil",
             "xtail": "xtail", "toy-xtail": "xtail"}
CIL_DEFAULT_STEPS = {"cil-cifar100": 10, "cil-tinyimagenet": 10, "toy-cil": data.TOY_CIL_STEPS}  # CHOICE: 10

def protocol(benchmark: str) -> str:
    """mtil | cil | xtail: how a benchmark's tasks are trained and tested."""
    return _PROTOCOL[benchmark]

def is_toy(benchmark: str) -> bool:
    """The toy world's benchmarks (toy, toy-cil, toy-xtail): the tiny CLIP, no files."""
    return benchmark.startswith("toy")

def protocol_key(args) -> str:
    """The key of a script's PROTOCOL_DEFAULTS for this run: "cil" (both real CIL datasets),
    "xtail", "toy-cil", "toy-xtail"; "mtil" / "toy" have no overrides."""
    return "cil" if args.benchmark.startswith("cil-") else args.benchmark

# Values a PROTOCOL_DEFAULTS entry may take, resolved here (defaults_for):
EPOCH = "epoch"        # "iterations": one pass over the task's training set, ceil(N / batch) + 1 steps
                       # (MoE-Adapters cil/continual_clip/models.py:ClassIncremental.train loops over
                       # range(total_iterations + 1): one batch more than an epoch)
CIL_BATCH = "cil"      # "batch_size": the CIL config's batch size (data.CIL_BATCH_SIZE; toy-cil: 64)
# What every script takes on a protocol before its own overrides: the protocol's own settings.
PROTOCOL_COMMON = {"cil": {"few_shot": 0}, "toy-cil": {"few_shot": 0},
                   "xtail": {"few_shot": data.XTAIL_SHOTS}, "toy-xtail": {"few_shot": data.XTAIL_SHOTS}}

def epoch_iterations(task, batch_size: int) -> int:
    """One epoch of the task's training set as MoE-Adapters' cil loop counts it: ceil(N / B) + 1."""
    return math.ceil(len(task.train) / batch_size) + 1

def finalize_args(args: argparse.Namespace, method: str, defaults: dict,
                  protocols: dict | None = None) -> argparse.Namespace:
    """Fill every default and validate numbers (one-line errors). `defaults` is the script's
    DEFAULTS table, name -> (MTIL value, toy value): each flag the user did not give (None, or
    `official` for --amp / --eval-prompts) takes its benchmark's value, so config.json records
    what the run used. `protocols`: the script's PROTOCOL_DEFAULTS (defaults_for). --iterations /
    --batch-size / --lr stay None unless given: the script's `hparams(args, task, t)` resolves them
    per task (config.json "per_task")."""
    args.method = method
    check_benchmark(args)
    toy = is_toy(args.benchmark)
    if args.model is None:
        args.model = TOY_MODEL if toy else "ViT-B-16"
    if args.pretrained is None:
        args.pretrained = "toy" if toy else "openai"
    if args.workers is None:
        args.workers = 0 if toy else default_workers()
    if args.out is None:
        steps = f"-{args.steps}steps" if args.steps else ""
        args.out = f"runs/{method}-{args.benchmark}{steps}-order{args.order}-seed{args.seed}"
    check_model_and_weights(args.model, args.pretrained)
    col = defaults_for(args, defaults, protocols)
    for name, value in col.items():
        if name in PER_TASK_FLAGS or not hasattr(args, name):
            continue
        if getattr(args, name) is None or (name in ("amp", "eval_prompts") and getattr(args, name) == "official"):
            setattr(args, name, value)
    if args.few_shot is None:
        args.few_shot = 0
    for name in ("iterations", "batch_size", "max_tasks", "few_shot", "workers", "eval_batch_size", "align_n"):
        v = getattr(args, name)
        zero_ok = name in ("few_shot", "workers", "align_n")
        if v is not None and v < (0 if zero_ok else 1):
            raise UserError(f"--{name.replace('_', '-')} must be {'>= 0' if zero_ok else '>= 1'}, got {v}")
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        raise UserError(f"--lr must be a positive number, got {args.lr}")
    args.progress = (not args.no_progress) and sys.stderr.isatty()
    return args

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")

def check_model_and_weights(name: str, pretrained: str | None) -> None:
    """--model and --pretrained, checked before anything loads (one-line errors): a known model
    name, a tag that model has, or a weights file that exists."""
    models = open_clip.list_models()
    if name != TOY_MODEL and name not in models and not name.startswith(("hf-hub:", "local-dir:")):
        close = difflib.get_close_matches(name, [TOY_MODEL, *models], n=3)
        raise UserError(f"unknown --model {name!r}{' (close: ' + ', '.join(close) + ')' if close else ''}: use "
                        f"{TOY_MODEL} (the toy benchmark's tiny CLIP) or an open_clip model name such as ViT-B-16 "
                        "(all of them: python -c \"import open_clip; print(open_clip.list_models())\")")
    tags = open_clip.list_pretrained_tags_by_model(name) if name in models else []
    if pretrained == "toy" and name != TOY_MODEL:
        raise UserError(f"--pretrained toy (the toy benchmark's tiny CLIP) only exists for --model {TOY_MODEL}; "
                        f"for {name} pass {'an open_clip tag (' + ', '.join(tags[:4]) + ', ...), ' if tags else ''}"
                        "a weights FILE or none")
    if pretrained in (None, "none", "toy"):
        return
    path = Path(pretrained).expanduser()
    if path.is_dir():
        raise UserError(f"--pretrained {pretrained} is a folder: pass the weights file in it")
    if path.is_file():
        return
    if os.sep in pretrained or pretrained.endswith(WEIGHT_SUFFIXES):
        raise UserError(f"weights file not found: {pretrained} (--pretrained takes an existing weights file, "
                        "an open_clip tag or none)")
    if name == TOY_MODEL:
        raise UserError(f"{TOY_MODEL} has no open_clip tags: use --pretrained toy, none or a FILE")
    if name in models and not open_clip.get_pretrained_cfg(name, pretrained):
        raise UserError(f"--pretrained {pretrained!r} is neither a file nor a tag of {name} (its tags: "
                        f"{', '.join(tags) or 'none'})")

def check_benchmark(args) -> None:
    """--steps and --order against --benchmark (one-line errors); fills the default --steps."""
    if protocol(args.benchmark) != "cil":
        if args.steps is not None:
            raise UserError(f"--steps is for the class-incremental benchmarks (cil-cifar100, cil-tinyimagenet, "
                            f"toy-cil), not --benchmark {args.benchmark}")
    else:
        args.steps = args.steps or CIL_DEFAULT_STEPS[args.benchmark]
        allowed = sorted(data.CIL_STEPS[args.benchmark]) if args.benchmark in data.CIL_STEPS else [data.TOY_CIL_STEPS]
        if args.steps not in allowed:
            raise UserError(f"--benchmark {args.benchmark} runs in {' | '.join(map(str, allowed))} steps, "
                            f"not --steps {args.steps}")
    if protocol(args.benchmark) != "mtil" and args.order != "I":
        raise UserError(f"--benchmark {args.benchmark} has one order (its source's); --order II is for mtil and toy")

def defaults_for(args: argparse.Namespace, defaults: dict, protocols: dict | None = None, task=None) -> dict:
    """This run's defaults: the column of a DEFAULTS table (name -> (MTIL, toy); the real CIL and
    X-TAIL benchmarks read the MTIL column, toy-cil and toy-xtail the toy one), updated by the
    protocol's own settings (PROTOCOL_COMMON) and then by the script's `protocols`
    (PROTOCOL_DEFAULTS: protocol_key -> {name: value}; a key "<protocol_key>:<variant>" applies to
    that --variant only). CIL_BATCH is resolved here; EPOCH too when `task` is given (its
    training set, at the run's batch size)."""
    col = 1 if is_toy(args.benchmark) else 0
    d = {name: values[col] for name, values in defaults.items()}
    key = protocol_key(args)
    for k in (key, f"{key}:{getattr(args, 'variant', None)}"):
        d.update(PROTOCOL_COMMON.get(k, {}))
        d.update((protocols or {}).get(k, {}))
    if d.get("batch_size") == CIL_BATCH:
        d["batch_size"] = data.CIL_BATCH_SIZE.get(args.benchmark, {}).get(args.steps, 64)
    for name, value in d.items():                # "iterations" and the like ("iterations_full_shot")
        if value == EPOCH and name.startswith("iterations") and task is not None:
            d[name] = epoch_iterations(task, args.batch_size or d["batch_size"])
    return d

@dataclass(frozen=True)
class HParams:
    """One task's optimisation settings as the run used them (a script's `hparams(args, task, t)`;
    config.json "per_task" lists them)."""
    iterations: int
    batch_size: int
    lr: float
    warmup: int = 0                   # linear warm-up steps (0: none)
    schedule: str = "cosine"          # the lr schedule, by name

def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)

def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available (use --device cpu)")
    return dev

def missing_data(args) -> list[tuple[str, str, str]]:
    """(name, expected path, how to get it) of every dataset the benchmark needs and lacks."""
    if args.benchmark == "mtil":
        return data.mtil_missing(args.data_root, data.MTIL_ORDERS[args.order])  # all evaluated, even with --max-tasks
    if args.benchmark == "xtail":
        return data.mtil_missing(args.data_root, data.XTAIL_DOMAINS)         # the union needs every domain
    if args.benchmark in data.CIL_DATASETS:
        return data.cil_missing(args.data_root, [args.benchmark])
    return []

def check_data(args) -> None:
    """Fail early (before loading any model) when data is missing: exit 2 with the list."""
    missing = missing_data(args)
    if missing:
        raise data.MissingDataError(missing)

def load_tasks(args, model: ClipView, train_transform: str = "train", few_shot_once: bool = False) -> list:
    """All the benchmark's tasks in training order, test splits with the eval transform, few-shot
    subsets applied when --few-shot K > 0. --max-tasks limits training (`n_train_tasks`), not the
    columns of the matrix. The methods' official codes differ in their training inputs:
      train_transform  "train": ZSCL's RandomResizedCrop(scale 0.9-1) + flip-free CLIP
                       preprocessing; "eval": the deterministic eval transform (KeepLoRA)
      few_shot_once    the few-shot images are transformed once and kept (DAC, MoE-Adapters: they
                       stack the transformed images into a TensorDataset), instead of on the fly.
    CIL steps train on their new classes only (data.new_classes_only); X-TAIL's shots are --few-shot.
    Every task of CIL and X-TAIL carries `union_classnames`, its test head (evaluate_all)."""
    tr, ev = data.clip_transforms(model.image_size)
    tr = ev if train_transform == "eval" else tr
    few_shot = args.few_shot
    if args.benchmark == "mtil":
        tasks = data.mtil_tasks(args.data_root, args.order, tr, ev)
    elif args.benchmark == "toy":
        tasks = data.toy_tasks(args.order)
    elif args.benchmark == "xtail":
        tasks, few_shot = data.xtail_tasks(args.data_root, args.seed, args.few_shot, tr, ev), 0
    elif args.benchmark == "toy-xtail":
        tasks, few_shot = data.toy_xtail_tasks(args.seed, args.few_shot), 0
    elif args.benchmark == "toy-cil":
        tasks = [data.new_classes_only(t) for t in data.toy_cil_tasks(args.steps)]
    else:
        tasks = [data.new_classes_only(t) for t in data.cil_tasks(args.benchmark, args.steps, args.data_root,
                                                                  train_transform=tr, eval_transform=ev)]
    for t in tasks:
        if few_shot:
            t.train = data.few_shot_subset(t.train, few_shot, seed=args.seed)
        if few_shot_once and (few_shot or args.few_shot):
            t.train = data.transformed_once(t.train, seed=args.seed)
    return tasks

def n_train_tasks(args, tasks: list) -> int:
    return min(len(tasks), args.max_tasks or len(tasks))

def setup_model(args, device) -> ClipView:
    """The run's CLIP. Resolves `--quick-gelu auto` into args (so config.json records it) and sets
    the run's precision (`set_precision`). From
    the command line (cli_main) the run folder is claimed first (`claim_run_folder`: in use by
    another run, not writable, --resume without a checkpoint...), so those errors come before the
    model loads. The time from here on is the run's `seconds`, less the toy pretraining's."""
    if _CLI:
        _CLI_CLAIMS.append(claim_run_folder(args))
    t0, pretrained_before = time.time(), _PRETRAIN_SECONDS[0]
    if args.quick_gelu == "auto":
        args.quick_gelu = "on" if wants_quick_gelu(args.model, args.pretrained) else "off"
    set_precision(torch.device(device), args.amp)
    model = load_clip(args.model, args.pretrained, device, progress_bar=args.progress,
                      quick_gelu=args.quick_gelu == "on")
    _LAST_SETUP.update(args=weakref.ref(args), t0=t0, pretraining=_PRETRAIN_SECONDS[0] - pretrained_before)
    return model

# when the latest setup_model began and how long its toy pretraining took (Run's `seconds`)
_LAST_SETUP: dict = {}

# ---------------------------------------------------------------------------------------------
# ---- 2. CLIP through open_clip: loading (tags, weight files, QuickGELU, the toy tiny CLIP) and the view ----
# ---------------------------------------------------------------------------------------------

TOY_MODEL = "toy-tiny"

def cache_dir() -> Path:
    return Path(os.environ.get("CLCLIP_CACHE", Path.home() / ".cache" / "clip-cl"))

class _RandomInitFilter(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ... initialized randomly" record: our toy and
    `none` models are random on purpose. Every other warning (a QuickGELU mismatch among them)
    still reaches the user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

def _create(name: str, **kw):
    f = _RandomInitFilter()
    logging.getLogger().addFilter(f)
    try:
        return _create_model(name, **kw)
    finally:
        logging.getLogger().removeFilter(f)

def _create_model(name: str, **kw):
    check_model_and_weights(name, None)
    if name == TOY_MODEL:
        if kw.get("pretrained"):
            raise UserError(f"{TOY_MODEL} has no open_clip tags: use --pretrained toy, none or a FILE")
        return open_clip.create_model("ViT-B-32", pretrained=None, **data.TOY_CLIP_CFG), \
            data.TOY_CLIP_CFG["text_cfg"]["context_length"]
    model = open_clip.create_model(name, **kw)
    return model, model.context_length

def _is_torchscript(path: Path) -> bool:
    """OpenAI's original CLIP files are TorchScript archives, recognised by their structure: a zip
    whose entries all sit in one folder that holds data.pkl, constants.pkl and code/."""
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1:
        return False
    r = roots.pop()
    return {f"{r}/data.pkl", f"{r}/constants.pkl"} <= names and any(n.startswith(f"{r}/code/") for n in names)

def wants_quick_gelu(name: str, pretrained: str | None) -> bool:
    """Whether `--quick-gelu auto` gives QuickGELU (x * sigmoid(1.702 x)), the activation OpenAI's
    CLIP was trained with. open_clip 3.3.0 builds `ViT-B-16` with nn.GELU even for the `openai`
    tag (it only warns "QuickGELU mismatch"), so every weight source is decided here:
      a tag            -> the tag's own setting (True for `openai`, False for e.g. `laion2b_*`);
      OpenAI's .pt     -> True (TorchScript archive: only OpenAI ships those);
      a state-dict file-> True when open_clip knows an `openai` tag for the model: such a file of
                          the papers' backbone is taken to hold OpenAI's weights (--quick-gelu off
                          for other weights of that architecture);
      none / toy       -> False (the model config's own activation)."""
    if pretrained in (None, "none", "toy") or name == TOY_MODEL:
        return False
    path = Path(pretrained).expanduser()
    if path.is_file():
        return _is_torchscript(path) or bool(open_clip.get_pretrained_cfg(name, "openai"))
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    return bool(cfg and cfg.get("quick_gelu", False))

def load_clip(name: str, pretrained: str | None, device: torch.device | str = "cpu",
              toy_seed: int = 0, toy_pretrain: dict | None = None, progress_bar: bool = True,
              quick_gelu: bool | None = None) -> ClipView:
    """Build a CLIP as a `ClipView`, in fp32, in eval mode, on `device`.

    name       open_clip model name, or `toy-tiny` (the toy benchmark's model)
    pretrained an open_clip tag (e.g. `openai`), a local weights file (open_clip/state-dict
               `.pt/.pth/.bin/.safetensors`, or OpenAI's original TorchScript `.pt`), `toy` (the
               cached toy pretraining), or `none`
    quick_gelu force QuickGELU on / off; None = `wants_quick_gelu(name, pretrained)`."""
    device = torch.device(device)
    tokenizer_name = "ViT-B-32" if name == TOY_MODEL else name
    if quick_gelu is None:
        quick_gelu = wants_quick_gelu(name, pretrained)
    if quick_gelu and name == TOY_MODEL:
        raise UserError(f"{TOY_MODEL} uses GELU; --quick-gelu on is for OpenAI-style models")
    qg = {"force_quick_gelu": True} if quick_gelu else {}
    if pretrained == "toy":
        if name != TOY_MODEL:
            raise UserError(f"--pretrained toy only exists for --model {TOY_MODEL}")
        clip, ctx = _toy_pretrained(toy_seed, toy_pretrain or data.TOY_CLIP_PRETRAIN, progress_bar)
    elif pretrained in (None, "none"):
        clip, ctx = _create(name, **qg)
    else:
        path = Path(pretrained).expanduser()
        check_model_and_weights(name, pretrained)
        try:
            if path.is_file():
                clip, ctx = _load_weights_file(name, path, qg)
            else:
                clip, ctx = _create(name, pretrained=pretrained, **qg)
        except UserError:
            raise
        except RuntimeError as e:
            msg = str(e)
            if "Failed to download" in msg or "Unknown pretrained" in msg or "not found" in msg.lower() \
                    or "not a known tag" in msg:
                raise UserError(
                    f"could not load weights '{pretrained}' for {name} (offline, or an unknown tag); "
                    f"download them once and pass --pretrained FILE (e.g. OpenAI's ViT-B-16.pt from "
                    f"openaipublic.azureedge.net, or open_clip_pytorch_model.bin of "
                    f"timm/vit_base_patch16_clip_224.openai; both get QuickGELU)") from None
            raise UserError(f"could not load weights '{pretrained}' for {name}: {msg.splitlines()[0][:300]}") from None
        except (FileNotFoundError, OSError, ValueError) as e:
            raise UserError(f"could not load weights '{pretrained}' for {name}: {str(e).splitlines()[0][:300]}") from None
    tokenizer = open_clip.get_tokenizer(tokenizer_name, context_length=ctx)
    return ClipView(clip.float(), tokenizer, ctx).to(device).eval()

def _load_weights_file(name: str, path: Path, qg: dict):
    """A CLIP with the weights of a local file, read safely: OpenAI's TorchScript archive by
    torch.jit.load (the one trusted format that is more than tensors, recognised by its structure;
    it runs no Python unpickling), every other file as plain tensors (torch.load weights_only=True,
    or safetensors). Any failure is one line that names the file."""
    try:
        if _is_torchscript(path):
            with warnings.catch_warnings():        # torch 2.x: "torch.jit.load is deprecated"
                warnings.simplefilter("ignore", FutureWarning)
                sd = torch.jit.load(str(path), map_location="cpu").state_dict()
            for key in ("input_resolution", "context_length", "vocab_size"):   # as open_clip's loader
                sd.pop(key, None)
            clip, ctx = _create(name, **qg)
            kept = clip.state_dict()               # a scripted module also lists non-persistent buffers
            sd = {k: v for k, v in sd.items() if k in kept or k not in dict(clip.named_buffers())}
            open_clip.model.resize_pos_embed(sd, clip)
            clip.load_state_dict(sd)
        elif name == TOY_MODEL:
            clip, ctx = _create(name)
            sd = torch.load(path, map_location="cpu", weights_only=True)
            clip.load_state_dict(sd.get("state_dict", sd))
        else:   # open_clip reads it with torch.load(weights_only=True) or safetensors
            clip, ctx = _create(name, pretrained=str(path), **qg)
        return clip, ctx
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 -- a weights file can fail in many ways; none is a bug here
        # torch's own message may advise weights_only=False, which would run the file's code: never shown
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        if "weights_only" in str(e) or "pickle" in str(e).lower() or isinstance(e, (EOFError, zipfile.BadZipFile)):
            what = "not a weights file this loader reads safely (a state dict of tensors, .safetensors, or OpenAI's TorchScript .pt), or it is truncated"
        elif isinstance(e, RuntimeError) and ("size mismatch" in msg or "state_dict" in msg):
            what = f"its weights do not fit --model {name} ({msg})"
        else:
            what = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
        raise UserError(f"could not load --pretrained {path}: {what}") from None

_PRETRAINING = False           # inside the toy CLIP's pretraining (cli_main's Ctrl-C message)
_PRETRAIN_SECONDS = [0.0]      # seconds this process spent pretraining (or waiting for another's)
LOG_EVERY_S = 60.0             # at most this long without a line while pretraining or waiting (no bar)

def toy_cache_path(seed: int = 0, recipe: dict | None = None) -> Path:
    """Where the toy CLIP of (seed, recipe) is cached, keyed by (model config, recipe, world
    version, seed); the lock file next to it has the suffix .lock."""
    # "init": the initial weights are drawn from `seed` too; the field keeps caches built when they
    # came from the caller's RNG state (so depended on the script that filled the cache) unused.
    key = json.dumps({"cfg": data.TOY_CLIP_CFG, "recipe": recipe or data.TOY_CLIP_PRETRAIN,
                      "world": data.TOY_WORLD_VERSION, "seed": seed, "init": "seeded"}, sort_keys=True)
    return cache_dir() / f"toy-clip-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"

def _toy_pretrained(seed: int, recipe: dict, progress_bar: bool):
    """The toy tiny CLIP, pretrained contrastively on the toy world's captions; cached on disk
    (`toy_cache_path`). Deterministic for a seed on a machine. A cache that exists is read without
    the lock (it is written atomically), so a read-only shared cache works; pretraining takes the
    lock, so two runs started together pretrain once, the second waiting (with a line now and then)."""
    global _PRETRAINING
    path = toy_cache_path(seed, recipe)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
        torch.manual_seed(seed)
        clip, ctx = _create(TOY_MODEL)
        if _toy_load_cache(clip, path, quiet=True):
            return clip, ctx
        t0, _PRETRAINING = time.time(), True
        try:
            with _toy_cache_lock(path):
                _remove_leftovers(path.parent, [path.name])          # of a save that was killed
                if not _toy_load_cache(clip, path, quiet=False):     # another process may have built it
                    _toy_pretrain_and_cache(clip, ctx, path, seed, recipe, progress_bar)
            return clip, ctx
        finally:
            _PRETRAINING = False
            _PRETRAIN_SECONDS[0] += time.time() - t0

def _toy_load_cache(clip, path: Path, quiet: bool) -> bool:
    if not path.is_file():
        return False
    try:
        clip.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return True
    except Exception:  # noqa: BLE001 -- a truncated or foreign file: rebuilt under the lock
        if not quiet:
            print(f"warning: toy CLIP cache {path} unreadable; rebuilding it", file=sys.stderr, flush=True)
        return False

@contextlib.contextmanager
def _toy_cache_lock(path: Path):
    """The cache's lock file, held while pretraining; waits for another process that holds it,
    printing a line at once and then every LOG_EVERY_S seconds."""
    lock_path = path.with_suffix(".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(lock_path, "a")
    except OSError as e:
        raise UserError(f"the toy CLIP cache {path.parent} is not writable ({e.strerror or type(e).__name__}); "
                        "set CLCLIP_CACHE to a folder you can write to, e.g. CLCLIP_CACHE=/tmp/clip-cl") from None
    with lock:
        t0, last = time.time(), None
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.time()
                if last is None or now - last >= LOG_EVERY_S:
                    print(f"waiting for another process that is pretraining the toy CLIP (lock {lock_path}; "
                          f"{now - t0:.0f} s so far)", file=sys.stderr, flush=True)
                    last = now
                time.sleep(0.5)
        if last is not None:
            print(f"the other process finished after {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        yield

def _toy_pretrain_and_cache(clip, ctx, path: Path, seed: int, recipe: dict, progress_bar: bool) -> None:
    print(f"pretraining the toy CLIP once ({recipe['steps']} steps; cached in {path})", file=sys.stderr, flush=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=ctx)
    pretrain_contrastive(clip, tokenizer, data.toy_pretraining_batches(seed, recipe["batch_size"]),
                         recipe, seed, progress_bar)
    try:
        atomic_torch_save(clip.state_dict(), path)
    except OSError as e:
        print(f"warning: could not cache the toy CLIP in {path} ({e.strerror or type(e).__name__}); the next run "
              "pretrains again", file=sys.stderr, flush=True)

def pretrain_contrastive(clip: nn.Module, tokenizer, batches: Iterator, recipe: dict, seed: int,
                         progress_bar: bool = True) -> None:
    """Standard CLIP pretraining (symmetric InfoNCE, learnable temperature) on CPU. Without a
    progress bar (a log file, --no-progress) a line every tenth of the steps and at least every
    LOG_EVERY_S seconds."""
    torch.manual_seed(seed)  # the CPU stream only: callers' python, numpy and CUDA streams stay as they were
    clip.train()
    opt = torch.optim.AdamW(clip.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    show_bar = progress_bar and sys.stderr.isatty()
    bar = progress(range(recipe["steps"]), show_bar, desc="toy CLIP", leave=False)
    t0 = last = time.time()
    tenth = max(1, recipe["steps"] // 10)
    for step in bar:
        set_lr(opt, cosine_lr(step, recipe["lr"], recipe["warmup"], recipe["steps"]))
        images, captions = next(batches)
        tok = tokenizer(captions)
        img = F.normalize(clip.encode_image(images), dim=-1)
        txt = F.normalize(clip.encode_text(tok), dim=-1)
        logits = clip.logit_scale.exp().clamp(max=100) * img @ txt.T       # (B, B)
        y = torch.arange(len(images))
        loss = (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        now = time.time()
        if not show_bar and ((step + 1) % tenth == 0 or now - last >= LOG_EVERY_S):
            last = now
            print(f"toy CLIP pretraining: step {step + 1}/{recipe['steps']}, loss {loss.item():.3f}, "
                  f"{now - t0:.0f} s", file=sys.stderr, flush=True)
    clip.eval()

class SplitAttention(nn.Module):
    """nn.MultiheadAttention with its packed in_proj split into q, k, v and out `nn.Linear`s.

    open_clip's default blocks read `attn.in_proj_weight` / `out_proj.weight` functionally
    inside F.multi_head_attention_forward, so a module put in their place is silently bypassed.
    Here each projection is a module that is called, so LoRA / hooks / projections on it work.
    Same call signature as nn.MultiheadAttention (batch_first=True) as used by open_clip."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        d = mha.embed_dim
        self.num_heads = mha.num_heads
        self.q, self.k, self.v = (nn.Linear(d, d, bias=mha.in_proj_bias is not None) for _ in range(3))
        self.out = nn.Linear(d, d, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            for i, lin in enumerate((self.q, self.k, self.v)):
                lin.weight.copy_(mha.in_proj_weight[i * d:(i + 1) * d])  # (3d, d) -> 3 x (d, d)
                if lin.bias is not None:
                    lin.bias.copy_(mha.in_proj_bias[i * d:(i + 1) * d])
            self.out.weight.copy_(mha.out_proj.weight)
            if self.out.bias is not None:
                self.out.bias.copy_(mha.out_proj.bias)

    def forward(self, q_x, k_x=None, v_x=None, need_weights=False, attn_mask=None):
        k_x = q_x if k_x is None else k_x
        v_x = q_x if v_x is None else v_x
        N, L, d = q_x.shape
        h = self.num_heads
        q = self.q(q_x).view(N, L, h, d // h).transpose(1, 2)      # (N, h, L, d/h)
        k = self.k(k_x).view(N, -1, h, d // h).transpose(1, 2)     # (N, h, S, d/h)
        v = self.v(v_x).view(N, -1, h, d // h).transpose(1, 2)     # (N, h, S, d/h)
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, h, L, d/h)
        o = o.transpose(1, 2).reshape(N, L, d)                     # (N, L, d)
        return self.out(o), None

class ClipView(nn.Module):
    """open_clip's CLIP, rewired so that the methods see plain `nn.Linear` layers.

    Adapted layers, named `<tower>.<block>.<kind>` with tower in {visual, text}, kind in
    {attn.q, attn.k, attn.v, attn.out, mlp.c_fc, mlp.c_proj}, plus `visual.proj` (the visual
    projection as an nn.Linear with weight = open_clip's proj^T). `layers()` iterates them in
    that canonical order. Features equal plain open_clip's (tests/test_common.py)."""

    KINDS = ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.c_fc", "mlp.c_proj")

    def __init__(self, clip: nn.Module, tokenizer, context_length: int):
        super().__init__()
        if not hasattr(clip, "transformer") or not hasattr(clip.visual, "transformer"):
            raise UserError("only CLIP models with a ViT image tower and a transformer text tower are supported")
        for blk in list(clip.visual.transformer.resblocks) + list(clip.transformer.resblocks):
            if not isinstance(blk.attn, nn.MultiheadAttention):
                raise UserError("unsupported open_clip block type (need the standard ResidualAttentionBlock)")
            blk.attn = SplitAttention(blk.attn)
        proj = clip.visual.proj                                      # (width, embed)
        clip.visual.proj = None  # open_clip's VisionTransformer.forward then returns the pooled feature
        self.visual_proj = nn.Linear(proj.shape[0], proj.shape[1], bias=False)
        with torch.no_grad():
            self.visual_proj.weight.copy_(proj.T)                    # (embed, width)
        self.clip = clip
        self.tokenizer = tokenizer
        self.context_length = context_length
        vc = clip.visual
        self.image_size = vc.image_size[0] if isinstance(vc.image_size, (tuple, list)) else vc.image_size

    # -- canonical iteration ----------------------------------------------------------------
    def blocks(self, tower: str) -> nn.ModuleList:
        return (self.clip.visual.transformer if tower == "visual" else self.clip.transformer).resblocks

    def layers(self, towers=("visual", "text"), kinds=KINDS, proj: bool = True) -> dict[str, nn.Module]:
        """name -> module, in canonical order (visual blocks, [visual.proj], text blocks)."""
        out = {}
        for tower in ("visual", "text"):
            if tower not in towers:
                continue
            for i, blk in enumerate(self.blocks(tower)):
                for kind in kinds:
                    a, b = kind.split(".")
                    out[f"{tower}.{i}.{kind}"] = getattr(getattr(blk, a), b)
            if tower == "visual" and proj:
                out["visual.proj"] = self.visual_proj
        return out

    def get_layer(self, name: str) -> nn.Module:
        return self.layers()[name]

    def set_layer(self, name: str, module: nn.Module) -> None:
        """Replace an adapted layer (e.g. by a LoRALinear wrapping it)."""
        if name == "visual.proj":
            self.visual_proj = module
            return
        tower, i, a, b = name.split(".")
        setattr(getattr(self.blocks(tower)[int(i)], a), b, module)

    # -- encoders -------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.visual_proj(self.clip.visual(images))               # (N, width) -> (N, embed)
        return F.normalize(x, dim=-1) if normalize else x

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Tokens cut to the longest prompt in the batch: CLIP's text encoder is causal and pools
        at the EOT token, so padding after the longest EOT never influences any output (exact;
        tests/test_common.py checks it against the full context)."""
        tok = self.tokenizer(texts)                                  # (N, ctx)
        L = int((tok != 0).sum(1).max())
        return tok[:, :max(L, 1)]

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        c = self.clip
        L = tokens.shape[1]
        x = c.token_embedding(tokens) + c.positional_embedding[:L]  # (N, L, width)
        mask = c.attn_mask[:L, :L] if c.attn_mask is not None else None
        x = c.transformer(x, attn_mask=mask)
        x = c.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # EOT token (N, width)
        tp = c.text_projection
        x = tp(x) if isinstance(tp, nn.Linear) else x @ tp          # (N, embed)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_texts(self, texts: list[str], device, normalize: bool = True) -> torch.Tensor:
        return self.encode_text(self.tokenize(texts).to(device), normalize=normalize)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def forward(self, images, tokens):
        return self.encode_image(images, True), self.encode_text(tokens, True)

# ---------------------------------------------------------------------------------------------
# ---- 3. The training loop's parts (loaders, lr schedule, precision, checks) ----
# ---------------------------------------------------------------------------------------------


def _worker_init(worker_id: int) -> None:
    s = torch.initial_seed() % 2**32  # distinct per worker, derived from the loader's generator
    np.random.seed(s)
    random.seed(s)

def make_loader(ds, batch_size: int, shuffle: bool, seed: int, workers: int = 0,
                drop_last: bool = False, device: torch.device | None = None):
    """A DataLoader whose shuffling and worker RNGs are a function of `seed` only. One pass
    (evaluation, statistics); a training loop draws from `forever(make_loader(...))`."""
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=workers,
        worker_init_fn=_worker_init if workers else None, drop_last=drop_last,
        pin_memory=device is not None and device.type == "cuda",
        persistent_workers=False)

def default_workers() -> int:
    """--workers on MTIL when not given: one per CPU core this process may use, one core left to
    the training loop, at least 1 and at most 8 (about what feeds one GPU at batch 64)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1))

class _Epochs(torch.utils.data.Sampler):
    """Endless keys (epoch seed, batch index in the epoch, indices): epoch after epoch, `batch_sampler`'s
    batches, and before each epoch the int64 that a fresh iterator of the DataLoader draws from
    `generator`. So the generator is consumed exactly as when the DataLoader is iterated again for
    every epoch, and the indices of every batch are the same."""

    def __init__(self, batch_sampler, generator: torch.Generator | None):
        self.batch_sampler, self.generator = batch_sampler, generator

    def __iter__(self):
        while True:
            epoch_seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator))
            n = 0
            for n, indices in enumerate(self.batch_sampler, 1):
                yield epoch_seed, n - 1, list(indices)
            if n == 0:
                raise UserError("a training split is empty (check the dataset / --few-shot)")

class _Batches(torch.utils.data.Dataset):
    """Reads one whole batch per key of `_Epochs` and collates it.
    CHOICE: the random numbers of a batch (random crops) come from its own seed, (epoch seed +
    batch index): the same batch whichever process reads it, so the data do not depend on
    --workers (0 reads them in this process, whose random streams are left as they were). A
    re-iterated DataLoader draws them from each worker's stream, started anew every epoch."""

    def __init__(self, ds, collate_fn):
        self.ds, self.collate_fn = ds, collate_fn

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        epoch_seed, i, indices = key
        seed = (epoch_seed + i) % 2**63
        in_worker = torch.utils.data.get_worker_info() is not None
        states = None if in_worker else (random.getstate(), np.random.get_state())
        with contextlib.nullcontext() if in_worker else torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            batch = self.collate_fn([self.ds[j] for j in indices])
        if states is not None:
            random.setstate(states[0])
            np.random.set_state(states[1])
        return batch

def _as_is(batch):
    return batch

def forever(loader) -> Iterator:
    """The batches of `loader` epoch after epoch (a new shuffled epoch each pass, as ZSCL's
    iteration loop draws them), from one iterator: its worker processes start once, not once per
    epoch (a 5-shot set is one batch: re-iterating the loader would start them every step). The
    indices are those of iterating `loader` again for each epoch (`_Epochs`); the random
    transforms of a batch are drawn from the batch's own seed (`_Batches`)."""
    if not isinstance(loader, torch.utils.data.DataLoader) or loader.batch_sampler is None:
        yield from _cycle(loader)                                  # any other iterable: cycled as it is
        return
    endless = torch.utils.data.DataLoader(
        _Batches(loader.dataset, loader.collate_fn), batch_size=None,
        sampler=_Epochs(loader.batch_sampler, loader.generator), num_workers=loader.num_workers,
        collate_fn=_as_is, pin_memory=loader.pin_memory,
        generator=torch.Generator())  # its own (unused) worker seeds: the global RNG is not drawn from
    yield from endless

def _cycle(loader) -> Iterator:
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise UserError("a training split is empty (check the dataset / --few-shot)")

def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """ZSCL's `cosine_lr`: linear warm-up over `warmup` steps, then cosine from base_lr to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    e = step - warmup
    es = max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * e / es)) * base_lr

def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

def autocast(device: torch.device, amp: str):
    """Autocast for `--amp fp16|bf16` on CUDA; a no-op for `off` and `tf32` (set for the whole run
    by `set_precision`) and on the CPU (CPU runs are fp32)."""
    if amp in AMP_DTYPES and device.type == "cuda":
        return torch.autocast("cuda", dtype=AMP_DTYPES[amp])
    return contextlib.nullcontext()

def set_precision(device: torch.device, amp: str) -> None:
    """`--amp tf32`: fp32 tensors, matrix products on TF32 tensor cores (CUDA, Ampere and later),
    for everything the run computes on the GPU (training, statistics, evaluation). Every other
    setting keeps PyTorch's default, fp32 products ("highest"). Nothing changes on the CPU."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if amp == "tf32" else "highest")

def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 training on CUDA (as torch.amp's recipe); disabled (a pass-through) otherwise."""
    return torch.amp.GradScaler("cuda", enabled=amp == "fp16" and device.type == "cuda")

# the current task's step losses: LossLog.mean records them, Run.finish_task reads them (the
# warning for a task whose loss did not fall), Run.begin_task clears them
_LOSS_TRACE: list[float] = []

# CHOICE: the step losses are read from the device every 50 steps (a non-finite loss stops the task
# at most 49 steps late; nothing of an unfinished task is saved).
LOSS_READ_EVERY = 50

class LossLog:
    """The loss of every step of a task, kept where it was computed: no host read (on CUDA, a
    device sync) per step. Every `every` steps the new ones are read at once and a non-finite
    loss raises NonFiniteLoss naming the task and its first non-finite step; `mean(steps)` reads
    the rest (checked too) and returns the mean over the steps, summed in step order as
    `sum += loss.item()` sums them. check=False: a statistic only (read at the end, unchecked)."""

    def __init__(self, task: str, steps: int, device, every: int | None = None, check: bool = True):
        self.task, self.every, self.check = task, every or LOSS_READ_EVERY, check
        self.values = torch.zeros(max(steps, 1), dtype=torch.float64, device=device)  # (steps,)
        self.host: list[float] = []                          # the values read so far, steps 0..len-1

    def add(self, loss: torch.Tensor, step: int) -> None:
        self.values[step] = loss.detach()                    # a device copy, no read
        if self.check and (step + 1) % self.every == 0:
            self._read(step + 1)

    def _read(self, upto: int) -> None:
        first = len(self.host)
        new = self.values[first:upto].tolist() if upto > first else []   # one host read
        for k, v in enumerate(new):
            if self.check and not math.isfinite(v):
                raise NonFiniteLoss(f"loss became {v} in task '{self.task}' at step {first + k}; "
                                    "(the lr is probably too high)")
        self.host += new

    def mean(self, steps: int) -> float:
        """The mean loss of steps 0..steps-1."""
        self._read(steps)
        _LOSS_TRACE[:] = self.host[:steps]                   # Run.finish_task: did the loss fall?
        total = 0.0
        for v in self.host[:steps]:                          # in step order (not sum(): Python >= 3.12 compensates)
            total += v
        return total / max(steps, 1)

def progress(it: Iterable, enabled: bool, **kw):
    if not enabled:
        return it
    from tqdm import tqdm
    return tqdm(it, **kw)

def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

# ---------------------------------------------------------------------------------------------
# ---- 4. Input statistics and linear algebra the methods share ----
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def input_hooks(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]):
    """Call fn(name, x) with the input x of every module in `modules` on each forward."""
    def hook(name):
        def h(mod, inp, out):
            fn(name, inp[0].detach())  # returns None: the module's output is never replaced
        return h

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()

@torch.no_grad()
def accumulate_grams(model_fn: Callable[[object], None], loader: Iterable, modules: dict[str, nn.Module],
                     dtype=torch.float64, max_batches: int | None = None,
                     per_batch: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Uncentered Gram matrices G = X^T X of each module's inputs over a loader, on the model's
    device. X stacks every token of every sample: input (..., d) -> (M, d). `per_batch(name, G_b)`
    may transform each batch's Gram before it is summed (e.g. a normalisation)."""
    grams: dict[str, torch.Tensor] = {}

    def fn(name, x):
        X = x.reshape(-1, x.shape[-1]).to(dtype)                             # (M, d)
        G = X.T @ X                                                          # (d, d)
        if per_batch is not None:
            G = per_batch(name, G)
        grams[name] = grams[name] + G if name in grams else G

    with input_hooks(modules, fn):
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            model_fn(batch)
    return grams

def orthonormalize(U: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of span(U) (column order kept as far as possible). (d, k) -> (d, rank).
    A column whose part outside the span of the earlier ones is below sqrt(eps) (relative) is
    dependent: round-off leaves exactly dependent columns a residual of a few eps, not zero."""
    if U.shape[1] == 0:
        return U
    Q, R = torch.linalg.qr(U)
    keep = R.diagonal().abs() > R.diagonal().abs().max() * max(U.shape) * torch.finfo(U.dtype).eps ** 0.5
    return Q[:, keep]

# ---------------------------------------------------------------------------------------------
# ---- 5. Evaluation (zero-shot heads, prompts) and the MTIL metrics, table and heatmap (ZSCL mtil/results.ipynb) ----
# ---------------------------------------------------------------------------------------------


def class_tokens(model: ClipView, classnames: list[str], template: str, device) -> torch.Tensor:
    """The tokens of one prompt per class, on `device`: built once per task, not every step (the
    tokenizer runs on the CPU). (C, L)"""
    return model.tokenize([template.format(c) for c in classnames]).to(device)

def class_text_features(model: ClipView, classnames: list[str], template: str, device,
                        tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised text features of one prompt per class (with grad: used in training); `tokens`:
    those of `class_tokens` when the caller built them once. (C, embed)"""
    if tokens is None:
        tokens = class_tokens(model, classnames, template, device)
    return model.encode_text(tokens, normalize=True)

@torch.no_grad()
def zeroshot_head(model: ClipView, classnames: list[str], templates: list[str], device,
                  chunk: int = 256) -> torch.Tensor:
    """ZSCL's zero-shot classifier: encode every template per class, normalise, average,
    renormalise. Returns W: (embed, C)."""
    prompts = [t.format(c) for c in classnames for t in templates]         # C * T prompts
    feats = torch.cat([model.encode_texts(prompts[i:i + chunk], device) for i in range(0, len(prompts), chunk)])
    feats = feats.view(len(classnames), len(templates), -1).mean(1)        # (C, embed)
    return F.normalize(feats, dim=-1).T                                     # (embed, C)

def eval_templates(templates: list[str], d: int, t: int, rule: str) -> list[str]:
    """The prompts of dataset d's zero-shot head in the accuracy row after task t (t = -1: the
    zero-shot row). rule: `ensemble` every template (ZSCL mtil/src/models/evaluation.py);
    `first` templates[0] only; `first-before` templates[0] for datasets trained before task t,
    every template for task t and later ones (the rule of GNSP's evaluation.py, see gnsp.py)."""
    if rule == "first" or (rule == "first-before" and d < t):
        return templates[:1]
    return list(templates)

@torch.no_grad()
def evaluate(model: ClipView, task, device, batch_size: int = 128, workers: int = 0,
             amp: str = "off", progress_bar: bool = False, templates: list[str] | None = None,
             heads: dict | None = None) -> float:
    """Top-1 accuracy (%) of `model` on task.test with a zero-shot head of `templates` (default:
    every template of the task). `heads`: a cache of the heads already built for this model
    (key: class names and templates), shared by the columns of one row."""
    was_training = model.training
    model.eval()
    templates = templates or task.templates
    key = (tuple(task.classnames), tuple(templates))
    with torch.inference_mode(), autocast(device, amp):
        W = heads.get(key) if heads is not None else None
        if W is None:
            W = zeroshot_head(model, task.classnames, templates, device)  # (embed, C)
            if heads is not None:
                heads[key] = W
        correct, n = torch.zeros((), dtype=torch.int64, device=device), 0   # counted on the device
        loader = make_loader(task.test, batch_size, shuffle=False, seed=0, workers=workers, device=device)
        for images, labels in progress(loader, progress_bar, desc=f"eval {task.name}", leave=False):
            f = model.encode_image(images.to(device, non_blocking=True), normalize=True)  # (N, embed)
            pred = (f @ W.to(f.dtype)).argmax(-1)
            correct += (pred == labels.to(device, non_blocking=True)).sum()
            n += len(labels)
    model.train(was_training)
    return 100.0 * int(correct) / max(n, 1)

def eval_sets(tasks: list, t: int, benchmark: str) -> list:
    """What each column of the accuracy row after task t (t = -1: zero-shot) measures: a Task
    whose `test` is classified over its `classnames`, or None (no value: NaN in the row).
      mtil   the task itself: its test set over its own classes (the task id is known)
      xtail  domain d's test set, labels offset + label, over the union of ALL domains' classes
             (RAIL primal_RAIL.py: merged_classnames, targets += tested_cls_num), seen or not
      cil    k = t (the zero-shot row: the last step): column j <= k = the test images of step
             j's classes among tasks[k].test (every class seen by step k), over the classes seen
             by step k (MoE-Adapters cil/continual_clip/models.py: current_class_names); j > k None.
    Pooled over the columns j <= k this is the source's accuracy after step k (cil_metrics)."""
    kind = protocol(benchmark)
    if kind == "mtil":
        return list(tasks)
    if kind == "xtail":
        return [data.Task(task.name, task.union_classnames, task.templates, None,
                          data.Relabelled(task.test, list(range(len(task.test))),
                                          [task.offset + y for y in data.dataset_targets(task.test)]))
                for task in tasks]
    k = t if t >= 0 else len(tasks) - 1
    seen = tasks[k]
    y = data.dataset_targets(seen.test)
    cols = []
    for j, task in enumerate(tasks):
        if j > k:
            cols.append(None)
            continue
        lo, hi = task.new_start, len(task.union_classnames)         # step j's classes in the union
        idx = [i for i, label in enumerate(y) if lo <= label < hi]
        cols.append(data.Task(task.name, seen.union_classnames, seen.templates, None,
                              data.Relabelled(seen.test, idx, [y[i] for i in idx])))
    return cols

def evaluate_all(model: ClipView, tasks: list, args, device, t: int = -1) -> list[float]:
    """One row of the accuracy matrix after task t (-1: zero-shot): accuracy on every column of
    the benchmark (eval_sets: MTIL's datasets with their own heads; CIL's and X-TAIL's over their
    union heads), with the prompts of `--eval-prompts` (eval_templates) and the precision of
    `--amp`. NaN for a CIL step not seen yet."""
    heads: dict = {}
    return [float("nan") if task is None else
            evaluate(model, task, device, args.eval_batch_size, args.workers, args.amp, args.progress,
                     eval_templates(task.templates, d, t, args.eval_prompts), heads)
            for d, task in enumerate(eval_sets(tasks, t, args.benchmark))]

# ---- the alignment diagnostics: modality gap and retrieval on held-out image-caption pairs ----

# GNSP's ImageNet reference sample per task at its default size (Ppp-Ttt/GNSP@55746ce:
# configs/mtil_order_{I,II}.json ref_data_nums) and its seeds (helpers.py:prepare_ref_dataset:
# 42 + the dataset's Order-I index; gnsp.py draws them with --seed + that index).
ALIGN_EXCLUDED_REF_N = 1000
ALIGN_SEED_OFFSET = 1000   # CHOICE: the held-out draw's seed --seed + 1000, none of the reference seeds (+0..10)

def alignment_pairs(args, model: ClipView, exclude: set[str] | None = None):
    """The held-out image-caption pairs of the alignment metrics, the same for every script, or
    None (--align-n 0, or no ImageNet on MTIL: a one-line note).
    toy: data.toy_reference(seed=0, n=--align-n, split="heldout"), a split the reference pairs
    and the toy CLIP's pretraining never draw from.
    mtil: ImageNet-train images with the eval transform: the first --align-n of the draw with
    seed --seed + 1000 (data.imagenet_reference) that lie in none of `exclude`, by default the
    11 per-task reference samples GNSP draws at its defaults (1000 images each, seed --seed +
    the dataset's Order-I index), so that no script, GNSP included, is measured on an image it
    trained on. gnsp.py passes the files of the samples it really uses.
    CHOICE (every script but gnsp.py, which needs ImageNet anyway): without ImageNet the run goes
    on without the metrics."""
    if not args.align_n:
        return None
    if is_toy(args.benchmark):
        return data.toy_reference(seed=0, n=args.align_n, split="heldout")
    if data.imagenet_missing(args.data_root):
        print(f"note: no ImageNet train folder ({Path(args.data_root).expanduser() / 'ImageNet' / 'train'}): "
              "modality gap / retrieval on held-out pairs are not reported", flush=True)
        return None
    if exclude is None:
        exclude = {f for i in range(len(data.MTIL_ORDERS["I"]))
                   for f in data.imagenet_reference(args.data_root, ALIGN_EXCLUDED_REF_N, args.seed + i).files}
    ev = data.clip_transforms(model.image_size)[1]
    cand = data.imagenet_reference(args.data_root, args.align_n + len(exclude), args.seed + ALIGN_SEED_OFFSET, ev)
    keep = [i for i, f in enumerate(cand.files) if f not in exclude][:args.align_n]
    if not keep:
        print("note: every ImageNet train image is in a reference sample: modality gap / retrieval on "
              "held-out pairs are not reported", flush=True)
        return None
    return data.ImageNetReference([cand.files[i] for i in keep], [cand.captions[i] for i in keep], ev)

def alignment_from_features(U: torch.Tensor, V, idx: torch.Tensor, route: torch.Tensor | None = None) -> dict:
    """The alignment metrics of N image-caption pairs from their features.
    U: (N, e) normalised image features; idx: (N,) the index of image i's caption among the C
    distinct captions; V: (C, e) their normalised text features, or a dict route -> (C, e) when
    the text features depend on a route and image i is scored under its own route[i] ((N,)).
    With S[i, c] = <u_i, v_c> (under route[i]):
      modality gap = ||mean_i u_i - mean_i v_idx(i)||_2   (Liang et al., NeurIPS 2022, arXiv 2203.02053)
      i2t_r1 = % of images whose top caption is their own (argmax_c S[i, c] = idx(i))
      t2i_r1 = % of distinct captions whose top image has that caption (idx(argmax_i S[i, c]) = c)
    CHOICE: recall over the distinct captions (several images may share one, as ImageNet's
    class captions do); ties go to the lower index (argmax)."""
    if not isinstance(V, dict):
        V, route = {0: V}, torch.zeros(len(U), dtype=torch.long, device=U.device)
    C = next(iter(V.values())).shape[0]
    S = U.new_empty(len(U), C)                                         # (N, C) similarities
    V_pair = torch.empty_like(U)                                       # (N, e) each image's caption feature
    for r, V_r in V.items():
        rows = (route == r).nonzero().squeeze(1)
        S[rows] = U[rows] @ V_r.T                                      # (n_r, e) @ (e, C)
        V_pair[rows] = V_r[idx[rows]]
    i2t = (S.argmax(1) == idx).float().mean()                          # (N,)
    t2i = (idx[S.argmax(0)] == torch.arange(C, device=U.device)).float().mean()  # (C,)
    return {"modality_gap": round((U.mean(0) - V_pair.mean(0)).norm().item(), 4),
            "i2t_r1": round(100 * i2t.item(), 2), "t2i_r1": round(100 * t2i.item(), 2)}

@torch.no_grad()
def alignment_metrics(model: ClipView, pairs, args, device,
                      encode_image: Callable[[torch.Tensor], tuple] | None = None,
                      encode_texts: Callable[[list[str], int], torch.Tensor] | None = None) -> dict:
    """modality_gap, i2t_r1, t2i_r1 (alignment_from_features) of `model` on held-out `pairs`
    (alignment_pairs), at the precision of evaluation (--amp). A method whose deployed encoders
    depend on the input passes its own: encode_image(images on device) -> (normalised features
    (n, e), route (n,) ints), and encode_texts(captions, route) -> normalised (C, e); by default
    the plain encoders, one route."""
    model.eval()
    if encode_image is None:
        def encode_image(x):
            return model.encode_image(x, normalize=True), torch.zeros(len(x), dtype=torch.long, device=x.device)
    if encode_texts is None:
        def encode_texts(captions, r):
            return model.encode_texts(captions, device)
    U, routes, caps = [], [], []
    with autocast(device, args.amp):
        for images, captions in make_loader(pairs, args.eval_batch_size, False, 0, args.workers, device=device):
            u, r = encode_image(images.to(device, non_blocking=True))
            U.append(u.float())
            routes.append(r)
            caps += list(captions)
        U, route = torch.cat(U), torch.cat(routes)                     # (N, e), (N,)
        ids = {c: i for i, c in enumerate(dict.fromkeys(caps))}
        uniq = list(ids)
        idx = torch.tensor([ids[c] for c in caps], device=U.device)    # (N,) caption id of each image
        V = {r: torch.cat([encode_texts(uniq[i:i + 256], r).float() for i in range(0, len(uniq), 256)])  # (C, e)
             for r in route.unique().tolist()}
    return alignment_from_features(U, V, idx, route)

def alignment_note(info: dict, zero_shot: dict | None = None) -> str:
    """One line under the task's line: the held-out metrics (the untouched model's in brackets)."""
    z = zero_shot or {}
    def part(key: str, fmt: str, label: str = "") -> str:
        return f"{info[key]:{fmt}}" + (f" ({label}{z[key]:{fmt}})" if key in z else "")
    return (f"held-out pairs: modality gap {part('modality_gap', '.3f', 'zero-shot ')}"
            f"  R@1 image->text {part('i2t_r1', '.1f')}  text->image {part('t2i_r1', '.1f')}")

class Alignment:
    """A run's alignment diagnostics: the held-out pairs (alignment_pairs) and the untouched
    model's metrics, measured when the run is set up (so a resumed run still has them).
    `info(model, t, args, device, ...)`: what a script's evaluate adds after task t (t = -1: the
    zero-shot metrics), {} without pairs."""

    def __init__(self, model: ClipView, args, device, exclude: set[str] | None = None):
        self.pairs = alignment_pairs(args, model, exclude)
        self.zero_shot = None if self.pairs is None else alignment_metrics(model, self.pairs, args, device)

    def info(self, model: ClipView, t: int, args, device, encode_image=None, encode_texts=None) -> dict:
        if self.pairs is None:
            return {}
        if t < 0:
            return {**self.zero_shot, "note": alignment_note(self.zero_shot, None)}
        m = alignment_metrics(model, self.pairs, args, device, encode_image, encode_texts)
        return {**m, "note": alignment_note(m, self.zero_shot)}

def mtil_metrics(acc) -> dict:
    """ZSCL's Transfer / Average / Last for an accuracy matrix A[t, d] (rows = after task t,
    columns = datasets in training order). A run stopped early has fewer rows than columns:
    Transfer uses the columns d >= 1 that have at least one row t < d; Average is the mean of
    every entry present; Last is the mean of the last row.

      Transfer_d = mean_{t < d} A[t, d]   (d = 2..T, 1-based)   Transfer = mean_d Transfer_d
      Avg_d      = mean_t A[t, d]                               Average  = mean_d Avg_d
      Last_d     = A[T, d]                                      Last     = mean_d Last_d
    """
    A = np.asarray(acc, dtype=float)
    if A.ndim != 2 or A.shape[0] == 0:
        raise ValueError("accuracy matrix must be 2-D with at least one row")
    rows, cols = A.shape
    transfer_d = [float(A[:min(d, rows), d].mean()) for d in range(1, cols)]
    avg_d = A.mean(0).tolist()
    last_d = A[-1].tolist()
    return {"transfer": float(np.mean(transfer_d)) if transfer_d else float("nan"),
            "average": float(np.mean(avg_d)), "last": float(np.mean(last_d)),
            "transfer_per_dataset": transfer_d, "average_per_dataset": avg_d, "last_per_dataset": last_d}

def cil_group_sizes(tasks: list) -> list[int]:
    """The test images of each CIL step's new classes (the weights of cil_metrics)."""
    sizes = [len(t.test) for t in tasks]
    return [sizes[0]] + [b - a for a, b in zip(sizes, sizes[1:])]

def cil_metrics(acc, sizes: list[int]) -> dict:
    """The CIL metrics of MoE-Adapters (cil/main.py; continuum metrics/logger.py:Logger.accuracy)
    for an accuracy matrix A[k, j] (row k = after step k, column j = accuracy on step j's classes'
    test images within the head of every class seen; NaN for j > k) and the test images per step
    `sizes`:
      acc_k = sum_{j <= k} n_j A[k, j] / sum_{j <= k} n_j   the accuracy over every test image seen
      Avg   = mean_k acc_k (every step, the first included: statistics.mean(acc_list))
      Last  = acc_K, the final step's."""
    A = np.asarray(acc, dtype=float)
    if A.ndim != 2 or A.shape[0] == 0:
        raise ValueError("accuracy matrix must be 2-D with at least one row")
    n = np.asarray(sizes, dtype=float)
    cil = [float(np.dot(A[k, :k + 1], n[:k + 1]) / n[:k + 1].sum()) for k in range(A.shape[0])]
    return {"cil_acc": cil, "avg": float(np.mean(cil)), "last": cil[-1]}

def r1(x: float) -> str:
    """One decimal as ZSCL's results.ipynb rounds (np.around, half to even on the binary value
    times 10): 65.35 -> "65.4", where Python's format gives "65.3"."""
    return f"{np.around(x, 1):.1f}"

def metrics_line(acc, sizes: list[int] | None = None) -> str:
    """"Transfer x   Average y   Last z" (MTIL, X-TAIL), or with CIL's `sizes` "Avg x   Last y"."""
    if sizes is not None:
        m = cil_metrics(acc, sizes)
        return f"Avg {r1(m['avg'])}   Last {r1(m['last'])}"
    m = mtil_metrics(acc)
    return f"Transfer {r1(m['transfer'])}   Average {r1(m['average'])}   Last {r1(m['last'])}"

def format_table(names: list[str], acc, zero_shot: list[float] | None = None, sizes: list[int] | None = None) -> str:
    """The matrix as text, then its metrics (CIL's with `sizes`, cil_metrics; a CIL step not seen
    yet prints "-")."""
    A = np.asarray(acc, dtype=float)
    w = max(8, max(len(n) for n in names) + 1)
    short = [n[:w - 1] for n in names]

    def cell(v):
        return f"{'-':>{w}}" if np.isnan(v) else f"{v:>{w}.1f}"
    lines = [" " * 14 + "".join(f"{s:>{w}}" for s in short)]
    if zero_shot is not None:
        lines.append(f"{'zero-shot':<14}" + "".join(cell(v) for v in zero_shot))
    rows = [n.rsplit("-", 1)[-1] for n in names] if sizes is not None else short  # CIL: "after step3"
    for t, row in enumerate(A):
        lines.append(f"{'after ' + rows[t]:<14}"[:14] + "".join(cell(v) for v in row))
    partial = (f"partial: {A.shape[0]} of {A.shape[1]} tasks trained, not comparable to a full run: "
               if A.shape[0] < A.shape[1] else "")
    lines.append(partial + metrics_line(A, sizes))
    return "\n".join(lines)

def plot_matrix(names: list[str], acc, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    A = np.asarray(acc, dtype=float)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(names), 1 + 0.5 * len(A)))
    im = ax.imshow(A, vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(A)), [f"after {n}" for n in names[:len(A)]], fontsize=8)
    for t in range(A.shape[0]):
        for d in range(A.shape[1] if A.shape[1] <= 25 else 0):       # no numbers on a 50-step CIL matrix
            if not np.isnan(A[t, d]):                                 # NaN: a CIL step not seen yet (blank)
                ax.text(d, t, f"{A[t, d]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if A[t, d] < 60 else "black")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fd, tmp = _temp_beside(Path(path))
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)

# ---------------------------------------------------------------------------------------------
# ---- 6. The run folder (config.json, summary.json, atomic checkpoint, --resume) ----
# ---------------------------------------------------------------------------------------------


def _file_mode() -> int:
    """The mode a plain open() gives a new file: 0o666 less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask

def _temp_beside(path: Path) -> tuple[int, str]:
    """A temporary file next to `path` (`<name>.<random>.tmp`, the pattern `_remove_leftovers`
    knows) with the user's normal permissions (mkstemp alone makes it 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.fchmod(fd, _file_mode())
    return fd, tmp

def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to a temporary file, then rename it over `path`: readers see the old or the
    new file, never half of one; an error leaves no temporary file (a killed process may: the
    next run in that folder removes it)."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def atomic_torch_save(obj, path: Path) -> None:
    """torch.save through a temporary file and a rename (as atomic_write_text)."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def _remove_leftovers(folder: Path, names: Iterable[str]) -> None:
    """Remove the temporary files that interrupted atomic writes of `names` left in `folder`
    (`<name>.<random>.tmp`). Only called by the process that holds the folder's lock (the run
    folder's, or the toy cache entry's), so no write in progress is touched."""
    import glob
    for name in names:
        for leftover in folder.glob(glob.escape(name) + ".*.tmp"):
            with contextlib.suppress(OSError):
                if leftover.is_file():
                    leftover.unlink()

def versions() -> dict:
    import torchvision
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "torchvision": torchvision.__version__, "open_clip": open_clip.__version__}

LOCK_NAME = "run.lock"
RUN_FILES = ("config.json", "summary.json", "acc_matrix.csv", "acc_matrix.png", "checkpoint.pt")
_HELD: weakref.WeakValueDictionary = weakref.WeakValueDictionary()   # folders this process holds, by real path
_CLI_CLAIMS: list = []                        # what cli_main's process claimed early (setup_model)
_ACTIVE_CLAIM: weakref.ref | None = None      # the latest claim (cli_main's advice after a failure)

class RunFolderLock:
    """This process's hold on a run folder: an exclusive flock on `<out>/run.lock`, a file that
    names the holder (pid, host, start, command). The kernel drops a flock when its process ends,
    however it ends, so the folder of a killed run is free again and the next run takes it over
    (and says so: a run that ends normally empties the file, a killed one cannot)."""

    def __init__(self, out: Path, resume: bool):
        self.out, self.resume, self.fd = out, resume, None
        self.created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the run folder {out} ({e.strerror or type(e).__name__}): "
                            "pass an --out where you can write") from None
        path = out / LOCK_NAME
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, _file_mode())
            except OSError as e:
                raise UserError(f"cannot write in the run folder {out} ({e.strerror or type(e).__name__}): "
                                "pass an --out where you can write") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "a process that is starting"
                os.close(fd)
                raise UserError(f"{out} is in use by another run ({holder}): wait for it to end, or pass "
                                "another --out") from None
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:   # not unlinked while we waited for it
                    break
            os.close(fd)
        self.fd = fd
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        if previous:
            print(f"note: taking over {out} from a run that ended without finishing ({previous})",
                  file=sys.stderr, flush=True)
        me = (f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
              + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300])
        os.ftruncate(fd, 0)
        os.pwrite(fd, (me + "\n").encode(), 0)
        _remove_leftovers(out, RUN_FILES)
        with contextlib.suppress(OSError):
            (out / "acc_matrix.tmp.png").unlink()     # the plot's temporary name in earlier versions

    def release(self, failed: bool = False) -> None:
        """Let go of the folder (emptying run.lock: a clean end). After a failure, a folder this
        run created and left empty is removed."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
            if failed and self.created and os.listdir(self.out) == [LOCK_NAME]:
                os.unlink(self.out / LOCK_NAME)
                os.rmdir(self.out)
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = None
        with contextlib.suppress(Exception):
            if _HELD.get(os.path.realpath(self.out)) is self:
                del _HELD[os.path.realpath(self.out)]

    def __del__(self):
        with contextlib.suppress(Exception):
            self.release()

def claim_run_folder(args) -> RunFolderLock:
    """Make `args.out` this process's run folder, before anything is computed: not a file,
    writable, not in use by another live run (run.lock), the leftovers of interrupted writes
    removed, and its state fits the command (--resume needs a checkpoint; without --resume the
    folder must not hold a run). Idempotent within a process."""
    global _ACTIVE_CLAIM
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: pass a folder (it is created if needed)")
    key = os.path.realpath(out)
    lock = _HELD.get(key)
    fresh = lock is None or lock.fd is None
    if fresh:
        lock = RunFolderLock(out, args.resume)
        _HELD[key] = lock
    lock.resume = args.resume
    _ACTIVE_CLAIM = weakref.ref(lock)
    try:
        _check_folder_state(out, args.resume)
    except UserError:
        if fresh:
            lock.release(failed=True)
        raise
    return lock

def _tasks_done(out: Path) -> int:
    """How many finished tasks a run folder's checkpoint holds (0: no checkpoint)."""
    if not (out / "checkpoint.pt").is_file():
        return 0
    try:
        return max(1, len(json.loads((out / "summary.json").read_text())["acc_matrix"]))
    except Exception:  # noqa: BLE001 -- a summary cut short: at least one task is in the checkpoint
        return 1

def _check_folder_state(out: Path, resume: bool) -> None:
    ckpt, summary = out / "checkpoint.pt", out / "summary.json"
    start_over = f"another --out (or delete {out}) to start over"
    if resume and not ckpt.is_file():
        if summary.exists():
            raise UserError(f"--resume: {out} has no checkpoint.pt, so its run cannot be continued; pass {start_over}")
        raise UserError(f"--resume: {out} holds no run to continue (no checkpoint.pt); start without --resume")
    if not resume and (summary.exists() or ckpt.exists()):
        try:
            s = json.loads(summary.read_text())
            what = (f" ({len(s['acc_matrix'])} of {len(s['datasets'])} tasks done"
                    + (", complete)" if len(s["acc_matrix"]) == len(s["datasets"]) else ")"))
        except Exception:  # noqa: BLE001 -- only for the message
            what = ""
        raise UserError(f"{out} already holds a run{what}; pass "
                        + ("--resume to continue it, or " if ckpt.exists() else "") + start_over)

def _release_claims(failed: bool = False) -> None:
    for lock in list(_HELD.values()):
        lock.release(failed=failed)
    _CLI_CLAIMS.clear()

def _is_matrix(v, n: int) -> bool:
    """A per-task list of full accuracy rows (n columns), e.g. igsp's acc_oracle."""
    return isinstance(v, list) and bool(v) and all(isinstance(r, list) and len(r) == n for r in v)

class Run:
    """The run folder of DESIGN.md. Files: config.json, acc_matrix.csv, acc_matrix.png,
    summary.json, checkpoint.pt (the latest finished task: method state + matrix so far).

    CHOICE: one checkpoint file, overwritten atomically after each task (not one per task): a
    full-model checkpoint of ViT-B/16 is ~0.6 GB and only the latest is needed to resume.
    CHOICE: every task starts by re-seeding with (seed, task index), so a resumed run draws the
    same random numbers as an uninterrupted one without replaying RNG state.
    The folder belongs to one live process (`claim_run_folder`, run.lock), from before the model
    loads when started from the command line, else from here."""

    # flags that may differ between a run and its resumption (they do not change the results,
    # or, for --max-tasks, only where the run stops)
    CONFIG_KEYS_IGNORED = {"resume", "no_progress", "progress", "out", "workers", "device", "eval_batch_size",
                           "max_tasks"}
    # ... and per benchmark, the flags it does not read (the toy world needs no files)
    CONFIG_KEYS_UNUSED = {"toy": {"data_root"}, "toy-cil": {"data_root"}, "toy-xtail": {"data_root"}}

    def __init__(self, args: argparse.Namespace, tasks: list, plan: list[HParams]):
        """`tasks`: the benchmark's tasks in training order; `plan`: each task's HParams."""
        self.method, self.args, self.datasets = args.method, args, [t.name for t in tasks]
        self.protocol = protocol(args.benchmark)
        # the head each task's own column is read over (learnt_nothing's chance level)
        self.n_classes = [len(getattr(t, "union_classnames", t.classnames)) for t in tasks]
        self.plan = list(plan)
        # CIL: test images per step (the weights of cil_metrics); None for MTIL and X-TAIL
        self.sizes = cil_group_sizes(tasks) if self.protocol == "cil" else None
        self.n_train = n_train_tasks(args, tasks)
        self.out = Path(args.out)
        setup = _LAST_SETUP if _LAST_SETUP.get("args", lambda: None)() is args else {}
        self.t0 = setup.get("t0", time.time())            # from setup_model on (the model's load included)
        self.t_task = time.time()
        self.pretraining_now = setup.get("pretraining", 0.0)
        self.zero_shot: list[float] | None = None
        self.acc: list[list[float]] = []
        self.extra: dict = {}
        self.state: dict | None = None  # the method state of the last finished task (on resume)
        self.seconds_before = self.pretraining_before = 0.0
        cfg = {k: v for k, v in vars(args).items()}
        self.config = {"method": self.method, "args": cfg, "datasets": self.datasets,
                       "per_task": [{"task": n, **asdict(hp)} for n, hp in zip(self.datasets, plan)],
                       "versions": versions()}
        fresh = os.path.realpath(self.out) not in _HELD
        self._lock = claim_run_folder(args)   # checks: in use, writable, --resume needs a checkpoint...
        try:
            if args.resume:
                self._load(self.out / "checkpoint.pt")
            atomic_write_text(self.out / "config.json", json.dumps(self.config, indent=2, default=str))
        except BaseException:
            if fresh:
                self._lock.release()
            raise

    def _load(self, path: Path) -> None:
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}), so the run cannot be "
                            f"continued; pass another --out (or delete {self.out}) to start over") from None
        ignored = self.CONFIG_KEYS_IGNORED | self.CONFIG_KEYS_UNUSED.get(self.args.benchmark, set())
        want = {k: v for k, v in vars(self.args).items() if k not in ignored}
        have = {k: v for k, v in ck.get("args", {}).items() if k not in ignored}
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if ck.get("method") != self.method or ck.get("datasets") != self.datasets or diff:
            raise UserError(f"checkpoint in {self.out} was made with other settings "
                            f"({', '.join('--' + d.replace('_', '-') for d in diff) or 'method/datasets'}); "
                            "use the same flags or another --out")
        self.zero_shot, self.acc, self.extra = ck["zero_shot"], ck["acc"], ck.get("extra", {})
        self.state = ck["state"]
        self.seconds_before = ck.get("seconds", 0.0)
        self.pretraining_before = ck.get("seconds_pretraining", 0.0)
        k = len(self.acc)
        print(f"resuming {self.out} after task {k} of {len(self.datasets)} ({self.datasets[k - 1]})"
              + (f"; tasks {k + 1}-{self.n_train} to train" if k < self.n_train else "; nothing left to train"),
              flush=True)

    @property
    def start_task(self) -> int:
        return len(self.acc)

    def begin_task(self, t: int) -> None:
        seed_all(self.args.seed * 1000 + t)
        _LOSS_TRACE.clear()
        self.t_task = time.time()

    def seconds(self) -> float:
        """The run's wall-clock seconds (every process of it), the toy pretraining left out."""
        return self.seconds_before + time.time() - self.t0 - self.pretraining_now

    def seconds_pretraining(self) -> float:
        return self.pretraining_before + self.pretraining_now

    def set_zero_shot(self, row: list[float], info: dict | None = None) -> None:
        """The untouched model's row; `info` (what the method's evaluate returned besides the
        row) is kept as summary.json "zero_shot_info" and its "note" printed."""
        self.zero_shot = [float(v) for v in row]
        info = dict(info or {})
        note = info.pop("note", "")
        if info:
            self.extra["zero_shot_info"] = info
        print("zero-shot  " + "  ".join(f"{n} {a:.1f}" for n, a in zip(self.datasets, self.zero_shot))
              + (f"\n    {note}" if note else ""), flush=True)

    def finish_task(self, t: int, row: list[float], state: dict, *infos: dict) -> None:
        """Record the matrix row after task t, save the checkpoint (atomic), rewrite the outputs,
        print one line. `infos`: what the hooks returned, merged: "loss" is printed, every "note"
        printed under the line (notes are not saved), "trainable_params" is the summary's count,
        every other entry is appended to its per-task list in summary.json."""
        self.acc.append([float(v) for v in row])
        info = {k: v for d in infos for k, v in d.items() if k != "note"}
        notes = [d["note"] for d in infos if d.get("note")]
        self.extra["trainable_params"] = int(info.pop("trainable_params"))
        for k, v in info.items():
            self.extra.setdefault(k, []).append(v)
        atomic_torch_save({"method": self.method, "datasets": self.datasets,
                           "args": {k: v for k, v in vars(self.args).items()},
                           "zero_shot": self.zero_shot, "acc": self.acc, "extra": self.extra,
                           "state": state, "seconds": self.seconds(),
                           "seconds_pretraining": self.seconds_pretraining()}, self.out / "checkpoint.pt")
        self.write_outputs()
        loss = f"loss {info['loss']:.3f}  " if "loss" in info else ""
        cil = (f"acc {cil_metrics(self.acc, self.sizes)['cil_acc'][-1]:.1f} over {self.n_classes[t]} classes | "
               if self.sizes else "")
        print(f"[{t + 1}/{len(self.datasets)}] {self.datasets[t]:<14} {loss}{time.time() - self.t_task:.0f}s | {cil}"
              + "  ".join(f"{a:.1f}" for a in row if not math.isnan(a)) + "".join(f"\n    {n}" for n in notes),
              flush=True)
        warning = self.learnt_nothing(t, row, list(_LOSS_TRACE))
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)

    def learnt_nothing(self, t: int, row: list[float], losses: list[float]) -> str:
        """Why task t looks untrained ("" if it does not): its own accuracy is at chance (at most a
        tenth of the way from chance to 100%), or its loss did not fall (the mean of the last fifth
        of the steps is not below the first fifth's; judged from 20 steps on). `losses`: the task's
        step losses (none: nothing was trained, no warning)."""
        if not losses:
            return ""
        problems = []
        if t < len(self.n_classes) and self.n_classes[t] >= 2:
            chance = 100.0 / self.n_classes[t]
            if row[t] <= chance + 0.1 * (100.0 - chance):
                problems.append(f"ended at {row[t]:.1f}% on its own test set (chance {chance:.1f}%)")
        if len(losses) >= 20:
            k = len(losses) // 5
            first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
            if last >= first:
                problems.append(f"its loss did not fall ({first:.3f} in the first {k} steps, {last:.3f} in the last {k})")
        if not problems:
            return ""
        lr = f" (lr {self.plan[t].lr:g})" if t < len(self.plan) else ""
        return (f"task {t + 1} ({self.datasets[t]}) {' and '.join(problems)}: it may have learnt nothing; "
                f"check --lr{lr}")

    @property
    def complete(self) -> bool:
        """Every task of the benchmark trained (not a killed run, not a --max-tasks run)."""
        return len(self.acc) == len(self.datasets)

    def partial_label(self) -> str:
        return "" if self.complete else f"partial: {len(self.acc)} of {len(self.datasets)} tasks trained"

    def summary(self) -> dict:
        """MTIL and X-TAIL: ZSCL's transfer / average / last of the matrix. CIL: "cil_acc" (the
        accuracy over every class seen, per step), "avg" and "last" (cil_metrics), transfer and
        average null; the unseen cells of acc_matrix null; zero_shot = the untouched CLIP over all
        classes, and its "last" (its accuracy after the final step) in zero_shot_metrics."""
        def rows(acc):
            return [[None if math.isnan(v) else v for v in row] for row in acc]
        s = {"method": self.method, "benchmark": self.args.benchmark, "order": self.args.order,
             **({"toy_world": data.TOY_WORLD_VERSION} if self.args.benchmark == "toy" else {}),
             "datasets": self.datasets, "complete": self.complete, "tasks_done": len(self.acc),
             "zero_shot": self.zero_shot, "acc_matrix": rows(self.acc)}
        if self.sizes is None:
            m = mtil_metrics(self.acc)
            s.update(transfer=m["transfer"], average=m["average"], last=m["last"],
                     zero_shot_metrics={k: mtil_metrics([self.zero_shot] * len(self.datasets))[k]
                                        for k in ("transfer", "average", "last")})
        else:
            m = cil_metrics(self.acc, self.sizes)
            s.update(steps=self.args.steps, transfer=None, average=None, cil_acc=m["cil_acc"], avg=m["avg"],
                     last=m["last"], zero_shot_metrics={"last": float(np.dot(self.zero_shot, self.sizes) / sum(self.sizes))})
        s.update(trainable_params=self.extra.get("trainable_params", 0), seconds=round(self.seconds(), 1),
                 seconds_pretraining=round(self.seconds_pretraining(), 1))
        s.update({k: (rows(v) if self.sizes and _is_matrix(v, len(self.datasets)) else v)
                  for k, v in self.extra.items() if k != "trainable_params"})
        return s

    def write_outputs(self) -> None:
        names = self.datasets
        csv = "after_task," + ",".join(names) + "\n" + "".join(   # a CIL step not seen yet: empty
            names[t] + "," + ",".join("" if math.isnan(v) else f"{v:.2f}" for v in row) + "\n"
            for t, row in enumerate(self.acc))
        atomic_write_text(self.out / "acc_matrix.csv", csv)
        atomic_write_text(self.out / "summary.json", json.dumps(self.summary(), indent=2))
        partial = self.partial_label()
        plot_matrix(names, self.acc, self.out / "acc_matrix.png",
                    f"{self.method} {self.args.benchmark} order {self.args.order}" + (f" ({partial})" if partial else ""))

    def print_final(self) -> None:
        """The table and metrics; also the metrics of every other accuracy matrix the method
        recorded (a per-task list of full rows in summary.json, e.g. igsp's acc_oracle)."""
        print(format_table(self.datasets, self.acc, self.zero_shot, self.sizes))
        if self.sizes:
            print(f"(zero-shot over all {self.n_classes[-1]} classes: {r1(self.summary()['zero_shot_metrics']['last'])})")
        else:
            print(f"(zero-shot: {metrics_line([self.zero_shot] * len(self.datasets))})")
        partial = self.partial_label()
        for k, v in self.extra.items():
            if _is_matrix(v, len(self.datasets)):
                print(f"({k}{', ' + partial if partial else ''}: {metrics_line(v, self.sizes)})")
        pre = self.seconds_pretraining()
        print(f"run folder: {self.out} ({self.seconds():.0f} s" + (f"; toy CLIP pretraining {pre:.0f} s)" if pre >= 0.5 else ")"))
        self._lock.release()
