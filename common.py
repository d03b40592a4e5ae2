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
     (`eval_templates`), accuracy rows, ZSCL's Transfer / Average / Last, the table, the heatmap.
  6. The run folder (`Run`): config.json (with each task's resolved HParams), acc_matrix.csv/png,
     summary.json, the atomic per-task checkpoint, `--resume`.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
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


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing data, missing weights). Printed as one
    message without a traceback; exit code 2."""

    exit_code = 2

class NonFiniteLoss(Exception):
    """The loss became NaN/inf. Everything saved before this step stays on disk."""

    exit_code = 1

def cli_main(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run `main(argv)`; turn user errors into a clean message + exit code (no traceback)."""
    try:
        main(argv)
    except (UserError, data.MissingDataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted; finished tasks are saved, continue with --resume", file=sys.stderr)
        sys.exit(130)

def common_parser(method: str, doc: str | None = None) -> argparse.ArgumentParser:
    """The flags every script accepts (DESIGN.md "The shared command line"). A method script
    adds its own under a `# method` group. `--iterations/--batch-size/--lr` default to None and
    are resolved per benchmark/order/task by each script (the paper's values)."""
    p = argparse.ArgumentParser(prog=f"{method}.py", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("common")
    g.add_argument("--benchmark", choices=["mtil", "toy"], default="mtil")
    g.add_argument("--order", choices=["I", "II"], default="I")
    g.add_argument("--data-root", default=os.environ.get("MTIL_DATA", "./data"))
    g.add_argument("--model", default=None,
                   help="open_clip model name (default: ViT-B-16 for mtil, the toy tiny CLIP for toy)")
    g.add_argument("--pretrained", default=None,
                   help="open_clip tag or a local weights file (default: openai for mtil, the "
                        "cached toy pretraining for toy; 'none' = random init)")
    g.add_argument("--few-shot", type=int, default=0, help="K images per class; 0 = full data")
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

def finalize_args(args: argparse.Namespace, method: str, defaults: dict) -> argparse.Namespace:
    """Fill every default and validate numbers (one-line errors). `defaults` is the script's
    DEFAULTS table, name -> (MTIL value, toy value): each flag the user did not give (None, or
    `official` for --amp / --eval-prompts) takes its benchmark's value, so config.json records
    what the run used. --iterations / --batch-size / --lr stay None unless given: the script's
    `hparams(args, task, t)` resolves them per task (config.json "per_task")."""
    args.method = method
    if args.model is None:
        args.model = "ViT-B-16" if args.benchmark == "mtil" else TOY_MODEL
    if args.pretrained is None:
        args.pretrained = "openai" if args.benchmark == "mtil" else "toy"
    if args.workers is None:
        args.workers = default_workers() if args.benchmark == "mtil" else 0
    if args.out is None:
        args.out = f"runs/{method}-{args.benchmark}-order{args.order}-seed{args.seed}"
    col = defaults_for(args, defaults)
    for name, value in col.items():
        if name in PER_TASK_FLAGS or not hasattr(args, name):
            continue
        if getattr(args, name) is None or (name in ("amp", "eval_prompts") and getattr(args, name) == "official"):
            setattr(args, name, value)
    for name in ("iterations", "batch_size", "max_tasks", "few_shot", "workers", "eval_batch_size"):
        v = getattr(args, name)
        if v is not None and v < (0 if name in ("few_shot", "workers") else 1):
            raise UserError(f"--{name.replace('_', '-')} must be {'>= 0' if name in ('few_shot', 'workers') else '>= 1'}, got {v}")
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        raise UserError(f"--lr must be a positive number, got {args.lr}")
    args.progress = (not args.no_progress) and sys.stderr.isatty()
    return args

def defaults_for(args: argparse.Namespace, defaults: dict) -> dict:
    """This run's column of a DEFAULTS table (name -> (MTIL, toy)): name -> value."""
    col = 0 if args.benchmark == "mtil" else 1
    return {name: values[col] for name, values in defaults.items()}

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

def check_data(args) -> None:
    """Fail early (before loading any model) when MTIL data is missing: exit 2 with the list."""
    if args.benchmark == "mtil":
        names = data.MTIL_ORDERS[args.order]  # every dataset is evaluated, even with --max-tasks
        missing = data.mtil_missing(args.data_root, names)
        if missing:
            raise data.MissingDataError(missing)

def load_tasks(args, model: ClipView, train_transform: str = "train", few_shot_once: bool = False) -> list:
    """All the benchmark's tasks in training order, test splits with the eval transform, few-shot
    subsets applied when --few-shot K > 0. --max-tasks limits training (`n_train_tasks`), not the
    columns of the matrix. The methods' official codes differ in their training inputs:
      train_transform  "train": ZSCL's RandomResizedCrop(scale 0.9-1) + flip-free CLIP
                       preprocessing; "eval": the deterministic eval transform (KeepLoRA)
      few_shot_once    the few-shot images are transformed once and kept (DAC, MoE-Adapters: they
                       stack the transformed images into a TensorDataset), instead of on the fly."""
    if args.benchmark == "mtil":
        tr, ev = data.clip_transforms(model.image_size)
        tasks = data.mtil_tasks(args.data_root, args.order, ev if train_transform == "eval" else tr, ev)
    else:
        tasks = data.toy_tasks(args.order)
    if args.few_shot:
        for t in tasks:
            t.train = data.few_shot_subset(t.train, args.few_shot, seed=args.seed)
            if few_shot_once:
                t.train = data.transformed_once(t.train, seed=args.seed)
    return tasks

def n_train_tasks(args, tasks: list) -> int:
    return min(len(tasks), args.max_tasks or len(tasks))

def setup_model(args, device) -> ClipView:
    """The run's CLIP. Resolves `--quick-gelu auto` into args (so config.json records it) and sets
    the run's precision (`set_precision`)."""
    if args.quick_gelu == "auto":
        args.quick_gelu = "on" if wants_quick_gelu(args.model, args.pretrained) else "off"
    set_precision(torch.device(device), args.amp)
    return load_clip(args.model, args.pretrained, device, progress_bar=args.progress,
                     quick_gelu=args.quick_gelu == "on")

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
    if name == TOY_MODEL:
        if kw.get("pretrained"):
            raise UserError(f"{TOY_MODEL} has no open_clip tags: use --pretrained toy, none or a FILE")
        return open_clip.create_model("ViT-B-32", pretrained=None, **data.TOY_CLIP_CFG), \
            data.TOY_CLIP_CFG["text_cfg"]["context_length"]
    model = open_clip.create_model(name, **kw)
    return model, model.context_length

def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False

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
        try:
            if path.is_file():
                if name == TOY_MODEL:
                    clip, ctx = _create(name)
                    sd = torch.load(path, map_location="cpu", weights_only=True)
                    clip.load_state_dict(sd.get("state_dict", sd))
                elif _is_torchscript(path):
                    # OpenAI's original archive: trusted TorchScript, needs weights_only=False.
                    clip, ctx = _create(name, pretrained=str(path), weights_only=False, **qg)
                else:
                    clip, ctx = _create(name, pretrained=str(path), **qg)
            elif os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
                raise UserError(f"weights file not found: {pretrained}")
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

def _toy_pretrained(seed: int, recipe: dict, progress_bar: bool):
    """The toy tiny CLIP, pretrained contrastively on the toy world's captions; cached on disk,
    keyed by (model config, recipe, world version, seed). Deterministic for a seed on a machine."""
    # "init": the initial weights are drawn from `seed` too; the field keeps caches built when they
    # came from the caller's RNG state (so depended on the script that filled the cache) unused.
    key = json.dumps({"cfg": data.TOY_CLIP_CFG, "recipe": recipe, "world": data.TOY_WORLD_VERSION, "seed": seed,
                      "init": "seeded"}, sort_keys=True)
    h = hashlib.sha1(key.encode()).hexdigest()[:12]
    path = cache_dir() / f"toy-clip-{h}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
        torch.manual_seed(seed)
        clip, ctx = _create(TOY_MODEL)
        with open(path.with_suffix(".lock"), "w") as lock:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)  # two runs started together pretrain once, not twice
            return _toy_cached_or_pretrain(clip, ctx, path, seed, recipe, progress_bar)

def _toy_cached_or_pretrain(clip, ctx, path: Path, seed: int, recipe: dict, progress_bar: bool):
    if path.is_file():
        try:
            clip.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return clip, ctx
        except Exception:
            print(f"warning: toy CLIP cache {path} unreadable; rebuilding it", file=sys.stderr)
    print(f"pretraining the toy CLIP once ({recipe['steps']} steps; cached in {path})", file=sys.stderr)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=ctx)
    pretrain_contrastive(clip, tokenizer, data.toy_pretraining_batches(seed, recipe["batch_size"]),
                         recipe, seed, progress_bar)
    atomic_torch_save(clip.state_dict(), path)
    return clip, ctx

