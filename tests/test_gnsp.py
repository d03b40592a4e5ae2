"""gnsp.py: the null-space rule, the projection's promise on a real model, the losses, the
statistics, and the command line (toy end to end, resume, missing data)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import common
import data
import gnsp

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}


def run(*argv):
    return subprocess.run([sys.executable, "gnsp.py", *map(str, argv)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)


def psd(seed, n, d, decay):
    """X^T X of n random rows in d dims with a decaying column scale (a realistic spectrum)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * decay ** torch.arange(d, dtype=torch.float64)
    return X, X.T @ X


# ---- the null-space rule ------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 40), d=st.integers(2, 24),
       decay=st.floats(0.5, 1.0), rho=st.floats(0.01, 1.0))
def test_projector_properties(seed, n, d, decay, rho):
    X, M = psd(seed, n, d, decay)
    P, k = gnsp.null_space_projector(M, rho)
    P = P.double()
    lam, U = torch.linalg.eigh(M)
    lam, U = lam.flip(0).clamp(min=0), U.flip(1)
    tol = 1e-5
    assert torch.allclose(P, P.T, atol=tol)                           # symmetric
    assert torch.allclose(P @ P, P, atol=tol)                         # idempotent
    assert torch.allclose(P @ U[:, :k], torch.zeros(d, k, dtype=P.dtype), atol=tol)  # P U_protected = 0
    assert abs(torch.trace(P).item() - (d - k)) < 1e-4                # rank d - k
    # the rule's guarantee: the stored inputs keep less than rho of their energy in the null space
    total = lam.sum()
    assert torch.trace(P @ M) <= rho * total * (1 + 1e-6) + 1e-12
    assert (X @ P).norm() ** 2 <= rho * (X.norm() ** 2) * (1 + 1e-6) + 1e-12
    # ... and k is the smallest such number (one fewer protected direction would break it)
    if k > 0:
        assert lam[k - 1:].sum() >= rho * total * (1 - 1e-9)


def test_projector_boundaries():
    d = 6
    v = torch.nn.functional.normalize(torch.arange(1.0, d + 1, dtype=torch.float64), dim=0)
    # all energy in one direction: it is the only protected one
    P, k = gnsp.null_space_projector(torch.outer(v, v), 0.15)
    assert k == 1 and torch.allclose(P.double(), torch.eye(d, dtype=torch.float64) - torch.outer(v, v), atol=1e-6)
    # flat spectrum: tail (d - k) / d < rho -> k = d - ceil(rho d) + 1 ... checked by counting
    for rho in (0.1, 0.15, 0.5, 1.0):
        P, k = gnsp.null_space_projector(torch.eye(d, dtype=torch.float64), rho)
        assert k == min(j for j in range(d + 1) if (d - j) / d < rho)
    # strict boundary: eigenvalues (3, 1), rho = 1/4 -> the tail 1/4 is not < 1/4 -> both protected
    P, k = gnsp.null_space_projector(torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64)), 0.25)
    assert k == 2 and P.abs().max() == 0
    P, k = gnsp.null_space_projector(torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64)), 0.2500001)
    assert k == 1
    # rank-deficient: every zero-eigenvalue direction is in the null space, even with a tiny rho
    X, M = psd(0, 3, 10, 1.0)
    P, k = gnsp.null_space_projector(M, 1e-9)
    assert k == 3 and (X @ P.double()).norm() < 1e-5 * X.norm()
    # nothing stored: nothing protected
    P, k = gnsp.null_space_projector(torch.zeros(4, 4), 0.15)
    assert k == 0 and torch.equal(P, torch.eye(4))


# ---- the losses -------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), R=st.integers(2, 8), T=st.floats(0.5, 4.0))
def test_contrastive_distillation(seed, R, T):
    g = torch.Generator().manual_seed(seed)
    Z0, Z = torch.randn(R, R, generator=g) * 5, (torch.randn(R, R, generator=g) * 5).requires_grad_()
    L = gnsp.contrastive_distillation(Z0, Z, T)
    # = T^2 (H(p0) + KL(p0 || p)) per direction, averaged over rows, summed over the two directions
    def ref(A, B):
        p0 = F.softmax(A / T, -1)
        return T ** 2 * (-(p0 * p0.log()).sum(-1) + F.kl_div(F.log_softmax(B / T, -1), p0, reduction="none").sum(-1)).mean()
    assert torch.allclose(L, ref(Z0, Z) + ref(Z0.T, Z.T), atol=1e-4)
    # the student matching the teacher is the minimum: zero gradient there
    Zt = Z0.clone().requires_grad_()
    gnsp.contrastive_distillation(Z0, Zt, T).backward()
    assert Zt.grad.abs().max() < 1e-5


