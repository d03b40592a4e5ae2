"""Behaviour tests of igsp.py (iGSP over MoE-Adapters; `--variant moe-adapters` is the baseline).

Each test pins an observable property, computed independently of the code under test where
possible: the MoE block's formula (experts on the un-normalised stream, router on token 0,
softmax over the top-k, noise only while training), the two phases of a real `train_task`
(frozen router in Phase 2, loss = CE + the phase's penalty, cosine schedule with warm-up),
what stays frozen (CLIP, the history, the most used MoE-Adapters experts), pruning on the
window statistics, router convergence, the regularisers' values, the task selector's decision
rule, task-free evaluation, and the published defaults (MoE-Adapters' scripts, the reconstruction's
own values for iGSP)."""
import math
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim.optimizer import register_optimizer_step_pre_hook

import common
import data
import igsp
from test_igsp import variant_flags          # --variant, and --experts for moe-adapters only

CPU = torch.device("cpu")


def _args(*extra):
    return igsp.parse_args(["--benchmark", "toy", "--no-progress", "--iterations", "6", "--batch-size", "4",
                            "--selector-samples", "16", "--selector-steps", "3", *extra])


def _task(name, seed, n=16, C=3):
    g = torch.Generator().manual_seed(seed)
    ds = torch.utils.data.TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(C, (n,), generator=g))
    return data.Task(name, [f"thing{i}" for i in range(C)], ["a {}.", "a photo of the {} here."], ds, ds)


def _clip():
    torch.manual_seed(0)
    return common.load_clip(common.TOY_MODEL, "none", "cpu")


def _moe(d, n, k, seed, n_hist=0):
    """A stand-alone MoEMLP with a real (random-affine) LayerNorm, so LN2(x) != x, and experts
    with random non-zero weights; router 0 random; eval mode."""
    torch.manual_seed(seed)
    ln = nn.LayerNorm(d)
    nn.init.normal_(ln.weight)
    nn.init.normal_(ln.bias)
    mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(d, 2 * d), gelu=nn.GELU(), c_proj=nn.Linear(2 * d, d)))
    m = igsp.MoEMLP(ln, mlp, k)
    igsp.add_experts(m, n, _args("--bottleneck", "3"))
    for e in m.experts:
        for p in e.parameters():
            nn.init.normal_(p)
    m.n_hist = n_hist
    m.add_router(n)
    nn.init.normal_(m.W_g[0])
    m.route = 0
    return m.eval()


def _expert_ref(e, x):
    """E(x) = s * (W_up ReLU(W_down x + b_down) + b_up), written out (no dropout: eval)."""
    return e.s * F.linear(F.relu(F.linear(x, e.down.weight, e.down.bias)), e.up.weight, e.up.bias)


def _gate_ref(x0, W, k):
    """Clean top-k gating: softmax over the k largest logits, zeros elsewhere; dense softmax p."""
    h = x0 @ W
    top, idx = h.topk(min(k, h.shape[1]), -1)
    return torch.zeros_like(h).scatter(-1, idx, top.softmax(-1)), h.softmax(-1)


