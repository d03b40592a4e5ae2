"""rank1_pool.py -- one LoRA as a pool of rank-1 experts with Activation-Guided Orthogonality (DAC).

Paper:  Fa, Duan, Zhang, Qi, Yang, Shi, "Decomposing and Composing: Towards Efficient
        Vision-Language Continual Learning via Rank-1 Expert Pool in a Single LoRA", AAAI 2026,
        arXiv 2601.22828.
Code:   Fazhan-cs/DAC@bb1e2c0: mtil/src/models/alora.py (the training loop),
        mtil/src/models/loralib/layers.py (the pool), mtil/src/models/loralib/utils.py (the merge),
        mtil/src/models/lrbmutil.py (AGO, the loss), mtil/scripts/train/train.sh (the protocol);
        we follow the code where it and the paper's words differ (the paper's variants are flags).

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
        python rank1_pool.py --benchmark cil-cifar100 --steps 10 --data-root ~/data   # class-incremental
        python rank1_pool.py --benchmark xtail --data-root ~/data   # X-TAIL; toy-cil / toy-xtail on the CPU

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

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see common.py, section 1)

import math
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ---------------------------------------------------------------------------------------------
# ---- PLUMBING: every default (MTIL | toy) and the arguments (common flags first, then the method's) ----
# ---------------------------------------------------------------------------------------------

# name: (MTIL, toy). MTIL: the official code, Fazhan-cs/DAC@bb1e2c0 (file:function on each line).
# toy: CHOICE: measured, see notes/rank1_pool.md (method flags keep the official values).
DEFAULTS = {
    "few_shot": (5, 0),                      # mtil/scripts/train/train.sh: --few_shot=5; 0 = full data
    "iterations": (500, 150),                # mtil/scripts/train/train.sh: --iterations 500
    # CHOICE: full data (--few-shot 0) is not in the code: the ZSCL / MoE-Adapters convention of 1000
    # iterations for full data (Thunderbeee/ZSCL:mtil/scripts/finetune.sh, JiazuoYu/MoE-Adapters4CL@4572d97:
    # mtil/scripts/train/train_full_shot_router11_experts22_1000iters.sh)
    "iterations_full_shot": (1000, 150),
    "batch_size": (32, 32),                  # mtil/scripts/train/train.sh: --batch-size 32
    "lr": (2e-3, 1e-3),                      # mtil/scripts/train/train.sh: lr (Order I: 2e-3 for every task)
    "lr_per_task": ({"I": {}, "II": {"MNIST": 1e-3, "Aircraft": 3e-3, "EuroSAT": 1e-3, "CIFAR100": 3e-3}},
                    {}),                     # by order; mtil/scripts/train/train.sh: Order II lrs, its commented list
    "rank": (12, 12),                        # mtil/scripts/train/train.sh: --r 12 (pool size r)
    "top_k": (8, 8),                         # mtil/src/models/loralib/layers.py:LinearLoRA.forward: k = 8
    "merge_k": (4, 4),                       # mtil/src/models/loralib/utils.py:merge_lora_back_to_original_all: topk = 4
    "alpha": (1.0, 1.0),                     # mtil/src/args.py:parse_arguments: --alpha 1
    "dropout": (0.2, 0.2),                   # mtil/src/args.py:parse_arguments: --dropout_rate 0.2
    "towers": (["visual", "text"], ["visual", "text"]),  # mtil/src/args.py:parse_arguments: --encoder both
    "router": ("fixed", "fixed"),            # mtil/src/models/loralib/layers.py:LinearLoRA.forward: experts summed, no gate
    "ago": ("code", "code"),                 # mtil/src/models/lrbmutil.py:compute_orthogonal_loss
    "ago_lambda": (0.1, 0.1),                # mtil/src/models/alora.py:alora: loss + o_loss * 0.1
    "weight_decay": (0.01, 0.01),            # mtil/src/models/alora.py:alora: AdamW weight_decay 1e-2
    "eta_min": (1e-6, 1e-6),                 # mtil/src/models/alora.py:alora: CosineAnnealingLR eta_min 1e-6
    "template": ("random", "random"),        # mtil/src/datasets/collections.py:ClassificationDataset.template
    "amp": ("off", "off"),                   # mtil/src/models/alora.py:alora: fp32 training and evaluation
    "eval_prompts": ("ensemble", "ensemble"),  # mtil/src/models/evaluation.py:zeroshot_classifier: every template
    "align_n": (1000, 1000),                 # CHOICE: held-out pairs of the alignment metrics (common.Alignment)
}

# CIL and X-TAIL (notes/protocols.md): what differs from the column above (cil, xtail: MTIL's;
# toy-cil, toy-xtail: toy's). CHOICE: a CIL step is one epoch of all its images (--few-shot 0) at
# the source config's batch size (MoE-Adapters cil/configs/class/*.yaml), DAC's optimiser, lr and
# losses otherwise; X-TAIL is 16-shot (common.PROTOCOL_COMMON), so its domains take the few-shot
# budget above (500 iterations) and the order's per-task lrs.
# Task-free: nothing changes, the pool composes per batch and each task is merged into the weights.
PROTOCOL_DEFAULTS = {"cil": {"iterations_full_shot": common.EPOCH, "batch_size": common.CIL_BATCH}}


def parse_args(argv=None):
    p = common.common_parser("rank1_pool", __doc__)
    p.set_defaults(few_shot=None)  # filled from DEFAULTS: 5 on mtil (the code), the toy value on toy; 0 = full data
    g = p.add_argument_group("method", "--few-shot defaults to 5 on mtil (official code), "
                             f"{DEFAULTS['few_shot'][1]} on toy; --few-shot 0 = full data")
    g.add_argument("--rank", type=int, help="pool size r = LoRA rank")
    g.add_argument("--top-k", type=int, help="experts active per step, R")
    g.add_argument("--merge-k", type=int, help="experts merged per module and task, = AGO's critical set")
    g.add_argument("--alpha", type=float, help="LoRA scale alpha / r")
    g.add_argument("--dropout", type=float, help="dropout on the LoRA input")
    g.add_argument("--towers", nargs="+", choices=["visual", "text"], help="encoders that get pools")
    g.add_argument("--router", choices=["fixed", "learned"],
                   help="fixed = the code (no gradient reaches the router); learned = gate-weighted variant")
    g.add_argument("--ago", choices=["code", "paper", "off"],
                   help="code: |<b_t, b_s>| summed over all earlier B columns; paper: earlier top --merge-k "
                        "columns, 1/(mn); off: no AGO")
    g.add_argument("--ago-lambda", type=float, help="AGO weight lambda")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    g.add_argument("--eta-min", type=float, help="cosine schedule floor")
    g.add_argument("--template", choices=["random", "first"],
                   help="training prompt: one template drawn per task as the code draws it "
                        "(python random seeded with --seed, one randint) or templates[0]")
    g.add_argument("--eval-before-merge", action="store_true",
                   help="also evaluate the current task with the routed pool before merging (extra)")
    args = common.finalize_args(p.parse_args(argv), "rank1_pool", DEFAULTS, PROTOCOL_DEFAULTS)
    args.towers = list(args.towers)                                  # a copy, never the DEFAULTS list
    if not 1 <= args.top_k <= args.rank or not 1 <= args.merge_k <= args.rank:
        raise common.UserError(f"need 1 <= --top-k, --merge-k <= --rank ({args.rank}), "
                               f"got {args.top_k}, {args.merge_k}")
    if not 0 <= args.dropout < 1:
        raise common.UserError(f"--dropout must be in [0, 1), got {args.dropout}")
    return args


def hparams(args, task, t: int) -> common.HParams:
    """Task t's iterations, batch size and lr: the flag if given, else DEFAULTS (the order's lr
    table; full data uses "iterations_full_shot"). Cosine from lr to --eta-min, no warm-up
    (Fazhan-cs/DAC@bb1e2c0:mtil/src/models/alora.py:alora, CosineAnnealingLR)."""
    d = common.defaults_for(args, DEFAULTS, PROTOCOL_DEFAULTS, task)
    lr = args.lr if args.lr is not None else d["lr_per_task"].get(args.order, {}).get(task.name, d["lr"])
    iterations = d["iterations_full_shot"] if args.few_shot == 0 else d["iterations"]
    return common.HParams(args.iterations or iterations, args.batch_size or d["batch_size"], lr,
                          warmup=0, schedule="cosine")


# ---------------------------------------------------------------------------------------------
# ---- PAPER: the rank-1 expert pool in one LoRA (Fazhan-cs/DAC@bb1e2c0:mtil/src/models/loralib/layers.py:LinearLoRA) ----
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
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))                     # LoRALayer.init_lora_param
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
# ---- PAPER: Activation-Guided Orthogonality (Fazhan-cs/DAC@bb1e2c0:mtil/src/models/lrbmutil.py:compute_orthogonal_loss) ----
# ---------------------------------------------------------------------------------------------


def ago_reference(experts: list[dict], args, device) -> dict[str, torch.Tensor]:
    """P_l: earlier tasks' B columns per module, concatenated: name -> (d_out, m).
    code: all r columns of every earlier B (the top-4 mask of Fazhan-cs/DAC@bb1e2c0:
    mtil/src/models/lrbmutil.py:load_lora_weights tests a key that never exists);
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
# ---- PAPER: training one task (Fazhan-cs/DAC@bb1e2c0:mtil/src/models/alora.py:alora) ----
# ---------------------------------------------------------------------------------------------


