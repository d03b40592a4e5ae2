"""Behaviour tests of keeplora.py, end to end on a tiny random CLIP and small fake tasks.

Each behaviour is checked against an independent recomputation (written out here, or through
the helpers that tests/test_keeplora.py checks against their definitions):
  * the command-line defaults of both variants and the official MTIL step budget;
  * the LoRA branch: y = W x + b + s_l (alpha/r) B^T A^T x, the layer scale per block and tower,
    merge == unmerged function, protected inputs untouched (hypothesis, non-square layers);
  * the task start: A = top-r left singular directions of the residual of the full-data gradient
    (LoRA off, current weights), orthogonal to M'; B0 = 0 (keeplora++) or S_r V_r^T with the
    compensating weight shift (keeplora);
  * training: only B moves, AdamW + OneCycleLR with its defaults stepped once per iteration,
    plain cross-entropy over logit_scale * cos(image, templates[0] text), gradient descent;
  * after the task: W grows by exactly s_l (alpha/r) B A and the model's function is kept, the
    LoRA is reset, M' is extended by the task's own input features (GPM);
  * setup (through main): M' starts as W_p of each weight with the tower's eps_w on the code's side;
  * checkpoint / restore: the merged q, k, v, out weights and M' come back exactly.
"""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.optim.optimizer import register_optimizer_step_pre_hook

import common
import data
import keeplora as kl

CPU = torch.device("cpu")
CLASSES = ["red circle", "blue square", "green star"]
# two different templates: the training loss must use templates[0] only
TEMPLATES = ["a photo of a {}.", "an old blurry drawing showing one {} shape"]


# ---- helpers -----------------------------------------------------------------------------------