def _clip_params(model):
    """CLIP's own parameters (everything but the experts and routers), by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if ".experts." not in n and ".W_g." not in n and ".W_noise." not in n}


# ---- the MoE block: formula, inputs of every part, gating ----

@settings(max_examples=30, deadline=None)
@given(N=st.integers(1, 4), L=st.integers(2, 4), n=st.integers(1, 5), k=st.integers(1, 3), seed=st.integers(0, 9999))
def test_moe_block_output_matches_formula(N, L, n, k, seed):
    """MLP(LN2(x)) + sum_i g_i(x_0) E_i(x): experts on the UN-normalised x, gates from token 0."""
    d = 6
    m = _moe(d, n, k, seed)
    x = torch.randn(N, L, d) * 2 + 0.5                                     # LN2 changes x visibly
    with torch.no_grad():
        g, _ = _gate_ref(x[:, 0], m.W_g[0], k)
        want = m.c_proj(F.gelu(m.c_fc(F.layer_norm(x, (d,), m.ln_2.weight, m.ln_2.bias))))
        for i, e in enumerate(m.experts):
            want = want + g[:, i, None, None] * _expert_ref(e, x)
        got = m(x)
    err = (got - want).abs().max().item()
    assert err < 1e-4, f"MoE block != MLP(LN2 x) + sum g_i(x[:,0]) E_i(x) (N={N} L={L} n={n} k={k}): max err {err}"
    m.route = None                                                         # route None: exactly CLIP's MLP
    with torch.no_grad():
        assert torch.equal(m(x), m.c_proj(m.gelu(m.c_fc(m.ln_2(x))))), "route None must be the untouched MLP"


def test_real_clip_experts_read_block_stream_router_reads_token0(monkeypatch):
    """On the tiny CLIP, with hooks: every expert's input is the MoE's input x (rows routed to it),
    the router's input is x[:, 0], CLIP's MLP reads LN2(x) with CLIP's own LN2, and the block's
    own ln_2 is an Identity (so x is the un-normalised residual stream)."""
    model = _clip().eval()
    ln2 = {f"{t}.{i}": blk.ln_2 for t in ("visual", "text") for i, blk in enumerate(model.blocks(t))}
    args = _args("--variant", "moe-adapters", "--experts", "5")
    moes = igsp.attach_moe(model, args)
    igsp.begin_task(moes, 0, args)
    for name, m in moes.items():
        blk = model.blocks(name.split(".")[0])[int(name.split(".")[1])]
        assert isinstance(blk.ln_2, nn.Identity) and blk.mlp is m, f"{name}: the block must feed x to the MoE"
        assert m.ln_2 is ln2[name], f"{name}: the MoE must apply CLIP's own LN2 to its MLP branch"
        torch.nn.init.normal_(m.W_g[0])
        for e in m.experts:
            torch.nn.init.normal_(e.up.weight, std=0.1)
    rec = {n: {"x": [], "gate": [], "fc": [], "exp": {i: [] for i in range(5)}} for n in moes}
    handles = []
    for name, m in moes.items():
        r = rec[name]
        handles.append(m.register_forward_pre_hook(lambda mod, a, r=r: r["x"].append(a[0].detach().clone())))
        handles.append(m.c_fc.register_forward_pre_hook(lambda mod, a, r=r: r["fc"].append(a[0].detach().clone())))
        for i, e in enumerate(m.experts):
            handles.append(e.register_forward_pre_hook(
                lambda mod, a, r=r, i=i: r["exp"][i].append(a[0].detach().clone())))
    real_gate = igsp.MoEMLP.gate

    def gate(self, x0):
        g, p = real_gate(self, x0)
        name = next(n for n, mm in moes.items() if mm is self)
        rec[name]["gate"].append((x0.detach().clone(), g.detach().clone()))
        return g, p

    monkeypatch.setattr(igsp.MoEMLP, "gate", gate)
    with torch.no_grad():
        model.encode_image(torch.randn(3, 3, 32, 32))
        model.encode_text(model.tokenize(["a red circle.", "a square on a striped background.", "x"]))
    for h in handles:
        h.remove()
    for name, r in rec.items():
        assert len(r["x"]) == 1 and len(r["gate"]) == 1, f"{name}: one MoE forward, one gate call"
        x, (x0, g) = r["x"][0], r["gate"][0]
        assert torch.equal(x0, x[:, 0]), f"{name}: router input is not token 0 of the block's stream"
        fc_want = F.layer_norm(x, x.shape[-1:], ln2[name].weight, ln2[name].bias)
        assert torch.allclose(r["fc"][0], fc_want, atol=1e-5), f"{name}: CLIP's MLP must read LN2(x)"
        for i in range(5):
            rows = g[:, i].nonzero().squeeze(1)
            got = r["exp"][i]
            if len(rows):
                assert len(got) == 1 and torch.equal(got[0], x[rows]), \
                    f"{name}: expert {i} must read the un-normalised x of its rows {rows.tolist()}"
            else:
                assert not got, f"{name}: expert {i} has no routed sample but was called"


def test_expert_formula_zero_init_and_hyperparameters():
    args = _args("--bottleneck", "5", "--adapter-scale", "0.3", "--adapter-dropout", "0.25")
    e = igsp.Expert(8, args.bottleneck, args.adapter_scale, args.adapter_dropout, CPU)
    x = torch.randn(2, 3, 8)
    assert torch.equal(e.eval()(x), torch.zeros(2, 3, 8)), "a new expert must output exactly 0"
    assert e.down.weight.abs().sum() > 0, "W_down must be initialised non-zero (only W_up, b are 0)"
    assert (e.down.out_features, e.up.in_features, e.s, e.drop.p) == (5, 5, 0.3, 0.25)
    for p in e.parameters():
        nn.init.normal_(p)
    assert torch.allclose(e(x), _expert_ref(e, x), atol=1e-5), "E(x) != s * (W_up ReLU(W_down x + b) + b_up)"
    e.train()
    torch.manual_seed(0)
    assert not torch.allclose(e(x), _expert_ref(e, x)), "dropout inside the expert must act while training"


def test_gate_noise_only_while_training_and_controlled_by_W_noise():
    m = _moe(6, 5, 2, seed=3)
    x0 = torch.randn(16, 6)
    with torch.no_grad():
        m.W_noise[0].fill_(0)
        m.W_noise[0][0] = 50.0                                             # huge noise where x0[:, 0] > 0
        g_ref, p_ref = _gate_ref(x0, m.W_g[0], 2)
        m.eval()
        for _ in range(3):                                                 # eval: clean and deterministic
            g, p = m.gate(x0)
            assert torch.allclose(g, g_ref, atol=1e-6), "gates at eval time must be the clean top-k (no noise)"
            assert torch.allclose(p, p_ref, atol=1e-6)
        m.train()
        sets = {tuple(m.gate(x0)[0].gt(0).flatten().tolist()) for _ in range(6)}
        assert len(sets) > 1, "with a large W_noise the training-mode top-k must vary (noisy gating)"
        g, p = m.gate(x0)
        assert torch.allclose(p, p_ref, atol=1e-6), "p (routing probabilities) must come from the clean logits"
        assert ((g > 0).sum(-1) <= 2).all() and torch.allclose(g.sum(-1), torch.ones(16)), "top-2, renormalised"
        m.W_noise[0].fill_(-200.0)                                         # softplus -> 0: sigma = 1e-2
        W = torch.zeros(6, 5)
        W[1] = torch.tensor([0.0, 5.0, 10.0, 15.0, 20.0])                  # logits far apart: noise can't reorder
        m.W_g[0].copy_(W)
        x1 = torch.rand(16, 6) + 0.5                                       # x1 W_noise << 0
        x1[:, 1] = 1.0
        g, _ = m.gate(x1)
        assert torch.allclose(g, _gate_ref(x1, W, 2)[0], atol=1e-3), "noise scale = softplus(x0 W_noise) + 1e-2"


# ---- the regularisers ----

@pytest.mark.ex9
@settings(max_examples=25, deadline=None)
@given(blocks=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=3),
       seed=st.integers(0, 9999))
def test_omega_orth_value(blocks, seed):
    """mean over ALL blocks of sum_{j in C, h in H} ||W_down,j W_down,h^T||_F^2 (0 without H or C)."""
    args = _args("--bottleneck", "2")
    torch.manual_seed(seed)
    moes, want = {}, 0.0
    for b, (H, C) in enumerate(blocks):
        m = igsp.MoEMLP(nn.Identity(), nn.Sequential(OrderedDict(c_fc=nn.Linear(4, 8), gelu=nn.GELU(),
                                                                 c_proj=nn.Linear(8, 4))), 2)
        igsp.add_experts(m, H + C, args)
        m.n_hist = H
        moes[f"b{b}"] = m
        for j in range(H, H + C):
            for h in range(H):
                want += (m.experts[j].down.weight @ m.experts[h].down.weight.T).pow(2).sum().item()
    want /= len(blocks)
    got = igsp.omega_orth(moes).item()
    assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-7), f"Omega_orth {got} != {want} for (H, C) {blocks}"


@pytest.mark.ex8
def test_omega_sub_value_is_candidate_mass():
    """mean over blocks and forwards of the batch-mean dense mass on the candidates experts[n_hist:]."""
    p1 = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])        # n_hist 1: masses 0.9, 0.6
    p2 = torch.tensor([[0.5, 0.25, 0.25]])                                 # n_hist 2: mass 0.25
    p3 = torch.tensor([[0.2, 0.3, 0.5]])                                   # n_hist 2: mass 0.5
    p4 = torch.tensor([[0.7, 0.3]])                                        # n_hist 0: mass 1
    moes = {"a": SimpleNamespace(n_hist=1, log=[(p1, None)]),
            "b": SimpleNamespace(n_hist=2, log=[(p2, None), (p3, None)]),
            "c": SimpleNamespace(n_hist=0, log=[(p4, None)])}
    want = (0.75 + 0.25 + 0.5 + 1.0) / 4
    got = igsp.omega_sub(moes).item()
    assert math.isclose(got, want, rel_tol=1e-6), f"Omega_sub {got} != candidate mass {want}"


# ---- one real task: phases, loss, schedule, frozen parts ----

def test_phase2_router_frozen_only_candidates_train(monkeypatch):
    """T1 forced to 3 of 6 steps: W_g[t], W_noise[t] are trained in Phase 1 and bit-identical from
    the switch on (default --phase2-router frozen), while the surviving candidates keep training."""
    model = _clip()
    args = _args("--t1-min", "0.5", "--t1-max", "0.5", "--prune-tau", "0", "--lr", "0.05")
    assert args.phase2_router == "frozen"
    method = igsp.init_method(model, args, 1)
    moes = method["moes"]
    snap, real_prune = {}, igsp.prune

    def prune(m, *a):
        kept = real_prune(m, *a)
        snap[m] = (m.W_g[m.route].detach().clone(), m.W_noise[m.route].detach().clone(),
                   [p.detach().clone() for p in m.experts.parameters()])
        return kept

    monkeypatch.setattr(igsp, "prune", prune)
    common.seed_all(0)
    info = igsp.train_task(model, method, _task("A", 1), 0, args, CPU)
    assert info["T1"] == 3 and len(snap) == len(moes)
    assert any(s[0].abs().sum() > 0 for s in snap.values()), "the router must train in Phase 1"
    for name, m in moes.items():
        Wg, Wn, _ = snap[m]
        assert torch.equal(m.W_g[0], Wg), f"{name}: W_g[t] changed in Phase 2 (router must be frozen)"
        assert torch.equal(m.W_noise[0], Wn), f"{name}: W_noise[t] changed in Phase 2 (router must be frozen)"
    moved = [not torch.equal(a, b) for m in moes.values() for a, b in zip(m.experts.parameters(), snap[m][2])]
    assert any(moved), "the surviving candidates must keep training in Phase 2"
    survivors = sum(p.numel() for m in moes.values() for p in m.experts.parameters())
    assert info["trainable_phase2"] == survivors, "Phase 2 trains exactly the surviving candidates"


def test_phase2_router_trained_flag_changes_router(monkeypatch):
    model = _clip()
    args = _args("--t1-min", "0.5", "--t1-max", "0.5", "--prune-tau", "0", "--lr", "0.05",
                 "--phase2-router", "trained")
    method = igsp.init_method(model, args, 1)
    moes = method["moes"]
    snap, real_prune = {}, igsp.prune

    def prune(m, *a):
        kept = real_prune(m, *a)
        snap[m] = m.W_g[m.route].detach().clone()
        return kept

    monkeypatch.setattr(igsp, "prune", prune)
    common.seed_all(0)
    igsp.train_task(model, method, _task("A", 1), 0, args, CPU)
    assert any(not torch.equal(m.W_g[0], snap[m]) for m in moes.values()), "--phase2-router trained: W_g must train"


@pytest.mark.parametrize("converged, check_every, want_T1", [(True, "0.1", 2), (False, "0.1", 6), (True, "0.3", 3)])
def test_T1_between_bounds_and_at_checks(monkeypatch, converged, check_every, want_T1):
    """T1 = first check (every `check_every`) at or after t1_min where the router converged, else t1_max."""
    monkeypatch.setattr(igsp.RouterMonitor, "converged", lambda self, *a: converged)
    model = _clip()
    args = _args("--iterations", "10", "--t1-min", "0.2", "--t1-max", "0.6", "--check-every", check_every,
                 "--prune-tau", "0")
    method = igsp.init_method(model, args, 1)
    moes = method["moes"]
    common.seed_all(0)
    info = igsp.train_task(model, method, _task("A", 1), 0, args, CPU)
    assert info["T1"] == want_T1, f"converged={converged} check_every={check_every}: T1 {info['T1']} != {want_T1}"


@pytest.mark.ex8
def test_pruning_uses_window_statistics(monkeypatch):
    """At T1 each block is pruned with pi = mean dense routing probability and sel = top-k counts
    over the last `window` steps, recorded here independently from the gates."""
    model = _clip()
    args = _args("--iterations", "10", "--t1-min", "0.5", "--t1-max", "0.5", "--window", "0.3", "--prune-tau", "1")
    method = igsp.init_method(model, args, 1)
    moes = method["moes"]
    stats = {n: [] for n in moes}
    real_gate, real_prune = igsp.MoEMLP.gate, igsp.prune
    seen = {}

    def gate(self, x0):
        g, p = real_gate(self, x0)
        if self.log is not None:
            stats[next(n for n, mm in moes.items() if mm is self)].append((p.detach().mean(0), (g > 0).sum(0)))
        return g, p

    def prune(m, pi, sel, tau):
        name = next(n for n, mm in moes.items() if mm is m)
        last = stats[name][-3:]                                            # w = round(0.3 * 10) = 3 steps
        assert torch.allclose(pi, torch.stack([a for a, _ in last]).mean(0), atol=1e-6), \
            f"{name}: pi is not the window mean"
        assert torch.equal(sel, torch.stack([b for _, b in last]).sum(0)), f"{name}: sel not the window top-k counts"
        assert tau == args.prune_tau
        seen[name] = len(stats[name])
        return real_prune(m, pi, sel, tau)

    monkeypatch.setattr(igsp.MoEMLP, "gate", gate)
    monkeypatch.setattr(igsp, "prune", prune)
    common.seed_all(0)
    info = igsp.train_task(model, method, _task("A", 1), 0, args, CPU)
    assert set(seen) == set(moes) and set(seen.values()) == {5}, f"pruned after {seen} steps, want T1 = 5"
    assert info["candidates_kept"] == sum(len(m.experts) - m.n_hist for m in moes.values())


@pytest.mark.parametrize("variant,lambdas", [("igsp", (0.5, 0.25)), ("igsp", (0, 0)), ("moe-adapters", (0.5, 0.25))])
def test_reported_loss_composition(monkeypatch, variant, lambdas):
    """Per step: Phase 1 = CE + lambda_s Omega_sub, Phase 2 = CE + lambda_o Omega_orth (igsp);
    CE only (moe-adapters, and igsp with --lambda-s 0 --lambda-o 0: the subspace terms off). The
    penalties are replaced by constants, CE is recorded."""
    model = _clip()
    l_s, l_o = lambdas
    args = _args(*variant_flags(variant, 4), "--t1-min", "0.5", "--t1-max", "0.5", "--prune-tau", "0",
                 "--lambda-s", str(l_s), "--lambda-o", str(l_o))
    method = igsp.init_method(model, args, 1)
    moes = method["moes"]
    ce, total, real_loss = [], [], igsp._loss

    def loss(*a):
        out = real_loss(*a)
        ce.append(out.item())
        return out

    monkeypatch.setattr(igsp, "_loss", loss)
    monkeypatch.setattr(igsp, "omega_sub", lambda moes: torch.tensor(2.0))
    monkeypatch.setattr(igsp, "omega_orth", lambda moes: torch.tensor(8.0))
    real_add = common.LossLog.add
    monkeypatch.setattr(common.LossLog, "add", lambda log, loss, step: total.append(loss.item()) or real_add(log, loss, step))
    common.seed_all(0)
    info = igsp.train_task(model, method, _task("A", 1), 0, args, CPU)
    assert len(ce) == 6
    if variant == "igsp":
        want = [c + (l_s * 2.0 if s < 3 else l_o * 8.0) for s, c in enumerate(ce)]
    else:
        want = list(ce)
    assert total == pytest.approx(want, rel=1e-5), f"{variant}: per-step loss {total} != {want} (CE {ce})"
    assert info["loss"] == pytest.approx(sum(want) / 6, rel=1e-5), f"{variant}: reported loss is the mean total"


def test_training_loss_is_label_smoothed_clip_ce():
    """CE(logit_scale.exp() * img @ text^T, label smoothing 0.2) with the task's FIRST template."""
    model = _clip()
    args = _args()
    assert args.label_smoothing == 0.2
    task = _task("A", 1)
    images, labels = task.train.tensors[0][:5], task.train.tensors[1][:5]
    model.eval()
    with torch.no_grad():
        got = igsp._loss(model, task, images, labels, args, CPU).item()
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(model.tokenize([task.templates[0].format(c) for c in task.classnames])),
                          dim=-1)
        logp = (model.clip.logit_scale.exp() * img @ txt.T).log_softmax(-1)
        eps = 0.2
        want = (-(1 - eps) * logp.gather(1, labels[:, None]).squeeze(1) - eps * logp.mean(-1)).mean().item()
    assert math.isclose(got, want, rel_tol=1e-5), f"training loss {got} != label-smoothed CLIP CE {want}"


