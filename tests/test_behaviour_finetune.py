"""Behaviour of finetune.py's Continual-FT step, checked against independent recomputations on a
tiny random CLIP: ZSCL's protocol (1000 iterations, batch 64, warm-up 100 + cosine, lr 1e-5 and
5e-5 for Aircraft / MNIST), the loss of every step (cross-entropy with label smoothing 0.2 over
logit_scale-scaled cosine logits against templates[0] prompts), the gradient AdamW receives, the
learning rate of every step, and which parameters move (both towers, never logit_scale)."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import common
import data
from fakes import Images
import finetune

CPU = torch.device("cpu")
MTIL = ["Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food", "MNIST", "OxfordPet",
        "StanfordCars", "SUN397"]


# ---- fixtures and helpers -------------------------------------------------------------------------


def fake_task(n=6, seed=0, name="A"):
    # two different templates: training must use templates[0]
    return data.Task(name, ["red", "green", "blue"], ["a photo of a {}.", "a drawing of the {} one."],
                     Images(n, seed), Images(4, seed + 1))


def args_for(*extra):
    return finetune.parse_args(["--benchmark", "toy", "--out", "/nonexistent", "--no-progress",
                                "--iterations", "3", "--batch-size", "4", *extra])


@pytest.fixture()
def clip(tiny_clip):
    """The tiny random CLIP with OpenAI CLIP's logit scale s = 100 (peaked logits: label
    smoothing matters)."""
    with torch.no_grad():
        tiny_clip.logit_scale.fill_(math.log(100))
    return tiny_clip


def step_loss(model, task, x, y, eps=0.2):
    """Continual-FT's loss written out: label-smoothed CE of s * cos(image, templates[0] prompt)."""
    s = model.logit_scale.exp()
    text = model.encode_texts([task.templates[0].format(c) for c in task.classnames], CPU, normalize=True)
    logits = s * F.normalize(model.encode_image(x), dim=-1) @ text.T
    C = logits.shape[1]
    target = (1 - eps) * F.one_hot(y, C).float() + eps / C
    return -(target * logits.log_softmax(-1)).sum(-1).mean()


def task_batches(task, args, t, batch_size):
    """The batches train_task draws (its loader: shuffled, seed --seed * 1000 + t, cycled)."""
    return common.forever(common.make_loader(task.train, batch_size, shuffle=True, seed=args.seed * 1000 + t))


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


# ---- the protocol ----------------------------------------------------------------------------------


def test_task_hparams_are_the_zscl_protocol():
    a = finetune.parse_args(["--out", "/nonexistent"])
    assert (a.label_smoothing, a.weight_decay, a.mode) == (0.2, 0.0, "continual-ft"), "ZSCL loss/optimiser defaults"
    for order in ("I", "II"):
        a = finetune.parse_args(["--order", order, "--out", "/nonexistent"])
        for name in MTIL:
            lr = 5e-5 if name in ("Aircraft", "MNIST") else 1e-5
            hp = finetune.hparams(a, fake_task(name=name), 0)
            assert (hp.iterations, hp.batch_size, hp.lr, hp.warmup) == (1000, 64, lr, 100), \
                f"{name}: (iterations, batch, lr, warm-up) should be (1000, 64, {lr}, 100)"
    a = finetune.parse_args(["--out", "/nonexistent", "--iterations", "7", "--batch-size", "5", "--lr", "3e-4"])
    hp = finetune.hparams(a, fake_task(name="MNIST"), 0)
    assert (hp.iterations, hp.batch_size, hp.lr) == (7, 5, 3e-4), "flags override the per-task defaults"


@pytest.mark.parametrize("name", ["Aircraft", "MNIST", "DTD"])
def test_mtil_schedule_reaches_the_optimiser(tiny_clip, adamw_spy, monkeypatch, name):
    """Only the first 2 steps of the real MTIL schedule run: cosine_lr gets (step, the task's lr,
    warm-up 100, 1000 iterations), AdamW uses the warm-up lr, and the loader batch size is 64."""
    sched, sizes = [], []
    real_cos, real_loader = common.cosine_lr, common.make_loader
    monkeypatch.setattr(common, "cosine_lr", lambda *a: sched.append(a) or real_cos(*a))
    monkeypatch.setattr(common, "make_loader", lambda ds, bs, *a, **k: sizes.append(bs) or real_loader(ds, bs, *a, **k))
    monkeypatch.setattr(common, "progress", lambda it, enabled, **kw: itertools.islice(it, 2))
    args = finetune.parse_args(["--order", "I", "--out", "/nonexistent", "--no-progress", "--workers", "0"])
    lr = 5e-5 if name in ("Aircraft", "MNIST") else 1e-5
    finetune.train_task(tiny_clip, {}, fake_task(8, 0, name), 0, args, CPU)
    assert sched == [(0, lr, 100, 1000), (1, lr, 100, 1000)], "cosine_lr(step, lr, warm-up 100, 1000 iterations)"
    assert [g for lrs in adamw_spy.lrs for g in lrs] == pytest.approx([lr / 100, 2 * lr / 100], rel=1e-9), \
        "AdamW did not see the warm-up lr of the first steps"
    assert sizes == [64], "task batch size should be 64"


