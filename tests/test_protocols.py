"""The class-incremental (CIL) and X-TAIL protocols through the scripts: the toy versions'
tasks, the union classifier of each row, CIL's Avg / Last against hand-computed values, and
finetune.py end to end on toy-cil, toy-xtail and the fake CIFAR-100 / TinyImageNet trees
(tests/test_data_protocols.py), with a kill and --resume mid-protocol."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import common
import data
from fake_mtil import skip_md5_checks
from test_data_protocols import write_fake_cifar100, write_fake_tinyimagenet

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
CPU = torch.device("cpu")


def args_for(benchmark, *flags, script="finetune"):
    import importlib
    return importlib.import_module(script).parse_args(["--benchmark", benchmark, "--out", "/nonexistent", *flags])


# ---- the toy protocols' tasks ----

def test_toy_cil_tasks():
    tasks = data.toy_cil_tasks()
    union = tasks[-1].union_classnames
    assert len(tasks) == data.TOY_CIL_STEPS == 5 and len(union) == 45 == len(set(union))  # distinct names
    assert "red object" in union and "red stroke" in union and "small outline" in union and "two objects" in union
    per_train, per_test = data.TOY_CIL_PER_CLASS
    for k, t in enumerate(tasks):
        assert t.new_start == 9 * k and t.union_classnames == union[:9 * (k + 1)] and t.templates == data.CIL_TEMPLATES
        assert np.bincount(data.dataset_targets(t.train)).tolist() == [0] * (9 * k) + [per_train] * 9
        assert np.bincount(data.dataset_targets(t.test)).tolist() == [per_test] * (9 * (k + 1))
    assert data.toy_cil_tasks()[-1].union_classnames == union                  # a fixed order
    # the image of a pooled class is its task's image of that class
    colours = data.toy_task("Colours")
    red = union.index("red object")
    x, y = tasks[-1].test[data.dataset_targets(tasks[-1].test).index(red)]
    assert y == red and any(torch.equal(x, colours.test[i][0]) for i in range(len(colours.test)))
    step = data.new_classes_only(tasks[2])   # what a step trains: its new classes, labels from 0
    assert step.classnames == union[18:27] and sorted(set(data.dataset_targets(step.train))) == list(range(9))
    assert step.union_classnames == union[:27] and step.test is tasks[2].test


def test_toy_xtail_tasks():
    tasks = data.toy_xtail_tasks(seed=3, shots=4)
    assert [t.name for t in tasks] == data.TOY_ORDERS["I"]
    union = tasks[0].union_classnames
    assert union == [c for n in data.TOY_ORDERS["I"] for c in data.toy_union_classnames(n)] and len(set(union)) == 45
    for t in tasks:
        assert t.union_classnames == union and union[t.offset:t.offset + len(t.classnames)] == t.classnames
        assert t.templates == data.RAIL_TEMPLATES
        assert np.bincount(data.dataset_targets(t.train)).tolist() == [4] * len(t.classnames)
    assert [t.train.indices for t in data.toy_xtail_tasks(seed=3, shots=4)] == [t.train.indices for t in tasks]


# ---- flags and defaults ----

@pytest.mark.parametrize("flags, message", [
    (["--benchmark", "toy", "--steps", "5"], "--steps is for the class-incremental"),
    (["--benchmark", "cil-cifar100", "--steps", "5"], "10 | 20 | 50"),
    (["--benchmark", "cil-tinyimagenet", "--steps", "50"], "5 | 10 | 20"),
    (["--benchmark", "xtail", "--order", "II"], "one order")])
def test_bad_protocol_flags_are_one_line(flags, message):
    import finetune
    with pytest.raises(common.UserError, match=message):
        finetune.parse_args([*flags, "--out", "/nonexistent"])


def test_protocol_budgets():
    """CIL: one epoch (ceil(N / B) + 1 steps) at the config's batch size; X-TAIL: 16 shots and the
    MTIL per-task values; toy protocols: the toy column."""
    import finetune
    step = data.Task("cil-cifar100-step1", ["a"], ["{}"], list(range(5000)), [])
    for steps, batch, iterations in ((10, 128, 41), (20, 128, 41), (50, 64, 80)):
        hp = finetune.hparams(args_for("cil-cifar100", "--steps", str(steps)), step, 0)
        assert (hp.batch_size, hp.iterations, hp.lr) == (batch, iterations, 1e-5)
    tiny = data.Task("cil-tinyimagenet-step1", ["a"], ["{}"], list(range(50000)), [])
    assert finetune.hparams(args_for("cil-tinyimagenet"), tiny, 0).iterations == 783   # notes/protocols.md 1.3
    a = args_for("xtail")
    assert a.few_shot == 16 and a.model == "ViT-B-16" and a.out == "/nonexistent"
    assert finetune.hparams(a, data.Task("MNIST", ["a"], ["{}"], [], []), 0).lr == 5e-5
    toy = args_for("toy-cil")
    assert toy.steps == 5 and toy.model == common.TOY_MODEL and toy.few_shot == 0
    assert finetune.hparams(toy, step, 0) == finetune.hparams(args_for("toy"), step, 0)
    assert finetune.parse_args(["--benchmark", "cil-cifar100"]).out == "runs/finetune-cil-cifar100-10steps-orderI-seed42"


# ---- the union classifier and the metrics ----

def test_the_union_classifier_grows_with_the_steps():
    a = args_for("toy-cil", "--pretrained", "none")
    tasks = [data.new_classes_only(t) for t in data.toy_cil_tasks()]
    for t in range(-1, 5):
        cols = common.eval_sets(tasks, t, "toy-cil")
        k = t if t >= 0 else 4                                       # zero-shot row: every class
        assert all(c is None for c in cols[k + 1:])
        for j, c in enumerate(cols[:k + 1]):
            assert c.classnames == tasks[k].union_classnames and len(c.classnames) == 9 * (k + 1)
            assert sorted(set(data.dataset_targets(c.test))) == list(range(9 * j, 9 * (j + 1)))
    xt = data.toy_xtail_tasks(shots=2)
    for t in (-1, 0, 5):                                             # X-TAIL: all domains' classes at every step
        for task, c in zip(xt, common.eval_sets(xt, t, "toy-xtail")):
            assert len(c.classnames) == 45 and c.templates == data.RAIL_TEMPLATES
            assert data.dataset_targets(c.test) == [task.offset + y for y in data.dataset_targets(task.test)]
    assert a.steps == 5


def test_cil_metrics_hand_computed():
    """Avg = the mean of the per-step accuracies over every image seen, the first step included;
    Last = the final step's (MoE-Adapters cil/main.py)."""
    nan = float("nan")
    A = [[90.0, nan, nan], [60.0, 80.0, nan], [30.0, 50.0, 70.0]]
    sizes = [100, 100, 200]
    acc = [90.0, (60 + 80) / 2, (30 * 100 + 50 * 100 + 70 * 200) / 400]   # 90, 70, 55
    m = common.cil_metrics(A, sizes)
    assert m["cil_acc"] == pytest.approx(acc) and m["last"] == pytest.approx(55.0)
    assert m["avg"] == pytest.approx((90 + 70 + 55) / 3)
    assert common.cil_metrics(A[:2], sizes)["last"] == pytest.approx(70.0)  # a partial run
    assert "Avg 71.7   Last 55.0" in common.format_table(["s1", "s2", "s3"], A, [1.0, 2.0, 3.0], sizes)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.data()), min_size=1, max_size=6))