@pytest.mark.parametrize("variant, iterations, warmup, want_warmup",
                         [("igsp", 8, 3, 3), ("moe-adapters", 8, 3, 3), ("moe-adapters", 6, 10, 3)])
def test_lr_schedule_every_step(variant, iterations, warmup, want_warmup):
    """The lr of every optimiser step (both phases): linear warm-up, then cosine to 0; wd as flagged."""
    model = _clip()
    args = _args(*variant_flags(variant, 4), "--iterations", str(iterations), "--warmup", str(warmup),
                 "--lr", "0.01", "--t1-min", "0.5", "--t1-max", "0.5", "--prune-tau", "0")
    assert args.weight_decay == 0.0
    method = igsp.init_method(model, args, 1)
    seen = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, a, k: seen.append([(g["lr"], g["weight_decay"]) for g in opt.param_groups])
        if isinstance(opt, torch.optim.AdamW) else None)
    try:
        common.seed_all(0)
        igsp.train_task(model, method, _task("A", 1), 0, args, CPU)
    finally:
        handle.remove()
    T, w, lr = iterations, want_warmup, 0.01
    want = [lr * (s + 1) / w if s < w else 0.5 * (1 + math.cos(math.pi * (s - w) / (T - w))) * lr for s in range(T)]
    got = [groups[0][0] for groups in seen]
    assert all(len({g for g in groups}) == 1 for groups in seen)
    assert got == pytest.approx(want, rel=1e-9), f"{variant}: lr per step {got} != warm-up {w} + cosine {want}"
    assert all(groups[0][1] == 0.0 for groups in seen), "AdamW weight decay must be 0 (MoE-Adapters)"


