"""The hot loops do no per-step waste, and change no number.

  * the training loader starts its worker processes once per task, not once per epoch (a 5-shot
    set is one batch: once per step), and draws exactly the batches that re-iterating the
    DataLoader drew; its random transforms do not depend on --workers
  * the class prompts are tokenized once per task, not once per step
  * the step losses stay on the device (no host read per step); a non-finite loss still names the
    task and its first non-finite step, at most LOSS_READ_EVERY steps late
  * device syncs per training step, counted by tools/syncs.py: none, but one per MoE block in
    igsp.py (the expert batch sizes; the old code did one per expert)
  * igsp's dispatch, rank1_pool's token table and GNSP's reference batches give bit-identical
    results to what they replace
  * --amp tf32, the worker default, tools/bench.py and tools/cpu_speed.py on the CPU
"""
import gc
import itertools
import math
import multiprocessing
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import common
import data
import finetune
import gnsp
import igsp
import keeplora
import rank1_pool
from fakes import Images

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from syncs import SyncCounter  # noqa: E402

CPU = torch.device("cpu")
SCRIPTS = {  # key: (module, flags that keep the toy run small)
    "finetune": (finetune, ["--align-n", "0"]),
    "gnsp": (gnsp, ["--ref-n", "8", "--align-n", "8"]),
    "keeplora": (keeplora, ["--grad-batches", "1", "--feature-batches", "1", "--align-n", "0"]),
    "rank1_pool": (rank1_pool, ["--align-n", "0"]),
    "igsp": (igsp, ["--selector-samples", "8", "--selector-steps", "2", "--align-n", "0"]),
    "moe-adapters": (igsp, ["--variant", "moe-adapters", "--experts", "4", "--selector-samples", "8",
                            "--selector-steps", "2", "--align-n", "0"]),
}


def tiny():
    torch.manual_seed(0)
    return common.load_clip(common.TOY_MODEL, "none", "cpu")


def toy_tasks(ds_fn=None, n=4):
    """Two tasks of n random images (one batch at --batch-size 4), 3 classes, two templates."""
    tasks = []
    for k, name in enumerate(data.TOY_ORDERS["I"][:2]):
        ds = ds_fn(k) if ds_fn else Images(n, k)
        tasks.append(data.Task(name, ["red circle", "green star", "blue square"], ["a {}.", "a photo of the {}."], ds, ds))
    return tasks


def prepared(key, monkeypatch, tasks, *flags):
    """The script's own setup on a fresh tiny CLIP and the given tasks: (module, args, model, tasks, method)."""
    m, extra = SCRIPTS[key]
    args = m.parse_args(["--benchmark", "toy", "--no-progress", "--out", "/nonexistent", "--batch-size", "4",
                         "--seed", "1", *extra, *flags])
    model = tiny()
    monkeypatch.setattr(common, "setup_model", lambda a, d: model)
    monkeypatch.setattr(common, "load_tasks", lambda a, mdl, **kw: tasks)
    model, tasks, method = m.setup(args, CPU)
    return m, args, model, tasks, method


def train(key, monkeypatch, steps, tasks=None, *flags, spy=None):
    """Train the first task for `steps` steps; `spy(model)` is called after setup (returns a context)."""
    m, args, model, tasks, method = prepared(key, monkeypatch, tasks or toy_tasks(), "--iterations", str(steps), *flags)
    common.seed_all(1000)
    with (spy(model) if spy else _nothing()):
        info = m.train_task(model, method, tasks[0], 0, args, CPU)
    return info


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ---- acceptance: workers started once per task, tokens built once per task -------------------------


@pytest.mark.parametrize("key", list(SCRIPTS))
def test_a_one_batch_loader_starts_no_new_workers_from_step_to_step(key, monkeypatch):
    """A task whose training split is one batch, --workers 2: the worker processes started while
    the script sets up and trains the task do not grow with the number of steps (the old loader started new
    ones at every epoch, i.e. every step), and none outlives the task."""
    started = []
    real_start = multiprocessing.process.BaseProcess.start
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start",
                        lambda self: started.append(1) or real_start(self))
    counts = {}
    for steps in (1, 3):
        started.clear()
        train(key, monkeypatch, steps, None, "--workers", "2")
        counts[steps] = len(started)
        gc.collect()
        assert not multiprocessing.active_children(), f"{key}: loader workers outlive the task"
    assert counts[1] > 0, f"{key}: the test expects the training loader to use worker processes"
    assert counts[3] == counts[1], \
        f"{key}: {counts[1]} worker processes started for 1 step, {counts[3]} for 3: workers restart per epoch"


