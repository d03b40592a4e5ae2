"""tools/bench.py -- how fast each script trains, finishes a task and evaluates, in each precision.

    python tools/bench.py                                   # GPU: ViT-B/16, every script, every precision
    python tools/bench.py --scripts gnsp,igsp --precisions off,bf16
    python tools/bench.py --device cpu --tiny --quick       # CPU, the toy tiny CLIP (what the test runs)

No dataset and no download: CLIP has random weights (`--pretrained none`, the speed of a step
does not depend on the weights) and every task is a split of synthetic images in memory, with
`--classes` class prompts of ImageNet class names. For each script (igsp.py twice: iGSP and
`--variant moe-adapters`) and each precision (`--amp off | tf32 | fp16 | bf16`; the CPU runs fp32
only), the script's own hooks run on two synthetic tasks, as main runs them:

    setup -> train_task(task 1, 2 steps) -> after_task(task 1)            [after-task s]
          -> train_task(task 2, warm-up + timed steps)                    [steps/s, peak memory,
                                                                            task start/end s]
          -> after_task(task 2) -> evaluate(after task 2, both test sets) [eval images/s]

  steps/s         steady-state training steps per second at --batch-size (default 64), the
                  --warmup first steps of task 2 excluded (the device is synchronised at both ends)
  peak GB         torch.cuda.max_memory_allocated during task 2's train_task
  task start/end  the rest of task 2's train_task: what happens before the first step and after
                  the last (KeepLoRA's gradient estimate and SVDs, GNSP's projectors, ...)
  after-task s    after_task of task 1 on --train-images images (GNSP's statistics pass, KeepLoRA's
                  merge + feature pass + GPM update, the pool's merge, iGSP's selector)
  eval img/s      the script's evaluate after task 2 (both test sets, their zero-shot heads included)

and once: the training loader's images per second (common.forever(common.make_loader(...)),
ZSCL's train transform, --workers) on a fake JPEG tree of --loader-images photos-sized JPEGs.
Prints one Markdown table and writes everything as JSON (--json, default runs/bench-<device>.json),
rewritten after every row. A script that fails gets an error row, the others go on, and the exit
code is then 1.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
import data  # noqa: E402

SCRIPTS = {"finetune": ("finetune", []), "gnsp": ("gnsp", []), "keeplora": ("keeplora", []),
           "rank1_pool": ("rank1_pool", []), "igsp": ("igsp", []),
           "moe-adapters": ("igsp", ["--variant", "moe-adapters"])}


class Pairs(torch.utils.data.Dataset):
    """Synthetic image-caption pairs (GNSP's reference data)."""

    def __init__(self, images: torch.Tensor, captions: list[str]):
        self.images, self.captions = images, captions

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return self.images[i], self.captions[i]


def synthetic_tasks(size: int, n_train: int, n_test: int, classes: int, seed: int = 0) -> list[data.Task]:
    g = torch.Generator().manual_seed(seed)
    names = list(data.OPENAI_IMAGENET_CLASSNAMES[:classes])
    tasks = []
    for name in data.MTIL_ORDERS["I"][:2]:
        split = {}
        for s, n in (("train", n_train), ("test", n_test)):
            split[s] = torch.utils.data.TensorDataset(torch.randn(n, 3, size, size, generator=g),
                                                      torch.randint(classes, (n,), generator=g))
        tasks.append(data.Task(name, names, ["a photo of a {}."], split["train"], split["test"]))
    return tasks


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Replaces common.progress: times the steps after the first `warmup` (synchronised at both ends)."""

    def __init__(self, device: torch.device, warmup: int):
        self.device, self.warmup = device, warmup
        self.t0 = self.t1 = None
        self.steps = 0

    def __call__(self, it, enabled=False, **kw):
        try:
            for i, step in enumerate(it):
                if i == self.warmup:
                    sync(self.device)
                    self.t0 = time.perf_counter()
                self.steps = i + 1                  # counted when handed out: a loop may break after it
                yield step
        finally:                                    # also when the loop breaks early (iGSP, every candidate pruned)
            sync(self.device)
            self.t1 = time.perf_counter()

    @property
    def timed(self) -> tuple[int, float]:
        if self.t0 is None:
            return 0, 0.0
        return self.steps - self.warmup, self.t1 - self.t0


@contextlib.contextmanager
def patched(obj, name, value):
    real = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, real)


def bench_script(key: str, amp: str, a, device: torch.device) -> dict:
    import importlib
    module, flags = SCRIPTS[key]
    m = importlib.import_module(module)
    args = m.parse_args(["--benchmark", "mtil", "--model", a.model, "--pretrained", "none", "--amp", amp,
                         "--batch-size", str(a.batch_size), "--iterations", "2", "--device", str(device),
                         "--workers", "0", "--eval-batch-size", str(a.eval_batch_size), "--no-progress",
                         "--align-n", "0", "--out", "/nonexistent", *flags])
    size = {"toy-tiny": 32}.get(a.model, 224)
    tasks = synthetic_tasks(size, a.train_images, a.eval_images, a.classes)
    refs = [Pairs(t.train.tensors[0], [f"a photo of a {t.classnames[y]}." for y in t.train.tensors[1].tolist()])
            for t in tasks]
    row = {"script": key, "precision": amp}
    with contextlib.ExitStack() as stack, contextlib.redirect_stdout(io.StringIO()):
        stack.enter_context(patched(common, "check_data", lambda args: None))
        stack.enter_context(patched(common, "load_tasks", lambda args, model, **kw: tasks))
        if module == "gnsp":
            stack.enter_context(patched(m, "check_data", lambda args: None))
            stack.enter_context(patched(m, "reference_data", lambda args, tasks, model: refs))
        common.seed_all(0)
        model, tasks, method = m.setup(args, device)
        m.train_task(model, method, tasks[0], 0, args, device)
        sync(device)
        t = time.perf_counter()
        m.after_task(model, method, tasks[0], 0, args, device)
        sync(device)
        row["after_task_s"] = time.perf_counter() - t
        args.iterations = a.warmup + a.steps
        clock = StepClock(device, a.warmup)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        with patched(common, "progress", clock):
            m.train_task(model, method, tasks[1], 1, args, device)
        sync(device)
        total = time.perf_counter() - t
        n, dt = clock.timed
        row["steps_per_s"] = n / dt if dt > 0 else float("nan")
        row["task_start_end_s"] = total - (dt + (dt / n * a.warmup if n else 0.0))
        row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        m.after_task(model, method, tasks[1], 1, args, device)
        sync(device)
        t = time.perf_counter()
        m.evaluate(model, method, tasks, 1, args, device)
        sync(device)
        row["eval_images_per_s"] = sum(len(t_.test) for t_ in tasks) / (time.perf_counter() - t)
    del model, method
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def write_jpeg_tree(root: Path, n: int, size: tuple[int, int], classes: int = 10) -> None:
    from PIL import Image
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        d = root / f"class{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        base = np.stack([(xx * (i + 1)) % 256, (yy * 3 + i) % 256, (xx + yy) % 256], -1)   # photo-like gradients
        img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)        # and texture
        Image.fromarray(img).save(d / f"{i:05d}.jpg", quality=90)


def bench_loader(a, device: torch.device, size: int) -> dict:
    import torchvision
    root = Path(tempfile.mkdtemp(prefix="bench-jpeg-"))
    w, h = (int(v) for v in a.jpeg_size.split("x"))
    write_jpeg_tree(root, a.loader_images, (w, h))
    ds = torchvision.datasets.ImageFolder(str(root), transform=data.clip_transforms(size)[0])
    batches = common.forever(common.make_loader(ds, a.batch_size, shuffle=True, seed=0, workers=a.workers,
                                                device=device))
    for _ in range(2):                                              # workers started, first batches read
        next(batches)
    n = max(1, math.ceil(a.loader_batches))
    t = time.perf_counter()
    for _ in range(n):
        next(batches)
    dt = time.perf_counter() - t
    batches.close()
    return {"images_per_s": n * a.batch_size / dt, "workers": a.workers, "jpeg": a.jpeg_size,
            "image_size": size, "files": a.loader_images}


def table(res: dict) -> str:
    head = ["script", "precision", "steps/s", "peak GB", "task start/end s", "after-task s", "eval img/s"]
    rows = [[r["script"], r["precision"], "error: " + r["error"][:60], "", "", "", ""] if "error" in r else
            [r["script"], r["precision"], f"{r['steps_per_s']:.2f}",
             "-" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}", f"{r['task_start_end_s']:.2f}",
             f"{r['after_task_s']:.2f}", f"{r['eval_images_per_s']:.0f}"] for r in res["rows"]]
    w = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(head)) + " |",
             "|" + "|".join("-" * (x + 2) for x in w) + "|"]
    lines += ["| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |" for r in rows]
    if res.get("loader"):
        ld = res["loader"]
        lines.append(f"\nloader: {ld['images_per_s']:.0f} images/s ({ld['workers']} workers, {ld['jpeg']} JPEGs "
                     f"-> {ld['image_size']} px, batch {res['batch_size']})")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default=None, help="open_clip model name (default ViT-B-16; --tiny: toy-tiny)")
    p.add_argument("--tiny", action="store_true", help="the toy benchmark's tiny CLIP and small sizes")
    p.add_argument("--quick", action="store_true", help="very few steps and images (a smoke test)")
    p.add_argument("--scripts", default=",".join(SCRIPTS))
    p.add_argument("--precisions", default=None, help="default: off,tf32,fp16,bf16 on CUDA, off on the CPU")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--train-images", type=int, default=256)
    p.add_argument("--eval-images", type=int, default=1024)
    p.add_argument("--loader-images", type=int, default=512, help="0: no loader measurement")
    p.add_argument("--loader-batches", type=int, default=20)
    p.add_argument("--jpeg-size", default="500x375")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: common.default_workers())")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    device = common.pick_device(a.device)
    a.model = a.model or (common.TOY_MODEL if a.tiny else "ViT-B-16")
    a.workers = common.default_workers() if a.workers is None else a.workers
    if a.quick:
        a.batch_size, a.eval_batch_size, a.warmup, a.steps = 8, 16, 1, 2
        a.classes, a.train_images, a.eval_images = 5, 16, 16
        a.loader_images, a.loader_batches, a.jpeg_size = min(a.loader_images, 16), 2, "96x64"
    precisions = (a.precisions or ("off,tf32,fp16,bf16" if device.type == "cuda" else "off")).split(",")
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "model": a.model, "weights": "random", "batch_size": a.batch_size, "warmup": a.warmup, "steps": a.steps,
           "classes": a.classes, "train_images": a.train_images, "eval_images_per_task": a.eval_images,
           "versions": common.versions(), "rows": []}
    out = Path(a.json or ROOT / "runs" / f"bench-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Precision outside, script inside: a run cut short still has every script at the first precision.
    # Each row is written as soon as it is measured; a script that fails is recorded and the rest go on.
    for amp in precisions:
        for key in a.scripts.split(","):
            try:
                row = bench_script(key, amp, a, device)
                print(f"{key} {amp}: {row['steps_per_s']:.2f} steps/s", file=sys.stderr, flush=True)
            except Exception as e:  # noqa: BLE001 -- a benchmark reports a failing script and goes on
                traceback.print_exc()
                row = {"script": key, "precision": amp, "error": f"{type(e).__name__}: {e}"}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            res["rows"].append(row)
            common.atomic_write_text(out, json.dumps(res, indent=2))
    size = {"toy-tiny": 32}.get(a.model, 224)
    if a.loader_images > 0:
        res["loader"] = bench_loader(a, device, size)
    print(table(res))
    common.atomic_write_text(out, json.dumps(res, indent=2))
    print(f"written: {out}")
    return res


if __name__ == "__main__":
    sys.exit(1 if any("error" in r for r in main()["rows"]) else 0)
