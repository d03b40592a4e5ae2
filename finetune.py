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
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import common

# ---------------------------------------------------------------------------------------------
# ---- PLUMBING: arguments (common flags first, then the method's) ----
# ---------------------------------------------------------------------------------------------

# Paper defaults (ZSCL scripts/finetune.sh). Per-task lr: 5e-5 for Aircraft and MNIST, else 1e-5.
MTIL_DEFAULTS = {"iterations": 1000, "batch_size": 64, "lr": 1e-5, "warmup": 100,
                 "lr_per_task": {"Aircraft": 5e-5, "MNIST": 5e-5}}
# CHOICE: toy defaults, chosen by measurement (README, "toy benchmark"): enough steps and lr for
# every toy task to improve clearly over zero-shot within a CPU-minute budget.
TOY_DEFAULTS = {"iterations": 100, "batch_size": 64, "lr": 1e-3, "warmup": 10, "lr_per_task": {}}


def parse_args(argv=None):
    p = common.common_parser("finetune", __doc__)
    g = p.add_argument_group("method")
    g.add_argument("--mode", choices=["continual-ft", "zero-shot"], default="continual-ft")
    g.add_argument("--label-smoothing", type=float, default=0.2)
    g.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (ZSCL: 100; toy: 10)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    # ZSCL: fp32 training and evaluation, template ensemble for every dataset
    return common.finalize_args(p.parse_args(argv), "finetune", amp="off", eval_prompts="ensemble")


def task_hparams(args, name: str) -> tuple[int, int, float]:
    """(iterations, batch size, lr) for a task: the flag if given, else the paper's value."""
    d = MTIL_DEFAULTS if args.benchmark == "mtil" else TOY_DEFAULTS
    lr = args.lr if args.lr is not None else d["lr_per_task"].get(name, d["lr"])
    return args.iterations or d["iterations"], args.batch_size or d["batch_size"], lr


# ---------------------------------------------------------------------------------------------
# ---- PAPER: Continual-FT, one task (ZSCL mtil/src/models/finetune.py) ----
# ---------------------------------------------------------------------------------------------


def train_task(model: common.ClipView, task, t: int, args, device) -> float:
    iterations, batch_size, lr = task_hparams(args, task.name)
    model.logit_scale.requires_grad_(False)                        # ZSCL: logit_scale not optimised
    params = [p for p in model.parameters() if p.requires_grad]     # both encoders, everything else
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    batches = common.forever(common.make_loader(task.train, batch_size, shuffle=True, seed=args.seed * 1000 + t,
                                                workers=args.workers, device=device))
    d = MTIL_DEFAULTS if args.benchmark == "mtil" else TOY_DEFAULTS
    warmup = min(d["warmup"] if args.warmup is None else args.warmup, iterations // 2)
    scaler = common.grad_scaler(device, args.amp)
    model.train()
    loss_sum = 0.0
    for step in common.progress(range(iterations), args.progress, desc=task.name, leave=False):
        common.set_lr(opt, common.cosine_lr(step, lr, warmup, iterations))
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with common.autocast(device, args.amp):
            text = common.class_text_features(model, task.classnames, task.templates[0], device)  # (C, e)
            img = model.encode_image(images, normalize=True)        # (N, e)
            logits = model.logit_scale.exp() * img @ text.T          # (N, C)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=args.label_smoothing)
        common.check_finite(loss, task.name, step)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        loss_sum += loss.item()
    model.eval()
    return loss_sum / max(iterations, 1)


def after_task(model, task, args, device) -> None:
    """Continual-FT keeps nothing between tasks but the weights."""


# ---------------------------------------------------------------------------------------------
# ---- PLUMBING: main (setup, loop over tasks, evaluate, save) ----
# ---------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    device = common.pick_device(args.device)
    common.check_data(args)
    model = common.setup_model(args, device)
    tasks = common.load_tasks(args, model)
    names = [t.name for t in tasks]
    run = common.Run("finetune" if args.mode == "continual-ft" else "zero-shot", args, names)
    if run.state is not None:
        model.load_state_dict(run.state["model"])
    if run.zero_shot is None:
        run.set_zero_shot(common.evaluate_all(model, tasks, args, device))
        print("zero-shot  " + "  ".join(f"{n} {a:.1f}" for n, a in zip(names, run.zero_shot)), flush=True)
    for t in range(run.start_task, common.n_train_tasks(args, tasks)):
        run.begin_task(t)
        t0 = time.time()
        loss = train_task(model, tasks[t], t, args, device) if args.mode == "continual-ft" else float("nan")
        after_task(model, tasks[t], args, device)
        row = common.evaluate_all(model, tasks, args, device, t)
        trainable = common.trainable_params(model) if args.mode == "continual-ft" else 0
        run.finish_task(t, row, {"model": model.state_dict()}, trainable)
        print(f"[{t + 1}/{len(tasks)}] {tasks[t].name:<14} loss {loss:.3f}  {time.time() - t0:.0f}s | "
              + "  ".join(f"{a:.1f}" for a in row), flush=True)
    run.print_final()


if __name__ == "__main__":
    common.cli_main(main)