def test_modality_alignment_preservation():
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(5, 5, generator=g) * 3
    # distinct captions, no smoothing: CLIP's symmetric InfoNCE
    Y = gnsp.same_caption(list("abcde"), "cpu")
    y = torch.arange(5)
    assert torch.equal(Y, torch.eye(5))
    assert torch.allclose(gnsp.modality_alignment_preservation(Z, Y, 0.0), F.cross_entropy(Z, y) + F.cross_entropy(Z.T, y))
    # duplicate captions are all positives, row-normalised; smoothing eps spreads eps / R
    Y = gnsp.same_caption(["a", "b", "a", "c", "a"], "cpu")
    assert torch.allclose(Y[0], torch.tensor([1 / 3, 0, 1 / 3, 0, 1 / 3])) and torch.allclose(Y, Y.T)
    Yt = 0.8 * Y + 0.2 / 5
    want = -(Yt * F.log_softmax(Z, -1)).sum(-1).mean() - (Yt * F.log_softmax(Z.T, -1)).sum(-1).mean()
    assert torch.allclose(gnsp.modality_alignment_preservation(Z, Y, 0.2), want, atol=1e-6)


# ---- the statistics ---------------------------------------------------------------------------


class Images(torch.utils.data.Dataset):
    def __init__(self, n, seed, classes=3):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(classes, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def fake_task(n, seed, name="A"):
    return data.Task(name, ["red", "green", "blue"], ["a {} thing."], Images(n, seed), Images(4, seed + 1))


def toy_args(*extra):
    return gnsp.parse_args(["--benchmark", "toy", "--out", "/nonexistent", "--no-progress", *extra])


def stored_inputs(model, images):
    """The protected layers' inputs on `images`, rows = tokens: name -> (rows, d_in)."""
    X = {}

    def keep(name, x):   # returns None: a forward hook's return value would replace the output
        X[name] = x.reshape(-1, x.shape[-1]).clone()

    with torch.no_grad(), common.input_hooks(gnsp.protected_layers(model), keep):
        model.encode_image(images)
    return X


def test_after_task_statistics_and_accumulation(tiny_clip):
    model, args = tiny_clip, toy_args("--gram-batch-size", "3")
    A, B = fake_task(6, 0), fake_task(3, 5)
    M = {}
    gnsp.after_task(model, A, 0, args, CPU, M)
    # by hand: two batches of 3 images, each Gram Frobenius-normalised, summed, normalised
    loader = common.make_loader(A.train, 3, shuffle=True, seed=args.seed * 1000 + 0)
    S = {}
    for x, _ in loader:
        for n, X in stored_inputs(model, x).items():
            G = X.T @ X
            S[n] = S.get(n, 0) + G / G.norm()
    want = {n: s / s.norm() for n, s in S.items()}
    assert set(M) == set(want) and len(M) == 2 * len(model.blocks("visual")) + 1
    for n in M:
        assert torch.allclose(M[n], want[n], atol=1e-5)
    # visual.proj sees the CLS feature after ln_post: one row per image
    assert stored_inputs(model, A.train.x[:3])["visual.proj"].shape[0] == 3
    # task 2: MLP layers add, visual.proj renormalises the history first (equal here: it is unit-norm)
    M1 = {n: m.clone() for n, m in M.items()}
    gnsp.after_task(model, B, 1, args, CPU, M)
    x = B.train.x
    for n, X in stored_inputs(model, x).items():
        G = X.T @ X
        assert torch.allclose(M[n], M1[n] + G / G.norm(), atol=1e-5)
    M2 = {n: m.clone() for n, m in M.items()}
    gnsp.after_task(model, B, 1, args, CPU, M)
    G = stored_inputs(model, x)["visual.proj"]
    G = G.T @ G
    assert torch.allclose(M["visual.proj"], M2["visual.proj"] / M2["visual.proj"].norm() + G / G.norm(), atol=1e-5)
    G = stored_inputs(model, x)["visual.0.mlp.c_fc"]
    G = G.T @ G
    assert torch.allclose(M["visual.0.mlp.c_fc"], M2["visual.0.mlp.c_fc"] + G / G.norm(), atol=1e-5)