def test_the_weighted_row_is_the_pooled_accuracy(groups):
    """acc_k from the row (per-step accuracies weighted by their test images) = correct / seen."""
    sizes = [n for n, _ in groups]
    correct = [d.draw(st.integers(0, n)) for n, d in groups]
    row = [100.0 * c / n for c, n in zip(correct, sizes)]
    k = len(sizes) - 1
    A = [[*row[:j + 1], *[float("nan")] * (k - j)] for j in range(k + 1)]
    assert common.cil_metrics(A, sizes)["last"] == pytest.approx(100.0 * sum(correct) / sum(sizes))


def test_a_cil_row_is_the_sources_pooled_accuracy(tiny_clip):
    """The row's columns pooled = the accuracy over every seen test image with the head of every
    seen class, as the source computes it (one evaluation of tasks[k].test)."""
    a = args_for("toy-cil", "--pretrained", "none")
    tasks = [data.new_classes_only(t) for t in data.toy_cil_tasks()]
    row = common.evaluate_all(tiny_clip, tasks, a, CPU, 1)
    pooled = common.evaluate(tiny_clip, data.Task("seen", tasks[1].union_classnames, tasks[1].templates, None,
                                                  tasks[1].test), CPU)
    assert math.isnan(row[2]) and common.cil_metrics([row], [*common.cil_group_sizes(tasks)])["cil_acc"] != []
    sizes = common.cil_group_sizes(tasks)
    assert sizes == [9 * data.TOY_CIL_PER_CLASS[1]] * 5
    assert (row[0] * sizes[0] + row[1] * sizes[1]) / (sizes[0] + sizes[1]) == pytest.approx(pooled)