class _DS(torch.utils.data.Dataset):
    """(image 3x32x32, int label) pairs, fixed by the seed."""

    def __init__(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.arange(n) % len(CLASSES)                     # every class present
        self.y = self.y[torch.randperm(n, generator=g)]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def fake_task(n=12, seed=0, name="fake"):
    return SimpleNamespace(name=name, classnames=list(CLASSES), templates=list(TEMPLATES),
                           train=_DS(n, seed), test=_DS(6, seed + 100))


def make_args(*extra):
    return kl.parse_args(["--benchmark", "toy", "--no-progress", "--iterations", "3", "--batch-size", "4", *extra])


def expected_scale(name, model, gamma, scale_text=False):
    """s_l of KeepLoRA++: gamma + (1 - gamma) l / (L - 1) on the vision tower (text only if asked)."""
    tower, l = name.split(".")[0], int(name.split(".")[1])
    L = len(model.blocks(tower))
    if tower == "text" and not scale_text:
        return 1.0
    return 1.0 if L == 1 else gamma + (1 - gamma) * l / (L - 1)


def ref_loss(model, images, labels, task):
    """The code's loss, written out: plain CE over logit_scale * cos(image, text of templates[0])."""
    txt = model.encode_texts([task.templates[0].format(c) for c in task.classnames], CPU, normalize=False)
    img = model.encode_image(images)
    logits = model.logit_scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    return F.cross_entropy(logits, labels)


def full_data(task):
    return task.train.x, task.train.y


def ref_gradients(model, lora, task):
    """Full-data gradient dL/dW (code orientation, (d_in, d_out)) at the current weights, LoRA off,
    computed on a copy so the model under test is untouched."""
    m2 = copy.deepcopy(model)
    names = list(lora)
    mods = [m2.get_layer(n) for n in names]
    for m in mods:
        m.enabled = False
    for m in mods:
        m.base.weight.requires_grad_(True)
    x, y = full_data(task)
    grads = torch.autograd.grad(ref_loss(m2, x, y, task), [m.base.weight for m in mods])
    return {n: g.T.double() for n, g in zip(names, grads)}


def initial_M(lora, eps=0.5):
    """A non-trivial protected basis for every module (a principal part plus a random part)."""
    g = torch.Generator().manual_seed(7)
    M = {}
    for n, m in lora.items():
        P = kl.principal_subspace(m.base.weight, eps, "code")
        X = torch.randn(P.shape[0], 4, generator=g)
        M[n] = kl.gpm_extend(P, X @ X.T, 0.9)
    return M


def proj(U):
    U = U.double()
    return U @ U.T


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- command line defaults -------------------------------------------------------------------------

def test_parse_args_defaults_per_variant():
    a = kl.parse_args([])
    got = {k: getattr(a, k) for k in ("variant", "b_init", "gamma", "principal_side", "feature_stat", "rank", "alpha",
                                       "eps_w_vision", "eps_w_text", "eps_f", "weight_decay", "scale_text",
                                       "grad_batches", "feature_batches")}
    want = {"variant": "keeplora++", "b_init": "zero", "gamma": 0.2, "principal_side": "code", "feature_stat": "sum",
            "rank": 16, "alpha": 1.0, "eps_w_vision": 0.85, "eps_w_text": 0.2, "eps_f": 0.99, "weight_decay": 0.01,
            "scale_text": False, "grad_batches": None, "feature_batches": None}
    assert got == want, f"keeplora++ defaults differ: { {k: (got[k], want[k]) for k in want if got[k] != want[k]} }"
    v1 = kl.parse_args(["--variant", "keeplora"])
    assert (v1.b_init, v1.gamma) == ("svd", 1.0), f"keeplora (v1) must start B at S_r V_r^T, no layer scale: {v1}"
    assert (v1.rank, v1.alpha, v1.eps_w_vision, v1.eps_w_text, v1.eps_f, v1.principal_side, v1.feature_stat) == \
        (16, 1.0, 0.85, 0.2, 0.99, "code", "sum")
    # explicit flags win over the variant's defaults
    x = kl.parse_args(["--variant", "keeplora", "--b-init", "zero", "--gamma", "0.5"])
    assert (x.b_init, x.gamma) == ("zero", 0.5)
    y = kl.parse_args(["--b-init", "svd", "--gamma", "1"])
    assert (y.b_init, y.gamma) == ("svd", 1.0)


@pytest.mark.parametrize("bad", [["--rank", "0"], ["--eps-f", "1.5"], ["--eps-w-text", "-0.1"],
                                 ["--grad-batches", "0"]])
def test_parse_args_rejects_bad_numbers(bad):
    with pytest.raises(common.UserError):
        kl.parse_args(bad)


@pytest.mark.parametrize("order,epochs", [("I", [10] * 10 + [5]), ("II", [5, 2, 5, 5, 5, 5, 10, 10, 10, 10, 10])])
def test_mtil_task_hparams_follow_official_configs(order, epochs):
    # official configs: AdamW lr 1e-3, batch 64, steps per task = epochs * ceil(N / 64)
    args = kl.parse_args(["--order", order])
    names = data.MTIL_ORDERS[order]
    for t, e in enumerate(epochs):
        task = SimpleNamespace(train=range(1000), name=names[t])
        hp = kl.hparams(args, task, t)
        assert (hp.iterations, hp.batch_size, hp.lr, hp.warmup, hp.schedule) == \
            (e * math.ceil(1000 / 64), 64, 1e-3, 0, "onecycle"), f"order {order}, task {t}: {hp}"
    # X-TAIL (Order I only) drops CIFAR-100: each domain keeps its own entry, not its position's
    xt = kl.parse_args(["--benchmark", "xtail"])
    kept = [(n, e) for n, e in zip(names, epochs) if n != "CIFAR100"] if order == "I" else []
    for t, (n, e) in enumerate(kept):
        hp = kl.hparams(xt, SimpleNamespace(train=range(1000), name=n), t)
        assert hp.iterations == e * math.ceil(1000 / 64), f"xtail {order}, {n}: {hp}"
    task = SimpleNamespace(train=range(1000), name=names[3])
    assert len(kl.DEFAULTS["epochs_per_task"][0][order]) == 11
    over = kl.parse_args(["--order", order, "--iterations", "7", "--batch-size", "5", "--lr", "0.02"])
    hp = kl.hparams(over, task, 3)
    assert (hp.iterations, hp.batch_size, hp.lr) == (7, 5, 0.02)
    bs = kl.parse_args(["--order", order, "--batch-size", "100"])           # the step count follows the batch
    assert kl.hparams(bs, task, 0).iterations == epochs[0] * 10


# ---- the LoRA branch -----------------------------------------------------------------------------

@pytest.mark.ex4
@settings(max_examples=30, deadline=None)
@given(d_in=st.integers(2, 12), d_out=st.integers(1, 12), r=st.integers(1, 6), alpha=st.floats(0.25, 4.0),
       s=st.floats(0.1, 1.0), seed=st.integers(0, 10_000))
def test_lora_linear_forward_merge_and_protection(d_in, d_out, r, alpha, s, seed):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(d_in, d_out).double()
    with torch.no_grad():
        base.weight.copy_(torch.randn(d_out, d_in, generator=g, dtype=torch.float64))
        base.bias.copy_(torch.randn(d_out, generator=g, dtype=torch.float64))
    m = kl.KeepLoRALinear(base, r, alpha, s).double()
    assert [n for n, _ in m.named_parameters() if not n.startswith("base.")] == ["B"], "only B is a LoRA parameter"
    assert "A" in dict(m.named_buffers()) and m.A.shape == (r, d_in) and m.B.shape == (d_out, r)
    x = torch.randn(5, d_in, generator=g, dtype=torch.float64)
    W0, b = base.weight.detach().clone(), base.bias.detach().clone()
    with torch.no_grad():
        assert torch.allclose(m(x), x @ W0.T + b), "A = B = 0 must leave the layer unchanged"
        A = torch.randn(r, d_in, generator=g, dtype=torch.float64)          # A^T of the code
        B = torch.randn(d_out, r, generator=g, dtype=torch.float64)         # B^T of the code
        m.A.copy_(A)
        m.B.copy_(B)
        want = x @ W0.T + b + s * (alpha / r) * (x @ A.T) @ B.T             # y = x W + s (alpha/r) x A B
        assert torch.allclose(m(x), want, atol=1e-10), "forward != W x + b + s (alpha/r) B A x"
        m.enabled = False
        assert torch.allclose(m(x), x @ W0.T + b), "LoRA off must give the base layer"
        m.enabled = True
        # inputs orthogonal to the rows of A (the protected side) are not moved
        Q = torch.linalg.qr(A.T, mode="complete")[0][:, min(r, d_in):]       # (d_in, d_in - r)
        if Q.shape[1]:
            xp = (Q @ torch.randn(Q.shape[1], 4, generator=g, dtype=torch.float64)).T
            assert torch.allclose(m(xp), xp @ W0.T + b, atol=1e-10), "x A = 0 must give an unchanged output"
        before = m(x)
        m.merge_and_reset()
        assert torch.allclose(base.weight, W0 + s * (alpha / r) * B @ A, atol=1e-10), "merge != W + s (alpha/r) B A"
        assert torch.all(m.A == 0) and torch.all(m.B == 0), "merge must reset A and B"
        assert torch.allclose(m(x), before, atol=1e-10), "merged layer differs from the unmerged one"


@pytest.mark.ex4
@pytest.mark.parametrize("flags,scale_text", [((), False), (("--scale-text", "--gamma", "0.4", "--rank", "4",
                                                                "--alpha", "3"), True)])
def test_branch_scale_per_block_and_tower(tiny_clip, flags, scale_text):
    args = make_args(*flags)
    lora = kl.add_keeplora(tiny_clip, args)
    assert set(lora) == {f"{tw}.{i}.{k}" for tw in ("visual", "text") for i in range(len(tiny_clip.blocks(tw)))
                         for k in ("attn.q", "attn.k", "attn.v", "attn.out")}, \
        "q, k, v, out of every block, both towers"
    assert all(tiny_clip.get_layer(n) is m for n, m in lora.items()), "the LoRA modules must be in the model"
    assert common.trainable_params(tiny_clip) == sum(m.B.numel() for m in lora.values()), "only B trains"
    g = torch.Generator().manual_seed(1)
    for n, m in lora.items():
        s = expected_scale(n, tiny_clip, args.gamma, scale_text)
        with torch.no_grad():
            m.A.normal_(generator=g)
            m.B.normal_(generator=g)
            x = torch.randn(3, m.A.shape[1], generator=g)
            got = m(x) - m.base(x)
            want = s * (args.alpha / args.rank) * (x @ m.A.T) @ m.B.T
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), \
                f"{n}: branch scale {float((got / want).mean()):.4f} != s_l alpha/r = {s * args.alpha / args.rank:.4f}"
            assert torch.allclose(F.linear(x, m.delta()), want, rtol=1e-4, atol=1e-5), f"{n}: delta() != forward"


