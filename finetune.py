"""finetune.py -- the two baselines of MTIL: Zero-shot CLIP and Continual-FT.

Paper:  Zheng et al., "Preventing Zero-Shot Transfer Degradation in Continual Learning of
        Vision-Language Models" (ZSCL), ICCV 2023, arXiv 2303.06628, Table 3 / Table 10.
Code:   Thunderbeee/ZSCL, mtil/ (`--method finetune`, scripts/finetune.sh); we follow its
        protocol: 1000 iterations per task, batch 64, AdamW (weight decay 0), 100 warm-up steps
        then cosine, label smoothing 0.2, lr 1e-5 (5e-5 for Aircraft and MNIST), both encoders
        trained, logit_scale frozen, cross-entropy over the task's class prompts (templates[0]).

Idea:   Continual-FT fine-tunes the whole CLIP on each task in turn, starting from the previous
        task's weights. It learns every task and forgets: the accuracy on earlier tasks and the
        zero-shot accuracy on later ones (Transfer) fall. It is the reference loop that every
        method script copies: `diff finetune.py gnsp.py` shows the method.

Run:    python finetune.py --benchmark toy                  # CPU, minutes
        python finetune.py --order I --data-root ~/data     # MTIL, GPU
        python finetune.py --mode zero-shot --order II      # the zero-shot row only
        python finetune.py --benchmark cil-cifar100 --steps 10 --data-root ~/data   # class-incremental
        python finetune.py --benchmark xtail --data-root ~/data                     # X-TAIL
        python finetune.py --benchmark toy-cil              # (toy-xtail) both protocols on the CPU
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see common.py, section 1)

import torch
import torch.nn.functional as F

import common

# ---------------------------------------------------------------------------------------------
# ---- PLUMBING: every default (MTIL | toy) and the arguments (common flags first, then the method's) ----
# ---------------------------------------------------------------------------------------------

DEFAULTS = {  # name: (MTIL, toy). MTIL: ZSCL mtil/scripts/finetune.sh. toy: CHOICE, measured (notes/finetune.md)
    "iterations": (1000, 100),
    "batch_size": (64, 64),
    "lr": (1e-5, 1e-3),
    "lr_per_task": ({"Aircraft": 5e-5, "MNIST": 5e-5}, {}),    # ZSCL: 5e-5 for Aircraft and MNIST
    "warmup": (100, 10),                                        # linear warm-up steps, then cosine
    "label_smoothing": (0.2, 0.2),
    "weight_decay": (0.0, 0.0),
    "amp": ("off", "off"),                                      # ZSCL: fp32 training and evaluation
    "eval_prompts": ("ensemble", "ensemble"),                   # ZSCL: every template, every dataset
    "align_n": (1000, 1000),                                    # CHOICE: held-out pairs of the alignment metrics (common.Alignment)
}
# CIL and X-TAIL (notes/protocols.md): what differs from the column above (cil, xtail: MTIL's;
# toy-cil, toy-xtail: toy's). CHOICE: a CIL step is one epoch at the source config's batch size
# (MoE-Adapters cil/configs/class/*.yaml), ZSCL's optimiser, lr and loss otherwise; X-TAIL and
# the toy protocols keep the column's per-task budget.
PROTOCOL_DEFAULTS = {"cil": {"iterations": common.EPOCH, "batch_size": common.CIL_BATCH}}


def parse_args(argv=None):
    p = common.common_parser("finetune", __doc__)
    g = p.add_argument_group("method")
    g.add_argument("--mode", choices=["continual-ft", "zero-shot"], default="continual-ft")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--warmup", type=int, help="linear warm-up steps")
    g.add_argument("--weight-decay", type=float)
    args = p.parse_args(argv)
    return common.finalize_args(args, "finetune" if args.mode == "continual-ft" else "zero-shot", DEFAULTS,
                                PROTOCOL_DEFAULTS)


def hparams(args, task, t: int) -> common.HParams:
    """Task t's iterations, batch size, lr and warm-up: the flag if given, else DEFAULTS."""
    d = common.defaults_for(args, DEFAULTS, PROTOCOL_DEFAULTS, task)
    iterations = args.iterations or d["iterations"]
    return common.HParams(iterations, args.batch_size or d["batch_size"],
                          args.lr or d["lr_per_task"].get(task.name, d["lr"]),
                          warmup=min(args.warmup, iterations // 2), schedule="warmup+cosine")


# ---------------------------------------------------------------------------------------------
# ---- PLUMBING: setup (data, CLIP, the method's state between tasks) ----
# ---------------------------------------------------------------------------------------------


def setup(args, device):
    """Check the data, load CLIP and the tasks, and draw the held-out pairs of the alignment
    metrics (measured on the untouched CLIP here: common.Alignment). Continual-FT adds nothing
    to CLIP: its state between tasks is the weights alone."""
    common.check_data(args)
    model = common.setup_model(args, device)
    return model, common.load_tasks(args, model), {"align": common.Alignment(model, args, device)}


# ---------------------------------------------------------------------------------------------
# ---- PAPER: Continual-FT, one task (ZSCL mtil/src/models/finetune.py) ----
# ---------------------------------------------------------------------------------------------


def train_task(model: common.ClipView, method: dict, task, t: int, args, device) -> dict:
    if args.mode == "zero-shot":                                    # the zero-shot row, repeated
        return {"trainable_params": 0}
    hp = hparams(args, task, t)
    model.logit_scale.requires_grad_(False)                        # ZSCL: logit_scale not optimised
    params = [p for p in model.parameters() if p.requires_grad]     # both encoders, everything else
    opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=args.weight_decay)
    batches = common.forever(common.make_loader(task.train, hp.batch_size, shuffle=True, seed=args.seed * 1000 + t,
                                                workers=args.workers, device=device))
    tokens = common.class_tokens(model, task.classnames, task.templates[0], device)  # (C, L) once per task
    scaler = common.grad_scaler(device, args.amp)
    losses = common.LossLog(task.name, hp.iterations, device)       # read every 50 steps, not every step
    model.train()
    for step in common.progress(range(hp.iterations), args.progress, desc=task.name, leave=False):
        common.set_lr(opt, common.cosine_lr(step, hp.lr, hp.warmup, hp.iterations))
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with common.autocast(device, args.amp):
            text = common.class_text_features(model, task.classnames, task.templates[0], device, tokens)  # (C, e)
            img = model.encode_image(images, normalize=True)        # (N, e)
            logits = model.logit_scale.exp() * img @ text.T          # (N, C)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=args.label_smoothing)
        losses.add(loss, step)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    model.eval()
    return {"loss": losses.mean(hp.iterations), "trainable_params": common.trainable_params(model)}


def after_task(model: common.ClipView, method: dict, task, t: int, args, device) -> dict:
    """Continual-FT keeps nothing between tasks but the weights."""
    return {}


# ---------------------------------------------------------------------------------------------
# ---- PLUMBING: evaluation, checkpoint, main (setup, loop over tasks, evaluate, save) ----
# ---------------------------------------------------------------------------------------------


def evaluate(model: common.ClipView, method: dict, tasks: list, t: int, args, device) -> tuple[list[float], dict]:
    """The accuracy row after task t (t = -1: zero-shot): every dataset's zero-shot head; the
    alignment metrics on the held-out pairs (modality_gap, i2t_r1, t2i_r1; common.Alignment)."""
    return common.evaluate_all(model, tasks, args, device, t), method["align"].info(model, t, args, device)


def checkpoint(model: common.ClipView, method: dict) -> dict:
    return {"model": model.state_dict()}


def restore(model: common.ClipView, method: dict, state: dict, args, device) -> None:
    model.load_state_dict(state["model"])


def main(argv=None):
    args = parse_args(argv)
    device = common.pick_device(args.device)
    model, tasks, method = setup(args, device)
    run = common.Run(args, tasks, [hparams(args, task, t) for t, task in enumerate(tasks)])
    if run.state is not None:                                       # --resume: after the last finished task
        restore(model, method, run.state, args, device)
    if run.zero_shot is None:
        run.set_zero_shot(*evaluate(model, method, tasks, -1, args, device))
    for t in range(run.start_task, run.n_train):
        run.begin_task(t)                                           # seeds (seed, t): resumable
        trained = train_task(model, method, tasks[t], t, args, device)
        after = after_task(model, method, tasks[t], t, args, device)
        row, evaluated = evaluate(model, method, tasks, t, args, device)
        run.finish_task(t, row, checkpoint(model, method), trained, after, evaluated)
    run.print_final()


if __name__ == "__main__":
    common.cli_main(main)
