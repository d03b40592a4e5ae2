"""Every method script on the class-incremental and X-TAIL protocols, end to end in one process:
toy-cil and toy-xtail (the tiny CLIP, 2 iterations a task) and the fake CIFAR-100 tree of
tests/test_data_protocols.py (the real CIL loaders), through the run folder and summary.json."""
import importlib
import json

import numpy as np
import pytest

import data
import fake_mtil
from fake_mtil import skip_md5_checks, write_fake_imagenet
from test_data_protocols import write_fake_cifar100, write_fake_tinyimagenet

# each method's flags that keep a toy task to a few seconds (its own passes over the data)
FAST = {"gnsp": ["--ref-n", "16", "--gram-batches", "2"],
        "keeplora": ["--grad-batches", "2", "--feature-batches", "2"],
        "rank1_pool": [],
        "igsp": ["--selector-samples", "32", "--selector-steps", "5", "--oracle-eval"],
        "moe-adapters": ["--selector-samples", "32", "--selector-steps", "5", "--oracle-eval"]}
METHODS = list(FAST)
NAME = {"keeplora": "keeplora++"}                                    # the run's method: keeplora.py's default variant


def run(method, out, *argv, tasks=2):
    script = "igsp" if method == "moe-adapters" else method
    variant = ["--variant", "moe-adapters"] if method == "moe-adapters" else []
    importlib.import_module(script).main([*argv, *variant, *FAST[method], "--iterations", "2", "--max-tasks", str(tasks),
                                          "--align-n", "0", "--no-progress", "--out", str(out)])
    return json.loads((out / "summary.json").read_text()), json.loads((out / "config.json").read_text())


def check_cil(s, method, steps):
    assert s["method"] == NAME.get(method, method) and s["steps"] == steps and len(s["acc_matrix"]) == len(s["cil_acc"]) == 2
    for k, row in enumerate(s["acc_matrix"]):
        assert all(v is not None and 0 <= v <= 100 for v in row[:k + 1]) and all(v is None for v in row[k + 1:])
    assert s["avg"] == pytest.approx(np.mean(s["cil_acc"])) and s["last"] == s["cil_acc"][-1]
    assert s["transfer"] is None and s["average"] is None and s["trainable_params"] > 0


@pytest.mark.parametrize("method", METHODS)
def test_toy_cil(method, tmp_path, toy_weights):
    s, cfg = run(method, tmp_path / "o", "--benchmark", "toy-cil", "--pretrained", str(toy_weights))
    check_cil(s, method, 5)
    assert s["datasets"] == [f"toy-cil-step{k}" for k in range(1, 6)]
    assert cfg["args"]["few_shot"] == 0
    if method == "igsp":                                             # the selector routes among the steps
        assert 0 <= s["selector_acc_seen"][-1] <= 100 and s["selector_fallback_unseen"][-1] is None
        assert len(s["acc_oracle"]) == 2 and s["acc_oracle"][0][1] is None
    if method == "moe-adapters":                                     # cil/'s module: one router, no selector
        assert cfg["args"]["routers"] == "shared" and cfg["args"]["experts"] == 2
        assert s["selector_acc_seen"] == [None, None] and "acc_oracle" not in s


@pytest.mark.parametrize("method", METHODS)
def test_toy_xtail(method, tmp_path, toy_weights):
    # one domain is enough for the union head; the selectors (igsp, moe-adapters) choose between its
    # router and the untouched CLIP for the five domains not learned
    tasks = 1
    s, cfg = run(method, tmp_path / "o", "--benchmark", "toy-xtail", "--pretrained", str(toy_weights), tasks=tasks)
    assert s["method"] == NAME.get(method, method) and s["datasets"] == data.TOY_ORDERS["I"] and len(s["acc_matrix"]) == tasks
    assert all(0 <= v <= 100 for row in s["acc_matrix"] for v in row) and s["transfer"] is not None
    assert cfg["args"]["few_shot"] == 16
    if method in ("igsp", "moe-adapters"):                           # the selector: its router or CLIP
        assert 0 <= s["selector_acc_seen"][0] <= 100 and 0 <= s["selector_fallback_unseen"][0] <= 100


@pytest.fixture(scope="module")
def real_root(tmp_path_factory):
    """Fake CIFAR-100, TinyImageNet and the 10 X-TAIL domains (MTIL's builders), with ImageNet for GNSP."""
    root = tmp_path_factory.mktemp("real")
    write_fake_cifar100(root)
    write_fake_tinyimagenet(root)
    if fake_mtil.HAS_SCIPY:                                          # Flowers, StanfordCars: .mat files
        fake_mtil.write_fake_mtil(root, data.XTAIL_DOMAINS)
    write_fake_imagenet(root, per_class=12)                          # GNSP's reference pairs
    return root