# ---- the loss and the gradient ------------------------------------------------------------------


@pytest.mark.parametrize("flags,eps", [([], 0.2), (["--label-smoothing", "0.05"], 0.05)])
def test_step_losses_are_label_smoothed_ce_on_the_first_template(clip, monkeypatch, flags, eps):
    """Every step's loss equals the CE recomputed here (lr 1e-12: the weights stay put, so each
    step is recomputed on the initial model with the batch it draws), and train_task returns
    the mean over the steps."""
    model, task = clip, fake_task(6)
    args = args_for("--lr", "1e-12", *flags)
    batches = task_batches(task, args, 2, 4)
    with torch.no_grad():
        want = [step_loss(model, task, *next(batches), eps=eps).item() for _ in range(3)]
    seen = []
    real_add = common.LossLog.add
    monkeypatch.setattr(common.LossLog, "add", lambda log, loss, step: seen.append(loss.item()) or real_add(log, loss, step))
    mean = finetune.train_task(model, {}, task, 2, args, CPU)["loss"]
    assert len(seen) == 3, "one loss per iteration"
    for k, (a, b) in enumerate(zip(seen, want)):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), \
            f"step {k}: loss {a:.6f} != CE(label smoothing {eps}, s * cos, templates[0]) = {b:.6f}"
    assert mean == pytest.approx(sum(want) / 3, rel=1e-4), "train_task should return the mean step loss"


def test_adamw_gets_this_steps_gradient_through_both_towers(clip, adamw_spy):
    """At every step the gradient AdamW receives for image- and text-tower weights equals the
    gradient of this step's recomputed loss (not accumulated over steps, not cut at the text
    features); lr 1e-12 keeps the weights fixed so the recomputation is exact."""
    model, task = clip, fake_task(6)
    args = args_for("--lr", "1e-12")
    watch = {"visual_proj.weight", "clip.visual.transformer.resblocks.0.mlp.c_fc.weight",
             "clip.transformer.resblocks.1.attn.v.weight", "clip.text_projection", "clip.ln_final.weight"}
    params = {n: p for n, p in model.named_parameters() if n in watch}
    assert set(params) == watch
    batches, want = task_batches(task, args, 0, 4), []
    for _ in range(3):
        loss = step_loss(model, task, *next(batches))
        want.append(dict(zip(params, torch.autograd.grad(loss, list(params.values())))))
    adamw_spy.watch = {id(p) for p in params.values()}
    finetune.train_task(model, {}, task, 0, args, CPU)
    assert len(adamw_spy.grads) == 3, "AdamW should step once per iteration"
    for k, grads in enumerate(adamw_spy.grads):
        for n, p in params.items():
            assert id(p) in grads, f"step {k}: {n} got no gradient"
            err = rel(grads[id(p)], want[k][n])
            assert err < 1e-3, f"step {k}: the gradient of {n} is not that of this step's loss (rel. error {err:.2e})"


# ---- the schedule and what moves ----------------------------------------------------------------


@pytest.mark.ex2
@pytest.mark.parametrize("warmup_flag,warmup", [(None, 4), ("2", 2)])
def test_lr_is_warmup_then_cosine_at_every_step(tiny_clip, adamw_spy, warmup_flag, warmup):
    """The lr AdamW uses at each of 8 steps: linear warm-up (toy default min(10, iterations // 2))
    then cosine to 0; AdamW with weight decay 0, betas (0.9, 0.999)."""
    args = args_for("--iterations", "8", "--lr", "1e-3", *(["--warmup", warmup_flag] if warmup_flag else []))
    finetune.train_task(tiny_clip, {}, fake_task(6), 0, args, CPU)
    lr = 1e-3
    want = [lr * (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (8 - warmup))) * lr
            for s in range(8)]
    got = [lrs[0] for lrs in adamw_spy.lrs]
    assert all(len(set(lrs)) == 1 for lrs in adamw_spy.lrs), "every param group should get the same lr"
    assert got == pytest.approx(want, rel=1e-9), f"lr per step {got} != warm-up {warmup} + cosine {want}"
    grp = adamw_spy.opts[0].param_groups[0]
    assert grp["weight_decay"] == 0 and tuple(grp["betas"]) == (0.9, 0.999), "AdamW hyper-parameters"


def test_both_towers_train_and_logit_scale_never_moves(tiny_clip):
    """Two tasks in a row: after each, every parameter of both towers has changed and
    logit_scale is bit-identical."""
    model = tiny_clip
    args = args_for("--lr", "1e-3", "--iterations", "2")
    s0 = model.logit_scale.detach().clone()
    for t in range(2):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        finetune.train_task(model, {}, fake_task(6, 10 * t), t, args, CPU)
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        want = {k for k, _ in model.named_parameters()} - {"clip.logit_scale"}
        assert changed == want, f"task {t + 1}: moved but should not: {sorted(changed - want)}; " \
                                f"should move: {sorted(want - changed)}"
    assert torch.equal(model.logit_scale.detach(), s0), "logit_scale must stay frozen"
