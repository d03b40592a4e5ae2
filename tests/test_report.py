"""tools/report.py on run folders written by common.Run itself (the writer of summary.json and
config.json), and on folders it must skip: the rows and their numbers, the variant labels, the two
figures, report.md, and one line per skipped folder with its reason."""
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

import common
import data

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("report_tool", ROOT / "tools" / "report.py")
report = importlib.util.module_from_spec(_spec)
sys.modules["report_tool"] = report                     # dataclasses look their module up there
_spec.loader.exec_module(report)

TASKS = ["alpha", "beta", "gamma"]
ZS = [60.0, 40.0, 80.0]                                 # the untouched model's row
ZS_FIRST = [58.0, 41.0, 79.0]                           # ... with another evaluation protocol
FT = [[90.0, 30.0, 70.0], [50.0, 95.0, 60.0], [40.0, 45.0, 97.0]]
G1 = [[88.0, 41.0, 80.0], [86.0, 90.0, 79.0], [85.0, 88.0, 93.0]]
G2 = [[85.0, 40.0, 80.0], [85.0, 80.0, 80.0], [84.0, 79.0, 85.0]]
KL = [[89.0, 40.5, 79.0], [88.0, 91.0, 78.5], [87.5, 90.0, 94.0]]


def write_run(root: Path, name: str, method: str, rows, zero_shot=ZS, order="I", tasks=TASKS, trainable=1000,
              max_tasks=None, **flags) -> Path:
    """A run folder as a script's main leaves it: common.Run with these rows (the plot skipped)."""
    argv = ["--benchmark", "toy", "--order", order, "--out", str(root / name)]
    args = common.finalize_args(common.common_parser(method).parse_args(
        argv + (["--max-tasks", str(max_tasks)] if max_tasks else [])), method, {})
    args.eval_prompts = "ensemble"
    for k, v in flags.items():
        setattr(args, k, v)
    run = common.Run(args, [data.Task(n, [], [], [], []) for n in tasks], [common.HParams(5, 4, 1e-3)] * len(tasks))
    run.set_zero_shot(zero_shot)
    for t, row in enumerate(rows[:run.n_train]):
        run.begin_task(t)
        run.finish_task(t, row, {}, {"trainable_params": trainable, "loss": 0.5})
    run.print_final()
    return root / name


@pytest.fixture()
def runs(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "plot_matrix", lambda *a, **k: None)   # each run's own png: not needed here
    r = tmp_path / "runs"
    made = {
        "zs": write_run(r, "zs", "zero-shot", [ZS] * 3, trainable=0),
        "ft": write_run(r, "ft", "finetune", FT, trainable=3_379_200),
        "g1": write_run(r, "g1", "gnsp", G1, trainable=69_632, rho=0.15),
        "g2": write_run(r, "g2", "gnsp", G2, trainable=69_632, rho=0.5),
        "kl": write_run(r, "kl", "keeplora++", KL, zero_shot=ZS_FIRST, trainable=16_384, eval_prompts="first"),
        "ft2": write_run(r, "ft2", "finetune", [row[::-1] for row in FT][::-1], zero_shot=ZS[::-1], order="II",
                         tasks=TASKS[::-1]),
        "partial": write_run(r, "partial", "rank1_pool", G1, max_tasks=2),
        "old-world": write_run(r, "old-world", "gnsp", G1, tasks=["alpha", "beta", "delta"]),
    }
    shutil.copytree(made["ft"], r / "mtil")
    s = json.loads((r / "mtil" / "summary.json").read_text())
    (r / "mtil" / "summary.json").write_text(json.dumps({**s, "benchmark": "mtil"}))
    made["mtil"] = r / "mtil"
    (r / "empty").mkdir()
    made["empty"] = r / "empty"
    (r / "broken").mkdir()
    (r / "broken" / "summary.json").write_text('{"method": "gnsp", "acc')
    made["broken"] = r / "broken"
    (r / "notes.md").write_text("not a run")
    made["file"] = r / "notes.md"
    return made


def rows_of(md: str) -> dict[str, list[str]]:
    """label -> the other cells, for every table row of the Markdown."""
    out = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("method / variant",):
            out[cells[0]] = cells[1:]
    return out


def metrics(acc) -> list[str]:
    m = common.mtil_metrics(acc)
    return [common.r1(m["transfer"]), common.r1(m["average"]), common.r1(m["last"])]


