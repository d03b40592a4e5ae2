"""tools/report.py -- compare finished runs: one table of Transfer / Average / Last and two figures.

    python tools/report.py runs/finetune-toy-orderI-seed42 runs/gnsp-toy-orderI-seed42
    python tools/report.py runs/* --out runs/report           # every run folder; the others are skipped, with why
    python tools/report.py runs/sweeps/* --benchmark toy --partial

Reads each run folder's summary.json (what common.Run writes: method, benchmark, order, datasets,
complete, zero_shot, acc_matrix, transfer, average, last, trainable_params, seconds, ...) and its
config.json (the run's flags). Prints a Markdown table per order of the benchmark, and writes to
--out (default runs/report):

  report.md          the tables (Transfer / Average / Last; and the alignment on held-out pairs after the
                     last task where the runs recorded it), the folders skipped and why, the two figures
  acc_matrices.png   every run's accuracy matrix (the zero-shot row on top), side by side, one colour scale
  acc_curves.png     one panel per task: its accuracy after each training stage (0 = zero-shot), one
                     curve per run; a dot where the task itself was trained

Rows: "Zero-shot" from the runs' zero_shot rows (one row per distinct zero-shot row: the scripts'
evaluation prompts differ, see README "Protocols"), "Continual-FT" from finetune.py runs, then one row
per method run. Runs of one method that differ in their flags are labelled with the flags that differ
(e.g. "GNSP --rho 0.5"). Metrics are rounded as ZSCL's results.ipynb rounds (common.r1).

Skipped, each with a line on stderr: a path that is not a folder, a folder without a readable
summary.json, an unfinished run (complete is false: killed, or --max-tasks; --partial includes them,
labelled), a run of another benchmark than --benchmark (default: the benchmark most runs have), and a
run whose tasks differ from those of the other runs of its order (e.g. made before the toy world changed).

Class-incremental runs (`--benchmark cil-*`, `toy-cil`: summary.json has `cil_acc`) get CIL's columns,
Avg / Last (common.cil_metrics); their steps not seen yet are blank in the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NAMES = {"zero-shot": "Zero-shot", "finetune": "Continual-FT", "gnsp": "GNSP", "keeplora++": "KeepLoRA++",
         "keeplora": "KeepLoRA", "rank1_pool": "Rank-1 pool (DAC)", "igsp": "iGSP (reconstruction)",
         "moe-adapters": "MoE-Adapters"}
ORDER = list(NAMES)                                     # table order: baselines first, then the methods
# flags that never distinguish two runs' results (common.Run.CONFIG_KEYS_IGNORED, plus where a run lives)
NOT_A_VARIANT = {"resume", "no_progress", "progress", "out", "workers", "device", "eval_batch_size", "max_tasks",
                 "data_root", "method"}
SUMMARY_KEYS = ("method", "benchmark", "order", "datasets", "acc_matrix", "transfer", "average", "last")


def r1(x) -> str:
    """One decimal as ZSCL's results.ipynb rounds (common.r1: np.around, half to even on the binary value)."""
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{np.around(x, 1):.1f}"


@dataclass
class RunInfo:
    path: Path
    summary: dict
    args: dict = field(default_factory=dict)           # config.json "args" ({} without a config.json)
    label: str = ""

    @property
    def method(self) -> str:
        return self.summary["method"]

    @property
    def done(self) -> int:
        return len(self.summary["acc_matrix"])

    @property
    def complete(self) -> bool:
        return bool(self.summary.get("complete", self.done == len(self.summary["datasets"])))


def read_run(path: Path, partial: bool) -> RunInfo | str:
    """The run of a folder, or why it is skipped."""
    if not path.is_dir():
        return "not a folder" if path.exists() else "no such folder"
    f = path / "summary.json"
    if not f.is_file():
        return "no summary.json (not a run folder, or a run that has not finished its first task)"
    try:
        s = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        return f"summary.json unreadable ({type(e).__name__})"
    missing = [k for k in SUMMARY_KEYS if k not in s] if isinstance(s, dict) else list(SUMMARY_KEYS)
    if missing:
        return f"summary.json lacks {', '.join(missing)}"
    if not s["acc_matrix"]:
        return "no task finished yet"
    run = RunInfo(path, s)
    if not run.complete and not partial:
        return f"unfinished run ({run.done} of {len(s['datasets'])} tasks trained; --partial includes it)"
    try:
        run.args = json.loads((path / "config.json").read_text()).get("args", {})
    except (OSError, ValueError, AttributeError):
        run.args = {}                                  # the table still works; only the variant labels need it
    return run


