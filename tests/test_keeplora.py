"""Tests of keeplora.py: layer scales, energy ranks, W_p, the residual A (orthogonality and
optimality, saturation guards), the GPM update, feature statistics, the gradient estimate, the
core promise (outputs on span(M') do not move after real AdamW steps; merged == unmerged), the
ViT-B/16 parameter count, and the command line with resume."""
import copy
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import common
import keeplora as kl

ROOT = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=25, deadline=None)
CPU = torch.device("cpu")


def rand_orthonormal(d, k, gen):
    return torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))[0] if k else torch.zeros(d, 0, dtype=torch.float64)


# ---- layer scales ----------------------------------------------------------------------------

@pytest.mark.ex4
def test_layer_scales_formula_and_placement(tiny_clip):
    s = kl.layer_scales(12, 0.2)
    table = [0.200, 0.273, 0.345, 0.418, 0.491, 0.564, 0.636, 0.709, 0.782, 0.855, 0.927, 1.000]  # @7abf7ec:MTIL/model/peft_vit.py:build_layer_scales, 12 layers, gamma 0.2
    assert all(abs(a - b) < 5e-4 for a, b in zip(s, table))
    assert kl.layer_scales(1, 0.2) == [1.0] and kl.layer_scales(5, 1.0) == [1.0] * 5
    for L in (2, 3, 7):
        assert kl.layer_scales(L, 0.3) == pytest.approx([0.3 + 0.7 * l / (L - 1) for l in range(L)])
    v1 = kl.add_keeplora(copy.deepcopy(tiny_clip), kl.parse_args(["--variant", "keeplora"]))
    assert all(m.s == 1.0 for m in v1.values())                 # KeepLoRA (v1): no layer scale
    lora = kl.add_keeplora(tiny_clip, kl.parse_args(["--benchmark", "toy"]))
    L = len(tiny_clip.blocks("visual"))
    for n, m in lora.items():
        i = int(n.split(".")[1])
        assert m.s == (pytest.approx(0.2 + 0.8 * i / (L - 1)) if n.startswith("visual.") else 1.0)


# ---- energy ranks and W_p --------------------------------------------------------------------

@pytest.mark.ex10
def test_energy_rank_below_boundaries():
    lam = torch.tensor([1.0, 1.0, 1.0, 1.0])                   # cumulative energy .25 .5 .75 1 (exact)
    assert kl.energy_rank_below(lam, 0.5) == 1                  # cum == eps is not < eps
    assert kl.energy_rank_below(lam, 0.5000001) == 2
    assert kl.energy_rank_below(lam, 0.75) == 2
    assert kl.energy_rank_below(lam, 1.0) == 3                  # keeps slightly less than eps
    assert kl.energy_rank_below(lam, 1e-9) == 1                 # at least one direction
    assert kl.energy_rank_below(lam, 0.0) == 0                  # eps <= 0: no W_p


@pytest.mark.ex10
@FAST
@given(n=st.integers(1, 20), eps=st.floats(0.01, 0.999), seed=st.integers(0, 10_000))
def test_energy_rank_below_definition(n, eps, seed):
    lam = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 1e-3
    k = kl.energy_rank_below(lam, eps)
    cum = torch.cumsum(torch.sort(lam, descending=True).values, 0) / lam.sum()
    assert 1 <= k <= n
    if k >= 2:
        assert cum[k - 1] < eps                                # top-k hold less than eps ...
    if k < n:
        assert cum[k] >= eps                                   # ... and top-(k+1) reach it


@pytest.mark.ex10
def test_principal_subspace_sides():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(10, 10, generator=g, dtype=torch.float64)   # PyTorch (d_out, d_in)
    U, S, Vh = torch.linalg.svd(W)
    k = kl.energy_rank_below(S ** 2, 0.6)
    for side, ref in (("code", U[:, :k]), ("paper", Vh[:k].T)):
        P = kl.principal_subspace(W, 0.6, side).double()
        assert P.shape == (10, k)
        assert torch.allclose(P.T @ P, torch.eye(k, dtype=torch.float64), atol=1e-6)
        assert torch.allclose(P @ P.T, ref @ ref.T, atol=1e-5)  # same span as the definition
    assert (kl.principal_subspace(W, 0.6, "paper").double().T @ W.T).norm() ** 2 == pytest.approx(float((S[:k] ** 2).sum()), rel=1e-5)
    assert kl.principal_subspace(W, 0.0, "code").shape == (10, 0)


# ---- the residual A (@a17f9c2:MTIL/trainer/trainer.py:Trainer.in_proj_weight_process) -----------

@pytest.mark.ex10
@FAST
@given(d_in=st.integers(3, 20), d_out=st.integers(2, 20), k_frac=st.floats(0, 0.9), r=st.integers(1, 8),
       seed=st.integers(0, 10_000))
