"""Behaviour of gnsp.py's training, checked against independent recomputations on a tiny random
CLIP: the loss of every step (CE + lambda_CD L_CD + lambda_MAP L_MAP, each term written out here),
the gradient AdamW receives (g P from task 2 on), the learning-rate schedule, which weights move,
the statistics option `--accumulation sum`, and how main() wires statistics, projectors and the
teacher together. The method's defaults are checked against the official configs."""
import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import common
import data
from fakes import Images
import gnsp

CPU = torch.device("cpu")
CAPTIONS = ["a red thing", "a blue thing", "a red thing", "a green thing"]   # with a duplicate caption


# ---- fixtures and helpers -------------------------------------------------------------------------


def fake_task(n=6, seed=0, name="A"):
    # two different templates: training must use templates[0]
    return data.Task(name, ["red", "green", "blue"], ["a photo of a {}.", "a drawing of the {} one."],
                     Images(n, seed), Images(4, seed + 1))


def ref_pairs(n=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, 32, 32, generator=g), CAPTIONS[i % len(CAPTIONS)]) for i in range(n)]


@pytest.fixture()
def clip(tiny_clip):
    """The tiny random CLIP with OpenAI CLIP's logit scale s = 100 (peaked logits: label
    smoothing and the temperature matter)."""
    with torch.no_grad():
        tiny_clip.logit_scale.fill_(math.log(100))
    return tiny_clip


@pytest.fixture()
def teacher():
    """Another random tiny CLIP playing the original model: its reference logits differ from the
    student's, as they do from task 2 on."""
    torch.manual_seed(1)
    m = common.load_clip(common.TOY_MODEL, "none", "cpu")
    with torch.no_grad():
        m.logit_scale.fill_(math.log(100))
    return m


def args_for(*extra):
    return gnsp.parse_args(["--benchmark", "toy", "--out", "/nonexistent", "--no-progress",
                            "--iterations", "3", "--batch-size", "4", *extra])