def training_template_index(templates: list[str], args) -> int:
    """The code (Fazhan-cs/DAC@bb1e2c0:mtil/src/datasets/collections.py:ClassificationDataset.template,
    read once in mtil/src/models/alora.py:alora): every task runs in a new process that seeds
    python's `random` with --seed (mtil/src/utils.py:seed_all) and then draws
    random.randint(0, len(templates) - 1) once, before anything else uses `random`."""
    return random.Random(args.seed).randint(0, len(templates) - 1) if args.template == "random" else 0


class PromptTokens:
    """The tokens of one prompt per class, built once per task and kept on `device`; `of` gives a
    batch's, one per sample, cut to the batch's longest prompt exactly as ClipView.tokenize cuts
    them: the rows are picked on the device, the length from the labels as the loader gives them
    (on the host), so no step waits for the device or copies tokens to it."""

    def __init__(self, model: common.ClipView, prompts: list[str], device):
        tokens = model.tokenizer(prompts)                                    # (C, ctx) uncut
        self.lengths = (tokens != 0).sum(1).tolist()                         # (C,) tokens up to EOT
        self.tokens = tokens.to(device)

    def of(self, host_labels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N,) labels on the host and the same on the device -> (N, L) tokens on the device."""
        L = max(max(self.lengths[y] for y in host_labels.tolist()), 1)
        return self.tokens[labels][:, :L]


def multi_positive_clip_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss with soft targets G_nm = 1[y_n = y_m] / #{m: y_m = y_n}
    (Fazhan-cs/DAC@bb1e2c0:mtil/src/models/lrbmutil.py:clip_loss). logits: (N, N) text x image."""
    G = (labels[:, None] == labels[None, :]).float()                         # (N, N)
    G = G / G.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, G) + F.cross_entropy(logits.T, G.T))