@pytest.mark.parametrize("variant", ["igsp", "moe-adapters"])
def test_clip_weights_and_logit_scale_never_change(variant):
    model = _clip()
    args = _args(*variant_flags(variant, 4), "--lr", "0.1", "--t1-min", "0.5", "--t1-max", "0.5",
                 "--prune-tau", "0")
    method = igsp.init_method(model, args, 2)
    before = _clip_params(model)
    assert "clip.logit_scale" in before
    for t in range(2):
        common.seed_all(t)
        igsp.train_task(model, method, _task(f"T{t}", t), t, args, CPU)
        igsp.after_task(model, method, _task(f"T{t}", t), t, args, CPU)
    after = _clip_params(model)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert not changed, f"{variant}: CLIP's own weights changed: {changed[:5]}"
    assert not [n for n, p in model.named_parameters() if n in before and p.requires_grad], "CLIP must stay frozen"


@pytest.mark.parametrize("freeze", [2, 3])
def test_moe_adapters_freezes_most_used_experts_counted_independently(monkeypatch, freeze):
    """After each task exactly the `freeze_per_task` experts chosen most often (top-k selections,
    counted here from the gates) are frozen per block; frozen ones stay bit-identical and the old
    router too, while the rest of the pool keeps training."""
    model = _clip()
    args = _args("--variant", "moe-adapters", "--experts", "6", "--freeze-per-task", str(freeze), "--lr", "0.05")
    assert args.top_k == 2
    method = igsp.init_method(model, args, 2)
    moes = method["moes"]
    counts = {}
    real_gate = igsp.MoEMLP.gate

    def gate(self, x0):
        g, p = real_gate(self, x0)
        name = next(n for n, mm in moes.items() if mm is self)
        counts[name] = counts.get(name, 0) + (g > 0).sum(0)
        return g, p

    monkeypatch.setattr(igsp.MoEMLP, "gate", gate)
    frozen_prev = {n: set() for n in moes}
    snaps = []
    for t in range(2):
        counts.clear()
        common.seed_all(t)
        info = igsp.train_task(model, method, _task(f"T{t}", t), t, args, CPU)
        want = sum(p.numel() for n, m in moes.items() for j, e in enumerate(m.experts) if j not in frozen_prev[n]
                   for p in e.parameters()) + sum(m.W_g[t].numel() + m.W_noise[t].numel() for m in moes.values())
        assert info["trainable_phase1"] == want, f"task {t}: trainable = unfrozen experts + this task's router only"
        igsp.after_task(model, method, _task(f"T{t}", t), t, args, CPU)
        for name, m in moes.items():
            assert len(m.experts) == 6 and m.W_g[t].shape[1] == 6, f"{name}: the pool stays 6 experts"
            frozen = {j for j, e in enumerate(m.experts) if not any(p.requires_grad for p in e.parameters())}
            c = counts[name].tolist()
            kth = sorted(c, reverse=True)[freeze - 1]
            new = frozen - frozen_prev[name]
            assert frozen_prev[name] <= frozen, f"{name}: an expert frozen by an earlier task was unfrozen"
            assert all(c[j] >= kth for j in new), f"task {t} {name}: froze {sorted(new)} but counts are {c}"
            assert all(j in frozen for j in range(6) if c[j] > kth), \
                f"task {t} {name}: a most-used expert is not frozen (counts {c}, frozen {sorted(frozen)})"
            n_top = sum(1 for j in frozen if c[j] >= kth)
            assert n_top >= freeze and len(new) <= freeze, \
                f"task {t} {name}: {sorted(new)} newly frozen, want {freeze} (counts {c})"
            frozen_prev[name] = frozen
        if t == 0:
            snaps = {n: ([p.detach().clone() for p in m.experts.parameters()], m.W_g[0].detach().clone(),
                         m.W_noise[0].detach().clone()) for n, m in moes.items()}
            frozen0 = {n: set(s) for n, s in frozen_prev.items()}
    trained = False
    for name, m in moes.items():
        params, Wg, Wn = snaps[name]
        assert torch.equal(m.W_g[0], Wg) and torch.equal(m.W_noise[0], Wn), f"{name}: task 0's router changed"
        for j, e in enumerate(m.experts):
            same = all(torch.equal(a, b) for a, b in zip(e.parameters(), params[4 * j:4 * j + 4]))
            if j in frozen0[name]:
                assert same, f"{name}: expert {j}, frozen after task 0, changed during task 1"
            trained |= not same
    assert trained, "the unfrozen experts must keep training on task 1"