@pytest.mark.parametrize("key", list(SCRIPTS))
def test_the_text_tokens_of_a_task_are_built_once(key, monkeypatch):
    """The tokenizer runs as often for a 6-step task as for a 2-step one (once per task for the
    class prompts; GNSP: also once per reference batch), not once per step."""
    counts = {}
    for steps in (2, 6):
        calls = []

        def spy(model):
            real = model.tokenizer
            model.tokenizer = lambda texts, *a, **kw: calls.append(len(texts)) or real(texts, *a, **kw)
            return _nothing()

        train(key, monkeypatch, steps, None, spy=spy)
        counts[steps] = len(calls)
    assert counts[2] > 0
    assert counts[6] == counts[2], f"{key}: tokenizer called {counts[2]} times for 2 steps, {counts[6]} for 6"


# ---- the endless loader: the same batches, random transforms from the batch's seed ------------------


def reiterated(loader, k):
    """The old way: iterate the DataLoader again for every epoch."""
    return list(itertools.islice(itertools.chain.from_iterable(iter(loader) for _ in itertools.count()), k))


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 13), bs=st.integers(1, 6), shuffle=st.booleans(), drop_last=st.booleans(),
       seed=st.integers(0, 10**6))
def test_forever_draws_the_batches_of_reiterating_the_loader(n, bs, shuffle, drop_last, seed):
    if drop_last and n < bs:
        with pytest.raises(common.UserError, match="empty"):
            next(common.forever(common.make_loader(Images(n, 0), bs, shuffle, seed, drop_last=drop_last)))
        return
    ds = Images(n, seed % 7)
    want = reiterated(common.make_loader(ds, bs, shuffle, seed, drop_last=drop_last), 9)
    got = list(itertools.islice(common.forever(common.make_loader(ds, bs, shuffle, seed, drop_last=drop_last)), 9))
    assert same(got, want), "forever must draw the same indices as re-iterating the loader epoch after epoch"


def test_forever_with_workers_draws_the_same_batches():
    ds = Images(10, 3)
    want = reiterated(common.make_loader(ds, 4, True, 5), 12)
    got = list(itertools.islice(common.forever(common.make_loader(ds, 4, True, 5, workers=2)), 12))
    assert same(got, want)


