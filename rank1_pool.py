"""rank1_pool.py -- one LoRA as a pool of rank-1 experts with Activation-Guided Orthogonality (DAC).

Paper:  Fa, Duan, Zhang, Qi, Yang, Shi, "Decomposing and Composing: Towards Efficient
        Vision-Language Continual Learning via Rank-1 Expert Pool in a Single LoRA", AAAI 2026,
        arXiv 2601.22828.
Code:   Fazhan-cs/DAC (commit bb1e2c0, mtil/src/models/alora.py, loralib/layers.py,
        loralib/utils.py, lrbmutil.py, scripts/train/train.sh); we follow the code where it and
        the paper's words differ (the paper's variants are flags).

Idea:   Every adapted Linear (q, k, v, out, c_fc, c_proj in every block of both encoders) gets a
        rank-r LoRA read as r rank-1 experts E_i = B[:, i] A[i, :] (r = 12). A router reads token 0
        of the layer's input; each sample votes for its top-8 experts, the batch's top-8 by votes
        is the one expert set of the step, and the votes are counted over the task. A loss (AGO)
        pushes the current task's most-activated B columns to be orthogonal to earlier tasks' B
        columns. After the task only the 4 most-activated experts are merged into the weights
        (W <- W + (1/12) B_K A_K); the pool is thrown away and a fresh one starts the next task.
        Inference is plain CLIP: no router, no task id, no added latency.

        THE ROUTER IS NOT LEARNED in the official code: the selected experts are summed with equal
        weight, so no gradient reaches the router; it is a fixed random projection drawn anew per
        task. That is our default (`--router fixed`). `--router learned` (gate-weighted experts)
        is a labelled variant, not the paper's method.

Run:    python rank1_pool.py --benchmark toy                     # CPU, minutes
        python rank1_pool.py --order I --data-root ~/data        # 5-shot MTIL, GPU
        python rank1_pool.py --few-shot 0 --data-root ~/data     # full-shot MTIL (our choice)
        python rank1_pool.py --benchmark toy --ago paper --router learned   # the variants

DEVIATIONS from the official code (each marked `# DEVIATION:` below):
  * exactly --iterations steps per task (the code's loop runs iterations + 1 = 501);
  * the few-shot subset is data.few_shot_subset: the code's rule (the first K images of each class
    met in a shuffled pass of the training set, transformed once and kept), another draw (the
    code's pass depends on its torch RNG state after building the model);
  * token 0 is read from the batch-first (N, L, d) input (the code guesses N from L in {197, 77});
  * routers of the fixed variant have requires_grad=False (the code marks them trainable, they
    never get a gradient: same updates); `trainable_params` counts A and B, the extra
    `params_with_routers` gives the code's count.
CHOICES where code and paper are silent (each marked `# CHOICE:` below): the toy defaults; full-shot
MTIL uses 1000 iterations; top-k ties go to the lower expert index; votes are counted in training
mode only; drop_last only when the set holds a full batch; `--ago paper` keeps |.|; the learned
router's gates; the AGO critical set has --merge-k columns (the code hard-codes 4 for both).
"""
from __future__ import annotations

import math
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ---------------------------------------------------------------------------------------------
# ---- PLUMBING: arguments (common flags first, then the method's) ----
# ---------------------------------------------------------------------------------------------

# Official defaults (train.sh, alora.py): 5-shot, 500 iterations, batch 32, lr 2e-3 (Order I);
# Order II lrs from the commented list in train.sh (2e-3 unless listed).
MTIL_DEFAULTS = {"few_shot": 5, "iterations": 500, "batch_size": 32, "lr": 2e-3,
                 "lr_per_task": {"I": {}, "II": {"MNIST": 1e-3, "Aircraft": 3e-3, "EuroSAT": 1e-3, "CIFAR100": 3e-3}}}
# CHOICE: full-shot MTIL (`--few-shot 0`) is not in the code; 1000 iterations is the ZSCL /
# MoE-Adapters convention for full data (research brief, section 6 #9).
MTIL_FULL_SHOT_ITERATIONS = 1000
# CHOICE: toy defaults, chosen by measurement (order I, Transfer/Average/Last; zero-shot 76.5/78.9/78.9):
# full data, 150 steps, lr 2e-3: 75.8/78.9/79.0; 5-shot: 75.0/77.5/77.8; lr 5e-3: 71.2/76.0/77.0;
# 500 steps: 68.1/74.3/75.4 (the pool learns the task, merging 4 of 8 experts loses it and more).
TOY_DEFAULTS = {"few_shot": 0, "iterations": 150, "batch_size": 32, "lr": 2e-3, "lr_per_task": {}}


