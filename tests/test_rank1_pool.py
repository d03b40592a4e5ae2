"""Tests of rank1_pool.py (DAC): the pool equals its dense LoRA, the two-stage vote, the top-k
merge, AGO, frozen merged weights under a real optimiser step, ViT-B/16 parameter counts, the
few-shot default, and the command line end to end with resume."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import common
import data
import rank1_pool as R

ROOT = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=15, deadline=None)


def toy_args(*extra):
    return R.parse_args(["--benchmark", "toy", "--no-progress", *extra])


def fill_random(pools, seed=0):
    """Random A, B and vote counts, as if each pool had been trained."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pools.values():
            p.B.copy_(torch.randn(p.B.shape, generator=g))
            p.counts.copy_(torch.randperm(p.r, generator=g) * 7)


# ---- the pool --------------------------------------------------------------------------------

@pytest.mark.ex5
@FAST
@given(d_in=st.integers(2, 12), d_out=st.integers(1, 12), r=st.integers(1, 6), n=st.integers(1, 5),
       length=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_pool_with_all_experts_equals_dense_lora(d_in, d_out, r, n, length, seed):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out)
    pool = R.RankOnePool(base, r=r, k=r, alpha=1.0, dropout=0.0)
    with torch.no_grad():
        pool.B.normal_()
    x = torch.randn(n, length, d_in)
    expect = base(x) + (1.0 / r) * x @ (pool.B @ pool.A).T                  # dense LoRA: W0 x + b + (alpha/r) B A x
    for mode in (True, False):
        pool.train(mode)
        torch.testing.assert_close(pool(x), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.ex5
@FAST
@given(r=st.integers(2, 12), n=st.integers(1, 40), data_=st.data())
def test_batch_vote_picks_exactly_the_top_k_of_the_summed_votes(r, n, data_):
    k = data_.draw(st.integers(1, r))
    torch.manual_seed(data_.draw(st.integers(0, 10_000)))
    pool = R.RankOnePool(nn.Linear(6, 3), r=r, k=k, dropout=0.0)
    z = torch.randn(n, 6)
    v, m = pool.route(z)
    p = torch.softmax(pool.router(z), -1)                                    # (n, r)
    votes = torch.zeros(r, dtype=torch.long)
    for row in p:                                                            # stage 1, by hand
        votes[row.argsort(descending=True)[:k]] += 1
    assert torch.equal(v, votes) and int(v.sum()) == n * k
    M = m.nonzero().flatten()
    assert len(M) == k and set(m.unique().tolist()) <= {0.0, 1.0}            # equal weights, no gate
    rest = torch.ones(r, dtype=torch.bool)
    rest[M] = False
    if rest.any():
        assert v[M].min() >= v[rest].max()                                   # exactly a top-k of the votes
        ties = (v[rest] == v[M].min())
        assert not ties.any() or rest.nonzero().flatten()[ties].min() > M[v[M] == v[M].min()].max()  # lower index wins
    pool.train()
    pool(torch.randn(n, 3, 6))
    pool(torch.randn(n, 3, 6))
    assert int(pool.counts.sum()) == 2 * n * k                               # votes accumulate in training
    pool.eval()
    pool(torch.randn(n, 3, 6))
    assert int(pool.counts.sum()) == 2 * n * k


@pytest.mark.ex5
def test_fixed_router_gets_no_gradient_learned_router_does():
    torch.manual_seed(0)
    for learned in (False, True):
        pool = R.RankOnePool(nn.Linear(8, 5), r=6, k=3, dropout=0.2, learned_router=learned)
        with torch.no_grad():
            pool.B.normal_()
        pool.train()
        pool(torch.randn(4, 3, 8)).square().sum().backward()
        assert pool.router.weight.requires_grad == learned
        assert (pool.router.weight.grad is not None and pool.router.weight.grad.abs().sum() > 0) == learned
        assert pool.A.grad.abs().sum() > 0 and pool.base.weight.grad is None


# ---- merging ---------------------------------------------------------------------------------

@pytest.mark.ex6
def test_merge_adds_exactly_the_top_experts_and_gives_plain_clip(tiny_clip):
    args = toy_args()
    pristine_types = [type(m) for m in tiny_clip.modules()]
    pristine_keys = list(tiny_clip.state_dict())
    before = {n: l.weight.detach().clone() for n, l in tiny_clip.layers(proj=False).items()}
    pools = R.attach_pools(tiny_clip, args)
    fill_random(pools)
    x = torch.randn(3, 3, 32, 32)
    # the pool restricted to K (the top --merge-k by counts), no dropout
    for p in pools.values():
        K = p.counts.argsort(descending=True)[:args.merge_k]
        mK = torch.zeros(p.r).index_fill_(0, K, 1.0)
        p.route = lambda z, mK=mK: (None, mK)
    tiny_clip.eval()
    with torch.no_grad():
        pooled_img = tiny_clip.encode_image(x)
        pooled_txt = tiny_clip.encode_texts(["a red circle", "a blue star"], "cpu")
    method = {"experts": [], "pools": pools}                                 # as train_task leaves it
    info = R.after_task(tiny_clip, method, None, 0, args, torch.device("cpu"))
    assert set(info) == {"merge_seconds"} and "pools" not in method and len(method["experts"]) == 1
    E = method["experts"][0]
    for n, p in pools.items():
        K = p.counts.argsort(descending=True)[:args.merge_k]
        assert set(K.tolist()) == set(R.top_indices(p.counts, args.merge_k).tolist())
        delta = (p.B[:, K] @ p.A[K, :]).detach() * (1 / 12)                  # (1/12) B[:, K] A[K, :]
        assert torch.equal(tiny_clip.get_layer(n).weight, before[n] + delta)
        assert torch.equal(E[n]["counts"], p.counts)
    assert [type(m) for m in tiny_clip.modules()] == pristine_types         # plain CLIP architecture
    assert list(tiny_clip.state_dict()) == pristine_keys
    with torch.no_grad():
        torch.testing.assert_close(tiny_clip.encode_image(x), pooled_img, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tiny_clip.encode_texts(["a red circle", "a blue star"], "cpu"), pooled_txt,
                                   rtol=1e-4, atol=1e-5)


# ---- Activation-Guided Orthogonality ---------------------------------------------------------

@pytest.mark.ex6
@FAST
@given(d=st.integers(8, 16), m=st.integers(1, 4), mode=st.sampled_from(["code", "paper"]), seed=st.integers(0, 10_000))
def test_ago_zero_for_orthogonal_columns_positive_otherwise_grad_only_on_critical(d, m, mode, seed):
    torch.manual_seed(seed)
    r, n = 6, 3
    pool = R.RankOnePool(nn.Linear(4, d), r=r, k=4, dropout=0.0)
    Q = torch.linalg.qr(torch.randn(d, d))[0]                                # orthonormal (d, d)
    with torch.no_grad():
        pool.counts.copy_(torch.randperm(r) * 5)
        pool.B.copy_(torch.randn(d, r))
        C = R.top_indices(pool.counts, n)
        pool.B[:, C] = Q[:, :n] * torch.rand(n).add(0.5)                     # critical columns in span(Q[:, :n])
    P = {"l": Q[:, n:n + m] * 3.0}                                           # earlier columns orthogonal to them
    pools = {"l": pool}
    assert R.ago_loss(pools, P, n, mode).abs().item() < 1e-5
    P = {"l": torch.randn(d, m)}
    loss = R.ago_loss(pools, P, n, mode)
    assert loss.item() > 0
    loss.backward()
    col_has_grad = pool.B.grad.abs().sum(0) > 0
    assert col_has_grad[C].all() and col_has_grad.sum() == n                 # only the current critical columns
    assert pool.A.grad is None and pool.router.weight.grad is None


@pytest.mark.ex6
def test_ago_reference_code_keeps_all_columns_paper_the_merged_ones():
    E = {"l": {"A": torch.zeros(4, 2), "B": torch.arange(12.).view(3, 4), "counts": torch.tensor([1, 9, 3, 9])}}
    P = R.ago_reference([E, E], toy_args("--ago", "code"), "cpu")["l"]
    assert P.shape == (3, 8)
    P = R.ago_reference([E], toy_args("--ago", "paper", "--merge-k", "2"), "cpu")["l"]
    assert torch.equal(P, E["l"]["B"][:, [1, 3]])


# ---- unchanged outputs: earlier tasks' merged weights are constants ---------------------------

def test_merged_weights_bit_identical_after_real_training_steps(tiny_clip):
    args = toy_args("--iterations", "3", "--batch-size", "4", "--lr", "1e-2")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 32, generator=g)
    labels = [0, 1, 2, 0, 1, 2, 0, 1]
    ds = [(images[i], labels[i]) for i in range(8)]
    task = data.Task("T", ["red", "green", "blue"], ["a {} thing."], ds, ds)
    cpu = torch.device("cpu")
    method = {"experts": []}
    pools = R.attach_pools(tiny_clip, args)                                  # task 1: "trained" pool, merged
    fill_random(pools)
    method["pools"] = pools
    R.after_task(tiny_clip, method, task, 0, args, cpu)
    frozen = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    layers = tiny_clip.layers(proj=False)
    merged = {n: l.weight.clone() for n, l in layers.items()}                # W0 + task 1's merged experts
    stored = {n: torch.randn(2, 5, l.in_features, generator=g) for n, l in layers.items()}  # stored inputs
    out_before = {n: layers[n](x).detach() for n, x in stored.items()}
    info = R.train_task(tiny_clip, method, task, 1, args, cpu)               # task 2: real steps with AGO
    pools = method["pools"]                                                  # the fresh pools it trained
    assert all(type(p) is R.RankOnePool and p.counts.sum() > 0 for p in pools.values())
    assert info["ago_loss"] > 0 and all(p.B.abs().sum() > 0 for p in pools.values())  # it did train, with AGO
    for n, p in pools.items():
        assert torch.equal(p.base.weight, merged[n])                          # bit-identical
        assert torch.equal(p.base(stored[n]), out_before[n])                 # earlier tasks' outputs unchanged
    for k, v in tiny_clip.state_dict().items():                              # every CLIP tensor unchanged
        k0 = k.replace(".base.", ".")
        if k0 in frozen:
            assert torch.equal(v, frozen[k0]), k
        else:
            assert k.endswith((".A", ".B", ".counts")) or ".router." in k, k