class RandomCrops(torch.utils.data.Dataset):
    """Each read draws from torch, numpy and python's random (as random transforms do)."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.rand(3) + np.random.rand() + random.random(), i


def test_random_transforms_do_not_depend_on_workers_and_leave_the_main_streams_alone():
    loaders = {w: common.forever(common.make_loader(RandomCrops(), 4, True, 9, workers=w)) for w in (0, 1, 2)}
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    batches = {w: list(itertools.islice(b, 7)) for w, b in loaders.items()}
    after = (torch.rand(1), np.random.rand(), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    assert torch.equal(after[0], torch.rand(1)) and after[1:] == (np.random.rand(), random.random()), \
        "reading batches in this process must not move its random streams"
    for w in (1, 2):
        assert same(batches[w], batches[0]), f"--workers {w} drew other random transforms than --workers 0"
    assert not torch.equal(batches[0][0][0], batches[0][2][0]), "two epochs should draw different transforms"


# ---- step losses: no read per step, NaN still named --------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=120), every=st.integers(1, 60))
def test_loss_log_mean_is_the_step_order_sum_of_the_items(values, every):
    log = common.LossLog("T", len(values), CPU, every=every)
    want = 0.0
    for step, v in enumerate(values):
        loss = torch.tensor(v, dtype=torch.float32)
        log.add(loss, step)
        want += loss.item()
    assert log.mean(len(values)) == want / len(values), "the mean must equal sum += loss.item() exactly"


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 100), bad=st.data(), every=st.integers(1, 60), value=st.sampled_from([math.nan, math.inf]))
def test_loss_log_names_the_first_non_finite_step(n, bad, every, value):
    k = bad.draw(st.integers(0, n - 1))
    log = common.LossLog("Colours", n, CPU, every=every)
    with pytest.raises(common.NonFiniteLoss, match=rf"in task 'Colours' at step {k};") as e:
        for step in range(n):
            log.add(torch.tensor(value if step >= k else 1.0), step)
        log.mean(n)
    assert ("nan" if math.isnan(value) else "inf") in str(e.value)
    assert step - k < every, "the check must come at most `every` steps late"
    quiet = common.LossLog("T", n, CPU, every=every, check=False)
    for step in range(n):
        quiet.add(torch.tensor(math.nan), step)
    assert math.isnan(quiet.mean(n)), "check=False: a statistic, never an error"


class PoisonAfter(torch.utils.data.Dataset):
    """Random images; every read from the `after`-th on returns NaN pixels (reads are in step order)."""

    def __init__(self, n, after):
        self.base, self.after, self.reads = Images(n, 0), after, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        self.reads += 1
        return (torch.full_like(x, math.nan) if self.reads > self.after else x), y


@pytest.mark.parametrize("key", ["finetune", "igsp"])
def test_a_nan_loss_names_task_and_step_and_stops_the_task(key, monkeypatch):
    """Training a task whose step-3 batch is NaN (and every later one) stops with NonFiniteLoss
    naming the task and step 3, within LOSS_READ_EVERY steps, not at the end of the task."""
    monkeypatch.setattr(common, "LOSS_READ_EVERY", 8)
    added = []
    real_add = common.LossLog.add
    monkeypatch.setattr(common.LossLog, "add", lambda log, loss, step: added.append(step) or real_add(log, loss, step))
    tasks = toy_tasks(lambda k: PoisonAfter(4, 3 * 4), n=4)
    with pytest.raises(common.NonFiniteLoss, match=rf"in task '{tasks[0].name}' at step 3;"):
        train(key, monkeypatch, 3 * common.LOSS_READ_EVERY, tasks, "--lr", "1e-3")
    assert max(added) < common.LOSS_READ_EVERY, f"{key}: the NaN was noticed only after step {max(added)}"


# ---- device syncs per step ------------------------------------------------------------------------------


def reads_during(key, monkeypatch, steps, *flags):
    box = {}

    def spy(model):
        box["c"] = SyncCounter(model, CPU)
        return box["c"]

    train(key, monkeypatch, steps, toy_tasks(n=8), *flags, spy=spy)
    return box["c"]


@pytest.mark.parametrize("key", ["finetune", "gnsp", "keeplora", "rank1_pool", "moe-adapters", "igsp"])
def test_device_syncs_per_training_step(key, monkeypatch):
    """Host reads of device values per step, (reads of a 7-step task - reads of a 3-step task) / 4:
    none; igsp.py: one per MoE block (the expert batch sizes of its sparse dispatch; iGSP's
    convergence checks are moved past the last step with --check-every 1)."""
    flags = ["--check-every", "1"] if key == "igsp" else []
    a, b = (reads_during(key, monkeypatch, n, *flags) for n in (3, 7))
    per_step = (b.count - a.count) / 4
    if key in ("igsp", "moe-adapters"):
        blocks = sum(1 for _ in igsp.attach_moe(tiny(), SCRIPTS[key][0].parse_args(["--benchmark", "toy"])))
        assert per_step <= blocks, f"{key}: {per_step} syncs per step, want at most one per MoE block ({blocks})"
        if key == "moe-adapters":
            assert per_step == blocks, f"{key}: {per_step} syncs per step, want one per MoE block ({blocks})"
    else:
        assert per_step == 0, f"{key}: {per_step} device syncs per step at {(b.sites - a.sites).most_common(3)}"


def test_sync_counter_counts_reads_of_device_values_only():
    net = nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    host = torch.tensor([1.0, 2.0])
    with SyncCounter(net, CPU) as c:
        out = net(torch.randn(4, 3))
        out.sum().backward()
        opt.step()                                     # Adam's step counters live on the host
        host.tolist(), int(host[0])                    # host values
        assert c.count == 0
        out.sum().item()
        bool((out > 0).any())
        x = host.to(CPU)                               # moved to the device
        x.tolist()
        torch.zeros(2, device=CPU).nonzero()
    assert c.count == 4 and sum(c.sites.values()) == 4


# ---- bit-identical replacements --------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 9), n=st.integers(0, 7), seed=st.integers(0, 10**6))
def test_dispatch_is_the_per_expert_nonzero(N, n, seed):
    g = torch.Generator().manual_seed(seed)
    gates = torch.rand(N, n, generator=g) * (torch.rand(N, n, generator=g) > 0.5)
    got = igsp.dispatch(gates)
    assert len(got) == n
    for i, r in enumerate(got):
        assert torch.equal(r, gates[:, i].nonzero().squeeze(1)), f"expert {i}"


def old_moe_forward(m, x):
    """MoEMLP.forward as it was: one nonzero() per expert."""
    y = m.c_proj(m.gelu(m.c_fc(m.ln_2(x))))
    g, p = m.gate(x[:, 0])
    rows, outs = [], []
    for i in range(g.shape[1]):
        r = g[:, i].nonzero().squeeze(1)
        if len(r):
            rows.append(r)
            outs.append(g[r, i, None, None] * m.experts[i](x[r]))
    return y if not rows else y.index_add(0, torch.cat(rows), torch.cat(outs).to(y.dtype))


@pytest.mark.parametrize("training", [True, False])
def test_moe_block_output_and_random_draws_are_unchanged(training):
    """Training mode (gate noise, expert dropout) and eval mode: the block's output is bit-identical
    to the per-expert loop's from the same RNG state, and the RNG ends in the same state."""
    model = tiny()
    args = igsp.parse_args(["--benchmark", "toy", "--variant", "moe-adapters", "--experts", "6"])
    m = igsp.attach_moe(model, args)["visual.0"]
    igsp.add_experts(m, 6, args)
    m.add_router(6)
    torch.manual_seed(1)
    with torch.no_grad():
        for e in m.experts:
            e.up.weight.normal_()
        m.W_g[0].normal_(std=3.0)
        m.W_noise[0].normal_()
    m.route = 0
    m.train(training)
    x = torch.randn(9, 5, m.d)
    torch.manual_seed(2)
    want, want_next = old_moe_forward(m, x), torch.rand(1)
    torch.manual_seed(2)
    got, got_next = m(x), torch.rand(1)
    assert torch.equal(got, want) and torch.equal(got_next, want_next)