# ---- end to end ----

def run_script(script, *argv, timeout=600):
    return subprocess.run([sys.executable, script, *map(str, argv)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def check_cil_summary(s, steps, done):
    assert s["benchmark"] in ("toy-cil", "cil-cifar100", "cil-tinyimagenet") and s["steps"] == steps
    assert len(s["acc_matrix"]) == len(s["cil_acc"]) == done and len(s["datasets"]) == len(s["zero_shot"])
    for k, row in enumerate(s["acc_matrix"]):
        assert all(v is not None for v in row[:k + 1]) and all(v is None for v in row[k + 1:])
    assert s["avg"] == pytest.approx(np.mean(s["cil_acc"])) and s["last"] == s["cil_acc"][-1]
    assert s["transfer"] is None and s["average"] is None and 0 <= s["zero_shot_metrics"]["last"] <= 100


def test_finetune_toy_xtail(tmp_path, toy_weights):
    import finetune
    finetune.main(["--benchmark", "toy-xtail", "--pretrained", str(toy_weights), "--iterations", "2",
                   "--max-tasks", "2", "--align-n", "0", "--no-progress", "--out", str(tmp_path / "xt")])
    s = json.loads((tmp_path / "xt" / "summary.json").read_text())
    assert s["datasets"] == data.TOY_ORDERS["I"] and len(s["acc_matrix"]) == 2 and len(s["acc_matrix"][0]) == 6
    assert all(isinstance(v, float) for row in s["acc_matrix"] for v in row) and s["transfer"] is not None
    cfg = json.loads((tmp_path / "xt" / "config.json").read_text())
    assert cfg["args"]["few_shot"] == 16 and cfg["per_task"][0]["iterations"] == 2


def _report_tool():
    import importlib.util
    spec = importlib.util.spec_from_file_location("report_tool", ROOT / "tools" / "report.py")
    report = importlib.util.module_from_spec(spec)
    sys.modules["report_tool"] = report                              # dataclasses look their module up there
    spec.loader.exec_module(report)
    return report


def test_sigkill_mid_protocol_then_resume_equals_uninterrupted(tmp_path, toy_weights):
    flags = ["--benchmark", "toy-cil", "--pretrained", str(toy_weights), "--iterations", "6", "--max-tasks", "2",
             "--align-n", "0", "--no-progress"]
    a = run_script("finetune.py", *flags, "--out", tmp_path / "a")
    assert a.returncode == 0, a.stderr
    assert "Avg " in a.stdout and "Last " in a.stdout and "Transfer" not in a.stdout
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    check_cil_summary(s, 5, 2)
    assert s["datasets"] == [f"toy-cil-step{k}" for k in range(1, 6)] and not s["complete"]
    csv = (tmp_path / "a" / "acc_matrix.csv").read_text().splitlines()
    assert csv[1].endswith(",,,,") and (tmp_path / "a" / "acc_matrix.png").is_file()
    report = _report_tool()                                          # tools/report.py reads CIL runs too
    assert report.main([str(tmp_path / "a"), "--partial", "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| method / variant | order | Avg | Last |" in md and "Transfer" not in md
    assert (tmp_path / "rep" / "acc_matrices.png").is_file() and (tmp_path / "rep" / "acc_curves.png").is_file()
    out = tmp_path / "b"
    p = subprocess.Popen([sys.executable, "finetune.py", *flags, "--out", str(out)], cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # task 1 finished: its checkpoint and its summary (two atomic writes, one after the other)
    while not ((out / "checkpoint.pt").exists() and (out / "summary.json").exists()) \
            and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    time.sleep(0.2)                      # now inside step 2
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert len(json.loads((out / "summary.json").read_text())["acc_matrix"]) == 1     # step 1 done, step 2 not
    b = run_script("finetune.py", *flags, "--out", out, "--resume")
    assert b.returncode == 0, b.stderr

    def summary(path):
        s = json.loads((path / "summary.json").read_text())
        s.pop("seconds")
        return s
    assert summary(out) == summary(tmp_path / "a")


@pytest.fixture(scope="module")
def cil_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cil-e2e")
    write_fake_cifar100(root)
    write_fake_tinyimagenet(root)
    return root


@pytest.mark.parametrize("benchmark, steps", [("cil-cifar100", 10), ("cil-tinyimagenet", 5)])
def test_finetune_real_cil_on_fake_trees(benchmark, steps, cil_root, tmp_path, toy_weights):
    """The real CIL path (torchvision CIFAR-100 / TinyImageNet loaders, class orders, transforms)."""
    import finetune
    with skip_md5_checks():
        finetune.main(["--benchmark", benchmark, "--steps", str(steps), "--data-root", str(cil_root),
                       "--model", "toy-tiny", "--pretrained", str(toy_weights), "--iterations", "2",
                       "--batch-size", "4", "--max-tasks", "2", "--workers", "0", "--out", str(tmp_path / "m"),
                       "--no-progress", "--align-n", "0"])
    s = json.loads((tmp_path / "m" / "summary.json").read_text())
    check_cil_summary(s, steps, 2)
    assert len(s["datasets"]) == len(data.cil_increments(benchmark, steps))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["args"]["steps"] == steps and cfg["per_task"][1]["batch_size"] == 4


def test_real_cil_missing_data_is_one_line(tmp_path, capsys):
    import finetune
    with pytest.raises(SystemExit) as e:
        common.cli_main(finetune.main, ["--benchmark", "cil-tinyimagenet", "--data-root", str(tmp_path),
                                        "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "tiny-imagenet-200.zip" in capsys.readouterr().err


@pytest.mark.skipif(not __import__("fake_mtil").HAS_SCIPY, reason="the fake Flowers and StanfordCars need scipy")
def test_finetune_real_xtail_on_fake_trees(tmp_path, toy_weights):
    """The real X-TAIL path: MTIL's builders for the 10 domains, 16 shots, the union of all of them."""
    import fake_mtil
    import finetune
    info = fake_mtil.write_fake_mtil(tmp_path / "data")
    with skip_md5_checks():
        finetune.main(["--benchmark", "xtail", "--data-root", str(tmp_path / "data"), "--model", "toy-tiny",
                       "--pretrained", str(toy_weights), "--iterations", "2", "--batch-size", "4", "--max-tasks", "2",
                       "--workers", "0", "--out", str(tmp_path / "x"), "--no-progress", "--align-n", "0"])
    s = json.loads((tmp_path / "x" / "summary.json").read_text())
    assert s["datasets"] == data.XTAIL_DOMAINS and len(s["acc_matrix"]) == 2 and len(s["acc_matrix"][1]) == 10
    assert all(0 <= v <= 100 for v in s["acc_matrix"][1]) and s["transfer"] is not None
    n_union = sum(len(info[n]["classnames"]) for n in data.XTAIL_DOMAINS)
    assert n_union > len(info["Aircraft"]["classnames"])