# ---- the hooks: train_task, after_task, checkpoint / restore ---------------------------------

def small_task(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(8, 3, 32, 32, generator=g)
    ds = [(images[i], i % 3) for i in range(8)]
    return data.Task("T", ["red", "green", "blue"], ["a {} thing."], ds, ds)


def test_train_task_attaches_fresh_pools_trains_them_and_reports(tiny_clip):
    args = toy_args("--iterations", "2", "--batch-size", "4")
    cpu = torch.device("cpu")
    method = {"experts": []}
    for t in range(2):
        merged = tiny_clip.layers(proj=False)
        info = R.train_task(tiny_clip, method, small_task(t), t, args, cpu)
        pools = method["pools"]
        assert set(pools) == set(merged) and all(tiny_clip.get_layer(n) is p for n, p in pools.items())
        assert all(p.base is merged[n] for n, p in pools.items()), f"task {t}: pools must wrap the merged layers"
        assert info["trainable_params"] == sum(p.A.numel() + p.B.numel() for p in pools.values())
        assert info["params_with_routers"] == R.pool_param_count(pools) > info["trainable_params"]
        assert info["loss"] > 0 and all(int(p.counts.sum()) == 2 * 4 * args.top_k for p in pools.values())
        if t == 0:
            assert info["ago_loss"] == 0 and "note" not in info, "no AGO without earlier tasks"
        else:
            assert info["ago_loss"] > 0 and "AGO" in info["note"]
        R.after_task(tiny_clip, method, small_task(t), t, args, cpu)
        assert len(method["experts"]) == t + 1


def test_train_task_draws_the_pools_from_the_rng_state_it_is_called_with(tiny_clip, monkeypatch):
    """Run.begin_task seeds (seed, t) right before train_task: the pools (Kaiming A, router) must
    be drawn inside train_task, so the same seed gives the same pools."""
    args = toy_args()
    monkeypatch.setattr(R, "train_pools", lambda *a, **k: (0.0, 0.0))      # the draws only
    drawn = []
    for seed in (5, 5, 6):
        model = copy.deepcopy(tiny_clip)
        method = {"experts": []}
        common.seed_all(seed)
        R.train_task(model, method, small_task(), 0, args, torch.device("cpu"))
        drawn.append({n: (p.A.detach().clone(), p.router.weight.detach().clone()) for n, p in method["pools"].items()})
    assert all(torch.equal(drawn[0][n][i], drawn[1][n][i]) for n in drawn[0] for i in (0, 1))
    assert not all(torch.equal(drawn[0][n][0], drawn[2][n][0]) for n in drawn[0])


def test_eval_before_merge_evaluates_the_routed_pool(tiny_clip, monkeypatch):
    args = toy_args("--eval-before-merge")
    pools = R.attach_pools(tiny_clip, args)
    fill_random(pools)
    seen = []
    monkeypatch.setattr(common, "evaluate", lambda model, task, *a: seen.append(
        any(isinstance(m, R.RankOnePool) for m in model.modules())) or 12.5)
    info = R.after_task(tiny_clip, {"experts": [], "pools": pools}, small_task(), 0, args, torch.device("cpu"))
    assert seen == [True] and info["acc_before_merge"] == 12.5 and "merge_seconds" in info


def test_checkpoint_then_restore_replays_the_merges_in_order(tiny_clip, tmp_path):
    args = toy_args("--iterations", "2", "--batch-size", "4")
    cpu = torch.device("cpu")
    pristine = copy.deepcopy(tiny_clip)
    method = {"experts": []}
    for t in range(2):
        R.train_task(tiny_clip, method, small_task(t), t, args, cpu)
        R.after_task(tiny_clip, method, small_task(t), t, args, cpu)
    torch.save(R.checkpoint(tiny_clip, method), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert set(state) == {"experts"} and len(state["experts"]) == 2
    restored = {"experts": []}
    R.restore(pristine, restored, state, args, cpu)
    want, got = tiny_clip.state_dict(), pristine.state_dict()
    assert list(want) == list(got) and all(torch.equal(want[k], got[k]) for k in want), "merges not replayed"
    assert len(restored["experts"]) == 2
    P0, P1 = R.ago_reference(method["experts"], args, cpu), R.ago_reference(restored["experts"], args, cpu)
    assert all(torch.equal(P0[n], P1[n]) for n in P0), "the AGO reference after resume differs"


# ---- defaults and ViT-B/16 parameter counts -----------------------------------------------------

def hp(args, name, t=0):
    return R.hparams(args, data.Task(name, ["a", "b"], ["{}"], [], []), t)


def test_defaults_follow_the_official_code():
    a = R.parse_args([])
    assert a.few_shot == 5 and hp(a, "Aircraft") == common.HParams(500, 32, 2e-3, warmup=0, schedule="cosine")
    assert (a.rank, a.top_k, a.merge_k, a.alpha, a.dropout, a.ago_lambda, a.weight_decay) == (12, 8, 4, 1.0, 0.2, 0.1, 0.01)
    assert a.router == "fixed" and a.ago == "code"
    assert (a.eta_min, a.template, a.towers, a.amp, a.eval_prompts) == (1e-6, "random", ["visual", "text"], "off", "ensemble")
    a = R.parse_args(["--few-shot", "0"])
    assert a.few_shot == 0 and hp(a, "DTD").iterations == 1000
    a = R.parse_args(["--order", "II"])
    assert [hp(a, n, t).lr for t, n in enumerate(("MNIST", "Aircraft", "EuroSAT", "CIFAR100", "Food"))] == \
        [1e-3, 3e-3, 1e-3, 3e-3, 2e-3]
    a = R.parse_args(["--order", "II", "--iterations", "7", "--batch-size", "5", "--lr", "3e-4"])
    assert hp(a, "MNIST") == common.HParams(7, 5, 3e-4, warmup=0, schedule="cosine"), "flags override the defaults"
    toy = R.parse_args(["--benchmark", "toy"])
    assert toy.few_shot == R.DEFAULTS["few_shot"][1]
    assert hp(toy, "Colours") == common.HParams(*(R.DEFAULTS[k][1] for k in ("iterations", "batch_size", "lr")),
                                                warmup=0, schedule="cosine")
    assert R.parse_args(["--benchmark", "toy", "--few-shot", "3"]).few_shot == 3
    with pytest.raises(common.UserError):
        R.parse_args(["--top-k", "13"])


@pytest.fixture(scope="module")
def vit_b16():
    torch.manual_seed(0)
    return common.load_clip("ViT-B-16", "none", "cpu")                      # random weights, no download


def test_vit_b16_parameter_counts(vit_b16):
    pools = R.attach_pools(vit_b16, R.parse_args([]))
    assert len(pools) == 144
    assert common.trainable_params(vit_b16) == 3_317_760                    # A and B
    assert R.pool_param_count(pools) == 4_978_368  # + routers (the code's count)
    for n, p in pools.items():
        vit_b16.set_layer(n, p.base)
    R.attach_pools(vit_b16, R.parse_args(["--router", "learned"]))
    assert common.trainable_params(vit_b16) == 4_978_368


# ---- the command line, end to end, with resume --------------------------------------------------

def run_cli(toy_weights, out, *extra):
    r = subprocess.run([sys.executable, "rank1_pool.py", "--benchmark", "toy", "--pretrained", str(toy_weights),
                        "--iterations", "3", "--out", str(out), "--no-progress", *extra],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.skipif(not hasattr(data, "toy_tasks"), reason="the toy benchmark is not in data.py yet")
def test_cli_end_to_end_and_resume(toy_weights, tmp_path, alignment_recorded):
    align, check_alignment = alignment_recorded
    s = run_cli(toy_weights, tmp_path / "a", "--max-tasks", "2", *align)
    for key in ("method", "benchmark", "order", "datasets", "zero_shot", "acc_matrix", "transfer", "average",
                "last", "trainable_params", "seconds", "params_with_routers", "ago_loss", "merge_seconds", "loss"):
        assert key in s, key
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["per_task"][0] == {"task": s["datasets"][0], "iterations": 3, "batch_size": R.DEFAULTS["batch_size"][1],
                                  "lr": R.DEFAULTS["lr"][1], "warmup": 0, "schedule": "cosine"}
    assert s["method"] == "rank1_pool" and len(s["acc_matrix"]) == 2
    assert s["ago_loss"][0] == 0 and s["ago_loss"][1] > 0
    assert s["trainable_params"] < s["params_with_routers"][0]
    check_alignment(s)                                      # after every task and at zero-shot
    for f in ("config.json", "acc_matrix.csv", "acc_matrix.png", "checkpoint.pt"):
        assert (tmp_path / "a" / f).is_file()
    run_cli(toy_weights, tmp_path / "b", "--max-tasks", "1", *align)
    s2 = run_cli(toy_weights, tmp_path / "b", "--max-tasks", "2", "--resume", *align)
    assert s2["acc_matrix"] == s["acc_matrix"] and s2["modality_gap"] == s["modality_gap"]
    assert (tmp_path / "a" / "acc_matrix.csv").read_text() == (tmp_path / "b" / "acc_matrix.csv").read_text()
