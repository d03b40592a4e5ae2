"""tools/cpu_speed.py -- the CPU measurements of the hot loops, old code against this one, in one process.

    python tools/cpu_speed.py --before DIR [--json FILE] [--quick]

DIR is a copy of the repository before the change (e.g. `git worktree add DIR <commit>` or
`git archive <commit> | tar -x -C DIR`); both trees are imported side by side in this process
(their modules under separate names) and measured alternately (loader, tokens and toy run twice
each, the best kept), so that the load of a shared machine hits both alike. Measured, each for the old and the new tree, then the ratio:

  loader     steps/s of the endless training loader of a 5-shot subset of a fake MTIL dataset
             (tests/fake_mtil.py, EuroSAT: one batch, JPEG files, ZSCL's train transform at
             224 px), batch 64, 4 workers: `common.forever(common.make_loader(...))`
  tokens     ms of tokenization per training step of finetune.py's train_task on a task with
             397 classes (SUN397's count; ImageNet class names), tiny random CLIP, 20 steps
  syncs      host reads of device values per training step (tools/syncs.py: each is a device
             sync on CUDA) of every script's train_task on the toy benchmark's first task:
             (reads of a 3N-step task - reads of an N-step task) / 2N, so that what happens once
             per task does not count; `--vit`: also igsp.py (both variants) on a random ViT-B/16
             (batch 2, the real block count: 24 MoE blocks, 22 experts for moe-adapters)
  toy run    seconds of `finetune.py --benchmark toy --max-tasks 2 --seed 3` (100 steps a task,
             two tasks, three evaluations of the six toy test sets), the best of two runs each
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))
NAMES = ["common", "data", "finetune", "gnsp", "keeplora", "rank1_pool", "igsp"]

import torch  # noqa: E402

from syncs import SyncCounter  # noqa: E402


def load_tree(root: Path) -> SimpleNamespace:
    """The repository's modules from `root`, imported apart from any other tree's."""
    saved = {n: sys.modules.pop(n) for n in NAMES if n in sys.modules}
    sys.path.insert(0, str(root))
    try:
        return SimpleNamespace(root=root, **{n: importlib.import_module(n) for n in NAMES})
    finally:
        sys.path.remove(str(root))
        for n in NAMES:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


def loader_steps_per_second(X, ds, steps: int, workers: int = 4) -> float:
    batches = X.common.forever(X.common.make_loader(ds, 64, shuffle=True, seed=0, workers=workers))
    next(batches)                                                   # the first start counts for neither
    t0 = time.perf_counter()
    for _ in range(steps):
        next(batches)
    dt = time.perf_counter() - t0
    batches.close()
    return steps / dt


def tiny_clip(X):
    torch.manual_seed(0)
    return X.common.load_clip(X.common.TOY_MODEL, "none", "cpu")


def tokenization_ms_per_step(X, steps: int = 20) -> tuple[float, float]:
    """(ms in the tokenizer per step, steps/s) of finetune.train_task, 397 classes."""
    model = tiny_clip(X)
    names = list(X.data.OPENAI_IMAGENET_CLASSNAMES[:397])
    g = torch.Generator().manual_seed(0)
    train = torch.utils.data.TensorDataset(torch.randn(256, 3, 32, 32, generator=g), torch.randint(397, (256,), generator=g))
    task = X.data.Task("SUN397", names, ["a photo of a {}."], train, train)
    args = X.finetune.parse_args(["--benchmark", "toy", "--iterations", str(steps), "--batch-size", "32",
                                  "--no-progress", "--out", "/nonexistent"])
    spent = [0.0]
    real = model.tokenizer

    def timed(texts):
        t = time.perf_counter()
        out = real(texts)
        spent[0] += time.perf_counter() - t
        return out

    model.tokenizer = timed
    t0 = time.perf_counter()
    X.finetune.train_task(model, {}, task, 0, args, torch.device("cpu"))
    return 1000 * spent[0] / steps, steps / (time.perf_counter() - t0)


def script_args(X, script: str, steps: int, extra=()) -> list[str]:
    variant = {"igsp-moe": ["--variant", "moe-adapters"]}.get(script, [])
    flags = {"gnsp": ["--ref-n", "64", "--align-n", "64"], "keeplora": ["--grad-batches", "2"]}.get(script, [])
    return ["--benchmark", "toy", "--iterations", str(steps), "--no-progress", "--device", "cpu", "--seed", "3",
            "--out", "/nonexistent", *variant, *flags, *extra]


def reads_of_one_task(X, script: str, steps: int, extra=(), model_fn=None) -> tuple[int, object]:
    """Host reads of device values while the script's train_task trains the first task for `steps` steps."""
    m = getattr(X, script.replace("igsp-moe", "igsp"))
    args = m.parse_args(script_args(X, script, steps, extra))
    cpu = torch.device("cpu")
    real = X.common.setup_model, X.common.load_tasks
    if model_fn is not None:                                        # a given model on synthetic 224 px tasks
        X.common.setup_model = lambda a, d: model_fn()
        X.common.load_tasks = lambda a, model, **kw: synthetic_tasks(X, model.image_size)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model, tasks, method = m.setup(args, cpu)
            X.common.seed_all(args.seed * 1000)
            with SyncCounter(model, cpu) as counter:
                m.train_task(model, method, tasks[0], 0, args, cpu)
    finally:
        X.common.setup_model, X.common.load_tasks = real
    return counter.count, counter.sites