# ---- the task start: A from the residual gradient; B0 --------------------------------------------

@pytest.mark.ex10
@pytest.mark.parametrize("variant", ["keeplora++", "keeplora"])
def test_init_task_A_is_top_residual_gradient_directions(tiny_clip, variant):
    args = make_args("--variant", variant, "--batch-size", "4")              # 12 samples: 3 gradient batches
    lora = kl.add_keeplora(tiny_clip, args)
    with torch.no_grad():                                                   # weights of an earlier merged task
        g = torch.Generator().manual_seed(2)
        for m in lora.values():
            m.A.normal_(generator=g)
            m.B.normal_(generator=g).mul_(0.3)
            m.merge_and_reset()
    M = initial_M(lora)
    task = fake_task(12)
    G = ref_gradients(tiny_clip, lora, task)
    W0 = {n: m.base.weight.detach().clone() for n, m in lora.items()}
    kl.init_task(tiny_clip, lora, M, task, 0, args, CPU)
    for n, m in lora.items():
        A = m.A.double().T                                                  # code A: (d_in, r)
        Mn = M[n].double()
        G_hat = G[n] - Mn @ (Mn.T @ G[n])                                   # (I - M'M'^T) G
        k = min(args.rank, Mn.shape[0] - Mn.shape[1])
        nz = A.norm(dim=0) > 0
        assert int(nz.sum()) == k, f"{n}: {int(nz.sum())} non-zero columns of A, want {k}"
        assert torch.allclose(A[:, nz].T @ A[:, nz], torch.eye(k, dtype=torch.float64), atol=1e-5), \
            f"{n}: A not orthonormal"
        off = (Mn.T @ A).abs().max()
        assert off < 1e-5, f"{n}: A is not orthogonal to M' (max |M'^T A| {off:.2e})"
        # optimality: A holds the energy of the top-k left singular vectors of G_hat
        # (the energy, not the span: the singular values of a random model's gradient lie close)
        best = float((torch.linalg.svdvals(G_hat)[:k] ** 2).sum())
        got = float(((A.T @ G_hat) ** 2).sum())
        assert got == pytest.approx(best, rel=1e-5), \
            f"{n}: A holds {got:.6e} of the residual gradient energy, the top-{k} left singular vectors hold {best:.6e}"
        W = m.base.weight.double()
        if variant == "keeplora++":
            assert torch.all(m.B == 0), f"{n}: keeplora++ starts B at 0"
            assert torch.equal(m.base.weight, W0[n]), f"{n}: keeplora++ must not shift W"
        else:
            B0 = (A.T @ G_hat).T                                            # (S_r V_r^T)^T = G_hat^T A: (d_out, r)
            err = (m.B.double() - B0).abs().max()
            assert torch.allclose(m.B.double(), B0, rtol=1e-3, atol=1e-3 * B0.abs().max()), \
                f"{n}: keeplora B0 != S_r V_r^T of the residual gradient (max err {err:.2e})"
            shift = (args.alpha / args.rank) * B0 @ A.T                      # s = 1 for v1
            assert torch.allclose(W, W0[n].double() - shift, atol=1e-6), f"{n}: W must be shifted by -s (alpha/r) A B0"