def test_table_figures_and_skipped_folders(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert report.main([str(p) for p in runs.values()] + ["--out", str(out)]) == 0
    std = capsys.readouterr()
    md = (out / "report.md").read_text()
    assert std.out.strip() in md, "report.md holds the table printed on stdout"
    tables = std.out.split("## ")[1:]
    assert [t.splitlines()[0] for t in tables] == ["toy, Order I (3 tasks: alpha, beta, gamma)",
                                                   "toy, Order II (3 tasks: gamma, beta, alpha)"]
    one, two = rows_of(tables[0]), rows_of(tables[1])
    assert list(one) == ["Zero-shot (eval prompts ensemble)", "Zero-shot (eval prompts first)", "Continual-FT",
                         "GNSP --rho 0.15", "GNSP --rho 0.5", "KeepLoRA++"], \
        "zero-shot rows first, then Continual-FT, then the methods; runs of one method named by the flags that differ"
    assert one["Zero-shot (eval prompts ensemble)"][:7] == ["I", *metrics([ZS] * 3), "-", "0", "-"]
    assert one["Zero-shot (eval prompts ensemble)"][7].startswith(("zs and", "ft and", "g1 and", "g2 and"))
    assert one["Zero-shot (eval prompts first)"][:4] == ["I", *metrics([ZS_FIRST] * 3)]
    # forgetting, by hand: FT (90 - 40 + 95 - 45) / 2 = 50.0; G1 (88 - 85 + 90 - 88) / 2 = 2.5; KL (1.5 + 1) / 2
    assert one["Continual-FT"] == ["I", *metrics(FT), "50.0", "3,379,200", one["Continual-FT"][6], "ft"]
    assert one["GNSP --rho 0.15"][1:5] == [*metrics(G1), "2.5"] and one["GNSP --rho 0.5"][1:4] == metrics(G2)
    assert one["KeepLoRA++"][1:6] == [*metrics(KL), "1.2", "16,384"]
    assert list(two) == ["Zero-shot", "Continual-FT"] and two["Continual-FT"][0] == "II"
    # every skipped folder, and why
    err = std.err
    for name, why in [("partial", "unfinished run (2 of 3 tasks trained; --partial includes it)"),
                      ("old-world", "other tasks (alpha, beta, delta) than the other order-I runs (alpha, beta, gamma)"),
                      ("mtil", "other benchmark (mtil; the report is on toy, most runs')"),
                      ("empty", "no summary.json"), ("broken", "summary.json unreadable"), ("notes.md", "not a folder")]:
        line = next((x for x in err.splitlines() if x.startswith(f"skipped {runs['file'].parent / name}:")), None)
        assert line is not None and why in line, f"no line saying why {name} was skipped in:\n{err}"
        assert f"`{runs['file'].parent / name}`: " in md, f"report.md does not list {name} as skipped"
    for png in ("acc_matrices.png", "acc_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"
        assert f"]({png})" in md


def test_partial_runs_on_request_and_benchmark_choice(runs, tmp_path, capsys):
    (tmp_path / "a").mkdir()                                          # `runs/*` may name the report's own folder
    assert report.main([str(runs["ft"]), str(runs["partial"]), str(tmp_path / "a"), "--partial",
                        "--out", str(tmp_path / "a")]) == 0
    std = capsys.readouterr()
    rows = rows_of(std.out)
    assert f"skipped {tmp_path / 'a'}: the report's own folder (--out)" in std.err
    assert rows["Rank-1 pool (DAC) (partial: 2 of 3 tasks)"][1:4] == metrics(G1[:2]), \
        "--partial includes an unfinished run, labelled, with the metrics of its rows"
    assert report.main([str(runs["ft"]), str(runs["g1"]), str(runs["mtil"]), "--benchmark", "mtil",
                        "--out", str(tmp_path / "b")]) == 0
    std = capsys.readouterr()
    assert list(rows_of(std.out)) == ["Zero-shot", "Continual-FT"] and "## mtil, Order I" in std.out
    assert f"skipped {runs['g1']}: other benchmark (toy; the report is on mtil, --benchmark)" in std.err


def test_nothing_to_report_is_one_line_and_exit_code_2(runs, tmp_path, capsys):
    assert report.main([str(runs["empty"]), str(runs["partial"]), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "error: no run to report (2 folders skipped)" and len(err) == 3
    assert not (tmp_path / "c").exists()


def test_alignment_table_reads_the_last_task_and_the_zero_shot_value(tmp_path, monkeypatch, capsys):
    """The alignment table shows each run's held-out modality gap and Recall@1 after its LAST task
    (not the first, not a mean), with the zero-shot value in brackets; runs without the metrics
    (older runs) get no row."""
    monkeypatch.setattr(common, "plot_matrix", lambda *a, **k: None)
    args = common.finalize_args(common.common_parser("gnsp").parse_args(
        ["--benchmark", "toy", "--order", "I", "--out", str(tmp_path / "g")]), "gnsp", {})
    args.eval_prompts = "ensemble"
    run = common.Run(args, [data.Task(n, [], [], [], []) for n in TASKS], [common.HParams(5, 4, 1e-3)] * 3)
    run.set_zero_shot(ZS, {"modality_gap": 0.25, "i2t_r1": 17.4, "t2i_r1": 14.25})
    for t, (gap, i2t, t2i) in enumerate([(0.3, 15.0, 13.0), (0.35, 12.5, 11.0), (0.41, 9.75, 8.5)]):
        run.begin_task(t)
        run.finish_task(t, G1[t], {}, {"trainable_params": 10, "loss": 0.5},
                        {"modality_gap": gap, "i2t_r1": i2t, "t2i_r1": t2i})
    run.print_final()
    write_run(tmp_path, "ft", "finetune", FT)                                 # no alignment recorded
    assert report.main([str(tmp_path / "g"), str(tmp_path / "ft"), "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "Alignment on the held-out image-caption pairs" in out
    align = out.split("Alignment on the held-out")[1]
    row = rows_of(align)
    assert row["GNSP"] == ["I", "0.410 (0.250)", "9.8 (17.4)", "8.5 (14.2)", "g"], row
    assert "Continual-FT" not in row, "a run without alignment metrics got an alignment row"