def test_residual_A_orthonormal_orthogonal_and_optimal(d_in, d_out, k_frac, r, seed):
    g = torch.Generator().manual_seed(seed)
    k = int(k_frac * d_in)
    M = rand_orthonormal(d_in, k, g)
    G = torch.randn(d_in, d_out, generator=g, dtype=torch.float64)
    A, B0, kept = kl.residual_A(G, M, r)
    A, B0 = A.double(), B0.double()
    n = min(r, d_in - k, d_out)
    assert A.shape == (d_in, r) and torch.all(A[:, n:] == 0)
    assert torch.allclose(A[:, :n].T @ A[:, :n], torch.eye(n, dtype=torch.float64), atol=1e-6)   # orthonormal
    assert torch.allclose(M.T @ A, torch.zeros(k, r, dtype=torch.float64), atol=1e-6)                # orthogonal to M'
    G_hat = G - M @ (M.T @ G)
    assert kept == pytest.approx(float((G_hat ** 2).sum() / (G ** 2).sum()))
    s = torch.linalg.svdvals(G_hat)
    best = float((s[:n] ** 2).sum())
    assert float(((A.T @ G) ** 2).sum()) == pytest.approx(best, rel=1e-5)                          # top-r energy
    assert torch.allclose(A @ B0, torch.linalg.svd(G_hat)[0][:, :n] @ torch.diag(s[:n]) @ torch.linalg.svd(G_hat)[2][:n],
                          atol=1e-5)                                                             # A B0 = U_r S_r V_r^T
    for _ in range(5):                                          # any other rank-n basis orthogonal to M' holds less
        Q = torch.randn(d_in, n, generator=g, dtype=torch.float64)
        Q = torch.linalg.qr(Q - M @ (M.T @ Q))[0]
        assert float(((Q.T @ G) ** 2).sum()) <= best * (1 + 1e-6) + 1e-9


@pytest.mark.ex10
def test_residual_A_saturation_guards():
    g = torch.Generator().manual_seed(1)
    G = torch.randn(8, 8, generator=g, dtype=torch.float64)
    A, B0, _ = kl.residual_A(G, rand_orthonormal(8, 8, g), 4)          # M' = everything: nothing to learn
    assert torch.all(A == 0) and torch.all(B0 == 0)
    M = rand_orthonormal(8, 6, g)
    A = kl.residual_A(G, M, 4)[0].double()                             # only 2 residual directions left
    assert torch.all(A[:, 2:] == 0) and (M.T @ A).abs().max() < 1e-6
    assert torch.allclose(A[:, :2].T @ A[:, :2], torch.eye(2, dtype=torch.float64), atol=1e-6)
    assert torch.all(kl.residual_A(torch.zeros(8, 8), M, 4)[0] == 0)    # zero gradient
    G_in = M @ torch.randn(6, 8, generator=g, dtype=torch.float64)     # gradient inside M': residual ~ 0
    assert torch.all(kl.residual_A(G_in, M, 4)[0] == 0)


# ---- GPM update (@a17f9c2:MTIL/model/prin_subspace.py:PrinSubspace._update_prin_subspace) -----

@pytest.mark.ex11
@FAST
@given(d=st.integers(3, 16), n=st.integers(2, 40), k_frac=st.floats(0, 0.8), eps=st.floats(0.3, 0.999),
       seed=st.integers(0, 10_000))
def test_gpm_extend_orthonormal_and_reaches_eps(d, n, k_frac, eps, seed):
    g = torch.Generator().manual_seed(seed)
    k = int(k_frac * d)
    M = rand_orthonormal(d, k, g).float()
    X = torch.randn(d, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)[:, None]
    K = X @ X.T
    M2 = kl.gpm_extend(M, K, eps).double()
    assert torch.allclose(M2.T @ M2, torch.eye(M2.shape[1], dtype=torch.float64), atol=1e-5)   # orthonormal
    assert M2.shape[1] <= d
    assert torch.allclose(M2 @ (M2.T @ M.double()), M.double(), atol=1e-5)                     # M' kept
    frac = lambda B: float(((B.T @ X) ** 2).sum() / (X ** 2).sum())
    if k == 0:                                                  # first update from empty: the code's rank rule
        assert M2.shape[1] == kl.energy_rank_below(torch.linalg.eigvalsh(K), eps)
        return
    assert frac(M2) >= eps - 1e-6                                # reaches eps_f of the feature energy
    if M2.shape[1] > k:                                          # and with the fewest new directions
        assert frac(M2[:, :-1]) < eps + 1e-6


# ---- feature statistics, gradient estimate -------------------------------------------------------