@pytest.mark.parametrize("freeze", [0, 4])
def test_moe_adapters_freeze_per_task_0_freezes_nothing_and_old_outputs_move(freeze):
    """--freeze-per-task 0 (the ablation) is accepted and freezes no expert, so task 2's real AdamW
    steps move the shared experts and task 1's image and text features under its own (frozen)
    router change; freezing every expert (4 of 4) keeps them bit-identical. A negative count is
    a one-line user error."""
    model = _clip()
    args = _args("--variant", "moe-adapters", "--experts", "4", "--freeze-per-task", str(freeze), "--lr", "0.05")
    tasks = [_task("A", 1), _task("B", 2)]
    method = igsp.init_method(model, args, 2)
    moes = method["moes"]
    common.seed_all(0)
    igsp.train_task(model, method, tasks[0], 0, args, CPU)
    more = igsp.after_task(model, method, tasks[0], 0, args, CPU)
    assert more["frozen_experts"] == freeze * len(moes)
    stored = tasks[0].test.tensors[0][:8]                                 # task 1's inputs
    tokens = model.tokenize(["a thing0.", "a thing2."])
    igsp.set_route(moes, 0)
    with torch.no_grad():
        ref_i, ref_t = model.encode_image(stored), model.encode_text(tokens)
    common.seed_all(1)
    igsp.train_task(model, method, tasks[1], 1, args, CPU)
    igsp.set_route(moes, 0)
    with torch.no_grad():
        img, txt = model.encode_image(stored), model.encode_text(tokens)
    if freeze == 4:
        assert torch.equal(img, ref_i) and torch.equal(txt, ref_t), "every expert frozen: task 1's outputs exact"
    else:
        moved = max((img - ref_i).abs().max().item(), (txt - ref_t).abs().max().item())
        assert moved > 1e-4, f"nothing frozen: task 1's outputs should move ({moved:.2e})"
    with pytest.raises(common.UserError, match="--freeze-per-task"):
        _args("--variant", "moe-adapters", "--freeze-per-task", "-1")


def test_igsp_pool_grows_by_survivors_and_history_frozen():
    model = _clip()
    args = _args("--t1-min", "0.5", "--t1-max", "0.5", "--prune-tau", "0", "--candidates", "3")
    method = igsp.init_method(model, args, 2)
    moes = method["moes"]
    for t in range(2):
        common.seed_all(t)
        sizes = {n: len(m.experts) for n, m in moes.items()}
        info = igsp.train_task(model, method, _task(f"T{t}", t), t, args, CPU)
        igsp.after_task(model, method, _task(f"T{t}", t), t, args, CPU)
        assert info["candidates_kept"] == sum(len(m.experts) - sizes[n] for n, m in moes.items())
        per = {n: sum(p.numel() for p in m.experts[0].parameters()) for n, m in moes.items()}
        want = sum(3 * per[n] + 2 * m.d * (sizes[n] + 3) for n, m in moes.items())
        assert info["trainable_phase1"] == want, f"task {t}: Phase 1 trains the 3 candidates + this task's router only"
        for name, m in moes.items():
            assert m.n_hist == len(m.experts), f"{name}: survivors must join the history"
            assert m.W_g[t].shape == (m.d, len(m.experts)) and m.W_noise[t].shape == m.W_g[t].shape
            assert not any(p.requires_grad for p in m.experts.parameters()), f"{name}: history must be frozen"
            assert not m.W_g[t].requires_grad and not m.W_noise[t].requires_grad
    igsp.begin_task(moes, 2, args)
    for name, m in moes.items():
        assert len(m.experts) == m.n_hist + 3 and m.W_g[2].shape == (m.d, m.n_hist + 3) and m.route == 2
        assert all(torch.equal(e.up.weight, torch.zeros_like(e.up.weight)) for e in m.experts[m.n_hist:])
        assert all(e.up.weight.requires_grad for e in m.experts[m.n_hist:])


# ---- router convergence ----

def _monitor(ps):
    """A RouterMonitor fed one (p, g) per step for one block; g = the top-2 of p."""
    blk = SimpleNamespace(log=[])
    mon = igsp.RouterMonitor({"b": blk})
    for p in ps:
        p = torch.as_tensor(p, dtype=torch.float32)[None]
        idx = p.topk(2, -1).indices
        blk.log.append((p, torch.zeros_like(p).scatter(-1, idx, 1.0)))
        mon.record()
    return mon, blk


@pytest.mark.ex9
def test_router_monitor_window_and_convergence():
    mon, blk = _monitor([[0.1, 0.2, 0.7], [0.3, 0.25, 0.45], [0.5, 0.2, 0.3]])
    assert not blk.log, "record() must consume the forward log"
    pi, sel = mon.window(2)
    assert torch.allclose(pi["b"], torch.tensor([0.4, 0.225, 0.375])), f"pi = mean p over the last 2 steps: {pi}"
    assert sel["b"].tolist() == [2, 0, 2], f"sel = top-k counts over the last 2 steps: {sel}"
    # stable routing: converged exactly at the `patience`-th stable check after the first
    mon, _ = _monitor([[0.1, 0.2, 0.7]])
    got = [mon.converged(1, 2, 0.05, 3) for _ in range(5)]
    assert got == [False, False, False, True, True], f"constant routing, patience 3: {got}"
    # a change of the top-k set resets the streak
    mon, blk = _monitor([[0.1, 0.2, 0.7]])
    assert [mon.converged(1, 2, 0.05, 2) for _ in range(2)] == [False, False]
    blk.log.append((torch.tensor([[0.45, 0.1, 0.45]]), torch.tensor([[1.0, 0.0, 1.0]])))
    mon.record()
    assert mon.converged(1, 2, 0.5, 2) is False, "a new top-k set must reset the stable streak"
    assert mon.converged(1, 2, 0.5, 2) is False and mon.converged(1, 2, 0.5, 2) is True


