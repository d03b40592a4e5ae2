"""Tests of igsp.py: gating, zero-output experts, pruning, the Phase-1 regulariser, frozen history
and exact old-task outputs after real optimiser steps, parameter accounting on the real
ViT-B/16 architecture, the task selector, and the command line (run + resume)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import common
import data
import igsp

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _args(*extra):
    return igsp.parse_args(["--benchmark", "toy", "--no-progress", "--batch-size", "8", "--selector-samples", "32",
                            "--selector-steps", "5", *extra])


def variant_flags(variant, experts):
    """--variant, and the fixed pool's size for moe-adapters (igsp grows its own: --experts is refused)."""
    return ["--variant", variant] + (["--experts", str(experts)] if variant == "moe-adapters" else [])


def _task(name, seed, n=24, C=3):
    g = torch.Generator().manual_seed(seed)
    ds = torch.utils.data.TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(C, (n,), generator=g))
    return data.Task(name, [f"thing{i}" for i in range(C)], ["a {}.", "a photo of a {}."], ds, ds)


def _moe(d, n_hist, M, args, seed=0):
    """A stand-alone MoEMLP (identity LN, a small MLP) with n_hist history experts and M candidates."""
    torch.manual_seed(seed)
    mlp = torch.nn.Sequential()
    mlp.add_module("c_fc", torch.nn.Linear(d, 2 * d))
    mlp.add_module("gelu", torch.nn.GELU())
    mlp.add_module("c_proj", torch.nn.Linear(2 * d, d))
    m = igsp.MoEMLP(torch.nn.Identity(), mlp, args.top_k)
    igsp.add_experts(m, n_hist + M, args)
    m.n_hist = n_hist
    m.add_router(n_hist + M)
    m.route = 0
    return m


# ---- gating ----