def test_feature_moments_sum_and_covariance(tiny_clip):
    lora = kl.add_keeplora(tiny_clip, kl.parse_args(["--benchmark", "toy"]))
    vis = {n: m for n, m in lora.items() if n.startswith("visual.")}
    batches = [torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    xs = {}
    with common.input_hooks({"q": vis["visual.1.attn.q"], "o": vis["visual.1.attn.out"]},
                            lambda n, x: xs.setdefault(n, []).append(x.reshape(-1, x.shape[-1]).double())):
        for b in batches:
            tiny_clip.encode_image(b)
    fw = [lambda b=b: tiny_clip.encode_image(b) for b in batches]
    Ks, Kc = kl.feature_moments(vis, fw, "sum"), kl.feature_moments(vis, fw, "covariance")
    for key, name in (("q", "visual.1.attn.q"), ("o", "visual.1.attn.out")):
        Xm = (xs[key][0] + xs[key][1]) / 2                      # code: aligned token matrices averaged
        assert torch.allclose(Ks[name], Xm.T @ Xm, rtol=1e-5, atol=1e-6)
        assert torch.allclose(Kc[name], sum(x.T @ x for x in xs[key]), rtol=1e-5, atol=1e-6)
    assert torch.equal(Ks["visual.1.attn.k"], Ks["visual.1.attn.q"]) and set(Ks) == set(vis)


class _DS(torch.utils.data.Dataset):
    def __init__(self, n=24, classes=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def fake_task(n=24):
    return SimpleNamespace(name="fake", classnames=["red circle", "blue square", "green star"],
                           templates=["a photo of a {}."], train=_DS(n))


def test_gradient_estimate_is_mean_gradient_with_lora_off(tiny_clip):
    plain = copy.deepcopy(tiny_clip)
    lora = kl.add_keeplora(tiny_clip, kl.parse_args(["--benchmark", "toy"]))
    with torch.no_grad():
        for m in lora.values():                                 # a live LoRA that must be ignored
            m.A.normal_()
            m.B.normal_()
    task = fake_task(12)
    batches = [(task.train.x[i:i + 6], task.train.y[i:i + 6]) for i in (0, 6)]
    G = kl.estimate_gradient(tiny_clip, lora, batches, task, CPU)
    names = [n for n in lora if n.endswith(".0.attn.q")] + [n for n in lora if n.endswith("attn.out")][-3:]
    Ws = [plain.get_layer(n).weight for n in names]
    ref = [torch.zeros_like(W) for W in Ws]
    for x, y in batches:
        for acc, gr in zip(ref, torch.autograd.grad(kl.task_loss(plain, x, y, task, CPU), Ws)):
            acc += gr / len(batches)
    for n, r in zip(names, ref):
        assert torch.allclose(G[n], r.T, atol=1e-6)             # code orientation (d_in, d_out)
    assert all(not m.base.weight.requires_grad and m.base.weight.grad is None and m.enabled for m in lora.values())


# ---- the core promise --------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["keeplora++", "keeplora"])
def test_outputs_on_protected_span_do_not_move(tiny_clip, variant, tmp_path):
    args = kl.parse_args(["--benchmark", "toy", "--variant", variant, "--iterations", "4", "--batch-size", "8",
                          "--no-progress", "--out", str(tmp_path)])
    lora = kl.add_keeplora(tiny_clip, args)
    M = {n: kl.principal_subspace(m.base.weight, 0.5, "code") for n, m in lora.items()}
    g = torch.Generator().manual_seed(3)
    for n in M:                                                 # plus a feature part, as after a task
        X = torch.randn(M[n].shape[0], 5, generator=g)
        M[n] = kl.gpm_extend(M[n], X @ X.T, 0.9)
    W0 = {n: m.base.weight.detach().clone() for n, m in lora.items()}
    task = fake_task()
    kl.train_task(tiny_clip, {"lora": lora, "M": M}, task, 0, args, CPU)  # init A (+ v1 shift), 4 real AdamW steps on B
    moved = 0.0
    for n, m in lora.items():
        assert m.B.abs().max() > 0
        x_in = (M[n] @ torch.randn(M[n].shape[1], 7, generator=g)).T       # (7, d_in) in span(M')
        x_any = torch.randn(7, M[n].shape[0], generator=g)
        with torch.no_grad():
            ref = F.linear(x_in, W0[n], m.base.bias)
            assert (m(x_in) - ref).abs().max() <= 1e-5 * (1 + ref.abs().max())       # x in span(M'): x A = 0, no change
            moved = max(moved, float((m(x_any) - F.linear(x_any, W0[n], m.base.bias)).abs().max()))
            before = m(x_any)
            m.merge_and_reset()
            assert torch.allclose(m(x_any), before, atol=1e-5)                       # merged == unmerged
            assert (m(x_in) - ref).abs().max() <= 1e-5 * (1 + ref.abs().max())
            assert torch.all(m.A == 0) and torch.all(m.B == 0)
    assert moved > 1e-4                                           # the layers did learn off span(M')


@pytest.mark.parametrize("variant", ["keeplora++", "keeplora"])
def test_protect_off_moves_outputs_on_the_protected_span(tiny_clip, variant, tmp_path):
    """--protect off (the ablation): the same set-up and 4 real AdamW steps as above, but A comes
    from the raw gradient G, so the outputs on inputs in span(M') (W_p and an earlier task's
    features) move in every layer; the residual energy reported is all of G's. Measured: the
    relative change per layer is 5e-5 to 5e-4 (with protection: at most 3e-7)."""
    args = kl.parse_args(["--benchmark", "toy", "--variant", variant, "--iterations", "4", "--batch-size", "8",
                          "--no-progress", "--out", str(tmp_path), "--protect", "off"])
    lora = kl.add_keeplora(tiny_clip, args)
    M = {n: kl.principal_subspace(m.base.weight, 0.5, "code") for n, m in lora.items()}
    g = torch.Generator().manual_seed(3)
    for n in M:
        X = torch.randn(M[n].shape[0], 5, generator=g)
        M[n] = kl.gpm_extend(M[n], X @ X.T, 0.9)
    W0 = {n: m.base.weight.detach().clone() for n, m in lora.items()}
    info = kl.train_task(tiny_clip, {"lora": lora, "M": M}, fake_task(), 0, args, CPU)
    assert info["residual_grad_energy"] == pytest.approx(1.0)
    for n, m in lora.items():
        assert (m.A @ M[n]).abs().max() > 1e-2, f"{n}: A should not be orthogonal to M' with --protect off"
        x_in = (M[n] @ torch.randn(M[n].shape[1], 7, generator=g)).T       # (7, d_in) in span(M')
        with torch.no_grad():
            ref = F.linear(x_in, W0[n], m.base.bias)
            assert (m(x_in) - ref).abs().max() > 1e-5 * (1 + ref.abs().max()), f"{n}: protected outputs did not move"


def test_keeplora_v1_shift_keeps_function(tiny_clip, tmp_path):
    args = kl.parse_args(["--benchmark", "toy", "--variant", "keeplora", "--batch-size", "8", "--out", str(tmp_path)])
    lora = kl.add_keeplora(tiny_clip, args)
    M = {n: kl.principal_subspace(m.base.weight, 0.85, "code") for n, m in lora.items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = tiny_clip.encode_image(x)
    kl.init_task(tiny_clip, lora, M, fake_task(), 0, args, CPU)
    assert all(m.B.abs().max() > 0 for m in lora.values())       # B0 = S_r V_r^T
    with torch.no_grad():
        assert torch.allclose(tiny_clip.encode_image(x), before, atol=1e-5)


# ---- ViT-B/16 trainable parameters (real architecture, random weights, count only) --------------

def test_trainable_params_vit_b16():
    model = common.load_clip("ViT-B-16", "none", "cpu")
    lora = kl.add_keeplora(model, kl.parse_args([]))
    assert len(lora) == 96
    assert common.trainable_params(model) == 12 * 4 * 16 * 768 + 12 * 4 * 16 * 512 == 983_040
    assert all(not m.A.requires_grad for m in lora.values())


# ---- command line ------------------------------------------------------------------------------

def _cli(toy_weights, out, *extra):
    cmd = [sys.executable, "keeplora.py", "--benchmark", "toy", "--pretrained", str(toy_weights),
           "--iterations", "3", "--grad-batches", "2", "--feature-batches", "2", "--out", str(out), "--no-progress", *extra]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_cli_end_to_end_and_resume(toy_weights, tmp_path, alignment_recorded):
    align, check_alignment = alignment_recorded
    r = _cli(toy_weights, tmp_path / "a", "--max-tasks", "2", *align)
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    for key in ("method", "benchmark", "order", "datasets", "zero_shot", "acc_matrix", "transfer", "average", "last",
                "trainable_params", "seconds", "grad_seconds", "svd_seconds", "feature_seconds", "train_seconds",
                "residual_grad_energy", "protected_frac_visual", "protected_frac_text"):
        assert key in s
    assert s["method"] == "keeplora++" and len(s["acc_matrix"]) == 2 and len(s["feature_seconds"]) == 2
    assert len(s["loss"]) == 2 and all(v > 0 for v in s["loss"])
    assert 0 < s["protected_frac_visual"][0] < s["protected_frac_visual"][1] <= 1
    check_alignment(s)                                         # after every task and at zero-shot
    assert "held-out pairs: modality gap" in r.stdout
    _cli(toy_weights, tmp_path / "b", "--max-tasks", "1", *align)
    _cli(toy_weights, tmp_path / "b", "--max-tasks", "2", "--resume", *align)
    assert (tmp_path / "a" / "acc_matrix.csv").read_text() == (tmp_path / "b" / "acc_matrix.csv").read_text()