@pytest.mark.ex9
@settings(max_examples=40, deadline=None)
@given(a=st.floats(0.0, 0.3), b=st.floats(0.0, 0.3), tol=st.floats(0.01, 0.3))
def test_router_stability_uses_total_variation_below_tol(a, b, tol):
    """Same top-2 set {1, 2}: a check is stable iff 0.5 ||pi - pi_prev||_1 < tol."""
    p1, p2 = [0.0, 0.5 - a / 2, 0.5 + a / 2], [0.0, 0.5 - b / 2, 0.5 + b / 2]
    tv = 0.5 * sum(abs(x - y) for x, y in zip(torch.tensor(p1).tolist(), torch.tensor(p2).tolist()))
    if abs(tv - tol) < 1e-6:
        return
    mon, blk = _monitor([p1])
    mon.converged(1, 2, tol, 1)
    blk.log.append((torch.tensor([p2]), torch.tensor([[0.0, 1.0, 1.0]])))
    mon.record()
    assert mon.converged(1, 2, tol, 1) == (tv < tol), f"TV {tv:.4f} vs tol {tol:.4f}"


# ---- task selector and task-free evaluation ----

@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.integers(0, 9999), st.booleans())
def test_selector_rule_min_ratio_or_clip(N, T, seed, per_batch):
    """Task = argmin_t err_t / theta_t if that ratio <= 1, else -1 (the untouched CLIP);
    per batch: the same rule on the batch-mean ratios."""
    g = torch.Generator().manual_seed(seed)
    err = torch.rand(N, T, generator=g) * 2
    theta = (torch.rand(T, generator=g) + 0.5).tolist()
    sel = igsp.TaskSelector()
    sel.theta = theta
    sel.errors = lambda f: err
    ratio = err / torch.tensor(theta)
    if per_batch:
        ratio = ratio.mean(0, keepdim=True).expand(N, T)
    want = [int(r.argmin()) if r.min() <= 1 else -1 for r in ratio]
    got = sel.select(torch.zeros(N, 3), per_batch).tolist()
    assert got == want, f"ratios {ratio.tolist()}: selected {got}, want {want}"


def test_selector_threshold_is_quantile_of_own_heldout_error():
    torch.manual_seed(0)
    args = _args("--selector-hidden", "4", "--selector-steps", "50")
    f = F.normalize(torch.randn(200, 8) + 2, dim=-1)
    sel = igsp.TaskSelector()
    sel.fit(f, args)
    errs = sel.errors(f)[:, 0]
    frac = (errs <= sel.theta[0]).float().mean().item()
    assert 0.8 <= frac <= 1.0, f"theta must be about the {args.selector_quantile} quantile of own errors: {frac}"
    assert not any(p.requires_grad for p in sel.aes[0].parameters()), "a fitted autoencoder must be frozen"


def test_task_free_evaluation_routes_each_image(monkeypatch):
    """evaluate_task_free: each test image gets the router the selector picked (or CLIP for -1): that
    router's image feature and that router's text head; oracle = the true task for seen datasets,
    CLIP for unseen ones. A stand-in model whose features and heads depend on the route; the
    test labels are the predictions of the expected routing, so any other routing loses accuracy."""
    g = torch.Generator().manual_seed(0)
    blk = SimpleNamespace(route=None)
    moes = {"b": blk}
    proj = {r: torch.randn(3 * 32 * 32, 8, generator=g) for r in (None, 0, 1)}
    heads = {(name, r): torch.randn(8, 6, generator=g) for name in "ABC" for r in (None, 0, 1)}
    model = SimpleNamespace(eval=lambda: None,
                            encode_image=lambda x, normalize=False: F.normalize(x.flatten(1) @ proj[blk.route], dim=-1))
    monkeypatch.setattr(common, "zeroshot_head", lambda model, classnames, templates, device, **kw:
                        heads[classnames[0][0], blk.route])
    args = _args("--eval-batch-size", "5")
    tasks = [data.Task(n, [f"{n}{i}" for i in range(6)], ["a {}."], None, _task(n, s, n=8).test)
             for s, n in enumerate("ABC")]

    def predict(task, routes):                                             # per image: its route's feature and head
        x = task.test.tensors[0]
        return torch.stack([(F.normalize(x[i:i + 1].flatten(1) @ proj[r], dim=-1) @ heads[task.name, r]).argmax()
                            for i, r in enumerate(routes)])

    def relabel(task, routes):
        return data.Task(task.name, task.classnames, task.templates, None,
                         torch.utils.data.TensorDataset(task.test.tensors[0], predict(task, routes)))

    for task in tasks:                                                     # the routing matters on these images
        assert len({tuple(predict(task, [r] * 8).tolist()) for r in (None, 0, 1)}) == 3

    pick = torch.tensor([0, -1, 1, 1, -1, 0, 0, 1])                        # the selector's choice per test image

    class Stub:
        def select(self, f, per_batch=False):
            out = pick[self.i:self.i + len(f)]
            self.i += len(f)
            return out

    routes = [None if int(c) < 0 else int(c) for c in pick]
    stub = Stub()
    for task in tasks:
        stub.i = 0
        row, sel = igsp.evaluate_task_free(model, moes, stub, [relabel(task, routes)], 1, args, CPU)
        assert row[0] == 100.0, f"{task.name}: per-image routing {routes} not followed (accuracy {row[0]})"
        assert sel[0] == pytest.approx(100.0 * (pick == 0).float().mean().item()), "selector acc vs target task 0"
    oracle = [relabel(task, [d if d <= 1 else None] * 8) for d, task in enumerate(tasks)]
    row, _ = igsp.evaluate_task_free(model, moes, stub, oracle, 1, args, CPU, oracle=True)
    assert row == [100.0] * 3, f"oracle: seen dataset d must use router d, unseen ones CLIP (accuracies {row})"
    assert blk.route is None, "evaluation must leave the route at CLIP"


