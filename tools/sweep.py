"""tools/sweep.py -- run one script several times with one flag changed, print a Markdown table.

Every tuning table in notes/ was made with this tool; the command that made it sits above it.

    python tools/sweep.py gnsp.py --vary lr=3e-4,1e-3,3e-3,1e-2 -- --benchmark toy --order I

Each value gets its own run folder under --root (default runs/sweeps), named after the script,
the flag and the value; a finished run (summary.json present) is read, not run again, so an
interrupted sweep continues where it stopped. `--vary` may be given several times: the runs are
the listed alternatives one after the other (not their product), each against the base flags.
A value `default` runs the base flags alone; `flag=on` is a switch without a value;
`a=1+b=2` is one run with both flags.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def runs_of(vary: list[str]) -> list[tuple[str, list[str]]]:
    """[(label, extra flags)] from `name=v1,v2,...` specs; `default` = no extra flag."""
    out = []
    for spec in vary:
        if "+" in spec:                           # several flags in one run: a=1+b=2
            pairs = [kv.partition("=") for kv in spec.split("+")]
            out.append((" ".join(f"--{k} {v}" for k, _, v in pairs), [x for k, _, v in pairs for x in (f"--{k}", v)]))
            continue
        name, _, values = spec.partition("=")
        for v in values.split(","):
            if v == "default":
                out.append(("default", []))
            elif v == "on":
                out.append((f"--{name}", [f"--{name}"]))
            else:
                out.append((f"--{name} {v}", [f"--{name}", v]))
    seen, unique = set(), []
    for label, flags in out:
        if label not in seen:
            seen.add(label)
            unique.append((label, flags))
    return unique


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    base = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("script")
    p.add_argument("--vary", action="append", required=True, help="flag=v1,v2,... (flag without --)")
    p.add_argument("--root", default="runs/sweeps")
    p.add_argument("--metric-key", default=None, help="also report this summary.json matrix (e.g. acc_oracle)")
    a = p.parse_args(own)
    import common  # after sys.path has the repository root
    rows = []
    for label, flags in runs_of(a.vary):
        tag = label.replace("--", "").replace(" ", "=") or "default"
        out = Path(a.root) / f"{Path(a.script).stem}-{'_'.join(base).replace('--', '').replace(' ', '')}-{tag}"
        summary = out / "summary.json"
        done = summary.is_file() and len(json.loads(summary.read_text())["acc_matrix"]) == len(
            json.loads(summary.read_text())["datasets"])
        if not done:
            cmd = [sys.executable, str(ROOT / a.script), *base, *flags, "--out", str(out), "--no-progress"]
            if out.exists():
                cmd.append("--resume")
            print("$ " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        s = json.loads(summary.read_text())
        row = [label, s["transfer"], s["average"], s["last"]]
        if a.metric_key:
            m = common.mtil_metrics(s[a.metric_key])
            row += [m["transfer"], m["average"], m["last"]]
        rows.append(row)
    head = "| run | Transfer | Average | Last |" + (f" {a.metric_key} T / A / L |" if a.metric_key else "")
    print(head)
    print("|" + "---|" * (5 if a.metric_key else 4))
    for r in rows:
        cells = [r[0]] + [common.r1(v) for v in r[1:4]]
        if a.metric_key:
            cells.append(" / ".join(common.r1(v) for v in r[4:]))
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