@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 8), st.integers(1, 4), st.integers(0, 10_000), st.booleans())
def test_gating_topk_support_and_softmax_over_selected(N, n, k, seed, training):
    args = _args("--top-k", str(k))
    m = _moe(6, 0, n, args, seed)
    torch.nn.init.normal_(m.W_g[0])
    torch.nn.init.normal_(m.W_noise[0])
    m.train(training)
    x0 = torch.randn(N, 6)
    g, p = m.gate(x0)
    kk = min(k, n)
    assert ((g > 0).sum(-1) == kk).all()                                  # exactly k experts per sample
    assert torch.allclose(g.sum(-1), torch.ones(N))
    assert torch.allclose(p.sum(-1), torch.ones(N))
    if not training:                                                      # clean logits: the top-k of h
        h = x0 @ m.W_g[0]
        top, idx = h.topk(kk, -1)
        assert torch.equal(torch.sort(idx, -1).values, torch.sort((g > 0).nonzero()[:, 1].view(N, kk), -1).values)
        assert torch.allclose(g.gather(-1, idx), top.softmax(-1))         # softmax over the selected logits


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gates_are_float32_whatever_the_logits_dtype(dtype, training):
    """Under CUDA autocast the router logits are fp16 / bf16 and softmax runs in float32: the gates come
    out float32 either way (scatter needs one dtype; fp16 / bf16 evaluation failed on a GPU without this),
    k per sample, summing to 1."""
    args = _args("--top-k", "2")
    m = _moe(6, 0, 4, args, 3)
    torch.nn.init.normal_(m.W_g[0])
    torch.nn.init.normal_(m.W_noise[0])
    m.train(training)
    g, p = m.gate(torch.randn(5, 6).to(dtype))
    assert g.dtype == p.dtype == torch.float32
    assert ((g > 0).sum(-1) == 2).all() and torch.allclose(g.sum(-1), torch.ones(5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (autocast there runs softmax in float32)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_moe_block_runs_under_cuda_autocast(dtype):
    args = _args("--top-k", "2")
    m = _moe(6, 0, 4, args, 3).cuda().eval()
    torch.nn.init.normal_(m.W_g[0])
    x = torch.randn(5, 7, 6, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        y = m(x)
    assert y.shape == x.shape and torch.isfinite(y.float()).all()


# ---- zero-output experts leave CLIP unchanged ----

@pytest.mark.parametrize("variant", ["igsp", "moe-adapters"])
def test_zero_output_experts_leave_clip_unchanged(tiny_clip, variant):
    images = torch.randn(3, 3, 32, 32)
    tokens = tiny_clip.tokenize(["a red circle.", "a square on a striped background."])
    ref_i, ref_t = tiny_clip.encode_image(images), tiny_clip.encode_text(tokens)
    args = _args(*variant_flags(variant, 5))
    moes = igsp.attach_moe(tiny_clip, args)
    igsp.begin_task(moes, 0, args)
    for m in moes.values():
        torch.nn.init.normal_(m.W_g[0])                                   # any routing: experts output 0
    for route in (None, 0):
        igsp.set_route(moes, route)
        assert torch.equal(tiny_clip.encode_image(images), ref_i)
        assert torch.equal(tiny_clip.encode_text(tokens), ref_t)
    assert "visual.0.mlp.c_fc" in tiny_clip.layers()                     # ClipView still sees the MLP


# ---- pruning ----

@pytest.mark.ex8
@settings(max_examples=30, deadline=None)
@given(st.integers(0, 4), st.integers(1, 5), st.floats(0.0, 2.0), st.integers(0, 10_000))
def test_pruning_removes_exactly_the_experts_under_threshold(n_hist, M, tau, seed):
    args = _args()
    m = _moe(4, n_hist, M, args, seed)
    torch.nn.init.normal_(m.W_g[0])
    n = n_hist + M
    g = torch.Generator().manual_seed(seed)
    pi = torch.rand(n, generator=g).softmax(0)
    sel = torch.randint(0, 3, (n,), generator=g)
    before, W_before = list(m.experts), m.W_g[0].detach().clone()
    kept = igsp.prune(m, pi, sel, tau)
    want = [j for j in range(n) if j < n_hist or (pi[j] >= tau / n and sel[j] > 0)]
    assert kept == len(want) - n_hist
    assert [id(e) for e in m.experts] == [id(before[j]) for j in want]
    assert torch.equal(m.W_g[0], W_before[:, want]) and m.W_noise[0].shape == (4, len(want))


# ---- the Phase-1 regulariser ----

@pytest.mark.ex8
@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 10_000))
def test_regulariser_gradient_moves_routing_mass_off_candidates(n_hist, M, seed):
    args = _args()
    m = _moe(5, n_hist, M, args, seed)
    torch.nn.init.normal_(m.W_g[0], std=0.5)
    m.eval()
    x = torch.randn(4, 3, 5)
    moes = {"b": m}

    def candidate_mass():                                                 # computed independently of omega_sub
        return (x[:, 0] @ m.W_g[0]).softmax(-1)[:, n_hist:].sum(-1).mean()

    m.log = []
    m(x)
    igsp.omega_sub(moes).backward()
    with torch.no_grad():
        before = candidate_mass()
        m.W_g[0] -= 1e-2 * m.W_g[0].grad                                  # one gradient step on Omega_sub
        assert candidate_mass() < before


# ---- real optimiser steps: frozen history and old-task outputs ----

def _snapshot(moes, t):
    return {name: ([p.detach().clone() for p in m.experts[:m.n_hist].parameters()],
                   m.W_g[t].detach().clone(), m.W_noise[t].detach().clone()) for name, m in moes.items()}


def _same(moes, snap, t):
    return all(all(torch.equal(a, b) for a, b in zip(m.experts[:m.n_hist].parameters(), snap[n][0]))
               and torch.equal(m.W_g[t], snap[n][1]) and torch.equal(m.W_noise[t], snap[n][2]) for n, m in moes.items())


@pytest.mark.parametrize("terms", [(), ("--lambda-s", "0", "--lambda-o", "0")])
def test_igsp_history_bit_identical_and_old_outputs_exact(tiny_clip, monkeypatch, terms):
    """After a real task 2 (both phases) the frozen history and task 1's router are bit-identical,
    and task 1's outputs under its router exact. Also with the subspace terms off (--lambda-s 0
    --lambda-o 0): what protects earlier tasks here is the frozen history, not those terms."""
    args = _args("--iterations", "10", "--t1-min", "0.3", "--t1-max", "0.3", "--prune-tau", "0", *terms)
    tasks = [_task("A", 1), _task("B", 2)]
    method = igsp.init_method(tiny_clip, args, len(tasks))
    moes = method["moes"]
    common.seed_all(0)
    igsp.train_task(tiny_clip, method, tasks[0], 0, args, CPU)
    igsp.after_task(tiny_clip, method, tasks[0], 0, args, CPU)
    stored = torch.stack([tasks[0].test[i][0] for i in range(8)])        # earlier task's inputs
    tokens = tiny_clip.tokenize(["a thing0.", "a photo of a thing2."])
    igsp.set_route(moes, 0)
    ref, ref_t = tiny_clip.encode_image(stored), tiny_clip.encode_text(tokens)
    snap = _snapshot(moes, 0)
    checked = []
    real_prune = igsp.prune

    def prune_after_phase1(m, *a):                                        # end of Phase 1: history untouched
        checked.append(_same(moes, snap, 0))
        return real_prune(m, *a)

    monkeypatch.setattr(igsp, "prune", prune_after_phase1)
    common.seed_all(1)
    info = igsp.train_task(tiny_clip, method, tasks[1], 1, args, CPU)
    assert info["T1"] == 3 and info["trainable_phase2"] > 0               # both phases ran
    assert checked and all(checked)
    assert _same(moes, snap, 0)                                           # after Phase 2 too
    igsp.set_route(moes, 0)
    assert torch.equal(tiny_clip.encode_image(stored), ref)               # old task's outputs exact
    assert torch.equal(tiny_clip.encode_text(tokens), ref_t)
    cand = [e for m in moes.values() for e in m.experts[m.n_hist:]]
    assert any(e.up.weight.abs().sum() > 0 for e in cand)                 # the new task did learn


def test_moe_adapters_freezes_most_used_experts(tiny_clip):
    args = _args("--variant", "moe-adapters", "--experts", "4", "--iterations", "6")
    tasks = [_task("A", 1), _task("B", 2)]
    method = igsp.init_method(tiny_clip, args, len(tasks))
    moes = method["moes"]
    common.seed_all(0)
    igsp.train_task(tiny_clip, method, tasks[0], 0, args, CPU)
    igsp.after_task(tiny_clip, method, tasks[0], 0, args, CPU)
    frozen = {n: [j for j, e in enumerate(m.experts) if not e.up.weight.requires_grad] for n, m in moes.items()}
    for n, js in frozen.items():
        assert set(js) == set(method["choose_map"][n].topk(2).indices.tolist())
    snap = {n: [p.detach().clone() for j in js for p in moes[n].experts[j].parameters()] for n, js in frozen.items()}
    common.seed_all(1)
    igsp.train_task(tiny_clip, method, tasks[1], 1, args, CPU)
    for n, js in frozen.items():
        assert all(torch.equal(a, b) for a, b in zip([p for j in js for p in moes[n].experts[j].parameters()], snap[n]))


# ---- parameter accounting on the real ViT-B/16 (random weights, no download) ----

def test_parameter_accounting_vit_b16():
    model = common.load_clip("ViT-B-16", "none", "cpu", progress_bar=False)
    args = igsp.parse_args(["--no-progress"])                             # mtil defaults: r = 64, M = 4
    assert args.bottleneck == 64 and args.candidates == 4
    moes = igsp.attach_moe(model, args)
    assert len(moes) == 24
    igsp.begin_task(moes, 0, args)
    per_expert = {"visual": 2 * 768 * 64 + 64 + 768, "text": 2 * 512 * 64 + 64 + 512}   # 99,136 / 66,112
    assert per_expert == {"visual": 99_136, "text": 66_112}
    phase1 = 4 * 12 * (99_136 + 66_112) + 2 * 12 * (768 + 512) * 4
    assert common.trainable_params(model) == phase1 == 8_054_784
    n = igsp.param_counts(moes, igsp.TaskSelector())
    assert n["experts"] == 7_931_904 and n["routers"] == 122_880
    for m in moes.values():                                               # the MoE-Adapters pool: 22 experts
        igsp.add_experts(m, 18, args)
        m.add_router(22)
    n = igsp.param_counts(moes, igsp.TaskSelector())
    assert n["experts"] == 22 * 12 * (99_136 + 66_112) == 26_171_904 + 17_453_568
    assert n["routers"] - 122_880 == 675_840                               # one task's routers


# ---- task selector ----

def test_selector_picks_task_on_separable_features_and_falls_back_on_unseen():
    torch.manual_seed(0)
    args = _args("--selector-hidden", "4", "--selector-steps", "100")
    e = 16
    centres = torch.eye(e)[:4] * 3

    def feats(c, n):
        return torch.nn.functional.normalize(centres[c] + 0.3 * torch.randn(n, e), dim=-1)

    sel = igsp.TaskSelector()
    for c in range(3):
        sel.fit(feats(c, 400), args)
    for c in range(3):
        assert (sel.select(feats(c, 200)) == c).float().mean() > 0.85
    assert (sel.select(feats(3, 200)) == -1).float().mean() > 0.95        # unseen -> untouched CLIP
    batch = sel.select(feats(1, 50), per_batch=True)
    assert (batch == 1).all()                                              # DDAS-style per-batch decision


# ---- command line: toy run, summary, resume ----

@pytest.mark.skipif(not hasattr(data, "toy_tasks"), reason="toy benchmark not in data.py yet")
def test_cli_toy_and_resume(toy_weights, tmp_path, alignment_recorded):
    align, check_alignment = alignment_recorded

    def cli(out, *extra):
        r = subprocess.run([sys.executable, "igsp.py", "--benchmark", "toy", "--pretrained", str(toy_weights),
                            "--iterations", "3", "--out", str(tmp_path / out), "--no-progress",
                            "--selector-samples", "64", "--selector-steps", "10", *align, *extra],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads((tmp_path / out / "summary.json").read_text())

    s = cli("a", "--max-tasks", "2")
    for k in ("method", "benchmark", "order", "datasets", "zero_shot", "acc_matrix", "transfer", "average", "last",
              "trainable_params", "seconds", "trainable", "T1", "candidates_kept", "trainable_phase1", "trainable_phase2",
              "total_params", "selector_acc_seen", "selector_fallback_unseen"):
        assert k in s, k
    assert s["method"] == "igsp" and len(s["acc_matrix"]) == 2 and len(s["T1"]) == 2
    check_alignment(s)                       # after every task (selector-routed) and at zero-shot
    assert (tmp_path / "a" / "acc_matrix.csv").is_file() and (tmp_path / "a" / "acc_matrix.png").is_file()
    cli("b", "--max-tasks", "1")
    r = cli("b", "--max-tasks", "2", "--resume")
    assert r["acc_matrix"] == s["acc_matrix"] and r["total_params"] == s["total_params"]
    assert r["modality_gap"] == s["modality_gap"] and r["zero_shot_info"] == s["zero_shot_info"]


def test_reconstruction_weights_default_per_benchmark_and_flags_win():
    """lambda_s, tau and lambda_o: the reconstruction's values on MTIL, the measured toy values on
    toy, and an explicit flag over either."""
    for bench, col in (("mtil", 0), ("toy", 1)):
        a = igsp.parse_args(["--benchmark", bench, "--no-progress"])
        assert (a.lambda_s, a.prune_tau, a.lambda_o) == tuple(igsp.DEFAULTS[k][col]
                                                              for k in ("lambda_s", "prune_tau", "lambda_o"))
        a = igsp.parse_args(["--benchmark", bench, "--no-progress", "--lambda-s", "0", "--prune-tau", "2",
                             "--lambda-o", "0.5"])
        assert (a.lambda_s, a.prune_tau, a.lambda_o) == (0.0, 2.0, 0.5)
    assert igsp.DEFAULTS["lambda_s"][0] != igsp.DEFAULTS["lambda_s"][1]


def test_every_method_flag_defaults_from_the_table():
    """Every method flag but the variant switch and --oracle-eval has no argparse default and an
    entry in DEFAULTS, which parse_args applies per benchmark."""
    p = common.common_parser("igsp")
    common_flags = {a.dest for a in p._actions}
    for bench, col in (("mtil", 0), ("toy", 1)):
        a = igsp.parse_args(["--benchmark", bench, "--no-progress"])
        own = set(vars(a)) - common_flags - {"method", "progress", "variant", "oracle_eval"}
        assert own and own <= set(igsp.DEFAULTS), own - set(igsp.DEFAULTS)
        for k in own:
            assert getattr(a, k) == igsp.DEFAULTS[k][col], (bench, k)
        assert (a.amp, a.eval_prompts) == ("off", "ensemble")
    assert igsp.parse_args(["--no-progress"]).method == "igsp"
    assert igsp.parse_args(["--no-progress", "--variant", "moe-adapters"]).method == "moe-adapters"


@pytest.mark.parametrize("variant", ["igsp", "moe-adapters"])
def test_reported_trainable_count_and_note(tiny_clip, variant):
    """after_task returns the reported count (igsp: the larger phase + the task's selector
    autoencoder; moe-adapters: the code's count with every task's router); evaluate at t = -1 is
    CLIP's zero-shot row (and the zero-shot alignment metrics), at t >= 0 the task-free row with
    the selector metrics, the alignment metrics and the note."""
    args = _args(*variant_flags(variant, 4), "--iterations", "6", "--t1-min", "0.5", "--t1-max", "0.5",
                 "--prune-tau", "0", "--eval-batch-size", "8", "--align-n", "12")
    tasks = [_task("A", 1), _task("B", 2), _task("C", 3)]
    method = igsp.init_method(tiny_clip, args, len(tasks))
    method["align"] = common.Alignment(tiny_clip, args, CPU)                # as igsp.setup
    zs, zs_info = igsp.evaluate(tiny_clip, method, tasks, -1, args, CPU)
    assert zs == common.evaluate_all(tiny_clip, tasks, args, CPU, -1)
    assert {k: v for k, v in zs_info.items() if k != "note"} == method["align"].zero_shot
    common.seed_all(0)
    info = igsp.train_task(tiny_clip, method, tasks[0], 0, args, CPU)
    more = igsp.after_task(tiny_clip, method, tasks[0], 0, args, CPU)
    ae = sum(p.numel() for p in method["selector"].aes[0].parameters())
    if variant == "igsp":
        want = max(info["trainable_phase1"], info["trainable_phase2"]) + ae
    else:
        want = igsp.moe_adapters_trainable(info["trainable_phase1"], method["moes"], 0, 3)
        assert want > info["trainable_phase1"]
    assert more["trainable_params"] == more["trainable"] == want
    n = igsp.param_counts(method["moes"], method["selector"])
    assert (more["total_params"], more["expert_params"], more["router_params"], more["selector_params"]) == (
        n["total"], n["experts"], n["routers"], n["selector"])
    row, ev = igsp.evaluate(tiny_clip, method, tasks, 0, args, CPU)
    want_row, sel = igsp.evaluate_task_free(tiny_clip, method["moes"], method["selector"], tasks, 0, args, CPU)
    assert row == want_row and ev["selector_acc_seen"] == round(sel[0], 2)
    assert ev["selector_fallback_unseen"] == round(sum(sel[1:]) / 2, 2) and "acc_oracle" not in ev
    assert f"trainable {want:,}" in ev["note"] and f"total {n['total']:,}" in ev["note"]
    assert {"modality_gap", "i2t_r1", "t2i_r1"} <= set(ev) and "held-out pairs" in ev["note"]