_TINY = tiny()


@settings(max_examples=25, deadline=None)
@given(labels=st.lists(st.integers(0, 4), min_size=1, max_size=12))
def test_rank1_prompt_tokens_are_the_batch_tokenization(labels):
    tiny_clip = _TINY
    prompts = [f"a photo of {c}." for c in ["a red circle", "x", "a small green star on a dark striped background",
                                            "two", "blue"]]
    table = rank1_pool.PromptTokens(tiny_clip, prompts, CPU)
    y = torch.tensor(labels)
    assert torch.equal(table.of(y, y.clone()), tiny_clip.tokenize([prompts[i] for i in labels]))


def test_gnsp_reference_batches_are_the_loaders(tiny_clip):
    ref = data.toy_reference(seed=0, n=10)
    args = gnsp.parse_args(["--benchmark", "toy", "--out", "/nonexistent"])
    got = gnsp.reference_batches(tiny_clip, ref, 4, args, CPU)
    want = list(common.make_loader(ref, 4, False, 0))
    assert len(got) == len(want) == 3
    for (im, tok, Y), (wim, caps) in zip(got, want):
        assert torch.equal(im, wim) and torch.equal(tok, tiny_clip.tokenize(list(caps)))
        assert torch.equal(Y, gnsp.same_caption(list(caps), CPU))


# ---- precision and worker defaults ---------------------------------------------------------------------


@pytest.mark.parametrize("module", [finetune, gnsp, keeplora, rank1_pool, igsp])
def test_amp_tf32_is_accepted_and_official_stays_each_codes(module):
    assert module.parse_args(["--amp", "tf32", "--out", "/nonexistent"]).amp == "tf32"
    want = module.DEFAULTS["amp"][0]
    assert module.parse_args(["--out", "/nonexistent"]).amp == want, "MTIL default: the official code's precision"
    assert want == ("fp16" if module is keeplora else "off")