def choose(runs: list[RunInfo], benchmark: str | None, skipped: list) -> list[RunInfo]:
    """The runs of one benchmark (--benchmark, else the most common), and per order those with the
    tasks most runs of that order have; the others go to `skipped`."""
    if not runs:
        return []
    bench = benchmark or Counter(r.summary["benchmark"] for r in runs).most_common(1)[0][0]
    kept = []
    for r in runs:
        if r.summary["benchmark"] != bench:
            why = "--benchmark" if benchmark else "most runs'"
            skipped.append((r.path, f"other benchmark ({r.summary['benchmark']}; the report is on {bench}, {why})"))
        else:
            kept.append(r)
    out = []
    for order in sorted({r.summary["order"] for r in kept}):
        group = [r for r in kept if r.summary["order"] == order]
        tasks = Counter(tuple(r.summary["datasets"]) for r in group).most_common(1)[0][0]
        for r in group:
            if tuple(r.summary["datasets"]) == tasks:
                out.append(r)
            else:
                skipped.append((r.path, f"other tasks ({', '.join(r.summary['datasets'])}) than the other "
                                        f"order-{order} runs ({', '.join(tasks)})"))
    return out


def _flag(key: str, value) -> str:
    name = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return name if value else f"no {name}"
    if isinstance(value, (list, tuple)):
        return f"{name} {' '.join(map(str, value))}"
    return f"{name} {value}"


def label_runs(runs: list[RunInfo]) -> None:
    """Method name, plus the flags in which runs of the same method and order differ."""
    groups: dict = {}
    for r in runs:
        groups.setdefault((r.summary["order"], r.method), []).append(r)
    for (order, method), group in groups.items():
        keys = sorted({k for r in group for k in r.args} - NOT_A_VARIANT)
        differ = [k for k in keys if len({json.dumps(r.args.get(k), sort_keys=True) for r in group}) > 1]
        for r in group:
            label = NAMES.get(method, method)
            flags = [_flag(k, r.args.get(k)) for k in differ if r.args.get(k) is not None and r.args.get(k) is not False]
            if flags:
                label += " " + " ".join(flags)
            elif len(group) > 1:
                label += f" ({r.path.name})"
            if not r.complete:
                label += f" (partial: {r.done} of {len(r.summary['datasets'])} tasks)"
            r.label = label


def zero_shot_metrics(s: dict) -> dict:
    """The zero-shot row's Transfer / Average / Last: summary.json's zero_shot_metrics, or (older runs)
    common.mtil_metrics of the row repeated, which is: Transfer = mean of columns 2..T, Average = Last = mean."""
    if "zero_shot_metrics" in s:
        return s["zero_shot_metrics"]
    z = list(s["zero_shot"])
    return {"transfer": float(np.mean(z[1:])) if len(z) > 1 else float("nan"),
            "average": float(np.mean(z)), "last": float(np.mean(z))}


def is_cil(runs: list[RunInfo]) -> bool:
    return all("cil_acc" in r.summary for r in runs)


def metric_cells(s: dict, cil: bool) -> list[str]:
    """Transfer / Average / Last, or CIL's Avg / Last (the zero-shot CLIP's Avg is not recorded: "-")."""
    return [r1(s.get("avg")), r1(s["last"])] if cil else [r1(s["transfer"]), r1(s["average"]), r1(s["last"])]


def backward_forgetting(acc) -> str:
    """Mean over the tasks t < T of A[t, t] - A[T, t] (T = the last trained task): how much of what
    each task reached right after its own training is gone at the end. '-' for a one-task run."""
    A = np.asarray(acc, dtype=float)
    return r1(float(np.mean([A[t, t] - A[-1, t] for t in range(len(A) - 1)]))) if len(A) > 1 else "-"


def table_rows(runs: list[RunInfo]) -> list[list[str]]:
    """The rows of one order's table: zero-shot rows, then each run (Continual-FT first)."""
    rows, zs, cil = [], {}, is_cil(runs)
    for r in runs:
        z = r.summary.get("zero_shot")
        if z:
            zs.setdefault(tuple(round(v, 2) for v in z), []).append(r)
    # several distinct zero-shot rows: name what distinguishes them, the evaluation prompts, else the methods
    prompts = [sorted({str(g.args.get("eval_prompts")) for g in group}) for group in zs.values()]
    by_prompts = sum(len(pr) for pr in prompts) == len({p for pr in prompts for p in pr}) and "None" not in str(prompts)
    for group, pr in zip(zs.values(), prompts):
        m = zero_shot_metrics(group[0].summary)
        label = "Zero-shot"
        if len(zs) > 1:
            label += (f" (eval prompts {' / '.join(pr)})" if by_prompts
                      else f" (as in {', '.join(sorted({NAMES.get(g.method, g.method) for g in group}))})")
        where = group[0].path.name + (f" and {len(group) - 1} more" if len(group) > 1 else "")
        rows.append([label, group[0].summary["order"], *metric_cells(m, cil), "-", "0", "-", where])
    for r in sorted((r for r in runs if r.method != "zero-shot"), key=sort_key):
        s = r.summary
        rows.append([r.label, s["order"], *metric_cells(s, cil), backward_forgetting(s["acc_matrix"]),
                     f"{int(s.get('trainable_params', 0)):,}", f"{s['seconds']:.0f}" if "seconds" in s else "-",
                     r.path.name])
    return rows