def random_projectors(model, seed=0):
    """A random rank-d/2 orthogonal projector per protected layer: far from I and from 0."""
    g = torch.Generator().manual_seed(seed)
    P = {}
    for n, lin in gnsp.protected_layers(model).items():
        d = lin.weight.shape[1]
        Q, _ = torch.linalg.qr(torch.randn(d, d // 2, generator=g))
        P[n] = Q @ Q.T
    return P


def task_batches(task, args, t, batch_size):
    """The task batches train_loop draws (its loader: shuffled, seed --seed * 1000 + t, cycled)."""
    return common.forever(common.make_loader(task.train, batch_size, shuffle=True, seed=args.seed * 1000 + t))


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


# ---- independent formulas ---------------------------------------------------------------------


def soft_ce(logits, target):
    """mean_i -sum_j target_ij log softmax(logits_i)_j"""
    return -(target * logits.log_softmax(-1)).sum(-1).mean()


def smoothed_ce(logits, labels, eps):
    C = logits.shape[1]
    return soft_ce(logits, (1 - eps) * F.one_hot(labels, C).float() + eps / C)


def cd_loss(Z0, Z, T):
    """Teacher Z0 gives the soft targets, both directions, times T^2."""
    return T ** 2 * (soft_ce(Z / T, F.softmax(Z0 / T, -1)) + soft_ce(Z.T / T, F.softmax(Z0.T / T, -1)))


def map_loss(Z, captions, eps):
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
    Y = (1 - eps) * same / same.sum(1, keepdim=True) + eps / len(captions)
    return soft_ce(Z, Y) + soft_ce(Z.T, Y)


def my_teacher(model, ref, R):
    """s * u0 v0^T of the model as it is now, per consecutive reference batch of R pairs."""
    out = []
    with torch.no_grad():
        for i in range(0, len(ref), R):
            x = torch.stack([p[0] for p in ref[i:i + R]])
            u = F.normalize(model.encode_image(x), dim=-1)
            v = model.encode_texts([p[1] for p in ref[i:i + R]], CPU, normalize=True)
            out.append(model.logit_scale.exp() * u @ v.T)
    return out


def my_loss(model, task, x, y, ref_batch, Z0, eps=0.2, w_cd=1.0, w_map=0.75, T=2.0):
    """GNSP's step loss written out: CE (label smoothing, logit_scale, templates[0]) + CD + MAP."""
    s = model.logit_scale.exp()
    text = model.encode_texts([task.templates[0].format(c) for c in task.classnames], CPU, normalize=True)
    loss = smoothed_ce(s * F.normalize(model.encode_image(x), dim=-1) @ text.T, y, eps)
    if ref_batch is not None:
        rx, caps = ref_batch
        Z = s * F.normalize(model.encode_image(rx), dim=-1) @ model.encode_texts(caps, CPU, normalize=True).T
        loss = loss + w_cd * cd_loss(Z0, Z, T) + w_map * map_loss(Z, caps, eps)
    return loss


def ref_batch(ref, k, R):
    """The k-th fixed (unshuffled, cycled) reference batch."""
    n_batches = math.ceil(len(ref) / R)
    part = ref[(k % n_batches) * R:(k % n_batches + 1) * R]
    return torch.stack([p[0] for p in part]), [p[1] for p in part]


# ---- the defaults -------------------------------------------------------------------------------


# GNSP configs/mtil_order_{I,II}.json: (lr, iterations) per task.
OFFICIAL = {
    "I": dict(zip(["Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food", "MNIST", "OxfordPet",
                   "StanfordCars", "SUN397"],
                  zip([1e-5, 2e-5, 1e-5, 5e-5, 2e-5, 2e-5, 5e-5, 1e-5, 5e-5, 5e-5, 2e-5],
                      [100, 500, 1000, 500, 500, 1000, 1000, 500, 500, 1000, 1000]))),
    "II": dict(zip(["StanfordCars", "Food", "MNIST", "OxfordPet", "Flowers", "SUN397", "Aircraft", "Caltech101", "DTD",
                    "EuroSAT", "CIFAR100"],
                   zip([1e-5, 1e-5, 1e-5, 1e-5, 2e-5, 2e-5, 5e-5, 1e-5, 5e-5, 1e-5, 1e-5],
                       [1000, 1000, 500, 500, 1000, 1000, 1000, 500, 500, 500, 1000]))),
}


def test_method_defaults_are_the_official_config():
    a = gnsp.parse_args(["--out", "/nonexistent"])
    got = {k: getattr(a, k) for k in ("rho", "temperature", "distill_weight", "map_weight", "label_smoothing",
                                      "project", "first_task", "accumulation", "weight_decay", "ref_n")}
    assert got == {"rho": 0.15, "temperature": 2.0, "distill_weight": 1.0, "map_weight": 0.75, "label_smoothing": 0.2,
                   "project": "gradient", "first_task": "full", "accumulation": "gnsp", "weight_decay": 0.0,
                   "ref_n": 1000}, "a method default differs from the official GNSP config"
    for order, table in OFFICIAL.items():
        a = gnsp.parse_args(["--order", order, "--out", "/nonexistent"])
        for t, (name, (lr, iterations)) in enumerate(table.items()):
            task = SimpleNamespace(name=name)
            assert gnsp.hparams(a, task, t) == common.HParams(iterations, 64, lr, warmup=100, schedule="warmup+cosine"), \
                f"order {order} {name}: (iterations, batch, lr, warm-up) should be ({iterations}, 64, {lr}, 100)"
            assert gnsp.ref_batch_size(a, task, t) == 64, "reference pairs per step should equal the batch size"
    # flags override every task's default
    a = gnsp.parse_args(["--out", "/nonexistent", "--iterations", "7", "--batch-size", "5", "--lr", "3e-4",
                         "--warmup", "2", "--ref-batch-size", "9"])
    task = SimpleNamespace(name="DTD")
    assert gnsp.hparams(a, task, 3) == common.HParams(7, 5, 3e-4, warmup=2, schedule="warmup+cosine")
    assert gnsp.ref_batch_size(a, task, 3) == 9


@pytest.mark.parametrize("order,name", [("I", "Aircraft"), ("II", "DTD")])
def test_mtil_defaults_reach_the_optimiser(tiny_clip, adamw_spy, monkeypatch, order, name):
    """Only the first 2 steps of the real MTIL schedule run; the schedule, the lr AdamW sees and
    the batch size must be the task's official values (warm-up 100 even for a 100-step task)."""
    sched, sizes = [], []
    real_cos, real_loader = common.cosine_lr, common.make_loader
    monkeypatch.setattr(common, "cosine_lr", lambda *a: sched.append(a) or real_cos(*a))
    monkeypatch.setattr(common, "make_loader", lambda ds, bs, *a, **k: sizes.append(bs) or real_loader(ds, bs, *a, **k))
    monkeypatch.setattr(common, "progress", lambda it, enabled, **kw: itertools.islice(it, 2))
    args = gnsp.parse_args(["--order", order, "--out", "/nonexistent", "--no-progress", "--workers", "0"])
    lr, iterations = OFFICIAL[order][name]
    gnsp.train_loop(tiny_clip, fake_task(8, 0, name), 1, args, CPU, random_projectors(tiny_clip))
    assert sched == [(0, lr, 100, iterations), (1, lr, 100, iterations)], "cosine_lr(step, lr, warm-up, iterations)"
    assert [g for lrs in adamw_spy.lrs for g in lrs] == pytest.approx([lr / 100, 2 * lr / 100], rel=1e-9), \
        "AdamW did not see the warm-up lr of the first steps"
    assert sizes[0] == 64, "task batch size should be 64"


# ---- the losses ---------------------------------------------------------------------------------


@pytest.mark.ex3
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6), R=st.integers(2, 8), T=st.floats(0.5, 4.0))
def test_cd_gradient_pulls_the_student_towards_the_teacher(seed, R, T):
    """dL_CD/dZ = T/R [(softmax_rows(Z/T) - softmax_rows(Z0/T)) + (same over columns)]: the
    teacher's distributions are the targets, both directions, scaled by T^2, mean over rows."""
    g = torch.Generator().manual_seed(seed)
    Z0, Z = torch.randn(R, R, generator=g) * 5, (torch.randn(R, R, generator=g) * 5).requires_grad_()
    (gZ,) = torch.autograd.grad(gnsp.contrastive_distillation(Z0, Z, T), Z)
    Zd = Z.detach()
    want = T / R * ((F.softmax(Zd / T, 1) - F.softmax(Z0 / T, 1)) + (F.softmax(Zd / T, 0) - F.softmax(Z0 / T, 0)))
    assert torch.allclose(gZ, want, atol=1e-5), "L_CD's gradient w.r.t. the student logits is not T (q - p0) / R"