# ---- training ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["keeplora++", "keeplora"])
def test_train_task_moves_only_B(tiny_clip, variant, monkeypatch):
    args = make_args("--variant", variant, "--lr", "0.05")
    lora = kl.add_keeplora(tiny_clip, args)
    M = initial_M(lora)
    before = snapshot(tiny_clip)
    at_init = {}
    real_init = kl.init_task

    def spy_init(*a, **kw):
        out = real_init(*a, **kw)
        at_init.update(snapshot(tiny_clip))
        return out

    monkeypatch.setattr(kl, "init_task", spy_init)
    kl.train_task(tiny_clip, {"lora": lora, "M": M}, fake_task(12), 0, args, CPU)
    after = snapshot(tiny_clip)
    assert at_init, "train_task must start with init_task"
    for k in after:
        if k.endswith(".B"):
            assert not torch.equal(after[k], at_init[k]), f"{k}: B did not train"
        else:                                                               # A, W, LayerNorms, MLP, logit_scale ...
            assert torch.equal(after[k], at_init[k]), f"{k} changed during training (only B may)"
        if not k.endswith((".A", ".B", ".base.weight")):
            assert torch.equal(at_init[k], before[k]), f"{k} changed at the task start"
        if k.endswith(".base.weight") and variant == "keeplora++":
            assert torch.equal(at_init[k], before[k]), f"{k}: keeplora++ must not shift W"
    for n, m in lora.items():                                               # the trained A is still the residual one
        A = m.A.double().T
        assert A.abs().max() > 0 and (M[n].double().T @ A).abs().max() < 1e-5, f"{n}: A not orthogonal to M'"
    assert not tiny_clip.training, "the model must be back in eval mode"