def synthetic_tasks(X, size: int, n: int = 8) -> list:
    g = torch.Generator().manual_seed(0)
    tasks = []
    for name in X.data.TOY_ORDERS["I"][:2]:
        ds = torch.utils.data.TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.arange(n) % 3)
        tasks.append(X.data.Task(name, ["red", "green", "blue"], ["a {} thing."], ds, ds))
    return tasks


def syncs_per_step(X, script: str, n: int = 10, extra=(), model_fn=None) -> float:
    a, _ = reads_of_one_task(X, script, n, extra, model_fn)
    b, _ = reads_of_one_task(X, script, 3 * n, extra, model_fn)
    return (b - a) / (2 * n)


def vit_b16(X):
    torch.manual_seed(0)
    return X.common.load_clip("ViT-B-16", "none", "cpu")


def toy_run_seconds(X, out: Path) -> float:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        X.finetune.main(["--benchmark", "toy", "--max-tasks", "2", "--seed", "3", "--no-progress",
                         "--device", "cpu", "--out", str(out)])
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="a copy of the repository before the change")
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke test, not a measurement)")
    p.add_argument("--vit", action="store_true", help="also count igsp's syncs on a random ViT-B/16")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: loader,tokens,syncs,toy")
    a = p.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    trees = {"before": load_tree(Path(a.before).resolve()), "after": load_tree(ROOT)}
    res: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix="cpu_speed-"))

    if "loader" not in skip:
        from fake_mtil import write_fake_mtil
        write_fake_mtil(tmp / "mtil", ["EuroSAT"])
        X = trees["after"]
        tr, ev = X.data.clip_transforms(224)
        ds = X.data.few_shot_subset(X.data.load_mtil_task("EuroSAT", tmp / "mtil", tr, ev).train, 5, seed=42)
        steps = {"before": 3 if a.quick else 20, "after": 20 if a.quick else 200}
        runs = {"before": [], "after": []}
        for _ in range(1 if a.quick else 2):                       # alternately; the best of each
            for k in ("before", "after"):
                runs[k].append(loader_steps_per_second(trees[k], ds, steps[k]))
        res["loader"] = {k: max(v) for k, v in runs.items()}
        res["loader"]["images"] = len(ds)

    if "tokens" not in skip:
        runs = {"before": [], "after": []}
        for _ in range(1 if a.quick else 2):                       # alternately; the best of each
            for k in ("before", "after"):
                runs[k].append(tokenization_ms_per_step(trees[k], 5 if a.quick else 20))
        res["tokens_ms"] = {k: min(ms for ms, _ in v) for k, v in runs.items()}
        res["tokens_steps_per_s"] = {k: max(sps for _, sps in v) for k, v in runs.items()}

    if "syncs" not in skip:
        res["syncs"] = {}
        for script in ("finetune", "gnsp", "keeplora", "rank1_pool", "igsp", "igsp-moe"):
            res["syncs"][script] = {k: syncs_per_step(trees[k], script, 2 if a.quick else 10) for k in trees}
        if a.vit:
            for script in ("igsp-moe", "igsp"):
                res["syncs"][script + " ViT-B/16"] = {
                    k: syncs_per_step(trees[k], script, 1, ["--batch-size", "2"], lambda k=k: vit_b16(trees[k]))
                    for k in trees}

    if "toy" not in skip:
        runs = {"before": [], "after": []}
        for i in range(1 if a.quick else 2):
            for k in ("before", "after"):
                runs[k].append(toy_run_seconds(trees[k], tmp / f"toy-{k}-{i}"))
        res["toy_run_s"] = {k: min(v) for k, v in runs.items()}

    print_table(res)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return res


def ratio(a: float, b: float) -> str:
    return f"{b / a:.2f}x" if a else ("-" if not b else "inf")


def print_table(res: dict) -> None:
    rows = [("measure", "before", "after", "after / before")]
    if "loader" in res:
        r = res["loader"]
        rows.append((f"5-shot loader, 4 workers ({r['images']} images): steps/s", f"{r['before']:.2f}",
                     f"{r['after']:.1f}", ratio(r["before"], r["after"])))
    if "tokens_ms" in res:
        r, s = res["tokens_ms"], res["tokens_steps_per_s"]
        rows.append(("tokenization per step, 397 classes: ms", f"{r['before']:.2f}", f"{r['after']:.3f}",
                     ratio(r["before"], r["after"])))
        rows.append(("  finetune train_task (tiny CLIP, batch 32): steps/s", f"{s['before']:.1f}", f"{s['after']:.1f}",
                     ratio(s["before"], s["after"])))
    for script, r in res.get("syncs", {}).items():
        rows.append((f"device syncs per step: {script}", f"{r['before']:.2f}", f"{r['after']:.2f}",
                     ratio(r["before"], r["after"])))
    if "toy_run_s" in res:
        r = res["toy_run_s"]
        rows.append(("toy run finetune.py --max-tasks 2: s", f"{r['before']:.1f}", f"{r['after']:.1f}",
                     ratio(r["before"], r["after"])))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, r in enumerate(rows):
        print("| " + " | ".join(c.ljust(w[j]) for j, c in enumerate(r)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (x + 2) for x in w) + "|")


if __name__ == "__main__":
    main()