HEAD = ["method / variant", "order", "Transfer", "Average", "Last", "forgetting", "trainable params", "seconds", "run"]
HEAD_CIL = ["method / variant", "order", "Avg", "Last", "forgetting", "trainable params", "seconds", "run"]


def sort_key(r: RunInfo):
    """Orders first, then baselines, then the methods in NAMES's order, then by label."""
    return r.summary["order"], ORDER.index(r.method) if r.method in ORDER else len(ORDER), r.label


ALIGN_HEAD = ["method / variant", "order", "modality gap", "image->text R@1", "text->image R@1", "run"]


def alignment_rows(runs: list[RunInfo]) -> list[list[str]]:
    """Held-out image-caption alignment after the last trained task, the zero-shot value in
    brackets (summary.json modality_gap / i2t_r1 / t2i_r1 and zero_shot_info); runs without it are
    left out."""
    rows = []
    for r in sorted((r for r in runs if r.summary.get("modality_gap") and r.method != "zero-shot"), key=sort_key):
        s, z = r.summary, r.summary.get("zero_shot_info") or {}

        def cell(k: str, f: str) -> str:                      # after the last task (zero-shot)
            return f"{s[k][-1]:{f}}" + (f" ({z[k]:{f}})" if k in z else "")
        rows.append([r.label, s["order"], cell("modality_gap", ".3f"), cell("i2t_r1", ".1f"), cell("t2i_r1", ".1f"),
                     r.path.name])
    return rows


def markdown(runs: list[RunInfo]) -> str:
    bench = runs[0].summary["benchmark"]
    parts = []
    for order in sorted({r.summary["order"] for r in runs}):
        group = [r for r in runs if r.summary["order"] == order]
        rows = table_rows(group)
        parts.append(f"## {bench}, Order {order} ({len(group[0].summary['datasets'])} tasks: "
                     f"{', '.join(group[0].summary['datasets'])})\n")
        head = HEAD_CIL if is_cil(group) else HEAD
        parts.append("| " + " | ".join(head) + " |")
        parts.append("|" + "---|" * len(head))
        parts += ["| " + " | ".join(row) + " |" for row in rows]
        parts.append("")
        align = alignment_rows(group)
        if align:
            parts.append(f"Alignment on the held-out image-caption pairs after the last task, Order {order} "
                         "(zero-shot in brackets):\n")
            parts.append("| " + " | ".join(ALIGN_HEAD) + " |")
            parts.append("|" + "---|" * len(ALIGN_HEAD))
            parts += ["| " + " | ".join(row) + " |" for row in align]
            parts.append("")
    return "\n".join(parts)