def _record_steps():
    """Record (optimizer, lr, betas, weight decay, params) at every optimizer step."""
    log = []

    def hook(opt, args, kwargs):
        pg = opt.param_groups[0]
        log.append(SimpleNamespace(opt=opt, lr=pg["lr"], betas=tuple(pg["betas"]), wd=pg["weight_decay"],
                                   params=[p for g in opt.param_groups for p in g["params"]]))

    h = register_optimizer_step_pre_hook(hook)
    return log, h


@pytest.mark.parametrize("iterations,lr,wd", [(7, 0.01, None), (4, None, 0.05)])
def test_train_task_adamw_onecycle_schedule(tiny_clip, iterations, lr, wd):
    args = make_args("--iterations", str(iterations), *(("--lr", str(lr)) if lr else ()),
                     *(("--weight-decay", str(wd)) if wd else ()))
    lora = kl.add_keeplora(tiny_clip, args)
    M = initial_M(lora)
    log, h = _record_steps()
    try:
        kl.train_task(tiny_clip, {"lora": lora, "M": M}, fake_task(12), 0, args, CPU)
    finally:
        h.remove()
    max_lr = lr or kl.DEFAULTS["lr"][1]                                   # the toy column
    # reference: torch's OneCycleLR with its defaults, stepped once after every optimizer step
    p = nn.Parameter(torch.zeros(1))
    ref_opt = torch.optim.AdamW([p], lr=max_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=max_lr, total_steps=iterations)
    want = []
    for _ in range(iterations):
        want.append((ref_opt.param_groups[0]["lr"], ref_opt.param_groups[0]["betas"][0]))
        p.grad = torch.zeros(1)
        ref_opt.step()
        sched.step()
    got = [(e.lr, e.betas[0]) for e in log]
    assert len(got) == iterations, f"{len(got)} optimizer steps for {iterations} iterations"
    assert [v for pair in got for v in pair] == pytest.approx([v for pair in want for v in pair], rel=1e-9), \
        f"(lr, beta1) per step {got}\n  OneCycleLR defaults give {want}"
    assert all(type(e.opt) is torch.optim.AdamW for e in log), f"optimizer {type(log[0].opt).__name__}, want AdamW"
    assert all(e.wd == (wd or 0.01) and e.betas[1] == 0.999 for e in log), \
        f"weight decay {log[0].wd}, betas {log[0].betas}"
    Bs = {id(m.B) for m in lora.values()}
    assert {id(q) for q in log[0].params} == Bs and len(log[0].params) == len(Bs), \
        "the optimizer must hold exactly the B's"


