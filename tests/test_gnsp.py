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
from fakes import Images
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


@pytest.mark.ex7
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
    etol = 1e-6 * total   # P is float32
    assert torch.trace(P @ M) < rho * total + etol
    assert (X @ P).norm() ** 2 < rho * X.norm() ** 2 + etol
    # ... and k is the smallest such number (one fewer protected direction would break it)
    if k > 0:
        assert lam[k - 1:].sum() >= rho * total * (1 - 1e-9)


@pytest.mark.ex7
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


@pytest.mark.ex3
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


@pytest.mark.ex3
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
    gnsp.accumulate_statistics(model, A, 0, args, CPU, M)
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
    gnsp.accumulate_statistics(model, B, 1, args, CPU, M)
    x = B.train.x
    for n, X in stored_inputs(model, x).items():
        G = X.T @ X
        assert torch.allclose(M[n], M1[n] + G / G.norm(), atol=1e-5)
    M2 = {n: m.clone() for n, m in M.items()}
    gnsp.accumulate_statistics(model, B, 1, args, CPU, M)
    G = stored_inputs(model, x)["visual.proj"]
    G = G.T @ G
    assert torch.allclose(M["visual.proj"], M2["visual.proj"] / M2["visual.proj"].norm() + G / G.norm(), atol=1e-5)
    G = stored_inputs(model, x)["visual.0.mlp.c_fc"]
    G = G.T @ G
    assert torch.allclose(M["visual.0.mlp.c_fc"], M2["visual.0.mlp.c_fc"] + G / G.norm(), atol=1e-5)