# ---- figures -----------------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_matrices(runs: list[RunInfo], path: Path) -> None:
    """Each run's matrix with its zero-shot row on top, side by side, one colour scale for all."""
    plt = _plt()
    mats = [np.asarray(([r.summary["zero_shot"]] if r.summary.get("zero_shot") else []) + r.summary["acc_matrix"],
                       dtype=float) for r in runs]
    lo = min(float(np.nanmin(m)) for m in mats)                     # NaN: a CIL step not seen yet
    hi = max(float(np.nanmax(m)) for m in mats)
    lo, hi = 5 * np.floor(lo / 5), max(5 * np.ceil(hi / 5), 5 * np.floor(lo / 5) + 5)
    n = len(runs)
    cols = min(n, 3)
    rows = -(-n // cols)
    T = max(len(r.summary["datasets"]) for r in runs)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * (1.8 + 0.45 * T), rows * (2.2 + 0.4 * T)), squeeze=False,
                             layout="constrained")
    im = None
    for ax, r, A in zip(axes.flat, runs, mats):
        names = r.summary["datasets"]
        im = ax.imshow(A, vmin=lo, vmax=hi, cmap="viridis")
        zs = 1 if r.summary.get("zero_shot") else 0
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(A)), (["zero-shot"] if zs else []) + [f"after {x}" for x in names[:len(A) - zs]],
                      fontsize=7)
        if A.size <= 144:
            for (i, j), v in np.ndenumerate(A):
                if np.isnan(v):
                    continue
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if v < lo + 0.6 * (hi - lo) else "black")
        s = r.summary
        title = textwrap.fill(f"{r.label}, order {s['order']}", 12 + 6 * T)
        metrics = (f"Avg {r1(s['avg'])} / Last {r1(s['last'])}" if "cil_acc" in s
                   else f"T {r1(s['transfer'])} / A {r1(s['average'])} / L {r1(s['last'])}")
        ax.set_title(f"{title}\n{metrics}", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, label="accuracy (%)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(runs: list[RunInfo], path: Path) -> None:
    """One panel per task: its accuracy at each stage (0 = zero-shot, k = after training task k),
    one curve per run, a dot where the task itself was trained."""
    plt = _plt()
    tasks = list(dict.fromkeys(d for r in runs for d in r.summary["datasets"]))
    cols = min(len(tasks), 4)
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes.flat, tasks):
        for i, r in enumerate(runs):
            s = r.summary
            if name not in s["datasets"]:
                continue
            d = s["datasets"].index(name)
            ys = ([s["zero_shot"][d]] if s.get("zero_shot") else []) + [np.nan if row[d] is None else row[d] for row in s["acc_matrix"]]
            x0 = 0 if s.get("zero_shot") else 1
            c, ls = colours[i % len(colours)], ["-", "--", ":", "-."][i // len(colours) % 4]
            ax.plot(range(x0, x0 + len(ys)), ys, color=c, ls=ls, lw=1.2, label=f"{r.label}, order {s['order']}")
            if d < len(s["acc_matrix"]):
                ax.plot([d + 1], [s["acc_matrix"][d][d]], "o", color=c, ms=4)
        ax.set_title(name, fontsize=9)
        T = max(len(r.summary["datasets"]) for r in runs)
        ax.set_xticks(range(0, T + 1, 1 + T // 12))                # stages are whole tasks
        ax.set_xlim(-0.3, T + 0.3)
        ax.set_xlabel("after task (0 = zero-shot)", fontsize=7)
        ax.set_ylabel("accuracy (%)", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * ((len(labels) - 1) // 3), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the command line ------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="report.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (each with summary.json and config.json)")
    p.add_argument("--out", default="runs/report", help="folder for report.md and the figures (default runs/report)")
    p.add_argument("--benchmark", choices=["mtil", "toy", "cil-cifar100", "cil-tinyimagenet", "xtail", "toy-cil",
                                           "toy-xtail"], help="report this benchmark (default: the one most runs have)")
    p.add_argument("--partial", action="store_true", help="include unfinished runs, labelled partial")
    a = p.parse_args(argv)
    runs, skipped, seen = [], [], set()
    for arg in a.runs:
        path = Path(arg)
        key = os.path.realpath(path)
        if key in seen:
            continue
        seen.add(key)
        got = "the report's own folder (--out)" if key == os.path.realpath(a.out) else read_run(path, a.partial)
        if isinstance(got, str):
            skipped.append((path, got))
        else:
            runs.append(got)
    runs = choose(runs, a.benchmark, skipped)
    for path, why in skipped:
        print(f"skipped {path}: {why}", file=sys.stderr)
    if not runs:
        print(f"error: no run to report ({len(skipped)} folder{'s' * (len(skipped) != 1)} skipped)", file=sys.stderr)
        return 2
    label_runs(runs)
    runs.sort(key=sort_key)
    table = markdown(runs)
    print(table)
    out = Path(a.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        plot_matrices(runs, out / "acc_matrices.png")
        plot_curves(runs, out / "acc_curves.png")
        md = ["# Report\n", table]
        if skipped:
            md += ["## Skipped\n"] + [f"- `{path}`: {why}" for path, why in skipped] + [""]
        md += ["## Accuracy matrices\n", "![accuracy matrices](acc_matrices.png)\n",
               "## Each task's accuracy across training\n", "![accuracy curves](acc_curves.png)\n"]
        (out / "report.md").write_text("\n".join(md))
    except OSError as e:
        print(f"error: cannot write the report in {out} ({e.strerror or type(e).__name__})", file=sys.stderr)
        return 2
    print(f"wrote {out / 'report.md'}, {out / 'acc_matrices.png'}, {out / 'acc_curves.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