def test_training_loss_is_plain_ce_and_first_step_descends(tiny_clip, monkeypatch):
    # one batch = the whole split: the loss of the single step does not depend on the shuffle
    n = 12
    args = make_args("--iterations", "1", "--batch-size", str(n), "--lr", "0.02")
    with torch.no_grad():                                                   # CLIP's cap 100: spread-out logits
        tiny_clip.logit_scale.fill_(math.log(100.0))
    lora = kl.add_keeplora(tiny_clip, args)
    M = initial_M(lora)
    task = fake_task(n)
    x, y = full_data(task)
    with torch.no_grad():
        want = float(ref_loss(copy.deepcopy(tiny_clip), x, y, task))
    state = {}
    real_init = kl.init_task

    def spy_init(model, lora_, *a, **kw):
        out = real_init(model, lora_, *a, **kw)
        state["model"] = copy.deepcopy(model)                             # A set, B = 0
        return out

    monkeypatch.setattr(kl, "init_task", spy_init)
    loss = kl.train_task(tiny_clip, {"lora": lora, "M": M}, task, 0, args, CPU)["loss"]
    assert loss == pytest.approx(want, rel=2e-6), \
        f"training loss {loss:.6f} != plain CE over logit_scale * cos(image, templates[0] text) = {want:.6f}"
    # dL/dB at the start; AdamW's first step from B = 0 is B1 = -lr0 g / (|g| + eps) = -lr0 sign(g)
    # wherever |g| >> eps (decoupled weight decay of 0 is 0)
    m0 = state["model"]
    names = list(lora)
    grads = torch.autograd.grad(ref_loss(m0, x, y, task), [m0.get_layer(k).B for k in names])
    p = nn.Parameter(torch.zeros(1))                                        # lr of OneCycleLR's first step
    lr0 = torch.optim.lr_scheduler.OneCycleLR(torch.optim.AdamW([p], lr=0.02), max_lr=0.02,
                                              total_steps=1).get_last_lr()[0]
    for k, gB in zip(names, grads):
        B1 = lora[k].B.detach()
        big = (gB.abs() > 1e-6) & (gB.abs() > 1e-3 * gB.abs().max())        # clear of eps and round-off
        assert big.sum() >= 10, f"{k}: gradient of B vanishes"
        assert B1.abs().max() <= lr0 * 1.001, f"{k}: first step larger than lr0 = {lr0:.3g}"
        err = (B1[big] + lr0 * gB[big].sign()).abs().max()
        assert err < 0.02 * lr0, \
            f"{k}: B after one step is not the descent step -lr0 sign(g) (max err {err:.2e}, lr0 {lr0:.2e}, " \
            f"sign agreement {float((B1[big].sign() == -gB[big].sign()).float().mean()):.2f})"


# ---- after the task: merge and GPM -----------------------------------------------------------------

def _trained(tiny_clip, *flags, n=12):
    args = make_args("--lr", "0.05", *flags)
    lora = kl.add_keeplora(tiny_clip, args)
    M = initial_M(lora)
    task = fake_task(n)
    kl.train_task(tiny_clip, {"lora": lora, "M": M}, task, 0, args, CPU)
    return args, lora, M, task