def test_set_precision_turns_tf32_on_for_cuda_only(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", seen.append)
    common.set_precision(torch.device("cuda"), "tf32")
    common.set_precision(torch.device("cuda"), "off")
    common.set_precision(torch.device("cuda"), "bf16")
    common.set_precision(CPU, "tf32")
    assert seen == ["high", "highest", "highest"], "TF32 products for --amp tf32 on CUDA only; nothing on the CPU"
    with common.autocast(CPU, "tf32"):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("cores,want", [(1, 1), (2, 1), (5, 4), (64, 8)])
def test_worker_default_follows_the_cpu_count(cores, want, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert common.default_workers() == want
    assert finetune.parse_args(["--out", "/nonexistent"]).workers == want
    assert finetune.parse_args(["--benchmark", "toy", "--out", "/nonexistent"]).workers == 0
    assert finetune.parse_args(["--workers", "3", "--out", "/nonexistent"]).workers == 3


# ---- the tools -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_runs_on_the_cpu_and_prints_its_table(tmp_path, capsys):
    import bench
    out = tmp_path / "bench.json"
    res = bench.main(["--device", "cpu", "--tiny", "--quick", "--workers", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert {r["script"] for r in res["rows"]} == set(bench.SCRIPTS)
    for r in res["rows"]:
        assert r["steps_per_s"] > 0 and r["eval_images_per_s"] > 0 and r["after_task_s"] >= 0, r
        assert r["script"] in text
    assert "steps/s" in text and "loader:" in text and res["loader"]["images_per_s"] > 0
    assert out.is_file() and len(__import__("json").loads(out.read_text())["rows"]) == len(bench.SCRIPTS)


def test_bench_step_clock_times_a_loop_that_breaks_early():
    """iGSP's training loop breaks when every candidate is pruned: the clock still closes, counting
    the steps handed out after the warm-up."""
    import bench
    clock = bench.StepClock(CPU, warmup=2)
    for i in clock(range(10)):
        if i == 6:
            break
    n, dt = clock.timed
    assert n == 5 and dt >= 0                       # steps 2..6 timed
    full = bench.StepClock(CPU, warmup=2)
    assert list(full(range(10))) == list(range(10)) and full.timed[0] == 8
    short = bench.StepClock(CPU, warmup=5)
    list(short(range(3)))
    assert short.timed == (0, 0.0)                  # ended inside the warm-up: nothing timed


def test_bench_records_a_failing_script_and_goes_on(tmp_path, monkeypatch, capsys):
    """A script that raises gets an error row; every other (script, precision) is still measured, the
    JSON on disk holds every row, and the loop runs precision by precision."""
    import bench
    calls = []

    def fake(key, amp, a, device):
        calls.append((amp, key))
        if key == "gnsp" and amp == "tf32":
            raise RuntimeError("planted")
        return {"script": key, "precision": amp, "steps_per_s": 1.0, "peak_gb": None, "task_start_end_s": 0.0,
                "after_task_s": 0.0, "eval_images_per_s": 1.0}

    monkeypatch.setattr(bench, "bench_script", fake)
    out = tmp_path / "b.json"
    res = bench.main(["--device", "cpu", "--tiny", "--quick", "--precisions", "off,tf32", "--scripts",
                      "finetune,gnsp,keeplora", "--loader-images", "0", "--json", str(out)])
    assert calls == [(p, k) for p in ("off", "tf32") for k in ("finetune", "gnsp", "keeplora")]
    errors = [r for r in res["rows"] if "error" in r]
    assert [(r["script"], r["precision"]) for r in errors] == [("gnsp", "tf32")] and "planted" in errors[0]["error"]
    assert len(__import__("json").loads(out.read_text())["rows"]) == 6 and "loader" not in res
    assert "error: RuntimeError: planted" in capsys.readouterr().out


@pytest.mark.slow
def test_cpu_speed_runs(capsys):
    import cpu_speed
    res = cpu_speed.main(["--before", str(ROOT), "--quick", "--skip", "syncs,toy"])
    assert res["loader"]["after"] > 0 and res["tokens_ms"]["after"] >= 0
    assert "tokenization per step" in capsys.readouterr().out