def pretrain_contrastive(clip: nn.Module, tokenizer, batches: Iterator, recipe: dict, seed: int,
                         progress_bar: bool = True) -> None:
    """Standard CLIP pretraining (symmetric InfoNCE, learnable temperature) on CPU."""
    torch.manual_seed(seed)  # the CPU stream only: callers' python, numpy and CUDA streams stay as they were
    clip.train()
    opt = torch.optim.AdamW(clip.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    bar = progress(range(recipe["steps"]), progress_bar and sys.stderr.isatty(), desc="toy CLIP", leave=False)
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
                                    "finished tasks are saved in the run folder (lower --lr and --resume)")
        self.host += new

    def mean(self, steps: int) -> float:
        """The mean loss of steps 0..steps-1."""
        self._read(steps)
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
             amp: str = "off", progress_bar: bool = False, templates: list[str] | None = None) -> float:
    """Top-1 accuracy (%) of `model` on task.test with a zero-shot head of `templates` (default:
    every template of the task)."""
    was_training = model.training
    model.eval()
    with torch.inference_mode(), autocast(device, amp):
        W = zeroshot_head(model, task.classnames, templates or task.templates, device)  # (embed, C)
        correct, n = torch.zeros((), dtype=torch.int64, device=device), 0   # counted on the device
        loader = make_loader(task.test, batch_size, shuffle=False, seed=0, workers=workers, device=device)
        for images, labels in progress(loader, progress_bar, desc=f"eval {task.name}", leave=False):
            f = model.encode_image(images.to(device, non_blocking=True), normalize=True)  # (N, embed)
            pred = (f @ W.to(f.dtype)).argmax(-1)
            correct += (pred == labels.to(device, non_blocking=True)).sum()
            n += len(labels)
    model.train(was_training)
    return 100.0 * int(correct) / max(n, 1)