@pytest.mark.ex4
@pytest.mark.parametrize("flags", [(), ("--variant", "keeplora"), ("--scale-text", "--gamma", "0.5", "--alpha", "2")])
def test_after_task_merges_exactly_and_keeps_function(tiny_clip, flags):
    args, lora, M, task = _trained(tiny_clip, *flags)
    scale_text = "--scale-text" in flags
    g = torch.Generator().manual_seed(5)
    imgs = torch.randn(4, 3, 32, 32, generator=g)
    prompts = ["a photo of a purple hexagon.", "green star", "a big red circle on a table"]
    with torch.no_grad():
        f_img, f_txt = tiny_clip.encode_image(imgs), tiny_clip.encode_texts(prompts, CPU, normalize=False)
        W_want = {}
        for n, m in lora.items():
            s = expected_scale(n, tiny_clip, args.gamma, scale_text)
            assert m.B.abs().max() > 0, f"{n}: B did not train"
            W_want[n] = m.base.weight + s * (args.alpha / args.rank) * m.B @ m.A   # W + s (alpha/r) (A B)^T
    kl.after_task(tiny_clip, {"lora": lora, "M": M}, task, 0, args, CPU)
    for n, m in lora.items():
        assert torch.all(m.A == 0) and torch.all(m.B == 0), f"{n}: LoRA not reset after the merge"
        assert m.enabled, f"{n}: LoRA must stay enabled for the next task"
        err = (m.base.weight - W_want[n]).abs().max()
        assert err < 1e-6, f"{n}: W after merge != W + s_l (alpha/r) B A (max err {err:.2e})"
    with torch.no_grad():
        e_img = (tiny_clip.encode_image(imgs) - f_img).abs().max()
        e_txt = (tiny_clip.encode_texts(prompts, CPU, normalize=False) - f_txt).abs().max()
    assert e_img < 1e-4 and e_txt < 1e-4, \
        f"merged model differs from the trained one: image {e_img:.2e}, text {e_txt:.2e}"


@pytest.mark.ex11
@pytest.mark.parametrize("stat,eps_f", [("sum", "0.99"), ("covariance", "0.9")])
def test_after_task_extends_M_with_task_features(tiny_clip, monkeypatch, stat, eps_f):
    # 12 samples, batch 6: two feature batches. 'sum' averages the batches' token matrices X_b
    # (K = X X^T of the mean), 'covariance' sums X_b X_b^T.
    args, lora, M, task = _trained(tiny_clip, "--batch-size", "6", "--eps-f", eps_f, "--feature-stat", stat, n=12)
    M_old = {k: v.clone() for k, v in M.items()}
    seen = []
    real = tiny_clip.encode_image

    def spy(images, *a, **kw):                                              # the image batches of the feature pass
        seen.append(images.clone())
        return real(images, *a, **kw)

    monkeypatch.setattr(tiny_clip, "encode_image", spy)
    kl.after_task(tiny_clip, {"lora": lora, "M": M}, task, 0, args, CPU)          # M updated in place
    monkeypatch.undo()
    assert [len(b) for b in seen] == [6, 6], f"feature pass saw batches of {[len(b) for b in seen]}, want the split"
    fingerprint = lambda x: sorted(x.flatten(1).sum(1).tolist())          # noqa: E731
    assert fingerprint(torch.cat(seen)) == pytest.approx(fingerprint(task.train.x)), \
        "the feature pass must see each training image once"
    # each adapted layer's own inputs, at the merged weights: visual from those batches, text from
    # the class prompts with templates[0]
    xs = {k: [] for k in lora}
    with torch.no_grad(), common.input_hooks(lora, lambda k, x: xs[k].append(x.double())):
        for b in seen:
            tiny_clip.encode_image(b)
        tiny_clip.encode_texts([task.templates[0].format(c) for c in task.classnames], CPU)
    for k in lora:
        d = xs[k][0].shape[-1]
        if stat == "sum":
            X = (sum(xs[k]) / len(xs[k])).reshape(-1, d)
            K = X.T @ X
        else:
            K = sum(x.reshape(-1, d).T @ x.reshape(-1, d) for x in xs[k])
        Mo, Mn = M_old[k].double(), M[k].double()
        assert Mn.shape[1] > Mo.shape[1], f"{k}: M' did not grow ({Mo.shape[1]} -> {Mn.shape[1]} columns)"
        assert torch.allclose(Mn.T @ Mn, torch.eye(Mn.shape[1], dtype=torch.float64), atol=1e-5), \
            f"{k}: M' not orthonormal"
        assert torch.allclose(proj(Mn) @ Mo, Mo, atol=1e-5), f"{k}: the old M' is not kept"
        R = torch.eye(d, dtype=torch.float64) - proj(Mo)
        top = torch.linalg.eigh(R @ K @ R)[1][:, -1]                        # top residual feature direction
        miss = (top - proj(Mn) @ top).norm()
        assert miss < 1e-3, f"{k}: the top residual feature direction is not in the new M' (off by {miss:.2e})"
        frac = float(torch.trace(Mn.T @ K @ Mn) / torch.trace(K))
        assert frac >= float(eps_f) - 1e-4, f"{k}: new M' holds {frac:.4f} of the task's feature energy < eps_f {eps_f}"
        want = kl.gpm_extend(M_old[k], K, float(eps_f)).double()
        assert Mn.shape == want.shape and torch.allclose(proj(Mn), proj(want), atol=1e-3), \
            f"{k}: M' is not the GPM extension by this layer's own {stat} features " \
            f"({Mo.shape[1]} -> {Mn.shape[1]} columns, want {want.shape[1]})"