def test_trainable_set(tiny_clip):
    model, args = tiny_clip, toy_args()
    assert gnsp.set_trainable(model, 0, args) is True
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "clip.logit_scale")
    assert not model.logit_scale.requires_grad
    assert gnsp.set_trainable(model, 1, args) is False
    want = {id(lin.weight) for lin in gnsp.protected_layers(model).values()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == want
    assert len(want) == 2 * len(model.blocks("visual")) + 1
    assert gnsp.set_trainable(model, 0, toy_args("--first-task", "restricted")) is False
    assert {id(p) for p in model.parameters() if p.requires_grad} == want


# ---- the promise: protected layers' outputs on stored inputs of earlier tasks -----------------


@pytest.fixture()
def small_clip(monkeypatch):
    """A random tiny CLIP with a fixed vision tower (2 blocks, width 96, 17 tokens per 32x32 image),
    independent of the toy model's tuning: one image's inputs span fewer dimensions than d."""
    vision = {"image_size": 32, "patch_size": 8, "width": 96, "layers": 2, "head_width": 32}
    monkeypatch.setitem(data.TOY_CLIP_CFG, "vision_cfg", vision)
    torch.manual_seed(0)
    return common.load_clip(common.TOY_MODEL, "none", "cpu")


def protect(model, n_images, rho):
    """Task A's statistics (one batch, so M is proportional to X^T X per layer), its projectors,
    and the stored inputs X of every protected layer."""
    A, M = fake_task(n_images, 0), {}
    gnsp.accumulate_statistics(model, A, 0, toy_args(), CPU, M)
    P, k = {}, {}
    for n, m in M.items():
        P[n], k[n] = gnsp.null_space_projector(m, rho)
    return P, k, stored_inputs(model, A.train.x)


def sgd_steps(model, P, steps=2, lr=0.1):
    """Real SGD steps on task B's CE loss, the protected weights only, gradients projected."""
    B = fake_task(8, 7, "B")
    gnsp.set_trainable(model, 1, toy_args())
    W = {n: lin.weight for n, lin in gnsp.protected_layers(model).items()}
    opt = torch.optim.SGD(list(W.values()), lr=lr)
    with torch.no_grad():
        text = common.class_text_features(model, B.classnames, B.templates[0], CPU)
    for _ in range(steps):
        f = model.encode_image(B.train.x, normalize=True)
        loss = F.cross_entropy(100 * f @ text.T, B.train.y)
        opt.zero_grad()
        loss.backward()
        gnsp.project_gradients(W, P)
        opt.step()


def adamw_steps(model, P, mode):
    """gnsp.train_loop itself (AdamW, CE + CD + MAP on reference pairs) for task 2."""
    args = toy_args("--iterations", "3", "--batch-size", "4", "--lr", "1e-3", "--project", mode)
    g = torch.Generator().manual_seed(3)
    ref = [(torch.randn(3, 32, 32, generator=g), c) for c in ["a red thing", "a blue thing", "a red thing"] * 2]
    Z0 = gnsp.teacher_logits(model, ref, 4, args, CPU)
    gnsp.train_loop(model, fake_task(8, 7, "B"), 1, args, CPU, P, ref, Z0)


def output_change(model, W0, X):
    """name -> (||X dW^T||_F, dW) for every protected layer."""
    out = {}
    for n, lin in gnsp.protected_layers(model).items():
        dW = lin.weight.detach() - W0[n]
        out[n] = ((X[n] @ dW.T).norm().item(), dW)
    return out


@pytest.mark.ex7
@pytest.mark.parametrize("optimiser", ["sgd", "adamw-update"])
def test_exact_null_space_outputs_do_not_move(small_clip, optimiser):
    """One stored image: the inputs span fewer dimensions than d, rho ~ 0 -> P = the exact
    complement of their span; SGD on projected gradients (and AdamW with --project update)
    leaves every protected layer's output on them unchanged (float32 round-off, ~1e-7). Without
    the projection the relative change is 0.13-0.96."""
    model = small_clip
    P, k, X = protect(model, 1, 1e-6)
    for n in P:
        assert k[n] == int(torch.linalg.matrix_rank(X[n].double())) < P[n].shape[0]
    W0 = {n: lin.weight.detach().clone() for n, lin in gnsp.protected_layers(model).items()}
    sgd_steps(model, P) if optimiser == "sgd" else adamw_steps(model, P, "update")
    for n, (change, dW) in output_change(model, W0, X).items():
        assert dW.norm() > 0
        assert change <= 1e-5 * X[n].norm() * dW.norm(), n


@pytest.mark.ex7
@pytest.mark.parametrize("optimiser", ["sgd", "adamw-update"])
def test_rho_null_space_bound(small_clip, optimiser):
    """Several stored images, rho = 0.15: the rule guarantees ||X P||_F^2 < rho ||X||_F^2 on the
    stored inputs, and an update in the null space (dW = dW P) moves their outputs by at most
    ||X dW^T||_F = ||X P dW^T||_F <= ||X P||_2 ||dW||_F. Measured on this model: projected steps
    reach 0.15-0.6 of the bound, unprojected ones exceed it 1.5x-10x."""
    model = small_clip
    P, k, X = protect(model, 4, 0.15)
    W0 = {n: lin.weight.detach().clone() for n, lin in gnsp.protected_layers(model).items()}
    sgd_steps(model, P) if optimiser == "sgd" else adamw_steps(model, P, "update")
    for n, (change, dW) in output_change(model, W0, X).items():
        XP = X[n] @ P[n]
        assert XP.norm() ** 2 < 0.15 * X[n].norm() ** 2 * (1 + 1e-4)
        assert change <= torch.linalg.matrix_norm(XP, 2) * dW.norm() * (1 + 1e-4), n


@pytest.mark.ex7
def test_adamw_on_projected_gradients_is_not_exact(small_clip):
    """The official default (project the gradient, then AdamW) is NOT exact: Adam's per-coordinate
    scaling moves the update out of the null space. Measured here so the limitation is visible:
    in the exact null space of one image the relative change is 3e-2 to 5e-2 (vs ~1e-7 with
    --project update and 0.13-0.5 without projection)."""
    model = small_clip
    P, k, X = protect(model, 1, 1e-6)
    W0 = {n: lin.weight.detach().clone() for n, lin in gnsp.protected_layers(model).items()}
    adamw_steps(model, P, "gradient")
    rel = [c / (X[n].norm() * dW.norm()) for n, (c, dW) in output_change(model, W0, X).items()]
    assert 1e-4 < max(rel) < 0.5


def test_project_none_switches_the_protection_off(small_clip):
    """--project none (the ablation): train_task builds no projector and after_task gathers no
    statistics, so task 2's AdamW steps (CE, the 25 protected weights, the same batches) move the
    protected layers' outputs on task 1's stored inputs; with --project update (exact) the same
    steps leave them in place, and the default (--project gradient) moves them far less. Measured
    (largest relative change ||X dW^T|| / (||X|| ||dW||) over the layers): update 3e-7, gradient
    0.05, none 0.53."""
    import copy
    A, B = fake_task(1, 0), fake_task(8, 7, "B")
    M = {}
    gnsp.accumulate_statistics(small_clip, A, 0, toy_args(), CPU, M)    # task 1's statistics (one image)
    X = stored_inputs(small_clip, A.train.x)
    moved = {}
    for mode in ("update", "gradient", "none"):
        model = copy.deepcopy(small_clip)
        args = toy_args("--iterations", "3", "--batch-size", "4", "--lr", "1e-3", "--rho", "1e-6", "--project", mode)
        method = {"M": {n: m.clone() for n, m in M.items()}, "refs": None, "Z0": None, "n_tasks": 3}
        W0 = {n: lin.weight.detach().clone() for n, lin in gnsp.protected_layers(model).items()}
        common.seed_all(1)
        info = gnsp.train_task(model, method, B, 1, args, CPU)
        assert (info["protected_dims"] == 0) == (mode == "none")
        moved[mode] = max(c / (X[n].norm() * dW.norm()) for n, (c, dW) in output_change(model, W0, X).items())
        gnsp.after_task(model, method, B, 1, args, CPU)
        unchanged = all(torch.equal(method["M"][n], M[n]) for n in M)
        assert unchanged == (mode == "none"), f"--project {mode}: statistics after task 2"
    assert moved["update"] < 1e-5 and moved["gradient"] < moved["none"] / 2 and moved["none"] > 0.1, moved


# ---- the command line -------------------------------------------------------------------------


def test_missing_data_lists_datasets_and_imagenet(tmp_path):
    root = tmp_path / "nothing"
    r = run("--order", "I", "--data-root", root, "--out", tmp_path / "o")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    for name in data.MTIL_DATASETS + ["ImageNet"]:
        assert name in r.stderr
    r = run("--order", "II", "--data-root", root, "--out", tmp_path / "o", "--ref-data", "none")
    assert r.returncode == 2 and "ImageNet" not in r.stderr and "SUN397" in r.stderr


def test_mtil_reference_data_seeds_and_disjoint_heldout(tmp_path):
    """MTIL: one ImageNet sample per task with seed --seed + the task's Order-I index (the code's
    42 + index), and held-out alignment pairs disjoint from every task's sample."""
    from types import SimpleNamespace
    sys.path.insert(0, str(ROOT / "tests"))
    import fake_mtil
    fake_mtil.write_fake_imagenet(tmp_path, per_class=40)
    args = gnsp.parse_args(["--order", "II", "--data-root", str(tmp_path), "--ref-n", "4", "--align-n", "30",
                            "--out", "/nonexistent"])
    tasks = [SimpleNamespace(name=n) for n in data.MTIL_ORDERS["II"]]
    refs = gnsp.reference_data(args, tasks, SimpleNamespace(image_size=32))
    for task, ref in zip(tasks, refs):
        assert ref.files == data.imagenet_reference(tmp_path, 4, 42 + data.MTIL_ORDERS["I"].index(task.name)).files
    seen = {f for r in refs for f in r.files}
    held = common.alignment_pairs(args, SimpleNamespace(image_size=32), exclude=seen)  # what gnsp.setup passes
    assert len(held) == 30 and not seen & set(held.files) and len(set(held.files)) == 30
    assert all(c.startswith("a photo of a") for c in held.captions)
    args = gnsp.parse_args(["--data-root", str(tmp_path / "none"), "--ref-data", "none", "--out", "/nonexistent"])
    assert gnsp.reference_data(args, tasks, SimpleNamespace(image_size=32)) is None
    assert common.alignment_pairs(args, SimpleNamespace(image_size=32)) is None


def test_fake_mtil_end_to_end(tmp_path, toy_weights):
    """The MTIL path (torchvision loaders, ImageNet reference pairs, held-out alignment pairs) on
    fake trees, with the toy model."""
    sys.path.insert(0, str(ROOT / "tests"))
    import fake_mtil
    fake_mtil.write_fake_mtil(tmp_path / "data")
    fake_mtil.write_fake_imagenet(tmp_path / "data", per_class=12)
    code = ("import sys; sys.path[:0] = ['tests', '.']; import fake_mtil, common, gnsp\n"
            "with fake_mtil.skip_md5_checks(): common.cli_main(gnsp.main, sys.argv[1:])")
    r = subprocess.run([sys.executable, "-c", code, "--order", "I", "--data-root", str(tmp_path / "data"),
                        "--model", "toy-tiny", "--pretrained", str(toy_weights), "--iterations", "2",
                        "--batch-size", "4", "--max-tasks", "2", "--workers", "0", "--ref-n", "6", "--align-n", "8",
                        "--out", str(tmp_path / "m"), "--no-progress"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert len(s["datasets"]) == 11 and len(s["acc_matrix"]) == 2 and len(s["modality_gap"]) == 2
    assert "held-out pairs" in r.stdout


def summary(path):
    s = json.loads((Path(path) / "summary.json").read_text())
    for key in ("seconds", "after_task_seconds"):
        s.pop(key)
    return s


def test_toy_end_to_end_and_resume(tmp_path, toy_weights, alignment_recorded):
    align, check_alignment = alignment_recorded
    base = ["--benchmark", "toy", "--pretrained", toy_weights, "--iterations", "3", "--gram-batches", "4",
            *align, "--ref-n", "128", "--no-progress"]
    r = run(*base, "--max-tasks", "2", "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    for key in ["method", "benchmark", "order", "datasets", "zero_shot", "acc_matrix", "transfer", "average",
                "last", "trainable_params", "seconds", "modality_gap", "i2t_r1", "t2i_r1", "zero_shot_info",
                "protected_dims", "after_task_seconds", "loss"]:
        assert key in s, key
    assert s["method"] == "gnsp" and len(s["acc_matrix"]) == 2 == len(s["modality_gap"]) == len(s["i2t_r1"])
    assert s["protected_dims"][0] == 0 < s["protected_dims"][1]
    assert set(s["zero_shot_info"]) == {"modality_gap", "i2t_r1", "t2i_r1"}   # the untouched CLIP's alignment
    check_alignment(s)                                                          # as every script's
    assert len(s["loss"]) == 2 and all(v > 0 for v in s["loss"])
    assert "modality gap" in r.stdout and "Transfer" in r.stdout and "protected input directions" in r.stdout
    # interrupted after task 1, resumed: the same matrix and alignment values
    assert run(*base, "--max-tasks", "1", "--out", tmp_path / "b").returncode == 0
    r = run(*base, "--max-tasks", "2", "--out", tmp_path / "b", "--resume")
    assert r.returncode == 0, r.stderr
    assert summary(tmp_path / "a") == summary(tmp_path / "b")