def test_alignment_metrics_follow_the_selector_route_of_each_image():
    """After a task the held-out alignment metrics are the deployed model's (igsp.alignment_info):
    each held-out image is encoded under the router the selector picks for it (or CLIP), and
    scored against, and paired with, the captions encoded under that same router (the MoE sits
    in the text tower too); the route is left at CLIP. A stub selector fixes the choices; the
    expected values are written out here."""
    model = _clip()
    args = _args("--align-n", "12", "--eval-batch-size", "5", "--lr", "0.05")
    tasks = [_task("A", 1), _task("B", 2)]
    method = igsp.init_method(model, args, 2)
    method["align"] = common.Alignment(model, args, CPU)                # as igsp.setup: toy held-out pairs
    for t, task in enumerate(tasks):
        common.seed_all(t)
        igsp.train_task(model, method, task, t, args, CPU)
        igsp.after_task(model, method, task, t, args, CPU)
    pick = torch.tensor([0, -1, 1, 1, -1, 0, 0, 1, -1, 1, 0, 0])            # the selector's choice per image

    class Stub:
        aes, i = [None, None], 0

        def select(self, f, per_batch=False):
            out = pick[self.i:self.i + len(f)]
            self.i += len(f)
            return out

    method["selector"] = Stub()
    moes = method["moes"]
    got = igsp.alignment_info(model, method, 1, args, CPU)
    assert all(m.route is None for m in moes.values()), "the route must be left at CLIP"
    pairs = method["align"].pairs
    x, caps = torch.stack([pairs[i][0] for i in range(12)]), [pairs[i][1] for i in range(12)]
    uniq = list(dict.fromkeys(caps))
    idx = [uniq.index(c) for c in caps]
    V, U = {}, []
    with torch.no_grad():
        for r in (-1, 0, 1):
            igsp.set_route(moes, None if r < 0 else r)
            V[r] = F.normalize(model.encode_text(model.tokenize(uniq)), dim=-1)            # (C, e) under router r
        for i in range(12):
            igsp.set_route(moes, None if pick[i] < 0 else int(pick[i]))
            U.append(F.normalize(model.encode_image(x[i:i + 1]), dim=-1)[0])              # (e,) under its router
    igsp.set_route(moes, None)
    S = torch.stack([V[int(pick[i])] @ U[i] for i in range(12)])                           # (N, C)
    gap = (torch.stack(U).mean(0) - torch.stack([V[int(pick[i])][idx[i]] for i in range(12)]).mean(0)).norm()
    i2t = 100 * sum(int(S[i].argmax()) == idx[i] for i in range(12)) / 12
    t2i = 100 * sum(idx[int(S[:, c].argmax())] == c for c in range(len(uniq))) / len(uniq)
    assert got["modality_gap"] == pytest.approx(gap.item(), abs=1e-4)
    assert got["i2t_r1"] == pytest.approx(i2t, abs=0.01) and got["t2i_r1"] == pytest.approx(t2i, abs=0.01)
    plain = common.alignment_metrics(model, pairs, args, CPU)                              # every image via CLIP
    assert plain["modality_gap"] != got["modality_gap"], "the routing should matter after training"
    assert "held-out pairs" in got["note"]


# ---- the published defaults ----

# MoE-Adapters mtil/scripts/train/train_{full,few}_shot_router11_experts22_1000iters.sh
FULL_LR = {"Aircraft": 5e-3, "Caltech101": 1e-3, "CIFAR100": 5e-3, "DTD": 1e-3, "EuroSAT": 1e-4, "Flowers": 1e-3,
           "Food": 1e-3, "MNIST": 1e-4, "OxfordPet": 1e-3, "StanfordCars": 1e-3, "SUN397": 1e-3}
FEW_LR = {"Aircraft": 8e-3, "Caltech101": 5e-4, "CIFAR100": 2e-4, "DTD": 5e-3, "EuroSAT": 1e-3, "Flowers": 1e-3,
          "Food": 1e-2, "MNIST": 1e-4, "OxfordPet": 1e-2, "StanfordCars": 1e-2, "SUN397": 1e-2}


@pytest.mark.parametrize("order", ["I", "II"])
def test_mtil_hparams_per_dataset(order):
    full = igsp.parse_args(["--order", order, "--no-progress"])
    few = igsp.parse_args(["--order", order, "--few-shot", "5", "--no-progress"])
    flags = igsp.parse_args(["--order", order, "--no-progress", "--iterations", "7", "--batch-size", "5",
                             "--lr", "0.5"])
    assert sorted(data.MTIL_ORDERS[order]) == sorted(FULL_LR)
    for t, name in enumerate(data.MTIL_ORDERS[order]):
        task = SimpleNamespace(name=name)
        assert igsp.hparams(full, task, t) == common.HParams(1000, 64, FULL_LR[name], 100, "warmup+cosine"), \
            f"full-shot {name}"
        assert igsp.hparams(few, task, t) == common.HParams(500, 64, FEW_LR[name], 100, "warmup+cosine"), \
            f"few-shot {name}"
        assert igsp.hparams(flags, task, t) == common.HParams(7, 5, 0.5, 3, "warmup+cosine"), \
            f"flags must win, warm-up at most half the iterations ({name})"
    for a in (full, few):
        got = {k: getattr(a, k) for k in ("label_smoothing", "weight_decay", "warmup", "experts", "top_k",
                                          "freeze_per_task", "bottleneck", "adapter_scale", "adapter_dropout")}
        assert got == {"label_smoothing": 0.2, "weight_decay": 0.0, "warmup": 100, "experts": 22, "top_k": 2,
                       "freeze_per_task": 2, "bottleneck": 64, "adapter_scale": 0.1, "adapter_dropout": 0.1}
        ours = {k: getattr(a, k) for k in ("variant", "candidates", "lambda_s", "lambda_o", "prune_tau", "t1_min",
                                           "t1_max", "tv_tol", "patience", "phase2_router", "selector_hidden",
                                           "selector_steps", "selector_lr")}
        assert ours == {"variant": "igsp", "candidates": 4, "lambda_s": 0.1, "lambda_o": 0.1, "prune_tau": 1.0,
                        "t1_min": 0.1, "t1_max": 0.3, "tv_tol": 0.05, "patience": 3, "phase2_router": "frozen",
                        "selector_hidden": 100, "selector_steps": 300, "selector_lr": 0.01}


def test_toy_hparams():
    a = igsp.parse_args(["--benchmark", "toy", "--no-progress"])
    few = igsp.parse_args(["--benchmark", "toy", "--few-shot", "5", "--no-progress"])
    for t, name in enumerate(data.TOY_ORDERS["I"]):
        want = common.HParams(200, 64, 3e-2, 10, "warmup+cosine")  # toy: 200 steps (notes/igsp.md)
        assert igsp.hparams(a, SimpleNamespace(name=name), t) == want, name
        assert igsp.hparams(few, SimpleNamespace(name=name), t) == want, f"toy few-shot: the toy values ({name})"
    assert (a.warmup, a.bottleneck, a.selector_hidden) == (10, 16, 16)
    assert (a.lambda_s, a.prune_tau, a.lambda_o) == (0.01, 0.5, 1e-3)