def expected_step_losses(model, task, args, t, ref, Z0, steps, **w):
    """The loss of each of the first `steps` steps recomputed on the (unchanged) model, with the
    task batch and the (cycled) reference batch that step draws."""
    want, batches = [], task_batches(task, args, t, 4)
    with torch.no_grad():
        for step in range(steps):
            x, y = next(batches)
            rb = ref_batch(ref, step, 4) if ref is not None else None
            want.append(my_loss(model, task, x, y, rb, Z0[step % len(Z0)] if ref is not None else None, **w).item())
    return want


CASES = {   # flags, t, P?, ref?, expected weights
    "defaults-task2": ([], 1, True, True, {}),
    "flags-task2": (["--distill-weight", "0.3", "--map-weight", "2.5", "--temperature", "3", "--label-smoothing", "0.1"],
                    1, True, True, {"w_cd": 0.3, "w_map": 2.5, "T": 3.0, "eps": 0.1}),
    "defaults-task1-full": ([], 0, False, True, {}),
    "no-reference-data": ([], 1, True, False, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_step_losses_are_ce_plus_weighted_cd_and_map(clip, teacher, monkeypatch, case):
    """Every step's loss equals L_CE(label smoothing, logit_scale, templates[0]) + lambda_CD
    L_CD(T) + lambda_MAP L_MAP recomputed here, and train_loop returns their mean. With lr 1e-12
    the weights do not move, so each step is recomputed on the initial model with the batches it
    draws; 3 steps over 2 reference batches check that Z0 follows the reference batch."""
    flags, t, with_P, with_ref, w = CASES[case]
    model, task = clip, fake_task(6)
    args = args_for("--lr", "1e-12", *flags)
    ref = ref_pairs(8) if with_ref else None
    Z0 = my_teacher(teacher, ref, 4) if with_ref else None
    if with_ref:
        got = gnsp.teacher_logits(teacher, ref, 4, args, CPU)
        assert len(got) == 2 and all(torch.allclose(a, b, rtol=1e-4, atol=1e-3) for a, b in zip(got, Z0)), \
            "teacher_logits is not s * u0 v0^T (normalised features) of the model per reference batch"
    want = expected_step_losses(model, task, args, t, ref, Z0, 3, **w)
    seen = []
    real_add = common.LossLog.add
    monkeypatch.setattr(common.LossLog, "add", lambda log, loss, step: seen.append(loss.item()) or real_add(log, loss, step))
    mean = gnsp.train_loop(model, task, t, args, CPU, random_projectors(model) if with_P else None, ref, Z0)
    assert len(seen) == 3
    for step, (a, b) in enumerate(zip(seen, want)):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), \
            f"step {step}: loss {a:.6f} != CE + {w.get('w_cd', 1.0)} CD + {w.get('w_map', 0.75)} MAP = {b:.6f}"
    assert mean == pytest.approx(sum(want) / 3, rel=1e-4), "train_loop should return the mean step loss"


# ---- the gradient AdamW receives, the schedule, and which weights move ---------------------------------


def setup_task2(model, teacher):
    task, ref = fake_task(6), ref_pairs(8)
    return task, ref, my_teacher(teacher, ref, 4), random_projectors(model)


def manual_grads(model, task, args, ref, Z0, W, steps):
    """d(step-k loss)/dW of the unchanged model for k < steps, for the protected weights W."""
    for w in W.values():
        w.requires_grad_(True)
    out, batches = [], task_batches(task, args, 1, 4)
    for k in range(steps):
        x, y = next(batches)
        loss = my_loss(model, task, x, y, ref_batch(ref, k, 4), Z0[k % len(Z0)])
        out.append(dict(zip(W, torch.autograd.grad(loss, list(W.values())))))
    return out


@pytest.mark.ex7
def test_default_gradient_projection_reaches_adamw(clip, teacher, adamw_spy):
    """Task 2, default flags (--project gradient): at every step AdamW receives exactly g P, g =
    the gradient of the recomputed step loss (lr 1e-12: the weights stay put, so g is exact),
    and AdamW optimises exactly the protected weights."""
    model = clip
    args = args_for("--lr", "1e-12")
    task, ref, Z0, P = setup_task2(model, teacher)
    W = {n: lin.weight for n, lin in gnsp.protected_layers(model).items()}
    g = manual_grads(model, task, args, ref, Z0, W, 3)
    adamw_spy.watch = {id(w) for w in W.values()}
    gnsp.train_loop(model, task, 1, args, CPU, P, ref, Z0)
    assert len(adamw_spy.grads) == 3, "AdamW should step once per iteration"
    assert {id(p) for grp in adamw_spy.opts[0].param_groups for p in grp["params"]} == adamw_spy.watch, \
        "from task 2 AdamW should optimise exactly the protected weights"
    for k, grads in enumerate(adamw_spy.grads):
        for n in W:
            gk = grads[id(W[n])]
            assert gk.norm() > 0, f"{n}: zero gradient at step {k}"
            assert (gk - gk @ P[n]).norm() <= 1e-4 * gk.norm(), \
                f"{n}: the step-{k} gradient AdamW receives leaves the range of P (projection skipped or wrong)"
            err = rel(gk, g[k][n] @ P[n])
            assert err < 1e-3, f"{n}: step-{k} gradient given to AdamW != g P of the loss (rel. error {err:.2e})"


def test_project_update_keeps_the_weight_change_in_range_of_P(clip, teacher, adamw_spy):
    """--project update: AdamW gets the raw gradient, and W - W_old is projected afterwards, so
    the total change dW of every protected weight satisfies dW = dW P."""
    model = clip
    args = args_for("--project", "update", "--lr", "1e-3")
    task, ref, Z0, P = setup_task2(model, teacher)
    W = {n: lin.weight for n, lin in gnsp.protected_layers(model).items()}
    W0 = {n: w.detach().clone() for n, w in W.items()}
    adamw_spy.watch = {id(w) for w in W.values()}
    gnsp.train_loop(model, task, 1, args, CPU, P, ref, Z0)
    for n, w in W.items():
        dW = w.detach() - W0[n]
        assert dW.norm() > 0, f"{n} did not change"
        assert (dW - dW @ P[n]).norm() <= 1e-4 * dW.norm(), f"{n}: the update leaves the range of P"
        g0 = adamw_spy.grads[0][id(w)]
        assert (g0 - g0 @ P[n]).norm() > 0.1 * g0.norm(), f"{n}: --project update should not project the gradient"


def expected_schedule(lr, warmup, total):
    return [lr * (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) * lr
            for s in range(total)]


@pytest.mark.parametrize("t,warmup_flag,warmup", [(0, None, 4), (1, "2", 2)])
def test_lr_is_warmup_then_cosine_at_every_step(tiny_clip, adamw_spy, t, warmup_flag, warmup):
    """The lr AdamW uses at each of the 8 steps is the linear warm-up + cosine schedule (toy
    default warm-up: min(10, iterations // 2)); AdamW with weight decay 0, betas (0.9, 0.999)."""
    model = tiny_clip
    args = args_for("--iterations", "8", "--lr", "1e-3", *(["--warmup", warmup_flag] if warmup_flag else []))
    P = random_projectors(model) if t else None
    gnsp.train_loop(model, fake_task(6), t, args, CPU, P)
    want = expected_schedule(1e-3, warmup, 8)
    got = [lrs[0] for lrs in adamw_spy.lrs]
    assert all(len(set(lrs)) == 1 for lrs in adamw_spy.lrs), "every param group should get the same lr"
    assert got == pytest.approx(want, rel=1e-9), f"lr per step {got} != warm-up {warmup} + cosine {want}"
    grp = adamw_spy.opts[0].param_groups[0]
    assert grp["weight_decay"] == 0 and tuple(grp["betas"]) == (0.9, 0.999), "AdamW hyper-parameters"


def changed_keys(model, before):
    after = model.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


def protected_keys(model):
    ids = {id(lin.weight) for lin in gnsp.protected_layers(model).values()}
    return {k for k, p in model.named_parameters() if id(p) in ids}


def test_from_task_2_only_the_protected_weights_move(clip, teacher):
    """Task 2 (CE + CD + MAP, projected): every one of the 2 * blocks + 1 protected weights
    changes; biases, LayerNorms, attention, embeddings, the text tower and logit_scale do not."""
    model = clip
    args = args_for("--lr", "1e-3")
    task, ref, Z0, P = setup_task2(model, teacher)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gnsp.train_loop(model, task, 1, args, CPU, P, ref, Z0)
    want = protected_keys(model)
    assert len(want) == 2 * len(model.blocks("visual")) + 1
    got = changed_keys(model, before)
    assert got == want, f"moved but frozen: {sorted(got - want)}; protected but unchanged: {sorted(want - got)}"


@pytest.mark.parametrize("first_task,with_ref", [("full", True), ("full", False), ("restricted", True)])
def test_first_task_trains_all_but_logit_scale_or_only_protected(tiny_clip, first_task, with_ref):
    """Task 1 (no projector): --first-task full moves every parameter of both towers except
    logit_scale (without reference pairs the text tower learns through the class prompts alone);
    --first-task restricted moves only the protected weights."""
    model = tiny_clip
    args = args_for("--lr", "1e-3", "--iterations", "2", "--first-task", first_task)
    ref = ref_pairs(8) if with_ref else None
    Z0 = gnsp.teacher_logits(model, ref, 4, args, CPU) if with_ref else None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gnsp.train_loop(model, fake_task(6), 0, args, CPU, None, ref, Z0)
    got = changed_keys(model, before)
    if first_task == "full":
        want = {k for k, _ in model.named_parameters()} - {"clip.logit_scale"}
    else:
        want = protected_keys(model)
    assert got == want, f"moved but should not: {sorted(got - want)}; should move: {sorted(want - got)}"


# ---- the statistics: the plain-sum option --------------------------------------------------------


def unit_gram(model, images):
    """G / ||G||_F of every protected layer's inputs (all tokens; the pooled CLS for visual.proj)."""
    X = {}
    with torch.no_grad(), common.input_hooks(gnsp.protected_layers(model),
                                             lambda n, x: X.__setitem__(n, x.reshape(-1, x.shape[-1]))):
        model.encode_image(images)
    return {n: (x.T @ x) / (x.T @ x).norm() for n, x in X.items()}


def test_accumulation_sum_adds_every_layer_without_renormalising(tiny_clip):
    """--accumulation sum: M_t = M_{t-1} + S^_t for every layer, visual.proj included (with the
    default, visual.proj renormalises M_{t-1} first). Three tasks, so ||M_{t-1}|| != 1."""
    model = tiny_clip
    A, B = fake_task(3, 0), fake_task(3, 5, "B")
    S = unit_gram(model, B.train.x)   # one batch of 3 images -> S^ = G / ||G||
    for mode in ("sum", "gnsp"):
        args = gnsp.parse_args(["--benchmark", "toy", "--out", "/nonexistent", "--gram-batch-size", "3",
                                "--accumulation", mode])
        M = {}
        gnsp.accumulate_statistics(model, A, 0, args, CPU, M)
        gnsp.accumulate_statistics(model, B, 1, args, CPU, M)
        M2 = {n: m.clone() for n, m in M.items()}
        assert abs(M2["visual.0.mlp.c_fc"].norm().item() - 1) > 1e-3
        gnsp.accumulate_statistics(model, B, 2, args, CPU, M)
        for n in M:
            prev = M2[n] / M2[n].norm() if (mode == "gnsp" and n == "visual.proj") else M2[n]
            assert torch.allclose(M[n], prev + S[n], atol=1e-5), f"--accumulation {mode}: wrong M_t for {n}"
            assert M[n].device.type == "cpu" and M[n].dtype == torch.float32


# ---- main(): statistics -> projectors -> train_task, and the original teacher --------------------------


def test_main_wires_statistics_projectors_and_the_original_teacher(tiny_clip, tmp_path, monkeypatch):
    """Three tasks through gnsp.main (evaluation stubbed): task 1 gets no projector; task t >= 2
    gets P = null_space_projector(M after task t-1, --rho) for all protected layers, M grows by a
    unit-norm term per task, Z0 is the ORIGINAL model's reference logits for every task, and no
    statistics are gathered after the benchmark's last task."""
    tasks = [fake_task(6, 10 * i, name) for i, name in enumerate("ABC")]
    init = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    monkeypatch.setattr(common, "setup_model", lambda args, device: tiny_clip)
    monkeypatch.setattr(common, "load_tasks", lambda args, model, **kw: tasks)
    monkeypatch.setattr(common, "evaluate_all", lambda model, tasks, args, device, t=-1: [0.0] * len(tasks))
    monkeypatch.setattr(common, "plot_matrix", lambda *a, **k: None)
    calls, Ms = [], []
    real_train, real_after = gnsp.train_loop, gnsp.accumulate_statistics

    def train_spy(model, task, t, args, device, P=None, ref=None, Z0=None):
        calls.append({"t": t, "task": task.name, "P": None if P is None else {n: p.clone() for n, p in P.items()},
                      "ref": ref, "Z0": None if Z0 is None else [z.clone() for z in Z0]})
        return real_train(model, task, t, args, device, P, ref, Z0)

    def after_spy(model, task, t, args, device, M):
        real_after(model, task, t, args, device, M)
        Ms.append((t, {n: m.clone() for n, m in M.items()}))

    monkeypatch.setattr(gnsp, "train_loop", train_spy)
    monkeypatch.setattr(gnsp, "accumulate_statistics", after_spy)
    gnsp.main(["--benchmark", "toy", "--iterations", "2", "--batch-size", "4", "--ref-n", "8", "--ref-batch-size", "4",
               "--align-n", "8", "--gram-batch-size", "3", "--rho", "0.3", "--out", str(tmp_path / "run"),
               "--no-progress"])
    assert [(c["t"], c["task"]) for c in calls] == [(0, "A"), (1, "B"), (2, "C")]
    assert [t for t, _ in Ms] == [0, 1], "statistics after every task but the last"
    assert calls[0]["P"] is None, "task 1 must not be projected"
    names = set(gnsp.protected_layers(tiny_clip))
    dims = [0]
    for c, (t_prev, M) in zip(calls[1:], Ms):
        assert c["P"] is not None and set(c["P"]) == names, f"task {c['t'] + 1}: no projector for every protected layer"
        dims.append(0)
        for n in names:
            P_want, k = gnsp.null_space_projector(M[n], 0.3)
            dims[-1] += k
            assert torch.allclose(c["P"][n], P_want, atol=1e-5), \
                f"task {c['t'] + 1}, {n}: P is not the --rho null-space projector of M after task {t_prev + 1}"
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["protected_dims"] == dims, "protected_dims should be the number of protected directions, all layers"
    assert set(s["zero_shot_info"]) == {"modality_gap", "i2t_r1", "t2i_r1"}, "the zero-shot alignment metrics"
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["state"]
    assert set(state) == {"model", "M"} and all(torch.equal(state["M"][n], Ms[-1][1][n]) for n in names), \
        "the checkpoint should hold the weights and the latest statistics M"
    for n in names - {"visual.proj"}:
        assert (Ms[1][1][n] - Ms[0][1][n]).norm().item() == pytest.approx(1.0, abs=1e-4), \
            f"{n}: M should keep the earlier tasks' statistics and add a unit-norm term"
    # the teacher is the model before any training, on each task's reference batches
    teacher = common.load_clip(common.TOY_MODEL, "none", "cpu")
    teacher.load_state_dict(init)
    for c in calls:
        assert c["ref"] is not None and len(c["ref"]) == 8
        want = my_teacher(teacher, [c["ref"][i] for i in range(len(c["ref"]))], 4)
        assert len(c["Z0"]) == len(want) and all(torch.allclose(a, b, atol=1e-4) for a, b in zip(c["Z0"], want)), \
            f"task {c['t'] + 1}: Z0 is not the original model's reference logits"