def parse_args(argv=None):
    p = common.common_parser("rank1_pool", __doc__)
    p.set_defaults(few_shot=None)  # resolved below: 5 on mtil (the code), TOY_DEFAULTS on toy; 0 = full data
    g = p.add_argument_group("method", "--few-shot defaults to 5 on mtil (official code), "
                             f"{TOY_DEFAULTS['few_shot']} on toy; --few-shot 0 = full data")
    g.add_argument("--rank", type=int, default=12, help="pool size r = LoRA rank (train.sh --r 12)")
    g.add_argument("--top-k", type=int, default=8, help="experts active per step, R (layers.py k = 8)")
    g.add_argument("--merge-k", type=int, default=4,
                   help="experts merged per module and task, = AGO's critical set (utils.py topk = 4)")
    g.add_argument("--alpha", type=float, default=1.0, help="LoRA scale alpha / r (args.py: alpha 1)")
    g.add_argument("--dropout", type=float, default=0.2, help="dropout on the LoRA input (args.py)")
    g.add_argument("--towers", nargs="+", choices=["visual", "text"], default=["visual", "text"],
                   help="encoders that get pools (train.sh: both)")
    g.add_argument("--router", choices=["fixed", "learned"], default="fixed",
                   help="fixed = the code (no gradient reaches the router); learned = gate-weighted variant")
    g.add_argument("--ago", choices=["code", "paper", "off"], default="code",
                   help="code: |<b_t, b_s>| summed over all earlier B columns; paper: earlier top --merge-k "
                        "columns, 1/(mn); off: no AGO")
    g.add_argument("--ago-lambda", type=float, default=0.1, help="AGO weight lambda (alora.py: 0.1)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (alora.py)")
    g.add_argument("--eta-min", type=float, default=1e-6, help="cosine schedule floor (alora.py)")
    g.add_argument("--template", choices=["random", "first"], default="random",
                   help="training prompt: one template drawn per task as the code draws it "
                        "(python random seeded with --seed, one randint) or templates[0]")
    g.add_argument("--eval-before-merge", action="store_true",
                   help="also evaluate the current task with the routed pool before merging (extra)")
    # the code (evaluation.py): fp32, template ensemble for every dataset
    args = common.finalize_args(p.parse_args(argv), "rank1_pool", amp="off", eval_prompts="ensemble")
    if args.few_shot is None:
        args.few_shot = (MTIL_DEFAULTS if args.benchmark == "mtil" else TOY_DEFAULTS)["few_shot"]
    if not 1 <= args.top_k <= args.rank or not 1 <= args.merge_k <= args.rank:
        raise common.UserError(f"need 1 <= --top-k, --merge-k <= --rank ({args.rank}), "
                               f"got {args.top_k}, {args.merge_k}")
    if not 0 <= args.dropout < 1:
        raise common.UserError(f"--dropout must be in [0, 1), got {args.dropout}")
    return args


def task_hparams(args, name: str) -> tuple[int, int, float]:
    """(iterations, batch size, lr) for a task: the flag if given, else the official value."""
    d = MTIL_DEFAULTS if args.benchmark == "mtil" else TOY_DEFAULTS
    lr = args.lr if args.lr is not None else d["lr_per_task"].get(args.order, {}).get(name, d["lr"])
    iterations = d["iterations"]
    if args.benchmark == "mtil" and args.few_shot == 0:
        iterations = MTIL_FULL_SHOT_ITERATIONS
    return args.iterations or iterations, args.batch_size or d["batch_size"], lr


# ---------------------------------------------------------------------------------------------
# ---- PAPER: the rank-1 expert pool in one LoRA (layers.py LinearLoRA) ----
# ---------------------------------------------------------------------------------------------


