"""igsp.py -- iGSP (implicit gradient subspace projection over MoE adapters), a LABELLED
RECONSTRUCTION, and its base method MoE-Adapters (`--variant moe-adapters`).

Paper:  Cui, Zhou et al., "iGSP: Implicit Gradient Subspace Projection for Efficient Continual
        Learning of Vision-Language Models", arXiv 2605.19301 (2026). Only the title and the
        abstract are public; GeoX-Lab/iGSP holds a README only (since renamed "iASP"). NO CODE.
Base:   Yu et al., "Boosting Continual Learning of Vision-Language Models via Mixture-of-Experts
        Adapters", CVPR 2024, arXiv 2403.11549. Code JiazuoYu/MoE-Adapters4CL@4572d97 (mtil/),
        followed for everything MoE: bottleneck experts (64, scale 0.1, dropout 0.1, zero output at
        init) parallel to the MLP of every block of both encoders, reading the un-normalised
        residual stream; noisy top-2 gating on token 0; one router per task; 1000 iterations,
        batch 64, AdamW (wd 0), 100 warm-up steps then cosine, label smoothing 0.2, per-task lr.

Idea:   CLIP stays frozen. Every block gets a pool of small experts and, per task, a router that
        mixes two of them per sample. MoE-Adapters keeps a fixed pool of 22 experts and freezes the
        two most used per block after each task. iGSP grows the pool: a new task first tries to
        live in the span of the frozen historical experts (candidates are penalised), keeps only
        the candidates the converged router still needs, and fine-tunes just those. At test time a
        selector picks the task router from the image, or CLIP itself for images of no seen task.

What the abstract says, and what is reconstructed:
  abstract: "leveraging the early convergence of MoE routers to establish the subspace basis";
        Phase 1 "Subspace Identification" introduces "candidate experts via basis pre-expansion",
        applies a "subspace-constrained regularization" that "implicitly projects new-task
        gradients onto the historical subspace", and "prunes redundant dimensions, treating routing
        probabilities as gradient-flow indicators"; Phase 2 "Orthogonal Subspace Fine-Tuning"
        "fixes the structural basis" and "removes the regularization" to fit the "task-specific
        residual loss". Claims: -42.7% average trainable and -86.9% final total parameters. The
        abstract says nothing about how the task is found at test time.
  RECONSTRUCTED (every formula and number behind those words): M = 4 zero-output candidates per
        block and encoder; historical experts frozen; regulariser Omega_sub = routing mass on the
        candidates, weight lambda_s = 0.1 (an expert's gradient is scaled by its gate, so moving
        mass to the history moves gradient flow there); router convergence = top-k set of the
        window-mean routing probabilities unchanged and total-variation change < 0.05 for 3
        checks, T1 in [10%, 30%] of the iterations; pruning = candidates whose mean routing
        probability is below tau / n (tau = 1) or never selected; Phase 2 = router frozen,
        survivors trained with a soft orthogonality penalty on W_down against the history
        (lambda_o = 0.1); survivors then join the frozen history. Task-free inference: a per-task
        autoencoder on frozen CLIP image features (2000 images per task) with a calibrated
        out-of-distribution threshold (the 95% quantile of the task's own held-out error), falling
        back to the untouched CLIP (it replaces MoE-Adapters' DDAS in both variants).

Markers in the code:
  # DEVIATION:      we differ from MoE-Adapters' code (the base of both variants):
        the task selector on CLIP features with per-task calibrated thresholds, decided per image
        (DDAS: AlexNet features, one global threshold, a TinyImageNet reference AE, per batch:
        `--select-per batch`); routers created per task instead of 11 pre-allocated ones (the
        reported trainable count of `--variant moe-adapters` adds them back, as the code counts
        them); few-shot subsets follow the code's rule (the first K images per class of a shuffled
        pass, transformed once and kept) with another draw (the code's pass depends on its torch
        RNG state).
  # CHOICE:         every source is silent: the toy defaults (measured, see notes/igsp.md);
        choose_map counted per task; on CIL, iGSP keeps its MTIL module (a router per step and
        the selector), while `--variant moe-adapters` takes MoE-Adapters' cil/ module there
        (`--routers shared`: one router, two experts, nothing frozen, no selector; PROTOCOL_DEFAULTS).
  # RECONSTRUCTED:  iGSP's own, in no source (the list above), and its details: Omega_orth
        averaged over blocks; fresh AdamW moments in Phase 2; gate noise stays on in Phase 2;
        reported trainable = the larger phase + the task's selector autoencoder.

Run:    python igsp.py --benchmark toy                           # CPU, minutes
        python igsp.py --benchmark toy --variant moe-adapters    # the baseline
        python igsp.py --benchmark cil-cifar100 --steps 10 --variant moe-adapters --data-root ~/data  # CIL
        python igsp.py --benchmark xtail --data-root ~/data      # X-TAIL; toy-cil / toy-xtail on the CPU
        python igsp.py --order I --data-root ~/data              # MTIL, GPU
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see common.py, section 1)

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ---------------------------------------------------------------------------------------------
# ---- PLUMBING: every default (MTIL | toy) and the arguments (common flags first, then the method's) ----
# ---------------------------------------------------------------------------------------------

# MoE-Adapters' per-dataset lrs: mtil/scripts/train/train_{full,few}_shot_router11_experts22_1000iters.sh
# (Order I; no Order II lrs were released: each dataset keeps its Order-I lr).
_MTIL_NAMES = ["Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food", "MNIST",
               "OxfordPet", "StanfordCars", "SUN397"]
_LR_FULL_SHOT = dict(zip(_MTIL_NAMES, [5e-3, 1e-3, 5e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-3]))
_LR_FEW_SHOT = dict(zip(_MTIL_NAMES, [8e-3, 5e-4, 2e-4, 5e-3, 1e-3, 1e-3, 1e-2, 1e-4, 1e-2, 1e-2, 1e-2]))

# name: (MTIL, toy). MTIL: JiazuoYu/MoE-Adapters4CL@4572d97 mtil/ ("scripts" = the two training
# scripts above), or RECONSTRUCTED (iGSP's own values). toy: the MTIL value unless marked.
DEFAULTS = {
    # -- optimisation (both variants)
    "iterations": (1000, 200),                  # scripts: --iterations 1000. toy: CHOICE: measured, see notes/igsp.md
    "iterations_few_shot": (500, 200),          # few-shot script: --iterations 500 (toy: as full-shot)
    "batch_size": (64, 64),                     # src/args.py --batch-size
    "lr": (1e-3, 3e-2),                         # src/args.py --lr. toy: CHOICE: measured, see notes/igsp.md
    "lr_per_task": (_LR_FULL_SHOT, {}),         # full-shot script: lr=(...)
    "lr_per_task_few_shot": (_LR_FEW_SHOT, {}),  # few-shot script: lr=(...)
    "warmup": (100, 10),                        # src/args.py --warmup_length. toy: CHOICE: measured, see notes/igsp.md
    "warmup_cap": (True, True),                 # CHOICE: warm-up at most half the task's steps (none at MTIL's 100 of 1000)
    "label_smoothing": (0.2, 0.2),              # scripts: --ls 0.2
    "weight_decay": (0.0, 0.0),                 # src/args.py --wd
    # -- MoE-Adapters: experts and routers (clip/model.py, src/args.py)
    "bottleneck": (64, 16),                     # --ffn_num 64. toy: CHOICE: measured, see notes/igsp.md
    "adapter_scale": (0.1, 0.1),                # clip/model.py Adapter(adapter_scalar=0.1)
    "adapter_dropout": (0.1, 0.1),              # clip/model.py Adapter(dropout=0.1)
    "top_k": (2, 2),                            # src/args.py --topk
    "experts": (22, 22),                        # moe-adapters: scripts num=22
    "freeze_per_task": (2, 2),                  # moe-adapters: src/models/finetune.py, topk(choose_map, 2)
    "routers": ("per-task", "per-task"),        # moe-adapters: mtil/ clip/model.py, router_list[taskid]
    # -- iGSP: RECONSTRUCTED (every value; the toy ones marked)
    "candidates": (4, 4),                       # M per block and encoder
    "lambda_s": (0.1, 0.01),                    # Omega_sub weight. toy: CHOICE: measured, see notes/igsp.md
    "prune_tau": (1.0, 0.5),                    # prune below tau / n. toy: CHOICE: measured, see notes/igsp.md
    "lambda_o": (0.1, 1e-3),                    # Omega_orth weight. toy: CHOICE: measured, see notes/igsp.md
    "t1_min": (0.1, 0.1),                       # earliest T1 (fraction of the iterations)
    "t1_max": (0.3, 0.3),                       # latest T1
    "check_every": (0.02, 0.02),                # convergence check period (fraction)
    "window": (0.05, 0.05),                     # routing-statistics window (fraction)
    "tv_tol": (0.05, 0.05),                     # total-variation tolerance
    "patience": (3, 3),                         # stable checks needed
    "phase2_router": ("frozen", "frozen"),      # abstract: "fixes the structural basis" (the router too)
    # -- task selector (DDAS: src/models/AutoEncoder.py; ours is a DEVIATION, see TaskSelector)
    "selector_hidden": (100, 16),               # Autoencoder(code_dims=100). toy: CHOICE: measured, see notes/igsp.md
    "selector_steps": (300, 300),               # scripts: the chooser's --iterations 300
    # DEVIATION: a constant lr; DDAS passes 0.01 (few-shot: 0.003) to exp_lr_scheduler, which decays
    # it every 10 epochs (AutoEncoder.py, few_shot_AutoEncoder.py:exp_lr_scheduler). Adam wd 1e-4 as DDAS.
    "selector_lr": (1e-2, 1e-2),
    "selector_samples": (2000, 2000),           # RECONSTRUCTED: training images per task
    "selector_quantile": (0.95, 0.95),          # RECONSTRUCTED: threshold = this quantile of the task's own error
    "select_per": ("sample", "sample"),         # DEVIATION: DDAS decides per test batch
    # -- precision and prompts (src/models/evaluation.py)
    "amp": ("off", "off"),                      # fp32 training and evaluation
    "eval_prompts": ("ensemble", "ensemble"),   # the template ensemble for every dataset
    "align_n": (1000, 1000),                    # CHOICE: held-out pairs of the alignment metrics (common.Alignment)
}

# CIL and X-TAIL (notes/protocols.md): what differs from the column above (cil, xtail: MTIL's;
# toy-cil, toy-xtail: toy's). MoE-Adapters on CIL: its cil/configs/class/*.yaml exactly (AdamW lr
# 1e-3, wd 0, ls 0, cosine after 30 warm-up iterations, uncapped, one epoch per step, batch 128 /
# 64); cil/continual_clip/models.py:ClassIncremental.train. iGSP (CHOICE): the same epoch and
# batch, its MTIL lr, warm-up and losses otherwise. X-TAIL is 16-shot (common.PROTOCOL_COMMON):
# both variants take the few-shot script's iterations and per-dataset lrs.
# MoE-Adapters' cil/ module is not its mtil/ one (cil/clip/model.py:ResidualAttentionBlock:
# experts_num = 2, top_k = 2, ffn_num 64, step = 1, so router_list holds one router, and
# cil/continual_clip/models.py calls the model with taskid 0 in training and test): one router
# and two experts for the whole run, all trained at every step, nothing frozen, no task selector.
# `--routers shared` is that module (toy-cil too, at the toy's width). iGSP keeps its MTIL module
# on CIL (CHOICE): a router per step, its history frozen, the selector choosing a step per image.
PROTOCOL_DEFAULTS = {
    "cil": {"iterations": common.EPOCH, "batch_size": common.CIL_BATCH},
    "cil:moe-adapters": {"lr": 1e-3, "lr_per_task": {}, "warmup": 30, "warmup_cap": False, "label_smoothing": 0.0,
                         "weight_decay": 0.0, "experts": 2, "freeze_per_task": 0, "routers": "shared"},
    "toy-cil:moe-adapters": {"experts": 2, "freeze_per_task": 0, "routers": "shared"},
}
MOE_ONLY_FLAGS = ("experts", "freeze_per_task", "routers")      # moe-adapters' module; igsp grows its own


def parse_args(argv=None):
    p = common.common_parser("igsp", __doc__)
    g = p.add_argument_group("method")
    g.add_argument("--variant", choices=["igsp", "moe-adapters"], default="igsp")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--warmup", type=int, help="linear warm-up steps")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--bottleneck", type=int, help="expert width r")
    g.add_argument("--adapter-scale", type=float, help="s in E(x) = s * up(down(x))")
    g.add_argument("--adapter-dropout", type=float)
    g.add_argument("--top-k", type=int, help="experts mixed per sample")
    g.add_argument("--experts", type=int, help="moe-adapters: fixed pool per block and encoder")
    g.add_argument("--freeze-per-task", type=int,
                   help="moe-adapters: most used experts frozen per task; 0 = none (ablation: every expert "
                        "keeps training in later tasks)")
    g.add_argument("--routers", choices=["per-task", "shared"],
                   help="moe-adapters: a router per task chosen by the task selector (mtil/), or one router "
                        "for every task and no selector (cil/; the default on cil-* and toy-cil)")
    g.add_argument("--candidates", type=int, help="igsp (RECONSTRUCTED): M candidates per block and encoder")
    g.add_argument("--lambda-s", type=float, help="igsp (RECONSTRUCTED): weight of Omega_sub in Phase 1")
    g.add_argument("--lambda-o", type=float, help="igsp (RECONSTRUCTED): weight of Omega_orth in Phase 2")
    g.add_argument("--prune-tau", type=float, help="igsp (RECONSTRUCTED): prune below tau / n (n = pool)")
    g.add_argument("--t1-min", type=float, help="igsp (RECONSTRUCTED): earliest T1, fraction of iterations")
    g.add_argument("--t1-max", type=float, help="igsp (RECONSTRUCTED): latest T1, fraction of iterations")
    g.add_argument("--check-every", type=float, help="igsp (RECONSTRUCTED): convergence check period (fraction)")
    g.add_argument("--window", type=float, help="igsp (RECONSTRUCTED): routing-statistics window (fraction)")
    g.add_argument("--tv-tol", type=float, help="igsp (RECONSTRUCTED): total-variation tolerance")
    g.add_argument("--patience", type=int, help="igsp (RECONSTRUCTED): stable checks needed")
    g.add_argument("--phase2-router", choices=["frozen", "trained"],
                   help="igsp (RECONSTRUCTED): Phase 2 'fixes the structural basis', the router too (frozen)")
    g.add_argument("--selector-hidden", type=int, help="autoencoder width")
    g.add_argument("--selector-samples", type=int, help="training images per task for the selector")
    g.add_argument("--selector-steps", type=int, help="autoencoder steps")
    g.add_argument("--selector-lr", type=float, help="autoencoder Adam lr")
    g.add_argument("--selector-quantile", type=float,
                   help="OOD threshold = this quantile of a task's own held-out reconstruction error")
    g.add_argument("--select-per", choices=["sample", "batch"],
                   help="task choice per test image (DEVIATION), or per test batch as MoE-Adapters' DDAS does")
    g.add_argument("--oracle-eval", action="store_true",
                   help="also evaluate with the true task identity (summary.json acc_oracle)")
    args = p.parse_args(argv)
    given = [n for n in MOE_ONLY_FLAGS if getattr(args, n) is not None]
    if args.variant == "igsp" and given:
        raise common.UserError(f"--{given[0].replace('_', '-')} is for --variant moe-adapters; "
                               "igsp adds --candidates experts per task and freezes them all")
    args = common.finalize_args(args, args.variant, DEFAULTS, PROTOCOL_DEFAULTS)  # the run's method: igsp | moe-adapters
    for name in ("bottleneck", "top_k", "experts", "candidates", "selector_hidden", "selector_samples"):
        if getattr(args, name) < 1:
            raise common.UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.freeze_per_task < 0:
        raise common.UserError(f"--freeze-per-task must be >= 0, got {args.freeze_per_task}")
    if not 0 <= args.t1_min <= args.t1_max <= 1:
        raise common.UserError("need 0 <= --t1-min <= --t1-max <= 1")
    return args


def hparams(args, task, t: int) -> common.HParams:
    """Task t's iterations, batch size, lr and warm-up: the flag if given, else DEFAULTS (the
    few-shot script's table with --few-shot)."""
    d = common.defaults_for(args, DEFAULTS, PROTOCOL_DEFAULTS, task)
    few = "_few_shot" if args.few_shot else ""
    iterations = args.iterations or d["iterations" + few]
    lr = args.lr if args.lr is not None else d["lr_per_task" + few].get(task.name, d["lr"])
    return common.HParams(iterations, args.batch_size or d["batch_size"], lr,
                          warmup=min(args.warmup, iterations // 2) if d["warmup_cap"] else args.warmup,
                          schedule="warmup+cosine")


# ---------------------------------------------------------------------------------------------
# ---- PAPER: MoE-Adapters, the base of both variants: experts, noisy top-k routers, attaching
# ----        them to CLIP, freezing the most used experts (mtil/clip/adapter.py, clip/model.py,
# ----        src/models/finetune.py) ----
# ---------------------------------------------------------------------------------------------


class Expert(nn.Module):
    """MoE-Adapters' `Adapter` (init 'lora', no LayerNorm):
    E(x) = s * (W_up Dropout(ReLU(W_down x + b_down)) + b_up); W_up = b = 0, so E = 0 at init."""

    def __init__(self, d: int, r: int, s: float, p: float, device):
        super().__init__()
        self.down = nn.Linear(d, r, device=device)                  # W_down: (r, d), kaiming-uniform(a=sqrt 5)
        self.up = nn.Linear(r, d, device=device)                    # W_up: (d, r)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias), nn.init.zeros_(self.up.weight), nn.init.zeros_(self.up.bias)
        self.s, self.drop = s, nn.Dropout(p)

    def forward(self, x):                                           # (n, L, d) -> (n, L, d)
        return self.s * self.up(self.drop(F.relu(self.down(x))))


class MoEMLP(nn.Module):
    """Replaces `blk.mlp` (and takes over `blk.ln_2`, which becomes an Identity), so that the block
    computes x + MLP(LN2(x)) + sum_i g_i(x) E_i(x) with the experts on the UN-normalised x, as in
    MoE-Adapters' ResidualAttentionBlock.forward. `route` = index of the task router in use;
    None = the untouched CLIP. c_fc / c_proj stay attributes, so ClipView.layers() still works."""

    def __init__(self, ln_2: nn.Module, mlp: nn.Sequential, k: int):
        super().__init__()
        self.ln_2, self.c_fc, self.gelu, self.c_proj = ln_2, mlp.c_fc, mlp.gelu, mlp.c_proj
        self.d, self.k = mlp.c_fc.in_features, k
        self.experts = nn.ModuleList()
        # DEVIATION: one router appended per task (MoE-Adapters pre-allocates 11); same function.
        self.W_g = nn.ParameterList()                               # one per task: (d, n_t), zeros
        self.W_noise = nn.ParameterList()                           # one per task: (d, n_t), zeros
        self.n_hist = 0                                             # experts[:n_hist] = frozen history H (igsp)
        self.route: int | None = None
        self.log: list | None = None                                # (p, g) of each forward while training

    def add_router(self, n: int) -> None:
        dev = self.c_fc.weight.device
        self.W_g.append(nn.Parameter(torch.zeros(self.d, n, device=dev)))
        self.W_noise.append(nn.Parameter(torch.zeros(self.d, n, device=dev)))

    def gate(self, x0: torch.Tensor):
        """Noisy top-k gating (Shazeer et al. 2017; MoE-Adapters `noisy_top_k_gating`).
        x0: (N, d) token 0. Returns sparse gates g (N, n) and dense probabilities p (N, n)."""
        W_g, W_noise = self.W_g[self.route], self.W_noise[self.route]
        h = x0 @ W_g.to(x0.dtype)                                   # clean logits (N, d) @ (d, n) -> (N, n)
        p = h.float().softmax(-1)                                   # RECONSTRUCTED: dense probabilities (iGSP)
        logits = h
        if self.training:                                           # noise only while training (MTIL)
            sigma = F.softplus(x0 @ W_noise.to(x0.dtype)) + 1e-2    # (N, n)
            logits = h + torch.randn_like(h) * sigma
        top, idx = logits.topk(min(self.k, h.shape[1]), dim=-1)     # (N, k)
        # softmax over the top-k only; float32 gates whatever the autocast dtype of the logits (CUDA
        # autocast runs softmax in float32, and scatter needs one dtype: fp16 / bf16 eval failed there)
        g = torch.zeros_like(logits, dtype=torch.float32).scatter(-1, idx, top.float().softmax(-1))  # (N, n)
        return g, p

    def forward(self, x):                                           # x: (N, L, d), after the attention residual
        y = self.c_proj(self.gelu(self.c_fc(self.ln_2(x))))         # CLIP's MLP(LN2(x))
        if self.route is None:
            return y
        g, p = self.gate(x[:, 0])                                   # router reads token 0 (CLS / SOT)
        if self.log is not None:
            self.log.append((p, g))
        rows, outs = [], []
        for i, r in enumerate(dispatch(g)):                         # sparse dispatch (SparseDispatcher)
            if len(r):                                              # r: the samples sent to expert i
                rows.append(r)
                outs.append(g[r, i, None, None] * self.experts[i](x[r]))  # (n_i, L, d)
        if not rows:                                                # every expert of this router was pruned
            return y
        return y.index_add(0, torch.cat(rows), torch.cat(outs).to(y.dtype))  # combine: y_b += sum_i g_bi E_i(x_b)


def dispatch(g: torch.Tensor) -> list[torch.Tensor]:
    """The samples sent to each expert: rows of g (N, n) with g[:, i] > 0, ascending, for i = 0..n-1
    (as `g[:, i].nonzero()` per expert, MoE-Adapters' SparseDispatcher). One host read per call,
    the expert batch sizes (a device sync on CUDA: one per block, not one per expert)."""
    N, n = g.shape
    if n == 0:                                                      # every expert of this router was pruned
        return []
    sent = g > 0                                                    # (N, n)
    counts = sent.sum(0).tolist()                                   # (n,) the only host read
    key = torch.arange(n, device=g.device) * N + torch.arange(N, device=g.device)[:, None]  # (N, n): i * N + b
    order = torch.where(sent, key, n * N).flatten().sort().values[:sum(counts)]  # expert-major, then sample
    return list((order % N).split(counts))                          # n tensors (n_i,)


def attach_moe(model: common.ClipView, args) -> dict[str, MoEMLP]:
    """Every block of both encoders (MoE-Adapters `AdapterDoubleEncoder`). name -> MoEMLP."""
    moes = {}
    for p in model.parameters():
        p.requires_grad_(False)                                     # CLIP frozen, logit_scale too
    for tower in ("visual", "text"):
        for i, blk in enumerate(model.blocks(tower)):
            blk.mlp, blk.ln_2 = MoEMLP(blk.ln_2, blk.mlp, args.top_k), nn.Identity()
            moes[f"{tower}.{i}"] = blk.mlp
    return moes


def set_route(moes: dict[str, MoEMLP], route: int | None) -> None:
    for m in moes.values():
        m.route = route


def add_experts(m: MoEMLP, n: int, args) -> None:
    for _ in range(n):
        m.experts.append(Expert(m.d, args.bottleneck, args.adapter_scale, args.adapter_dropout, m.c_fc.weight.device))


def freeze_most_used(m: MoEMLP, choose_map: torch.Tensor, k: int) -> None:
    """moe-adapters after a task: freeze the k experts of this block selected most often (top-k
    selection counts `choose_map`, src/models/finetune.py: topk(choose_map, 2))."""
    for j in choose_map.topk(min(k, len(m.experts))).indices.tolist():
        m.experts[j].requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# ---- RECONSTRUCTED: iGSP's own parts (the abstract names them, every formula is ours): the
# ----                Phase 1 regulariser Omega_sub, router convergence, pruning, Omega_orth ----
# ---------------------------------------------------------------------------------------------


def omega_sub(moes: dict[str, MoEMLP]) -> torch.Tensor:
    """abstract: "subspace-constrained regularization". RECONSTRUCTED: Omega_sub = mean over blocks
    and encoders and over the batch of sum_{j in C} p_j(x), the dense routing mass on the candidates
    C = experts[n_hist:]. Since dL/dtheta_j = g_j(x) J_j^T dL/dy, lowering the candidates' mass
    moves the update's gradient flow onto the historical experts (an implicit, soft projection)."""
    terms = [p[:, m.n_hist:].sum(-1).mean() for m in moes.values() for p, _ in m.log]  # each ()
    return torch.stack(terms).mean()


class RouterMonitor:
    """abstract: "early convergence of MoE routers". RECONSTRUCTED: per block and encoder, the
    batch-mean routing probability p-bar and the top-k selection counts of every step (the latter
    are MoE-Adapters' choose_map)."""

    def __init__(self, moes: dict[str, MoEMLP]):
        self.moes = moes
        self.p = {n: [] for n in moes}                              # per step: (n,)
        self.sel = {n: [] for n in moes}                            # per step: (n,) selection counts
        self.prev, self.streak = None, 0

    def record(self) -> None:
        for name, m in self.moes.items():
            for p, g in m.log:
                self.p[name].append(p.detach().mean(0))
                self.sel[name].append((g.detach() > 0).sum(0))
            m.log.clear()

    def window(self, w: int) -> tuple[dict, dict]:
        """pi = mean p-bar over the last w steps, and the selection counts over them."""
        return ({n: torch.stack(v[-w:]).mean(0) for n, v in self.p.items()},
                {n: torch.stack(v[-w:]).sum(0) for n, v in self.sel.items()})

    def converged(self, w: int, k: int, tol: float, patience: int) -> bool:
        """RECONSTRUCTED: stable = every block keeps its top-k set and moves < tol in total variation
        0.5 * ||pi_now - pi_prev||_1 since the previous check; converged after `patience` stable checks."""
        pi, _ = self.window(w)
        if self.prev is not None:
            stable = all(set(pi[n].topk(min(k, len(pi[n]))).indices.tolist())
                         == set(self.prev[n].topk(min(k, len(pi[n]))).indices.tolist())
                         and 0.5 * (pi[n] - self.prev[n]).abs().sum() < tol for n in pi)
            self.streak = self.streak + 1 if stable else 0
        self.prev = pi
        return self.streak >= patience


def prune(m: MoEMLP, pi: torch.Tensor, sel: torch.Tensor, tau: float) -> int:
    """abstract: "prunes redundant dimensions, treating routing probabilities as gradient-flow
    indicators". RECONSTRUCTED: delete candidate j when pi_j < tau / n or it was never in the top-k
    over the window. Drops the expert and its column of the current router. Returns the candidates kept."""
    n = len(m.experts)
    keep = [j for j in range(n) if j < m.n_hist or (pi[j] >= tau / n and sel[j] > 0)]
    m.experts = nn.ModuleList(m.experts[j] for j in keep)
    for W in (m.W_g, m.W_noise):
        W[m.route] = nn.Parameter(W[m.route].detach()[:, keep].clone())  # (d, n) -> (d, |keep|)
    return len(keep) - m.n_hist


def omega_orth(moes: dict[str, MoEMLP]) -> torch.Tensor:
    """abstract: "Orthogonal Subspace Fine-Tuning". RECONSTRUCTED: a soft O-LoRA-style penalty, mean
    over blocks and encoders of sum_{j in C, h in H} ||W_down,j W_down,h^T||_F^2."""
    terms = []  # RECONSTRUCTED: averaged over blocks like Omega_sub, so lambda_o does not grow with depth
    for m in moes.values():
        if 0 < m.n_hist < len(m.experts):
            Wh = torch.cat([e.down.weight for e in m.experts[:m.n_hist]])   # (|H| r, d)
            Wc = torch.cat([e.down.weight for e in m.experts[m.n_hist:]])   # (|C| r, d)
            terms.append((Wc @ Wh.T).pow(2).sum())                          # (|C| r, |H| r) -> ()
    return torch.stack(terms).sum() / len(moes) if terms else torch.zeros((), device=m.c_fc.weight.device)


# ---------------------------------------------------------------------------------------------
# ---- RECONSTRUCTED: task-free inference (the abstract is silent on it); both variants,
# ----                a DEVIATION from MoE-Adapters' DDAS ----
# ---------------------------------------------------------------------------------------------


class TaskSelector(nn.Module):
    """One small autoencoder per task on frozen CLIP image features f (normalised, (N, e)), as
    DDAS has one per task on AlexNet features. A test image goes to the task t minimising
    err_t(f) / theta_t, or to the untouched CLIP (-1) when every ratio exceeds 1.
    DEVIATION: CLIP features instead of an ImageNet AlexNet (no extra weights to download), and a
    per-task threshold theta_t = a quantile of the task's own held-out error instead of DDAS's one
    global MSE threshold 0.0655 (which is on AlexNet's scale), with no TinyImageNet reference AE;
    a linear decoder (DDAS ends in a Sigmoid, as it reconstructs sigmoid-squashed AlexNet features)."""

    def __init__(self):
        super().__init__()
        self.aes = nn.ModuleList()
        self.theta: list[float] = []

    @staticmethod
    def new_ae(e: int, h: int, device) -> nn.Module:                # DDAS: Linear+ReLU, Linear+Sigmoid
        return nn.Sequential(nn.Linear(e, h), nn.ReLU(), nn.Linear(h, e)).to(device)

    def errors(self, f: torch.Tensor) -> torch.Tensor:              # (N, e) -> (N, T) reconstruction MSE
        return torch.stack([(ae(f) - f).pow(2).mean(-1) for ae in self.aes], -1)

    def select(self, f: torch.Tensor, per_batch: bool = False) -> torch.Tensor:
        ratio = self.errors(f) / torch.tensor(self.theta, device=f.device)  # (N, T)
        if per_batch:                                               # DDAS: one decision per test batch
            ratio = ratio.mean(0, keepdim=True).expand_as(ratio)
        best = ratio.min(-1)
        return torch.where(best.values <= 1, best.indices, torch.full_like(best.indices, -1))  # (N,)

    def fit(self, f: torch.Tensor, args) -> None:
        """Train the task's autoencoder on 80% of f (n, e) (Adam, wd 1e-4 as DDAS), set theta_t from the other 20%."""
        perm = torch.randperm(len(f), device=f.device)
        n_cal = max(1, len(f) // 5)
        cal, fit = f[perm[:n_cal]], (f[perm[n_cal:]] if len(f) > 1 else f)
        ae = self.new_ae(f.shape[1], args.selector_hidden, f.device)
        opt = torch.optim.Adam(ae.parameters(), lr=args.selector_lr, weight_decay=1e-4)
        for _ in range(args.selector_steps):
            x = fit[torch.randint(len(fit), (min(256, len(fit)),), device=f.device)]  # (B, e)
            loss = (ae(x) - x).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            theta = torch.quantile((ae(cal) - cal).pow(2).mean(-1), args.selector_quantile)
        self.aes.append(ae.requires_grad_(False))
        self.theta.append(float(theta))

    def state(self) -> dict:
        return {"aes": [ae.state_dict() for ae in self.aes], "theta": list(self.theta)}

    def load(self, state: dict, device) -> None:
        for sd in state["aes"]:
            h, e = sd["0.weight"].shape
            ae = self.new_ae(e, h, device)
            ae.load_state_dict(sd)
            self.aes.append(ae.requires_grad_(False))
        self.theta = list(state["theta"])


@torch.no_grad()
def clip_features(model, moes: dict[str, MoEMLP], ds, args, device) -> torch.Tensor:
    """Normalised image features of the untouched CLIP for up to --selector-samples training images. (n, e)"""
    set_route(moes, None)
    loader = common.make_loader(ds, args.eval_batch_size, shuffle=True, seed=args.seed, workers=args.workers,
                                device=device)
    feats, n = [], 0
    for images, _ in loader:
        feats.append(model.encode_image(images.to(device, non_blocking=True), normalize=True))
        n += len(images)
        if n >= args.selector_samples:
            break
    return torch.cat(feats)[:args.selector_samples].float()


@torch.no_grad()
def route_images(model, moes: dict[str, MoEMLP], selector: TaskSelector, images: torch.Tensor, args,
                 target: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Task-free inference of one batch: the selector picks a task router per image (or the
    untouched CLIP, -1) from CLIP's own feature, and each image is encoded under its router.
    `target`: route every image there instead (the oracle). Returns the normalised features
    (N, e) and the route of each image (N,); leaves the route at CLIP."""
    set_route(moes, None)
    # (N, e) untouched CLIP: the selector's input, and the features of CLIP's own choice
    f0 = model.encode_image(images, normalize=True) if target is None or target < 0 else None
    choice = (torch.full((len(images),), target, dtype=torch.long, device=images.device) if target is not None
              else selector.select(f0.float(), args.select_per == "batch"))  # (N,)
    rows, feats = [], []
    for s in choice.unique().tolist():
        r = (choice == s).nonzero().squeeze(1)
        set_route(moes, None if s < 0 else s)
        rows.append(r)
        feats.append(f0[r] if s < 0 else model.encode_image(images[r], normalize=True))  # (n_s, e)
    set_route(moes, None)
    f = feats[0].new_empty(len(images), feats[0].shape[1])
    f[torch.cat(rows)] = torch.cat(feats)
    return f, choice


@torch.no_grad()
def evaluate_task_free(model, moes: dict[str, MoEMLP], selector: TaskSelector, tasks: list, t: int, args, device,
                       oracle: bool = False) -> tuple[list[float], list[float]]:
    """One row of the accuracy matrix with task-free routing: each test image gets the selector's
    task router (or CLIP), that router's image feature and that router's text head for the
    dataset's classes (route_images). Also, per dataset, the selector's accuracy (%): a seen
    dataset d <= t should get router d, an unseen one the untouched CLIP. `oracle`: use exactly
    that choice. CIL and X-TAIL: the columns of common.eval_sets (the test images of step d's
    classes / of domain d, over the union head), the same rule: an image of a class seen at step d
    should get router d (CIL: every column is seen; NaN for a step not seen yet). `--routers
    shared`: every image through the one router, as cil/ evaluates (taskid 0); no selector rates."""
    model.eval()
    row, sel_row, heads = [], [], {}                                # heads: (route, classes, prompts) -> (e, C)
    with torch.inference_mode(), common.autocast(device, args.amp):
        for d, task in enumerate(common.eval_sets(tasks, t, args.benchmark)):
            if task is None:
                row.append(float("nan"))
                sel_row.append(float("nan"))
                continue
            target = d if d <= t else -1
            forced = router_of(t, args) if shared(args) else (target if oracle else None)
            correct, hit, n = 0, 0, 0
            prompts = common.eval_templates(task.templates, d, t, args.eval_prompts)
            for images, labels in common.make_loader(task.test, args.eval_batch_size, shuffle=False, seed=0,
                                                     workers=args.workers, device=device):
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                f, choice = route_images(model, moes, selector, images, args, forced)  # (N, e), (N,)
                pred = torch.empty_like(labels)
                for s in choice.unique().tolist():
                    rows = (choice == s).nonzero().squeeze(1)
                    key = (s, tuple(task.classnames), tuple(prompts))
                    if key not in heads:
                        set_route(moes, None if s < 0 else s)
                        heads[key] = common.zeroshot_head(model, task.classnames, prompts, device)  # (e, C)
                    pred[rows] = (f[rows] @ heads[key].to(f.dtype)).argmax(-1)
                correct += (pred == labels).sum().item()
                hit += (choice == target).sum().item()
                n += len(labels)
            row.append(100.0 * correct / max(n, 1))
            sel_row.append(float("nan") if shared(args) else 100.0 * hit / max(n, 1))
    set_route(moes, None)
    return row, sel_row


def alignment_info(model, method: dict, t: int, args, device) -> dict:
    """The alignment metrics on the held-out pairs (common.Alignment) after task t.
    CHOICE: the deployed model's route, as evaluate_task_free: each held-out image goes where the
    selector sends it (a task router or CLIP), its caption is scored under that image's router
    (the MoE sits in the text tower too), so the metrics are those of the model that is evaluated."""
    moes, selector = method["moes"], method["selector"]
    if t < 0 or (not selector.aes and not shared(args)):            # no task yet: the untouched CLIP
        set_route(moes, None)
        return method["align"].info(model, t, args, device)
    forced = router_of(t, args) if shared(args) else None           # the one router, or the selector

    def encode_texts(captions: list[str], s: int) -> torch.Tensor:  # (C, e) under router s (CLIP for -1)
        set_route(moes, None if s < 0 else s)
        return model.encode_texts(captions, device)

    try:
        return method["align"].info(model, t, args, device,
                                    lambda x: route_images(model, moes, selector, x, args, forced), encode_texts)
    finally:
        set_route(moes, None)


# ---------------------------------------------------------------------------------------------
# ---- PLUMBING: parameter accounting ----
# ---------------------------------------------------------------------------------------------


def param_counts(moes: dict[str, MoEMLP], selector: TaskSelector) -> dict:
    """Stored extra parameters (CLIP's own excluded): all experts, all task routers + noise matrices,
    all selector autoencoders. Per expert: 2 d r + r + d; per router: 2 d n_t."""
    experts = sum(p.numel() for m in moes.values() for p in m.experts.parameters())
    routers = sum(W.numel() for m in moes.values() for W in list(m.W_g) + list(m.W_noise))
    sel = sum(p.numel() for p in selector.parameters())
    return {"experts": experts, "routers": routers, "selector": sel, "total": experts + routers + sel}


def moe_adapters_trainable(trained: int, moes: dict[str, MoEMLP], t: int, n_tasks: int) -> int:
    """MoE-Adapters' own count of trainable parameters (mtil/src/models/finetune.py, the printed
    requires_grad sum): its blocks pre-allocate one router and noise matrix per task of the
    benchmark (clip/model.py, `range(11)`), all trainable in every task; ours exist one per task.
    So the routers of the other n_tasks - 1 tasks are added to what task t trained."""
    return trained + (n_tasks - 1) * sum(m.W_g[t].numel() + m.W_noise[t].numel() for m in moes.values())


def _mean(v: list[float]):
    v = [x for x in v if not math.isnan(x)]                         # NaN: a CIL step not seen yet
    return round(sum(v) / len(v), 2) if v else None


# ---------------------------------------------------------------------------------------------
# ---- PLUMBING: setup (data, CLIP, the method's state between tasks) ----
# ---------------------------------------------------------------------------------------------


def init_method(model: common.ClipView, args, n_tasks: int) -> dict:
    """The method's state before task 1: the MoE attached to the frozen CLIP (route None: exactly
    CLIP) and an empty selector; `n_tasks`, the benchmark's task count (MoE-Adapters' reported
    count). "choose_map" (moe-adapters) and "report" are what train_task hands to after_task and
    evaluate for the task in progress (rebuilt every task, not checkpointed)."""
    return {"moes": attach_moe(model, args), "selector": TaskSelector(), "n_tasks": n_tasks,
            "choose_map": {}, "report": {}}


def setup(args, device):
    """Check the data, load CLIP and the tasks, attach the MoE and the task selector; the held-out
    pairs of the alignment metrics with the untouched CLIP's values (common.Alignment)."""
    common.check_data(args)
    model = common.setup_model(args, device)
    # MoE-Adapters: few-shot images transformed once and kept. DEVIATION: the subset is the code's
    # rule (first K per class of a shuffled pass) drawn from --seed, not from the code's RNG state.
    tasks = common.load_tasks(args, model, few_shot_once=True)
    method = init_method(model, args, len(tasks))
    method["align"] = common.Alignment(model, args, device)          # route None: the untouched CLIP
    return model, tasks, method


# ---------------------------------------------------------------------------------------------
# ---- PAPER: one task: MoE-Adapters' training loop (both variants), iGSP's two phases
# ----        (RECONSTRUCTED) inside it ----
# ---------------------------------------------------------------------------------------------


def shared(args) -> bool:
    """moe-adapters with `--routers shared` (cil/): one router trained at every task, no selector."""
    return args.variant == "moe-adapters" and args.routers == "shared"


def router_of(t: int, args) -> int:
    """The router task t trains and its test images use: its own, or the one shared router."""
    return 0 if shared(args) else t


def begin_task(moes: dict[str, MoEMLP], t: int, args) -> None:
    """igsp (abstract: "candidate experts via basis pre-expansion"; RECONSTRUCTED: M zero-output
    candidates after the frozen H); moe-adapters: the fixed pool (created at task 1), frozen
    experts stay frozen. Both: a new router; `--routers shared`: the one router, trained again."""
    r = router_of(t, args)
    for m in moes.values():
        if args.variant == "igsp":
            add_experts(m, args.candidates, args)                   # C_t after H = experts[:n_hist]
        elif not m.experts:
            add_experts(m, args.experts, args)
        if len(m.W_g) <= r:
            m.add_router(len(m.experts))                            # W_g^t, W_noise^t: zeros (d, n)
        m.W_g[r].requires_grad_(True)
        m.W_noise[r].requires_grad_(True)
        m.route = r


def _loss(model, task, images, labels, args, device, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """CE over the task's class prompts (templates[0]); `tokens`: theirs, built once per task."""
    text = common.class_text_features(model, task.classnames, task.templates[0], device, tokens)  # (C, e)
    img = model.encode_image(images, normalize=True)                # (N, e)
    logits = model.logit_scale.exp() * img @ text.T                 # (N, C)
    return F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing)


def train_task(model: common.ClipView, method: dict, task, t: int, args, device) -> dict:
    """moe-adapters: CE on the unfrozen experts + the task's router. igsp: Phase 1 (candidates +
    router, CE + lambda_s Omega_sub) until the router converged (T1), pruning, then Phase 2 (the
    survivors, CE + lambda_o Omega_orth)."""
    t_start = time.time()
    moes, hp, is_igsp = method["moes"], hparams(args, task, t), args.variant == "igsp"
    begin_task(moes, t, args)
    batches = common.forever(common.make_loader(task.train, hp.batch_size, shuffle=True, seed=args.seed * 1000 + t,
                                                workers=args.workers, device=device))
    frac = lambda f: max(1, round(f * hp.iterations))              # noqa: E731  fraction -> steps
    w, every = frac(args.window), frac(args.check_every)
    t1_min, t1_max = min(frac(args.t1_min), hp.iterations), min(frac(args.t1_max), hp.iterations)
    monitor = RouterMonitor(moes)
    info = {"trainable_phase1": common.trainable_params(model)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=hp.lr,
                            weight_decay=args.weight_decay)
    phase, T1, done = 1, hp.iterations, 0
    tokens = common.class_tokens(model, task.classnames, task.templates[0], device)  # (C, L) once per task
    losses = common.LossLog(task.name, hp.iterations, device)       # read every 50 steps, not every step
    scaler = common.grad_scaler(device, args.amp)
    model.train()
    for m in moes.values():
        m.log = []
    for step in common.progress(range(hp.iterations), args.progress, desc=task.name, leave=False):
        common.set_lr(opt, common.cosine_lr(step, hp.lr, hp.warmup, hp.iterations))
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with common.autocast(device, args.amp):                     # off by default (MoE-Adapters: fp32)
            loss = _loss(model, task, images, labels, args, device, tokens)
            if is_igsp and phase == 1:                              # RECONSTRUCTED: L1 = CE + lambda_s Omega_sub
                loss = loss + args.lambda_s * omega_sub(moes)
            elif is_igsp:                                           # RECONSTRUCTED: L2 = CE + lambda_o Omega_orth
                loss = loss + args.lambda_o * omega_orth(moes)
        losses.add(loss, step)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        monitor.record()
        done = step + 1
        if is_igsp and phase == 1 and done >= t1_min and (
                done >= t1_max or (done % every == 0 and monitor.converged(w, args.top_k, args.tv_tol, args.patience))):
            # ---- end of Phase 1 at router convergence: prune, then fix the structure ----
            T1, phase = done, 2
            pi, sel = monitor.window(w)
            info["candidates_kept"] = sum(prune(m, pi[n], sel[n], args.prune_tau) for n, m in moes.items())
            # abstract: "fixes the structural basis"; RECONSTRUCTED: gate noise stays on (training mode)
            for m in moes.values():
                m.W_g[t].requires_grad_(args.phase2_router == "trained")
                m.W_noise[t].requires_grad_(args.phase2_router == "trained")
            params = [p for p in model.parameters() if p.requires_grad]
            info["trainable_phase2"] = sum(p.numel() for p in params)
            if not params:                                          # every candidate pruned: nothing to fit
                break
            # RECONSTRUCTED: fresh AdamW moments for Phase 2 (a new objective on a pruned parameter set).
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=args.weight_decay)
    for m in moes.values():
        m.log = None
    model.eval()
    if is_igsp:
        info.setdefault("candidates_kept", sum(len(m.experts) - m.n_hist for m in moes.values()))
        info.setdefault("trainable_phase2", 0)
        info.update(T1=T1, candidates=args.candidates * len(moes))
    else:
        method["choose_map"] = {n: torch.stack(v).sum(0) for n, v in monitor.sel.items()}  # this task's
    info.update(loss=losses.mean(done), train_seconds=round(time.time() - t_start, 1))
    method["report"] = dict(info)
    return info