def train_pools(model: common.ClipView, pools: dict[str, RankOnePool], P: dict[str, torch.Tensor], task, t: int,
                args, device) -> tuple[float, float]:
    """The training loop of one task on the attached pools; P: the AGO reference (ago_reference).
    Returns the mean loss and the mean L_AGO over the steps."""
    hp = hparams(args, task, t)
    iterations, batch_size, lr = hp.iterations, hp.batch_size, hp.lr
    params = [p for p in model.parameters() if p.requires_grad]               # A, B (+ routers if learned)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    # CHOICE: drop_last (the code's few-shot loader) only when the set holds a full batch.
    batches = common.forever(common.make_loader(task.train, batch_size, shuffle=True, seed=args.seed * 1000 + t,
                                                workers=args.workers, drop_last=len(task.train) >= batch_size,
                                                device=device))
    template = task.templates[training_template_index(task.templates, args)]  # one prompt per task (alora)
    prompts = PromptTokens(model, [template.format(c) for c in task.classnames], device)  # tokenized once per task
    scaler = common.grad_scaler(device, args.amp)
    losses = common.LossLog(task.name, iterations, device)                 # read every 50 steps, not every step
    ago_losses = common.LossLog(task.name, iterations, device, check=False)
    model.train()
    # DEVIATION: `iterations` steps (the code's loop runs iterations + 1).
    for step in common.progress(range(iterations), args.progress, desc=task.name, leave=False):
        # CosineAnnealingLR(T_max = iterations, eta_min = 1e-6), no warm-up (alora)
        common.set_lr(opt, args.eta_min + (lr - args.eta_min) * (1 + math.cos(math.pi * step / iterations)) / 2)
        images, host_labels = next(batches)
        images, labels = images.to(device, non_blocking=True), host_labels.to(device, non_blocking=True)
        with common.autocast(device, args.amp):                             # off by default (the code: fp32)
            txt = model.encode_text(prompts.of(host_labels, labels), normalize=True)  # (N, e) one prompt per sample
            img = model.encode_image(images, normalize=True)                 # (N, e)
            logits = model.logit_scale.exp() * txt.float() @ img.float().T   # (N, N) frozen logit scale
            loss = multi_positive_clip_loss(logits, labels)                  # L_clip
            if P and args.ago != "off":                                      # from the second task on
                l_ago = ago_loss(pools, P, args.merge_k, args.ago)          # CHOICE: |C_t| = --merge-k (code: 4, 4)
                loss = loss + args.ago_lambda * l_ago                        # L = L_clip + lambda L_AGO
                ago_losses.add(l_ago, step)
        losses.add(loss, step)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    model.eval()
    return losses.mean(iterations), ago_losses.mean(iterations)


