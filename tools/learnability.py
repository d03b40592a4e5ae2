"""tools/learnability.py -- how far can each task be learned on its own?

A task that a method cannot learn when trained on it alone, from the pretrained CLIP, shows
nothing about forgetting or keeping. This tool trains a method script on each task of the
benchmark alone (the script's own setup, train_task, after_task and evaluate hooks, with every
flag the script takes) and prints one Markdown row per task: chance, zero-shot accuracy, and the
accuracy after training on that task alone.

    python tools/learnability.py finetune.py -- --benchmark toy
    python tools/learnability.py finetune.py -- --benchmark toy --iterations 300 --lr 3e-4

Flags after `--` go to the script. Nothing is written to disk (no run folder).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402


def learnability(script: str, argv: list[str]) -> list[dict]:
    """[{task, chance, zero_shot, alone}] for every task of the script's benchmark and order."""
    mod = importlib.import_module(Path(script).stem)
    args = mod.parse_args(argv)
    device = common.pick_device(args.device)
    rows = []
    n_tasks = None
    t = 0
    while n_tasks is None or t < n_tasks:
        model, tasks, method = mod.setup(args, device)                # fresh CLIP and method state
        n_tasks = len(tasks)
        task = tasks[t]
        zero_shot = mod.evaluate(model, method, [task], -1, args, device)[0][0]
        common.seed_all(args.seed * 1000)                              # as Run.begin_task(0)
        mod.train_task(model, method, task, 0, args, device)
        mod.after_task(model, method, task, 0, args, device)
        alone = mod.evaluate(model, method, [task], 0, args, device)[0][0]
        rows.append({"task": task.name, "chance": 100.0 / len(task.classnames),
                     "zero_shot": zero_shot, "alone": alone})
        print(f"{task.name}: zero-shot {zero_shot:.1f} -> {alone:.1f} alone", file=sys.stderr, flush=True)
        t += 1
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("script", help="a method script, e.g. finetune.py")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="-- then the script's flags")
    a = p.parse_args(argv)
    rest = a.script_args[1:] if a.script_args[:1] == ["--"] else a.script_args
    rows = learnability(a.script, rest)
    print(f"`python tools/learnability.py {a.script} -- {' '.join(rest)}`\n")
    print("| task | chance | zero-shot | trained alone |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['chance']:.1f} | {r['zero_shot']:.1f} | {r['alone']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