def top_indices(v: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of v (r,).
    CHOICE: ties go to the lower index (stable sort), so the set is the same on every device;
    torch.topk leaves ties unspecified, and integer votes tie often."""
    return torch.sort(v, descending=True, stable=True).indices[:k]


class RankOnePool(nn.Module):
    """y = W0 x + b0 + (alpha/r) sum_{i in M} B[:, i] A[i, :] x~,   x~ = Dropout(x),

    with r rank-1 experts E_i = B[:, i] A[i, :] (so B A = sum_i E_i) and M the batch's expert set
    (two-stage Top-R selection from a router on token 0 of x~). W0, b0 are frozen.
    A: (r, d_in) Kaiming, B: (d_out, r) zeros, router: Linear(d_in, r), counts: (r,) votes."""

    def __init__(self, base: nn.Linear, r: int = 12, k: int = 8, alpha: float = 1.0, dropout: float = 0.2,
                 learned_router: bool = False):
        super().__init__()
        self.base = base.requires_grad_(False)
        d_out, d_in = base.weight.shape
        dev = base.weight.device
        self.r, self.k, self.scaling, self.learned_router = r, k, alpha / r, learned_router
        self.A = nn.Parameter(torch.empty(r, d_in, device=dev))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))                     # loralib init
        self.B = nn.Parameter(torch.zeros(d_out, r, device=dev))
        # DEVIATION: requires_grad only for the learned variant (the code's fixed router is in the
        # optimiser but never gets a gradient, so AdamW never touches it: same updates).
        self.router = nn.Linear(d_in, r, device=dev).requires_grad_(learned_router)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("counts", torch.zeros(r, dtype=torch.long, device=dev))

    def route(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two-stage Top-R selection. z: (N, d_in) token-0 features -> votes v (r,), gates m (r,)."""
        p = torch.softmax(self.router(z), dim=-1)                            # (N, r) router probabilities
        S = p.topk(self.k, dim=-1).indices                                   # (N, k) stage 1: per-sample top-R
        v = torch.zeros_like(p, dtype=torch.long).scatter_(1, S, 1).sum(0)   # (r,) votes over the batch
        M = top_indices(v, self.k)                                           # (k,) stage 2: batch top-R by votes
        m = torch.zeros(self.r, device=z.device).index_fill_(0, M, 1.0)      # (r,) 1 on M: experts summed, no gate
        if self.learned_router:
            # CHOICE (variant, not the paper): gate the selected experts by the batch-mean router
            # probabilities renormalised to mean 1 over M, so the router gets a gradient and an
            # even router gives the fixed variant's update.
            g = p.mean(0) * m                                                # (r,)
            m = g * (self.k / g.sum())
        return v, m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xd = self.dropout(x)                                                 # (N, L, d_in) LoRA input; base sees x
        # DEVIATION: token 0 of the batch-first input, instead of guessing N from L in {197, 77}.
        v, m = self.route(xd[:, 0])                                          # router reads token 0 of x~
        if self.training:  # CHOICE: count only in training (the code never forwards in eval before merging)
            self.counts += v                                                 # activation counts over the task
        h = F.linear(xd, self.A) * m                                         # (N, L, r) expert activations, M only
        return self.base(x) + self.scaling * F.linear(h, self.B)             # (N, L, d_out)


def attach_pools(model: common.ClipView, args) -> dict[str, RankOnePool]:
    """Freeze all of CLIP (earlier tasks' merged weights and logit_scale included), then put a
    fresh pool on every adapted Linear (6 per block, chosen towers; not the visual projection)."""
    model.requires_grad_(False)
    pools = {}
    for name, lin in model.layers(towers=tuple(args.towers), proj=False).items():
        pools[name] = RankOnePool(lin, args.rank, args.top_k, args.alpha, args.dropout, args.router == "learned")
        model.set_layer(name, pools[name])
    return pools


def pool_param_count(pools: dict[str, RankOnePool]) -> int:
    """A, B and router parameters of all pools: the code's count (its routers are marked
    trainable though they never get a gradient; 4,978,368 for ViT-B/16)."""
    return sum(p.A.numel() + p.B.numel() + sum(q.numel() for q in p.router.parameters()) for p in pools.values())


# ---------------------------------------------------------------------------------------------
# ---- PAPER: Activation-Guided Orthogonality (lrbmutil.compute_orthogonal_loss) ----
# ---------------------------------------------------------------------------------------------


def ago_reference(experts: list[dict], args, device) -> dict[str, torch.Tensor]:
    """P_l: earlier tasks' B columns per module, concatenated: name -> (d_out, m).
    code: all r columns of every earlier B (the code's top-4 mask tests a key that never exists);
    paper: only each earlier task's critical (merged) columns, top --merge-k by its counts."""
    P = {}
    for E in experts:
        for name, e in E.items():
            Bs = e["B"] if args.ago == "code" else e["B"][:, top_indices(e["counts"], args.merge_k)]
            P[name] = torch.cat([P[name], Bs.to(device)], 1) if name in P else Bs.to(device)
    return P


def ago_loss(pools: dict[str, RankOnePool], P: dict[str, torch.Tensor], n_critical: int, mode: str) -> torch.Tensor:
    """L_AGO = mean over modules l of sum_{i in C_t, j} |B_t[:, i] . P_l[:, j]|   (code),
    or mean_l 1/(mn) sum_{i,j} |.|   (paper, Sec. AGO), C_t = top-n of the task's counts so far."""
    losses = []
    for name, P_l in P.items():
        pool = pools[name]
        C = top_indices(pool.counts, n_critical)                             # current critical experts
        G = pool.B[:, C].T @ P_l                                             # (n, d_out) @ (d_out, m) -> (n, m)
        # CHOICE: |.| in the paper variant too (without it the loss rewards anti-aligned columns)
        losses.append(G.abs().sum() / (G.numel() if mode == "paper" else 1))
    return torch.stack(losses).mean()


# ---------------------------------------------------------------------------------------------
# ---- PAPER: training one task (alora.py; loss lrbmutil.clip_loss) ----
# ---------------------------------------------------------------------------------------------


def training_template_index(templates: list[str], args) -> int:
    """The code (datasets/collections.py `template`, read once in alora.py): every task runs in a
    new process that seeds python's `random` with --seed (utils.seed_all) and then draws
    random.randint(0, len(templates) - 1) once, before anything else uses `random`."""
    return random.Random(args.seed).randint(0, len(templates) - 1) if args.template == "random" else 0


def multi_positive_clip_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss with soft targets G_nm = 1[y_n = y_m] / #{m: y_m = y_n}.
    logits: (N, N) text x image."""
    G = (labels[:, None] == labels[None, :]).float()                         # (N, N)
    G = G / G.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, G) + F.cross_entropy(logits.T, G.T))


def train_task(model: common.ClipView, pools: dict[str, RankOnePool], P: dict[str, torch.Tensor], task, t: int,
               args, device) -> tuple[float, float]:
    iterations, batch_size, lr = task_hparams(args, task.name)
    params = [p for p in model.parameters() if p.requires_grad]               # A, B (+ routers if learned)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    # CHOICE: drop_last (the code's few-shot loader) only when the set holds a full batch.
    batches = common.forever(common.make_loader(task.train, batch_size, shuffle=True, seed=args.seed * 1000 + t,
                                                workers=args.workers, drop_last=len(task.train) >= batch_size,
                                                device=device))
    template = task.templates[training_template_index(task.templates, args)]  # one prompt per task (alora.py)
    scaler = common.grad_scaler(device, args.amp)
    model.train()
    loss_sum = ago_sum = 0.0
    # DEVIATION: `iterations` steps (the code's loop runs iterations + 1).
    for step in common.progress(range(iterations), args.progress, desc=task.name, leave=False):
        # CosineAnnealingLR(T_max = iterations, eta_min = 1e-6), no warm-up (alora.py)
        common.set_lr(opt, args.eta_min + (lr - args.eta_min) * (1 + math.cos(math.pi * step / iterations)) / 2)
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with common.autocast(device, args.amp):                             # off by default (the code: fp32)
            txt = model.encode_texts([template.format(task.classnames[y]) for y in labels.tolist()], device)  # (N, e)
            img = model.encode_image(images, normalize=True)                 # (N, e)
            logits = model.logit_scale.exp() * txt.float() @ img.float().T   # (N, N) frozen logit scale
            loss = multi_positive_clip_loss(logits, labels)                  # L_clip
            if P and args.ago != "off":                                      # from the second task on
                l_ago = ago_loss(pools, P, args.merge_k, args.ago)          # CHOICE: |C_t| = --merge-k (code: 4, 4)
                loss = loss + args.ago_lambda * l_ago                        # L = L_clip + lambda L_AGO
                ago_sum += l_ago.item()
        common.check_finite(loss, task.name, step)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        loss_sum += loss.item()
    model.eval()
    return loss_sum / max(iterations, 1), ago_sum / max(iterations, 1)


# ---------------------------------------------------------------------------------------------
# ---- PAPER: after the task, merge the top experts and drop the pool (utils.py) ----
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def merge_experts(model: common.ClipView, E: dict[str, dict], args) -> None:
    """W <- W + (alpha/r) B[:, K] A[K, :], K = top --merge-k experts by the task's counts.
    Applied to plain nn.Linear layers: earlier tasks become constants inside the weights.
    CHOICE: the learned-router variant is merged the same way, without gates (its gates average
    1 over the selected experts by construction)."""
    for name, e in E.items():
        W = model.get_layer(name).weight                                     # (d_out, d_in)
        K = top_indices(e["counts"], args.merge_k).to(W.device)              # (k_m,)
        A, B = e["A"].to(W.device), e["B"].to(W.device)
        W += (B[:, K] @ A[K, :]) * (args.alpha / args.rank)                  # (d_out, k_m) @ (k_m, d_in)


def after_task(model: common.ClipView, pools: dict[str, RankOnePool], args) -> dict[str, dict]:
    """Unwrap every pool back to its plain nn.Linear (CLIP's architecture again), then merge the
    top experts. Returns this task's A, B and counts (saved as the code saves <dataset>.pt; B is
    the AGO reference of later tasks; resume replays the merges from the pristine weights)."""
    E = {n: {"A": p.A.detach().cpu(), "B": p.B.detach().cpu(), "counts": p.counts.cpu()} for n, p in pools.items()}
    for name, pool in pools.items():
        model.set_layer(name, pool.base)
    merge_experts(model, E, args)
    return E


# ---------------------------------------------------------------------------------------------
# ---- PLUMBING: main (setup, loop over tasks, evaluate, save) ----
# ---------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    device = common.pick_device(args.device)
    common.check_data(args)
    model = common.setup_model(args, device)
    # the code: few-shot images transformed once and kept. DEVIATION: the subset is the code's rule
    # (first K per class of a shuffled pass) drawn from --seed, not from the code's torch RNG state.
    tasks = common.load_tasks(args, model, few_shot_once=True)
    names = [t.name for t in tasks]
    run = common.Run("rank1_pool", args, names)
    experts: list[dict] = [] if run.state is None else run.state["experts"]
    for E in experts:                                            # resume: replay the merges, in order
        merge_experts(model, E, args)
    if run.zero_shot is None:
        run.set_zero_shot(common.evaluate_all(model, tasks, args, device))
        print("zero-shot  " + "  ".join(f"{n} {a:.1f}" for n, a in zip(names, run.zero_shot)), flush=True)
    for t in range(run.start_task, common.n_train_tasks(args, tasks)):
        run.begin_task(t)
        t0 = time.time()
        pools = attach_pools(model, args)
        trainable = common.trainable_params(model)
        extra = {"params_with_routers": pool_param_count(pools)}
        loss, l_ago = train_task(model, pools, ago_reference(experts, args, device), tasks[t], t, args, device)
        extra["ago_loss"] = l_ago
        if args.eval_before_merge:
            extra["acc_before_merge"] = common.evaluate(model, tasks[t], device, args.eval_batch_size, args.workers,
                                                        args.amp)
        t1 = time.time()
        experts.append(after_task(model, pools, args))
        extra["merge_seconds"] = round(time.time() - t1, 3)
        row = common.evaluate_all(model, tasks, args, device, t)
        run.finish_task(t, row, {"experts": experts}, trainable, extra)
        print(f"[{t + 1}/{len(tasks)}] {tasks[t].name:<14} loss {loss:.3f}  ago {l_ago:.3g}  {time.time() - t0:.0f}s | "
              + "  ".join(f"{a:.1f}" for a in row), flush=True)
    run.print_final()


if __name__ == "__main__":
    common.cli_main(main)