# ---- main: the initial protected basis ----------------------------------------------------------------

class _Stop(Exception):
    pass


@pytest.mark.ex10
@pytest.mark.parametrize("flags,eps", [((), (0.85, 0.2)), (("--eps-w-vision", "0.5", "--eps-w-text", "0.6",
                                                                "--principal-side", "paper"), (0.5, 0.6))])
def test_main_starts_M_at_principal_subspace_per_tower(monkeypatch, tmp_path, flags, eps):
    seen = {}

    def fake_train(model, method, task, t, args, device):
        seen.update(lora=method["lora"], M={k: v.clone() for k, v in method["M"].items()}, args=args)
        raise _Stop

    monkeypatch.setattr(kl, "train_task", fake_train)
    monkeypatch.setattr(common, "evaluate_all", lambda model, tasks, args, device, t=-1: [0.0] * len(tasks))
    monkeypatch.setattr(common, "load_tasks", lambda args, model, **kw: [fake_task(name="a"), fake_task(name="b")])
    with pytest.raises(_Stop):
        kl.main(["--benchmark", "toy", "--pretrained", "none", "--device", "cpu", "--no-progress",
                 "--out", str(tmp_path / "run"), *flags])
    side = seen["args"].principal_side
    assert side == ("paper" if flags else "code")
    for k, m in seen["lora"].items():
        e = eps[0] if k.startswith("visual.") else eps[1]
        want = kl.principal_subspace(m.base.weight, e, side)
        got = seen["M"][k]
        assert got.shape == want.shape and torch.allclose(proj(got), proj(want), atol=1e-5), \
            f"{k}: M'_0 has {got.shape[1]} columns, W_p({e}, {side}) has {want.shape[1]}"


# ---- checkpoint and restore ---------------------------------------------------------------------------

def test_checkpoint_restore_round_trip(tiny_clip):
    import io
    args = make_args()
    fresh = copy.deepcopy(tiny_clip)
    lora = kl.add_keeplora(tiny_clip, args)
    method = {"lora": lora, "M": initial_M(lora)}
    with torch.no_grad():                                                   # weights of an earlier merged task
        g = torch.Generator().manual_seed(4)
        for m in lora.values():
            m.base.weight.add_(0.1 * torch.randn(m.base.weight.shape, generator=g))
    state = kl.checkpoint(tiny_clip, method)
    assert set(state) == {"W", "M"} and set(state["W"]) == set(lora) == set(state["M"])
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)                              # what --resume reads
    lora2 = kl.add_keeplora(fresh, args)
    method2 = {"lora": lora2, "M": {n: torch.zeros(m.A.shape[1], 0) for n, m in lora2.items()}}
    kl.restore(fresh, method2, state, args, CPU)
    for n in lora:
        assert torch.equal(lora2[n].base.weight, lora[n].base.weight), f"{n}: W not restored"
        assert torch.equal(method2["M"][n], method["M"][n]), f"{n}: M' not restored"
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        assert torch.equal(fresh.encode_image(x), tiny_clip.encode_image(x)), "restored model computes another function"