# CIFAR-100 in 20 steps of 5; TinyImageNet: 100 base classes, then 5 steps of 20 (6 tasks in all)
@pytest.mark.parametrize("benchmark, steps, n_tasks", [("cil-cifar100", 20, 20), ("cil-tinyimagenet", 5, 6)])
@pytest.mark.parametrize("method", METHODS)
def test_fake_cil(method, benchmark, steps, n_tasks, real_root, tmp_path, toy_weights):
    with skip_md5_checks():
        s, cfg = run(method, tmp_path / "o", "--benchmark", benchmark, "--steps", str(steps), "--data-root",
                     str(real_root), "--model", "toy-tiny", "--pretrained", str(toy_weights), "--batch-size", "4",
                     "--workers", "0")
    check_cil(s, method, steps)
    assert len(s["datasets"]) == n_tasks and cfg["per_task"][0]["batch_size"] == 4


@pytest.mark.skipif(not fake_mtil.HAS_SCIPY, reason="the fake Flowers and StanfordCars need scipy (.mat files)")
@pytest.mark.parametrize("method", METHODS)
def test_fake_xtail(method, real_root, tmp_path, toy_weights):
    """The 10 domains' builders, 16 shots, every test image over the union of all 10 domains."""
    with skip_md5_checks():
        s, cfg = run(method, tmp_path / "o", "--benchmark", "xtail", "--data-root", str(real_root), "--model",
                     "toy-tiny", "--pretrained", str(toy_weights), "--batch-size", "4", "--workers", "0")
    assert s["method"] == NAME.get(method, method) and s["datasets"] == data.XTAIL_DOMAINS
    assert len(s["acc_matrix"]) == 2 and all(len(row) == 10 and all(0 <= v <= 100 for v in row) for row in s["acc_matrix"])
    assert s["transfer"] is not None and cfg["args"]["few_shot"] == 16


def test_protocol_budgets_per_method():
    """CIL: one epoch (ceil(N / B) + 1) at the config's batch size for every method; MoE-Adapters
    with its CIL config exactly (lr 1e-3, ls 0, wd 0, 30 warm-up steps even in a 21-step task);
    X-TAIL: each method's per-dataset / few-shot budget."""
    import gnsp
    import igsp
    import keeplora
    import rank1_pool

    def parse(m, *flags):
        return m.parse_args([*flags, "--out", "/nonexistent"])
    step = data.Task("cil-cifar100-step1", ["a"] * 5, ["{}"], list(range(2500)), [])   # 5-5: 2500 images a step
    moe = parse(igsp, "--benchmark", "cil-cifar100", "--steps", "20", "--variant", "moe-adapters")
    hp = igsp.hparams(moe, step, 0)
    assert (hp.iterations, hp.batch_size, hp.lr, hp.warmup) == (21, 128, 1e-3, 30)   # notes/protocols.md 1.3
    assert (moe.label_smoothing, moe.weight_decay) == (0.0, 0.0)
    ig = parse(igsp, "--benchmark", "cil-cifar100", "--steps", "20")
    assert igsp.hparams(ig, step, 0).warmup == 10 and ig.label_smoothing == 0.2        # iGSP: its own (CHOICE)
    for m in (gnsp, keeplora, rank1_pool):
        a = parse(m, "--benchmark", "cil-cifar100", "--steps", "20")
        assert (m.hparams(a, step, 0).iterations, m.hparams(a, step, 0).batch_size) == (21, 128), m.__name__
        assert a.few_shot == 0
    assert gnsp.hparams(parse(gnsp, "--benchmark", "cil-cifar100"), step, 0).lr == 1e-5
    aircraft = data.Task("Aircraft", ["a"] * 100, ["{}"], list(range(1600)), [])       # 16 shots of 100 classes
    assert keeplora.hparams(parse(keeplora, "--benchmark", "xtail"), aircraft, 0).iterations == 10 * 25
    assert rank1_pool.hparams(parse(rank1_pool, "--benchmark", "xtail"), aircraft, 0).iterations == 500
    assert igsp.hparams(parse(igsp, "--benchmark", "xtail"), aircraft, 0).lr == 8e-3     # the few-shot script's
    assert gnsp.hparams(parse(gnsp, "--benchmark", "xtail"), aircraft, 0).iterations == 100