# ---------------------------------------------------------------------------------------------
# ---- PAPER: after the task, merge the top experts and drop the pool (Fazhan-cs/DAC@bb1e2c0:mtil/src/models/loralib/utils.py:merge_lora_back_to_original_all) ----
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


def merge_pools(model: common.ClipView, pools: dict[str, RankOnePool], args) -> dict[str, dict]:
    """Unwrap every pool back to its plain nn.Linear (CLIP's architecture again), then merge the
    top experts. Returns this task's A, B and counts (saved as the code saves <dataset>.pt; B is
    the AGO reference of later tasks; resume replays the merges from the pristine weights)."""
    E = {n: {"A": p.A.detach().cpu(), "B": p.B.detach().cpu(), "counts": p.counts.cpu()} for n, p in pools.items()}
    for name, pool in pools.items():
        model.set_layer(name, pool.base)
    merge_experts(model, E, args)
    return E


# ---------------------------------------------------------------------------------------------
# ---- PLUMBING: setup (data, CLIP, the method's state between tasks) ----
# ---------------------------------------------------------------------------------------------


def setup(args, device):
    """Check the data, load CLIP and the tasks. The state between tasks is the list of finished
    tasks' experts ({"experts": [E_1, E_2, ...]}, E = name -> A, B, counts): their merges are
    in the weights, their B columns are the AGO reference; and the held-out pairs of the alignment
    metrics with the untouched CLIP's values (common.Alignment). The pools themselves are drawn in
    train_task, after Run.begin_task seeded (seed, t)."""
    common.check_data(args)
    model = common.setup_model(args, device)
    # the code: few-shot images transformed once and kept. DEVIATION: the subset is the code's rule
    # (first K per class of a shuffled pass) drawn from --seed, not from the code's torch RNG state.
    return model, common.load_tasks(args, model, few_shot_once=True), {"experts": [],
                                                                       "align": common.Alignment(model, args, device)}


# ---------------------------------------------------------------------------------------------
# ---- PAPER: one task: a fresh pool, AGO against earlier tasks, training; then the merge ----
# ---------------------------------------------------------------------------------------------


def train_task(model: common.ClipView, method: dict, task, t: int, args, device) -> dict:
    """A fresh pool on every adapted Linear (its Kaiming A and router drawn from this task's
    seed), AGO against the earlier tasks' B columns, the training loop. The live pools stay in
    method["pools"] until after_task merges them."""
    pools = attach_pools(model, args)
    method["pools"] = pools
    trainable = common.trainable_params(model)                              # A and B (+ routers if learned)
    P = ago_reference(method["experts"], args, device)
    loss, l_ago = train_pools(model, pools, P, task, t, args, device)
    info = {"loss": loss, "trainable_params": trainable, "params_with_routers": pool_param_count(pools),
            "ago_loss": l_ago}
    if P and args.ago != "off":
        info["note"] = f"AGO loss {l_ago:.3g} (mean over the steps, weight {args.ago_lambda})"
    return info


def after_task(model: common.ClipView, method: dict, task, t: int, args, device) -> dict:
    """Optionally evaluate the task with the routed pool (--eval-before-merge), then unwrap the
    pools, merge this task's top experts and keep its experts for AGO and resume."""
    info = {}
    if args.eval_before_merge:
        info["acc_before_merge"] = common.evaluate(model, task, device, args.eval_batch_size, args.workers, args.amp)
    t1 = time.time()
    method["experts"].append(merge_pools(model, method.pop("pools"), args))
    info["merge_seconds"] = round(time.time() - t1, 3)
    return info


# ---------------------------------------------------------------------------------------------
# ---- PLUMBING: evaluation, checkpoint, main (setup, loop over tasks, evaluate, save) ----
# ---------------------------------------------------------------------------------------------


def evaluate(model: common.ClipView, method: dict, tasks: list, t: int, args, device) -> tuple[list[float], dict]:
    """The accuracy row after task t (t = -1: zero-shot): plain CLIP with the merged weights, every
    dataset's zero-shot head (no router, no task id); the alignment metrics on the held-out pairs
    (common.Alignment) through the same plain encoders (after_task unwrapped the pools)."""
    return common.evaluate_all(model, tasks, args, device, t), method["align"].info(model, t, args, device)


def checkpoint(model: common.ClipView, method: dict) -> dict:
    """Every finished task's experts (A, B, counts on CPU): resume replays their merges."""
    return {"experts": method["experts"]}


def restore(model: common.ClipView, method: dict, state: dict, args, device) -> None:
    """Replay the finished tasks' merges on the pristine weights, in order."""
    method["experts"] = list(state["experts"])
    for E in method["experts"]:
        merge_experts(model, E, args)


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