@pytest.mark.parametrize("variant, n", [("moe-adapters", 22), ("igsp", 4)])
def test_mtil_defaults_and_flags_reach_the_experts(variant, n):
    """With the MTIL defaults the built pool has the published sizes (on the tiny CLIP); the
    expert flags reach every expert."""
    for extra, want in (([], (64, 0.1, 0.1, 2)),
                        (["--bottleneck", "8", "--adapter-scale", "0.3", "--adapter-dropout", "0.2", "--top-k", "3"],
                         (8, 0.3, 0.2, 3))):
        model = _clip()
        args = igsp.parse_args(["--variant", variant, "--no-progress", *extra])
        moes = igsp.attach_moe(model, args)
        igsp.begin_task(moes, 0, args)
        assert len(moes) == 2 * 2                                          # 2 blocks x 2 towers
        for name, m in moes.items():
            assert len(m.experts) == n and m.W_g[0].shape == (m.d, n), name
            got = {(e.down.out_features, e.s, e.drop.p, m.k) for e in m.experts}
            assert got == {want}, f"{name} {extra}: (r, scale, dropout, top-k) {got}, want {want}"


# ---- MoE-Adapters' class-incremental module (cil/): one router, two experts, nothing frozen ----


def _cil_args(*extra):
    return igsp.parse_args(["--benchmark", "toy-cil", "--variant", "moe-adapters", "--no-progress",
                            "--iterations", "6", "--batch-size", "4", "--lr", "0.05", *extra])


def test_moe_adapters_cil_module_defaults():
    """cil/clip/model.py: experts_num 2, top_k 2, step 1 (one router); nothing frozen between steps;
    on the real CIL benchmarks and toy-cil; MTIL keeps a router per task. The module flags are
    moe-adapters' only: igsp refuses them in one line."""
    for bench in (["--benchmark", "cil-cifar100"], ["--benchmark", "cil-tinyimagenet", "--steps", "5"],
                  ["--benchmark", "toy-cil"]):
        a = igsp.parse_args([*bench, "--variant", "moe-adapters"])
        assert (a.routers, a.experts, a.top_k, a.freeze_per_task) == ("shared", 2, 2, 0), bench
    for bench in ("mtil", "toy", "xtail", "toy-xtail"):
        a = igsp.parse_args(["--benchmark", bench, "--variant", "moe-adapters"])
        assert (a.routers, a.experts, a.freeze_per_task) == ("per-task", 22, 2), bench
    assert igsp.parse_args(["--benchmark", "toy-cil", "--variant", "moe-adapters", "--routers", "per-task",
                            "--experts", "6"]).experts == 6
    for flag in (["--experts", "4"], ["--freeze-per-task", "0"], ["--routers", "shared"]):
        with pytest.raises(common.UserError, match=flag[0]):
            igsp.parse_args(["--benchmark", "toy", *flag])


def test_moe_adapters_shared_router_trains_everything_at_every_step():
    """Step 2 of a shared-router run: no new router or expert, and its real AdamW steps change the
    one router, its noise matrix and both experts of every block (nothing is frozen), so step 1's
    outputs on its stored images move (the cil/ module protects nothing; the parameter count is
    the step's own, one router in all). No selector is fitted."""
    model = _clip()
    args = _cil_args()
    tasks = [_task("A", 1), _task("B", 2)]
    method = igsp.init_method(model, args, 2)
    moes = method["moes"]
    common.seed_all(0)
    trained = igsp.train_task(model, method, tasks[0], 0, args, CPU)
    after = igsp.after_task(model, method, tasks[0], 0, args, CPU)
    assert after["frozen_experts"] == 0 and after["trainable_params"] == trained["trainable_phase1"]
    assert not method["selector"].aes, "no task selector with one shared router"
    stored = tasks[0].test.tensors[0][:8]
    igsp.set_route(moes, 0)
    with torch.no_grad():
        ref = model.encode_image(stored)
    before = {n: [p.detach().clone() for p in [m.W_g[0], m.W_noise[0], *m.experts.parameters()]]
              for n, m in moes.items()}
    common.seed_all(1)
    igsp.train_task(model, method, tasks[1], 1, args, CPU)
    for n, m in moes.items():
        assert len(m.W_g) == len(m.W_noise) == 1 and len(m.experts) == 2, n
        now = [m.W_g[0], m.W_noise[0], *m.experts.parameters()]
        assert not torch.equal(now[0], before[n][0]), f"{n}: the shared router must train at step 2"
        for j in range(2):                                       # each expert: down + up weights and biases
            assert any(not torch.equal(a, b) for a, b in zip(now[2 + 4 * j:6 + 4 * j], before[n][2 + 4 * j:6 + 4 * j])), \
                f"{n}: expert {j} must train at step 2"
    igsp.set_route(moes, 0)
    with torch.no_grad():
        moved = (model.encode_image(stored) - ref).abs().max().item()
    assert moved > 1e-4, f"step 1's outputs should move under the shared router ({moved:.2e})"


def test_moe_adapters_shared_router_routes_every_test_image_through_it(monkeypatch):
    """Evaluation with one shared router (cil/ calls the model with taskid 0): every test image of
    every column, seen or not, goes through router 0, the selector is never asked, and no selector
    rate is reported; the row equals a plain evaluation under route 0."""
    model = _clip()
    args = _cil_args("--eval-batch-size", "8", "--align-n", "0")
    tasks = [_task("A", 1), _task("B", 2), _task("C", 3)]
    method = igsp.init_method(model, args, 3)
    method["align"] = common.Alignment(model, args, CPU)          # --align-n 0: no pairs, no metrics
    moes = method["moes"]
    for t in range(2):
        common.seed_all(t)
        igsp.train_task(model, method, tasks[t], t, args, CPU)
        igsp.after_task(model, method, tasks[t], t, args, CPU)
    monkeypatch.setattr(igsp.TaskSelector, "select", lambda *a, **k: pytest.fail("the selector was asked"))
    targets = []
    real = igsp.route_images
    monkeypatch.setattr(igsp, "route_images", lambda *a, **k: targets.append(a[5] if len(a) > 5 else k.get("target"))
                        or real(*a, **k))
    args.benchmark = "toy"                                       # the columns: the three tasks, each its own head
    row, info = igsp.evaluate(model, method, tasks, 1, args, CPU)
    assert targets and set(targets) == {0}
    assert info["selector_acc_seen"] is None and info["selector_fallback_unseen"] is None
    assert "one shared router" in info["note"]
    igsp.set_route(moes, 0)
    want = [common.evaluate(model, task, CPU, 8, 0, "off", False, task.templates) for task in tasks]
    assert row == pytest.approx(want)