def evaluate_all(model: ClipView, tasks: list, args, device, t: int = -1) -> list[float]:
    """One row of the accuracy matrix after task t (-1: zero-shot): accuracy on every task of the
    benchmark, with the prompts of `--eval-prompts` (eval_templates) and the precision of `--amp`."""
    return [evaluate(model, task, device, args.eval_batch_size, args.workers, args.amp, args.progress,
                     eval_templates(task.templates, d, t, args.eval_prompts)) for d, task in enumerate(tasks)]

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

def r1(x: float) -> str:
    """One decimal as ZSCL's results.ipynb rounds (np.around, half to even on the binary value
    times 10): 65.35 -> "65.4", where Python's format gives "65.3"."""
    return f"{np.around(x, 1):.1f}"

def format_table(names: list[str], acc, zero_shot: list[float] | None = None) -> str:
    A = np.asarray(acc, dtype=float)
    w = max(8, max(len(n) for n in names) + 1)
    short = [n[:w - 1] for n in names]
    lines = [" " * 14 + "".join(f"{s:>{w}}" for s in short)]
    if zero_shot is not None:
        lines.append(f"{'zero-shot':<14}" + "".join(f"{v:>{w}.1f}" for v in zero_shot))
    for t, row in enumerate(A):
        lines.append(f"{'after ' + short[t]:<14}"[:14] + "".join(f"{v:>{w}.1f}" for v in row))
    m = mtil_metrics(A)
    lines.append(f"Transfer {r1(m['transfer'])}   Average {r1(m['average'])}   Last {r1(m['last'])}")
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
        for d in range(A.shape[1]):
            ax.text(d, t, f"{A[t, d]:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if A[t, d] < 60 else "black")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)

# ---------------------------------------------------------------------------------------------
# ---- 6. The run folder (config.json, summary.json, atomic checkpoint, --resume) ----
# ---------------------------------------------------------------------------------------------


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

def atomic_torch_save(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def versions() -> dict:
    import torchvision
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "torchvision": torchvision.__version__, "open_clip": open_clip.__version__}

class Run:
    """The run folder of DESIGN.md. Files: config.json, acc_matrix.csv, acc_matrix.png,
    summary.json, checkpoint.pt (the latest finished task: method state + matrix so far).

    CHOICE: one checkpoint file, overwritten atomically after each task (not one per task): a
    full-model checkpoint of ViT-B/16 is ~0.6 GB and only the latest is needed to resume.
    CHOICE: every task starts by re-seeding with (seed, task index), so a resumed run draws the
    same random numbers as an uninterrupted one without replaying RNG state."""

    # flags that may differ between a run and its resumption (they do not change the results,
    # or, for --max-tasks, only where the run stops)
    CONFIG_KEYS_IGNORED = {"resume", "no_progress", "progress", "out", "workers", "device", "eval_batch_size",
                           "max_tasks"}

    def __init__(self, args: argparse.Namespace, tasks: list, plan: list[HParams]):
        """`tasks`: the benchmark's tasks in training order; `plan`: each task's HParams."""
        self.method, self.args, self.datasets = args.method, args, [t.name for t in tasks]
        self.n_train = n_train_tasks(args, tasks)
        self.out = Path(args.out)
        self.t0 = self.t_task = time.time()
        self.zero_shot: list[float] | None = None
        self.acc: list[list[float]] = []
        self.extra: dict = {}
        self.state: dict | None = None  # the method state of the last finished task (on resume)
        self.seconds_before = 0.0
        cfg = {k: v for k, v in vars(args).items()}
        self.config = {"method": self.method, "args": cfg, "datasets": self.datasets,
                       "per_task": [{"task": n, **asdict(hp)} for n, hp in zip(self.datasets, plan)],
                       "versions": versions()}
        ckpt = self.out / "checkpoint.pt"
        if args.resume:
            if not ckpt.is_file():
                raise UserError(f"--resume: no checkpoint in {self.out} (start without --resume)")
            self._load(ckpt)
        elif (self.out / "summary.json").exists() or ckpt.exists():
            raise UserError(f"{self.out} already holds a run; pass --resume to continue it or --out to start another")
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "config.json", json.dumps(self.config, indent=2, default=str))

    def _load(self, path: Path) -> None:
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}); "
                            "delete it to start over") from None
        want = {k: v for k, v in vars(self.args).items() if k not in self.CONFIG_KEYS_IGNORED}
        have = {k: v for k, v in ck.get("args", {}).items() if k not in self.CONFIG_KEYS_IGNORED}
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if ck.get("method") != self.method or ck.get("datasets") != self.datasets or diff:
            raise UserError(f"checkpoint in {self.out} was made with other settings "
                            f"({', '.join('--' + d.replace('_', '-') for d in diff) or 'method/datasets'}); "
                            "use the same flags or another --out")
        self.zero_shot, self.acc, self.extra = ck["zero_shot"], ck["acc"], ck.get("extra", {})
        self.state = ck["state"]
        self.seconds_before = ck.get("seconds", 0.0)

    @property
    def start_task(self) -> int:
        return len(self.acc)

    def begin_task(self, t: int) -> None:
        seed_all(self.args.seed * 1000 + t)
        self.t_task = time.time()

    def seconds(self) -> float:
        return self.seconds_before + time.time() - self.t0

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
                           "state": state, "seconds": self.seconds()}, self.out / "checkpoint.pt")
        self.write_outputs()
        loss = f"loss {info['loss']:.3f}  " if "loss" in info else ""
        print(f"[{t + 1}/{len(self.datasets)}] {self.datasets[t]:<14} {loss}{time.time() - self.t_task:.0f}s | "
              + "  ".join(f"{a:.1f}" for a in row) + "".join(f"\n    {n}" for n in notes), flush=True)

    def summary(self) -> dict:
        m = mtil_metrics(self.acc)
        s = {"method": self.method, "benchmark": self.args.benchmark, "order": self.args.order,
             "datasets": self.datasets, "zero_shot": self.zero_shot, "acc_matrix": self.acc,
             "transfer": m["transfer"], "average": m["average"], "last": m["last"],
             "zero_shot_metrics": {k: mtil_metrics([self.zero_shot] * len(self.datasets))[k]
                                   for k in ("transfer", "average", "last")},
             "trainable_params": self.extra.get("trainable_params", 0), "seconds": round(self.seconds(), 1)}
        s.update({k: v for k, v in self.extra.items() if k != "trainable_params"})
        return s

    def write_outputs(self) -> None:
        names = self.datasets
        csv = "after_task," + ",".join(names) + "\n" + "".join(
            names[t] + "," + ",".join(f"{v:.2f}" for v in row) + "\n" for t, row in enumerate(self.acc))
        atomic_write_text(self.out / "acc_matrix.csv", csv)
        atomic_write_text(self.out / "summary.json", json.dumps(self.summary(), indent=2))
        plot_matrix(names, self.acc, self.out / "acc_matrix.png",
                    f"{self.method} {self.args.benchmark} order {self.args.order}")

    def print_final(self) -> None:
        """The table and metrics; also the metrics of every other accuracy matrix the method
        recorded (a per-task list of full rows in summary.json, e.g. igsp's acc_oracle)."""
        print(format_table(self.datasets, self.acc, self.zero_shot))
        z = mtil_metrics([self.zero_shot] * len(self.datasets))
        print(f"(zero-shot: Transfer {r1(z['transfer'])}   Average {r1(z['average'])}   Last {r1(z['last'])})")
        for k, v in self.extra.items():
            if isinstance(v, list) and v and all(isinstance(r, list) and len(r) == len(self.datasets) for r in v):
                m = mtil_metrics(v)
                print(f"({k}: Transfer {r1(m['transfer'])}   Average {r1(m['average'])}   Last {r1(m['last'])})")
        print(f"run folder: {self.out}")