def after_task(model: common.ClipView, method: dict, task, t: int, args, device) -> dict:
    """igsp (RECONSTRUCTED): the survivors join the frozen history H. moe-adapters: freeze the
    `--freeze-per-task` most used experts of this task per block and encoder (top of choose_map).
    Both: the task router is stored frozen, and the selector learns the task. Returns the task's
    parameter counts (the reported trainable count includes the selector's new autoencoder)."""
    t_start = time.time()
    moes, selector, report = method["moes"], method["selector"], method["report"]
    r = router_of(t, args)
    for name, m in moes.items():
        m.W_g[r].requires_grad_(False)
        m.W_noise[r].requires_grad_(False)
        if args.variant == "igsp":
            m.experts.requires_grad_(False)
            m.n_hist = len(m.experts)
        else:
            # CHOICE: usage counted over this task only (whether choose_map persists across the
            # official per-task processes is not visible in the code).
            freeze_most_used(m, method["choose_map"][name], args.freeze_per_task)
    if not shared(args):
        selector.fit(clip_features(model, moes, task.train, args, device), args)
    seconds = time.time() - t_start
    n = param_counts(moes, selector)
    if args.variant == "igsp":
        # RECONSTRUCTED: trainable = the larger phase + the task's selector autoencoder
        ae = sum(p.numel() for p in selector.aes[t].parameters())
        trainable = max(report["trainable_phase1"], report["trainable_phase2"]) + ae
    else:
        trainable = (report["trainable_phase1"] if shared(args)   # cil/: one router in all
                     else moe_adapters_trainable(report["trainable_phase1"], moes, t, method["n_tasks"]))
    info = {"trainable_params": trainable, "trainable": trainable, "total_params": n["total"],
            "expert_params": n["experts"], "router_params": n["routers"], "selector_params": n["selector"],
            "experts_per_block": round(sum(len(m.experts) for m in moes.values()) / len(moes), 2),
            "after_task_seconds": round(seconds, 1)}
    if args.variant != "igsp":
        info["frozen_experts"] = sum(not e.up.weight.requires_grad for m in moes.values() for e in m.experts)
    report.update(info)
    return info


# ---------------------------------------------------------------------------------------------
# ---- PLUMBING: evaluation, checkpoint, main (setup, loop over tasks, evaluate, save) ----
# ---------------------------------------------------------------------------------------------


def evaluate(model: common.ClipView, method: dict, tasks: list, t: int, args, device) -> tuple[list[float], dict]:
    """t = -1: the zero-shot row of the untouched CLIP (no route). t >= 0: the task-free row (each
    test image routed by the selector), the selector's accuracy on seen datasets and its CLIP
    fallback rate on unseen ones, with --oracle-eval the row with the true task identity
    (acc_oracle), the alignment metrics on the held-out pairs (alignment_info), and the task's note."""
    moes, selector = method["moes"], method["selector"]
    if t < 0:
        set_route(moes, None)
        return common.evaluate_all(model, tasks, args, device, t), alignment_info(model, method, t, args, device)
    row, sel = evaluate_task_free(model, moes, selector, tasks, t, args, device)
    info = {"selector_acc_seen": _mean(sel[:t + 1]), "selector_fallback_unseen": _mean(sel[t + 1:])}
    if args.oracle_eval and not shared(args):                       # shared: no task identity to use
        info["acc_oracle"] = evaluate_task_free(model, moes, selector, tasks, t, args, device, oracle=True)[0]
    r = method["report"]
    what = (f"T1 {r['T1']}  kept {r['candidates_kept']}/{r['candidates']}" if args.variant == "igsp"
            else f"frozen {r['frozen_experts']}/{args.experts * len(moes)}")
    align = alignment_info(model, method, t, args, device)
    sel_note = ("one shared router" if shared(args)
                else f"selector {info['selector_acc_seen']}/{info['selector_fallback_unseen']}")
    info["note"] = (f"{what}  trainable {r['trainable']:,}  total {r['total_params']:,}  {sel_note}"
                    + (f"\n    {align.pop('note')}" if align else ""))
    return row, {**info, **align}


def moe_state(moes: dict[str, MoEMLP]) -> dict:
    return {name: {"n_experts": len(m.experts), "n_hist": m.n_hist,
                   "trainable": [e.up.weight.requires_grad for e in m.experts],
                   "weights": {k: v for k, v in m.state_dict().items()
                               if k.startswith(("experts.", "W_g.", "W_noise."))}}
            for name, m in moes.items()}


def load_moe_state(moes: dict[str, MoEMLP], state: dict, args) -> None:
    for name, m in moes.items():
        s = state[name]
        add_experts(m, s["n_experts"], args)
        for t in range(sum(k.startswith("W_g.") for k in s["weights"])):
            m.add_router(s["weights"][f"W_g.{t}"].shape[1])
        m.load_state_dict(s["weights"], strict=False)
        m.n_hist = s["n_hist"]
        for e, tr in zip(m.experts, s["trainable"]):
            e.requires_grad_(tr)
        for W in list(m.W_g) + list(m.W_noise):
            W.requires_grad_(False)


def checkpoint(model: common.ClipView, method: dict) -> dict:
    return {"moe": moe_state(method["moes"]), "selector": method["selector"].state()}


def restore(model: common.ClipView, method: dict, state: dict, args, device) -> None:
    load_moe_state(method["moes"], state["moe"], args)
    method["selector"].load(state["selector"], device)


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
