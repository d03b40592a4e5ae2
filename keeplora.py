"""keeplora.py -- KeepLoRA++ and KeepLoRA: LoRA confined to the residual subspace, merged after
every task; KeepLoRA++ adds a shallow-to-deep layer scale on the LoRA branch.

Papers: Luo et al., "KeepLoRA: Continual Learning with Residual Gradient Adaptation", ICLR 2026,
        arXiv 2601.19659 (`--variant keeplora`); Luo et al., "KeepLoRA++", arXiv 2606.16256
        (`--variant keeplora++`, the default). Of the papers only the abstracts could be read;
        only the official code could be read in full, so every reference below is to that code.
Code:   MaolinLuo/KeepLoRA, MTIL/: v1 = KeepLoRA at commit a17f9c2, v2 = KeepLoRA++ at commit
        7abf7ec. References name the commit, the file and the function, e.g.
        MaolinLuo/KeepLoRA@a17f9c2:MTIL/trainer/trainer.py:Trainer.estimate_gradient; the short
        form `@a17f9c2:MTIL/...` in comments is the same repository. Main files:
        trainer/trainer.py (gradient estimate, A/B init, optimiser), model/prin_subspace.py
        (W_p and the GPM-style update), model/peft_modules.py / model/peft_vit.py (LoRA branch,
        `build_layer_scales`), trainer/framework4MTIL.py (the task loop), configs/*.yaml.

Idea:   Every adapted weight W (attention q, k, v, out of both encoders) keeps an orthonormal basis
        M' of input directions to protect: before task 1 its principal subspace W_p (the top
        singular directions holding eps_w of ||W||^2), later extended with the input features of
        each finished task (GPM). For a new task the full-data gradient G of each W is projected
        onto the residual (I - M'M'^T) G, and its top-r left singular vectors become the LoRA's
        frozen A; only B is trained. Because A is orthogonal to M', x A B = 0 for every x in
        span(M') whatever B becomes: the layer's output on protected inputs cannot move. After the
        task the LoRA is merged into W and reset. KeepLoRA++ starts B at zero and multiplies the
        vision LoRA branch of block l by s_l = 0.2 + 0.8 l / (L - 1), so shallow layers (general
        knowledge) move less than deep ones (task knowledge).

        Orientation: the official code writes y = x W + x A B with A (d_in, r), B (r, d_out)
        (@a17f9c2:MTIL/model/peft_modules.py:KeepLoRA.forward: x @ lora_A @ lora_B); "code
        orientation" below means these shapes. PyTorch stores W^T (d_out, d_in); the module
        below holds A^T (r, d_in) and B^T (d_out, r).
        --principal-side: the official CLIP code takes W_p as the LEFT singular vectors of the
        PyTorch weight, i.e. its OUTPUT space (@a17f9c2:MTIL/model/prin_subspace.py:
        PrinSubspace._update_prin_subspace on prin_subspace_helper.py:
        get_accumulated_weight_matrix_list), and then uses them on the input side (it runs only
        because q, k, v, out are square); the official LLaVA code takes the input space, the
        right singular vectors of the PyTorch weight (@a17f9c2:MCITlib/KeepLoRA/llava/train/
        extract_weights.py:extract_weights). `code` (default) is the CLIP code's side, `paper`
        the input space (the flag keeps its old name; no paper text backs it here).

Protocol as the code (configs `prec: amp`; @a17f9c2:MTIL/trainer/trainer.py:
        Trainer.estimate_gradient, Trainer.train_one_task, Trainer.evaluate_one): fp16 autocast
        for the gradient estimate, training (with GradScaler), the feature pass and evaluation
        (`--amp fp16`; on the CPU everything runs in fp32); no augmentation
        (@a17f9c2:MTIL/main.py:run_exp: one transform for train and test): training, the gradient
        estimate and the feature pass read the deterministic eval transform; one prompt,
        templates[0] of KeepLoRA's own template lists (data.KEEPLORA_TEMPLATES: DTD, StanfordCars
        and SUN397 start with another sentence than ZSCL's), for the loss and for every zero-shot
        head (the official `--eval-prompts` resolves to `first`; `--eval-prompts ensemble
        --template-list zscl` is ZSCL's protocol).
DEVIATIONS (marked in the code): --iterations per task instead of epochs on MTIL
        (computed from the config's epochs, same step count); the text feature pass sees
        positions up to the longest class prompt, not all 77 (common's tokenizer cuts the
        context; the later positions are padding); M' is re-orthonormalised after each update.
CHOICES (marked): exact SVD in float64 instead of the randomized `svd_lowrank` (deterministic,
        negligible difference at r = 16); saturation guards on A (rank cap, re-projection,
        1e-6 residual-energy skip); the feature pass uses a seeded shuffled loader; the toy
        column of DEFAULTS.

Run:    python keeplora.py --benchmark toy                        # KeepLoRA++ on CPU, minutes
        python keeplora.py --benchmark toy --variant keeplora     # KeepLoRA (v1)
        python keeplora.py --order I --data-root ~/data           # MTIL, GPU
        python keeplora.py --benchmark toy --protect off          # ablation: A ignores M'
        python keeplora.py --benchmark cil-cifar100 --steps 10 --data-root ~/data   # class-incremental
        python keeplora.py --benchmark xtail --data-root ~/data   # X-TAIL; toy-cil / toy-xtail on the CPU
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
import data

# ---------------------------------------------------------------------------------------------
# ---- PLUMBING: every default (MTIL | toy) and the arguments (common flags first, then the method's) ----
# ---------------------------------------------------------------------------------------------

# name: (MTIL, toy). MTIL: MaolinLuo/KeepLoRA@a17f9c2:MTIL/configs/keeplora_order{1,2}.yaml and the
# code named per line; both variants use them (the configs at 7abf7ec could not be read). toy: the
# official value, except where marked CHOICE.
DEFAULTS = {
    "iterations": (None, 100),      # MTIL: epochs_per_task x ceil(N_train / batch) (hparams)
                                    # toy: CHOICE: measured, see notes/keeplora.md
    "epochs_per_task": ({"I": [10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 5],          # configs: optim.epoch_list
                         "II": [5, 2, 5, 5, 5, 5, 10, 10, 10, 10, 10]}, None),
    "batch_size": (64, 64),         # configs: optim.batch_size; toy: CHOICE: measured, see notes/keeplora.md
    "lr": (1e-3, 3e-3),             # configs: optim.lr (AdamW, OneCycleLR max_lr); toy: CHOICE: measured, see notes/keeplora.md
    "weight_decay": (0.01, 0.01),   # configs: optim.weight_decay
    "rank": (16, 16),               # configs: v_adapter_dim, t_adapter_dim
    "alpha": (1.0, 1.0),            # @a17f9c2:MTIL/model/peft_vit.py:ViT_Tuner.__init__: KeepLoRA(lora_alpha=1)
    "eps_w_vision": (0.85, 0.85),   # configs: v_prin_subspace_threshold2 (W_p before task 1)
    "eps_w_text": (0.2, 0.2),       # configs: t_prin_subspace_threshold2
    "eps_f": (0.99, 0.99),          # configs: v_/t_prin_subspace_threshold (the feature update)
    "principal_side": ("code", "code"),   # the CLIP code's side (header)
    "feature_stat": ("sum", "sum"),       # @a17f9c2:MTIL/model/peft_modules.py:KeepLoRA.accumulate_features
    "scale_text": (False, False),   # a switch: the text tower keeps s = 1 (see add_keeplora)
    "template_list": ("keeplora", "keeplora"),  # the code's own lists (@a17f9c2:MTIL/MTIL_datasets/collections.py: each
                                                # dataset class's __init__, data.KEEPLORA_TEMPLATES); toy: unused
    "grad_batches": (None, None),   # None = every batch, as @a17f9c2:MTIL/trainer/trainer.py:Trainer.estimate_gradient
    "feature_batches": (None, None),  # None = every batch, as @a17f9c2:MTIL/model/keeplora_helper.py:
                                      # KeepLoRAHelper.accumulate_features_for_task
    "amp": ("fp16", "fp16"),        # configs: prec "amp" (fp16 autocast); CPU runs stay fp32
    "eval_prompts": ("first", "first"),  # templates[0] for every head (@a17f9c2:MTIL/main.py:run_exp)
    "align_n": (1000, 1000),        # CHOICE: held-out pairs of the alignment metrics (common.Alignment)
    "protect": ("on", "on"),        # A orthogonal to M' (the method); off: an ablation, not in the code
}
# per --variant: B0 and the layer scale's gamma. keeplora++: B0 = 0
# (@7abf7ec:MTIL/trainer/trainer.py:Trainer.init_keeplora_with_grad: lora_B.data.zero_()) and
# gamma 0.2 (@7abf7ec:MTIL/model/peft_vit.py:ViT_Tuner.__init__: build_layer_scales(gamma=0.2));
# keeplora: B0 = S_r V_r^T (@a17f9c2:MTIL/trainer/trainer.py:Trainer.init_keeplora_with_grad) and
# no layer scale (gamma 1).
# CIL and X-TAIL (notes/protocols.md): what differs from the column above (cil, xtail: MTIL's;
# toy-cil, toy-xtail: toy's). CHOICE: a CIL step is one epoch at the source config's batch size
# (MoE-Adapters cil/configs/class/*.yaml), KeepLoRA's AdamW + OneCycleLR, lr and losses otherwise;
# an X-TAIL domain keeps its Order-I entry of epoch_list (epochs over its 16 shots).
# Task-free: nothing changes, KeepLoRA merges every task into W and keeps no task id: M' grows with
# each step's / domain's features as with each MTIL task's.
PROTOCOL_DEFAULTS = {"cil": {"iterations": common.EPOCH, "batch_size": common.CIL_BATCH, "epochs_per_task": None}}
VARIANT_DEFAULTS = {"keeplora++": {"b_init": "zero", "gamma": 0.2},
                    "keeplora": {"b_init": "svd", "gamma": 1.0}}

ADAPTED_KINDS = ("attn.q", "attn.k", "attn.v", "attn.out")     # configs v_/t_keeplora: q, k, v, o; no MLP, no proj


def parse_args(argv=None):
    p = common.common_parser("keeplora", __doc__)
    g = p.add_argument_group("method")
    g.add_argument("--variant", choices=["keeplora++", "keeplora"], default="keeplora++",
                   help="keeplora++ (v2): B = 0 and layer scaling; keeplora (v1): B = S V^T, no scaling")
    g.add_argument("--rank", type=int, help="LoRA rank r")
    g.add_argument("--alpha", type=float, help="LoRA alpha; scaling alpha / r")
    g.add_argument("--eps-w-vision", type=float, help="energy of W kept in W_p, vision")
    g.add_argument("--eps-w-text", type=float, help="energy of W kept in W_p, text")
    g.add_argument("--eps-f", type=float, help="feature energy kept by the GPM update")
    g.add_argument("--principal-side", choices=["code", "paper"],
                   help="W_p from the output singular vectors of the weight (code: the official CLIP code) "
                        "or from the input ones (paper: the side of the official LLaVA code)")
    g.add_argument("--feature-stat", choices=["sum", "covariance"],
                   help="X = batch token matrices summed element-wise (code) or all tokens (X X^T = covariance)")
    g.add_argument("--b-init", choices=["zero", "svd"], default=None,
                   help="B0 = 0 (keeplora++) or S_r V_r^T with the compensating weight shift (keeplora)")
    g.add_argument("--gamma", type=float, default=None,
                   help="layer scale s_l = gamma + (1 - gamma) l / (L - 1); "
                        "default 0.2 (keeplora++), 1 = off (keeplora)")
    g.add_argument("--scale-text", action="store_true", help="apply the layer scale to the text encoder too")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--template-list", choices=["keeplora", "zscl"],
                   help="MTIL prompt templates: KeepLoRA's own lists (the code) or ZSCL's")
    g.add_argument("--grad-batches", type=int,
                   help="cap on batches of the gradient estimate (default: all, as the code)")
    g.add_argument("--feature-batches", type=int,
                   help="cap on batches of the feature pass (default: all, as the code)")
    g.add_argument("--protect", choices=["on", "off"],
                   help="on: A from the residual gradient (I - M'M'^T) G, orthogonal to M' = W_p (the pretrained "
                        "principal subspace) + the earlier tasks' features (the method); off (ablation): A from "
                        "the raw gradient G, so nothing is protected (M' is still kept and reported)")
    args = p.parse_args(argv)
    args = common.finalize_args(args, args.variant, DEFAULTS, PROTOCOL_DEFAULTS)
    for name, value in VARIANT_DEFAULTS[args.variant].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.rank < 1:
        raise common.UserError(f"--rank must be >= 1, got {args.rank}")
    for name in ("eps_w_vision", "eps_w_text", "eps_f"):
        if not 0 <= getattr(args, name) <= 1:
            raise common.UserError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    for name in ("grad_batches", "feature_batches"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise common.UserError(f"--{name.replace('_', '-')} must be >= 1")
    return args


def hparams(args, task, t: int) -> common.HParams:
    """Task t's iterations, batch size and lr: the flag if given, else DEFAULTS. Schedule: AdamW
    with OneCycleLR at its PyTorch defaults (@a17f9c2:MTIL/trainer/trainer.py:
    Trainer.build_optimizer), whose own rise is part of the schedule: no separate warm-up."""
    d = common.defaults_for(args, DEFAULTS, PROTOCOL_DEFAULTS, task)
    bs = args.batch_size or d["batch_size"]
    if args.iterations:
        iterations = args.iterations
    elif d["epochs_per_task"]:                   # MTIL and X-TAIL: the dataset's entry of the order's list
        # DEVIATION: steps instead of epochs; the same count as the code's OneCycleLR
        # (epochs * len(train_loader), a loader without drop_last: ceil(N / batch) batches).
        epochs = d["epochs_per_task"][args.order][data.MTIL_ORDERS[args.order].index(task.name)]
        iterations = epochs * math.ceil(len(task.train) / bs)
    else:
        iterations = d["iterations"]
    return common.HParams(iterations, bs, args.lr or d["lr"], warmup=0, schedule="onecycle")


# ---------------------------------------------------------------------------------------------
# ---- PAPER: the LoRA branch with frozen A and layer scale (@7abf7ec:MTIL/model/peft_modules.py:KeepLoRA) ----
# ---------------------------------------------------------------------------------------------


class KeepLoRALinear(nn.Module):
    """y = x W + s_l (alpha / r) x A B   (code orientation; MaolinLuo/KeepLoRA@7abf7ec:
    MTIL/model/peft_modules.py:KeepLoRA.forward).

    In PyTorch orientation: y = W0 x + b + s * (alpha / r) * B^T (A^T x), with the buffer
    `A` = A^T: (r, d_in), frozen by construction (code: a plain tensor), and the parameter
    `B` = B^T: (d_out, r), the only trained weight. Both are zero between tasks (LoRA off)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, s: float):
        super().__init__()
        self.base = base
        self.r, self.scaling, self.s = r, alpha / r, s
        d_out, d_in = base.weight.shape
        self.register_buffer("A", torch.zeros(r, d_in, device=base.weight.device))   # A^T: (r, d_in)
        self.B = nn.Parameter(torch.zeros(d_out, r, device=base.weight.device))     # B^T: (d_out, r)
        self.enabled = True

    def delta(self) -> torch.Tensor:
        """s_l (alpha/r) (A B)^T, the weight change in PyTorch orientation: (d_out, d_in)."""
        return self.s * self.scaling * self.B @ self.A                             # (d_out, r)(r, d_in)

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        return y + self.s * self.scaling * F.linear(F.linear(x, self.A), self.B)   # (.., d_in)->(.., r)->(.., d_out)

    @torch.no_grad()
    def merge_and_reset(self) -> None:
        """W <- W + s_l (alpha/r) A B, then A = B = 0 (MaolinLuo/KeepLoRA@7abf7ec:MTIL/model/
        peft_modules.py:KeepLoRA.get_delta_weight, the layer scale in the merge too;
        @a17f9c2:MTIL/model/customClip.py:CustomCLIP.merge_keeplora_weights and
        @a17f9c2:MTIL/model/keeplora_helper.py:KeepLoRAHelper.reset_keeplora)."""
        self.base.weight += self.delta()
        self.A.zero_()
        self.B.zero_()


def layer_scales(L: int, gamma: float) -> list[float]:
    """KeepLoRA++ (@7abf7ec:MTIL/model/peft_vit.py:build_layer_scales): s_l = gamma + (1 - gamma) l / (L - 1), 1 if L = 1."""
    return [1.0] if L == 1 else [gamma + (1 - gamma) * l / (L - 1) for l in range(L)]


def add_keeplora(model: common.ClipView, args) -> dict[str, KeepLoRALinear]:
    """Freeze all of CLIP; wrap q, k, v, out of every block of both encoders. Returns name -> module."""
    for p in model.parameters():
        p.requires_grad_(False)
    lora = {}
    for tower in ("visual", "text"):
        # code: @7abf7ec:MTIL/model/peft_vit.py:ViT_Tuner.__init__ passes build_layer_scales; v2's text
        # tuner could not be read, so the text tower keeps KeepLoRA.__init__'s default layer_scale = 1.0
        # (@7abf7ec:MTIL/model/peft_modules.py), as v1's Text_Tuner.__init__ (@a17f9c2:MTIL/model/peft_text.py)
        scaled = tower == "visual" or args.scale_text
        s = layer_scales(len(model.blocks(tower)), args.gamma if scaled else 1.0)
        for name, base in model.layers(towers=(tower,), kinds=ADAPTED_KINDS, proj=False).items():
            lora[name] = KeepLoRALinear(base, args.rank, args.alpha, s[int(name.split(".")[1])])
            model.set_layer(name, lora[name])
    return lora


# ---------------------------------------------------------------------------------------------
# ---- PAPER: energy ranks, W_p, the residual A, the GPM update (@a17f9c2:MTIL/model/prin_subspace.py,
#      @a17f9c2:MTIL/trainer/trainer.py:Trainer.in_proj_weight_process / out_proj_weight_process) ----
# ---------------------------------------------------------------------------------------------

LA = torch.float64           # CHOICE: subspace linear algebra in float64 (d <= 768: cheap), bases stored fp32
SATURATION_TOL = 1e-6        # CHOICE: skip a module whose residual energy
                             # ||(I - M'M'^T) G||^2 is below this fraction of ||G||^2 (M' saturated)


def energy_rank_below(sigma2: torch.Tensor, eps: float) -> int:
    """Code rule (@a17f9c2:MTIL/model/prin_subspace.py:PrinSubspace._update_prin_subspace, its
    first-task branch): k = max(1, #{i : sum_{j<=i} sigma_j^2 / sum sigma^2 < eps}), so the top-k
    directions hold slightly LESS than eps; eps <= 0 -> 0: no W_p (the code skips thresholds
    <= 1e-8 in PrinSubspace.update_prin_subspace)."""
    if eps <= 0:
        return 0
    lam = torch.sort(sigma2.clamp(min=0).to(LA), descending=True).values
    if lam.sum() <= 0:
        return 0
    cum = torch.cumsum(lam, 0) / lam.sum()                                  # cumulative energy
    return max(1, int((cum < eps).sum()))


def principal_subspace(W: torch.Tensor, eps: float, side: str) -> torch.Tensor:
    """W_p, orthonormal (d_in, p), before task 1 (MaolinLuo/KeepLoRA@a17f9c2:MTIL/trainer/
    framework4MTIL.py:Framework4MTIL.train_and_evaluate at task_id == 0: PrinSubspace.
    update_prin_subspace on prin_subspace_helper.py:get_accumulated_weight_matrix_list with the
    *_prin_subspace_threshold2 values). W: PyTorch weight (d_out, d_in), square here.
    side 'code': left singular vectors of the PyTorch weight (output space, used on the input
    side as the official CLIP code does); 'paper': right singular vectors (input space, as
    @a17f9c2:MCITlib/KeepLoRA/llava/train/extract_weights.py:extract_weights)."""
    U, S, Vh = torch.linalg.svd(W.to(LA))                                   # W = U diag(S) Vh
    basis = U if side == "code" else Vh.T                                   # (d, d)
    return basis[:, :energy_rank_below(S ** 2, eps)].float()                # (d_in, p)


def residual_A(G: torch.Tensor, M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A and B0 from the residual gradient (MaolinLuo/KeepLoRA@a17f9c2:MTIL/trainer/trainer.py:
    Trainer.in_proj_weight_process / Trainer.out_proj_weight_process: grad - (M'M'^T) grad, then
    A = U[:, :r], B = S_r V_r^T of its SVD). G: task gradient in code orientation (d_in, d_out);
    M = M': (d_in, k) orthonormal. Returns A (d_in, r) with orthonormal columns orthogonal to M'
    (zero columns where the residual is exhausted), B0 = S_r V_r^T = A^T G_hat (r, d_out), and the
    kept energy ||G_hat||^2 / ||G||^2. A spans the top-r left singular directions of G_hat: no
    rank-r basis orthogonal to M' holds more of G's energy (tests/test_keeplora.py checks it)."""
    G, M = G.to(LA), M.to(LA)
    d_in = G.shape[0]
    A = torch.zeros(d_in, r, dtype=LA, device=G.device)
    G_hat = G - M @ (M.T @ G)                                               # (I - M'M'^T) G: (d_in, d_out)
    total, resid = (G ** 2).sum(), (G_hat ** 2).sum()
    kept = float(resid / total) if total > 0 else 0.0
    r_eff = min(r, d_in - M.shape[1], min(G.shape))                        # CHOICE: cap r at d_in - rank(M')
    if r_eff > 0 and total > 0 and resid > SATURATION_TOL * total:
        U = torch.linalg.svd(G_hat, full_matrices=False)[0][:, :r_eff]    # top-r left singular vectors (d_in, r_eff)
        U = U - M @ (M.T @ U)                                               # CHOICE: re-project against M' (round-off)
        good = U.norm(dim=0) > 0.5                                          # a unit column mostly inside M' is noise
        Q, R = torch.linalg.qr(U[:, good])                                  # re-orthonormalise (d_in, n_good)
        A[:, :int(good.sum())] = Q * torch.sign(torch.diagonal(R))         # signs as in U (QR sign fix)
    B0 = A.T @ G_hat                                                        # = S_r V_r^T: (r, d_in)(d_in, d_out)
    return A.float(), B0.float(), kept


def gpm_extend(M: torch.Tensor, K: torch.Tensor, eps_f: float) -> torch.Tensor:
    """The GPM-style update after a task (MaolinLuo/KeepLoRA@a17f9c2:MTIL/model/prin_subspace.py:
    PrinSubspace._update_prin_subspace). M = M': (d, k) orthonormal; K = X X^T: (d, d) with X (d, n)
    the module's feature matrix. Returns [M', U_hat[:, :k']] re-orthonormalised, where U_hat are the
    left singular vectors of X_hat = (I - M'M'^T) X and k' is the fewest that bring the energy of
    X inside the basis to eps_f (M' empty: the code's first-task rule, energy_rank_below)."""
    K, M0 = K.to(LA), M.to(LA)
    d = K.shape[0]
    total = torch.trace(K)
    if total <= 0:
        return M
    R = torch.eye(d, dtype=LA, device=K.device) - M0 @ M0.T                # I - M'M'^T: (d, d)
    K_hat = R @ K @ R                                                       # X_hat X_hat^T: (d, d)
    lam, U_hat = torch.linalg.eigh(K_hat)                                   # lam = s_hat^2 (ascending)
    lam, U_hat = lam.flip(0).clamp(min=0), U_hat.flip(1)                    # descending
    if M.shape[1] == 0:
        k = energy_rank_below(lam, eps_f)
    else:
        acc0 = 1 - torch.trace(K_hat) / total                               # energy of X already in span(M')
        before = acc0 + torch.cumsum(lam, 0) / total - lam / total          # energy held before adding i
        k = int(((before < eps_f) & (lam > 0)).sum())                       # code: add while acc < eps_f
    k = min(k, d - M.shape[1])                                              # at most d_in columns in all
    if k == 0:
        return M
    # DEVIATION: re-orthonormalise [M', U_hat_k] (QR); the code concatenates only.
    return common.orthonormalize(torch.cat([M0, U_hat[:, :k]], 1)).float()  # (d, k + k')


# ---------------------------------------------------------------------------------------------
# ---- PAPER: task loss, gradient estimate and feature statistics (@a17f9c2:MTIL/trainer/trainer.py:
#      Trainer.estimate_gradient, @a17f9c2:MTIL/model/keeplora_helper.py:KeepLoRAHelper.accumulate_features_for_task) ----
# ---------------------------------------------------------------------------------------------


def task_loss(model: common.ClipView, images, labels, task, device, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Code (@a17f9c2:MTIL/model/customClip.py:CustomCLIP.forward, trainer.py:Trainer.train_one_task):
    plain CE of logit_scale * cos(image, text) over the task's classes, templates[0]. `tokens`:
    the class prompts' tokens when the caller built them once (common.class_tokens)."""
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    text = common.class_text_features(model, task.classnames, task.templates[0], device, tokens)  # (C, e)
    img = model.encode_image(images, normalize=True)                       # (N, e)
    return F.cross_entropy(model.logit_scale.exp() * img @ text.T, labels)  # logits (N, C)


def full_loader(task, batch_size: int, seed: int, args, device):
    """Shuffled, drop_last (the code's accum_loader, @a17f9c2:MTIL/trainer/framework4MTIL.py:
    Framework4MTIL.train_and_evaluate), batch capped at the split size."""
    return common.make_loader(task.train, min(batch_size, len(task.train)), shuffle=True, seed=seed,
                              workers=args.workers, drop_last=True, device=device)


def estimate_gradient(model, lora: dict[str, KeepLoRALinear], batches, task, device,
                      amp: str = "off") -> dict[str, torch.Tensor]:
    """G = mean over batches of dL/dW at the merged weights, LoRA off (MaolinLuo/KeepLoRA@a17f9c2:
    MTIL/trainer/trainer.py:Trainer.estimate_gradient). Returns name -> G in code orientation
    (d_in, d_out)."""
    Ws = [m.base.weight for m in lora.values()]
    for m, W in zip(lora.values(), Ws):
        m.enabled = False
        W.requires_grad_(True)
    n = 0
    tokens = common.class_tokens(model, task.classnames, task.templates[0], device)  # (C, L) once
    for images, labels in batches:
        with common.autocast(device, amp):                                  # the code: fp16 autocast, no scaler
            loss = task_loss(model, images, labels, task, device, tokens)
        loss.backward()                                                     # sums dL_b/dW into W.grad
        n += 1
    G = {name: W.grad.T / max(n, 1) for name, W in zip(lora, Ws)}          # (d_out, d_in) -> (d_in, d_out)
    for m, W in zip(lora.values(), Ws):
        W.requires_grad_(False)
        W.grad = None
        m.enabled = True
    return G


@torch.no_grad()
def feature_moments(lora: dict[str, KeepLoRALinear], forwards, stat: str) -> dict[str, torch.Tensor]:
    """K = X X^T (d_in, d_in) per module from its inputs over `forwards` (callables), the matrix
    MaolinLuo/KeepLoRA@a17f9c2:MTIL/model/prin_subspace.py:PrinSubspace._update_prin_subspace
    decomposes after a task. stat 'sum' (code, @a17f9c2:MTIL/model/peft_modules.py:
    KeepLoRA.accumulate_features): X = mean over batches of the aligned token matrices X_b
    (d_in, N*L), so K = X X^T; 'covariance': K = sum_b X_b X_b^T (every token).
    q, k, v read the same LN_1 output: their statistics are gathered once, from q."""
    src = {n: n.replace("attn.k", "attn.q").replace("attn.v", "attn.q") for n in lora}
    modules = {s: lora[s] for s in set(src.values())}
    if stat == "covariance":                                                # K = sum_b X_b X_b^T (every token)
        K = common.accumulate_grams(lambda fwd: fwd(), forwards, modules, dtype=LA)
    else:
        acc: dict[str, torch.Tensor] = {}
        n = 0

        def hook(name, x):                                                  # x: (N, L, d_in)
            acc[name] = acc[name] + x if name in acc else x.clone()

        with common.input_hooks(modules, hook):
            for fwd in forwards:
                fwd()
                n += 1
        K = {}
        for s, a in acc.items():
            X = (a / n).reshape(-1, a.shape[-1]).to(LA)                     # X^T: (N*L, d_in)
            K[s] = X.T @ X                                                  # (d_in, d_in)
    return {name: K[s] for name, s in src.items() if s in K}


# ---------------------------------------------------------------------------------------------
# ---- PLUMBING: setup (data, CLIP, the method's state between tasks) ----
# ---------------------------------------------------------------------------------------------


def setup(args, device):
    """Check the data, load CLIP, wrap q, k, v, out in KeepLoRA branches, load the tasks (eval
    transform for training: the code does not augment) with KeepLoRA's template lists on MTIL.
    The method's state: the LoRA modules and M' per module, which starts as W_p of the untouched
    weights (a resumed run replaces both W and M' in restore); the held-out pairs of the alignment
    metrics with the untouched CLIP's values (common.Alignment)."""
    common.check_data(args)
    model = common.setup_model(args, device)
    lora = add_keeplora(model, args)
    tasks = common.load_tasks(args, model, train_transform="eval")         # the code: no augmentation
    if args.benchmark == "mtil" and args.template_list == "keeplora":
        for task in tasks:
            task.templates = list(data.KEEPLORA_TEMPLATES.get(task.name, task.templates))
    M = {n: principal_subspace(m.base.weight, args.eps_w_vision if n.startswith("visual.") else args.eps_w_text,
                               args.principal_side) for n, m in lora.items()}  # M'_0 = W_p, before task 1
    return model, tasks, {"lora": lora, "M": M, "align": common.Alignment(model, args, device)}


# ---------------------------------------------------------------------------------------------
# ---- PAPER: one task: init A, B from the residual gradient, train B
#      (@a17f9c2:MTIL/trainer/trainer.py:Trainer.train_one_task, Trainer.build_optimizer) ----
# ---------------------------------------------------------------------------------------------


def init_task(model, lora, M, task, t: int, args, device) -> dict:
    """The task start (MaolinLuo/KeepLoRA@a17f9c2:MTIL/trainer/trainer.py:Trainer.train_one_task,
    before the epochs): G from the task's data (Trainer.estimate_gradient), A = top-r residual
    directions and B0 (Trainer.init_keeplora_with_grad), the v1 weight shift
    (@a17f9c2:MTIL/model/customClip.py:CustomCLIP.subtract_keeplora_weights)."""
    batch_size = hparams(args, task, t).batch_size
    t0 = time.time()
    loader = full_loader(task, batch_size, args.seed * 1000 + t + 500, args, device)
    batches = (b for i, b in enumerate(loader) if args.grad_batches is None or i < args.grad_batches)
    G = estimate_gradient(model, lora, batches, task, device, args.amp)
    t1 = time.time()
    kept = []
    with torch.no_grad():
        for name, m in lora.items():
            # --protect off (ablation): an empty M' (d_in, 0), so A = top-r directions of G itself
            M_t = M[name] if args.protect == "on" else M[name][:, :0]
            A, B0, k = residual_A(G[name], M_t, args.rank)                 # (d_in, r), (r, d_out)
            kept.append(k)
            m.A.copy_(A.T)                                                  # A^T: (r, d_in)
            if args.b_init == "svd":                                        # KeepLoRA (v1): B0 = S_r V_r^T and
                m.B.copy_(B0.T)                                             # B^T: (d_out, r)
                m.base.weight -= m.delta()                                  # W <- W - s (alpha/r) A B0: f unchanged
            else:                                                           # KeepLoRA++ (v2): B0 = 0
                m.B.zero_()
    return {"grad_seconds": round(t1 - t0, 2), "svd_seconds": round(time.time() - t1, 2),
            "residual_grad_energy": round(sum(kept) / len(kept), 4)}


def train_task(model: common.ClipView, method: dict, task, t: int, args, device) -> dict:
    lora, M = method["lora"], method["M"]
    info = init_task(model, lora, M, task, t, args, device)
    hp = hparams(args, task, t)
    params = [m.B for m in lora.values()]                                   # only B is trained
    opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.lr, total_steps=hp.iterations)  # code: defaults
    batches = common.forever(common.make_loader(task.train, hp.batch_size, shuffle=True, seed=args.seed * 1000 + t,
                                                workers=args.workers, device=device))
    tokens = common.class_tokens(model, task.classnames, task.templates[0], device)  # (C, L) once per task
    scaler = common.grad_scaler(device, args.amp)                           # the code: GradScaler with fp16
    losses = common.LossLog(task.name, hp.iterations, device)               # read every 50 steps, not every step
    model.train()
    t0 = time.time()
    for step in common.progress(range(hp.iterations), args.progress, desc=task.name, leave=False):
        images, labels = next(batches)
        with common.autocast(device, args.amp):
            loss = task_loss(model, images, labels, task, device, tokens)
        losses.add(loss, step)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
    model.eval()
    loss = losses.mean(hp.iterations)
    info["train_seconds"] = round(time.time() - t0, 2)
    return {"loss": loss, "trainable_params": common.trainable_params(model), **info}


# ---------------------------------------------------------------------------------------------
# ---- PAPER: after the task: merge and reset, extend M' with the task's features
#      (@a17f9c2:MTIL/trainer/framework4MTIL.py:Framework4MTIL.train_and_evaluate) ----
# ---------------------------------------------------------------------------------------------


def after_task(model: common.ClipView, method: dict, task, t: int, args, device) -> dict:
    """Merge and reset every LoRA (the code: Trainer.save_model merges, then
    KeepLoRAHelper.reset_keeplora), one feature pass over the task (vision: its training split;
    text: its class prompts; KeepLoRAHelper.accumulate_features_for_task), then the GPM update of
    M' (PrinSubspace.update_prin_subspace with eps_f)."""
    lora, M = method["lora"], method["M"]
    for m in lora.values():
        m.merge_and_reset()                                                 # LoRA off afterwards
    t0 = time.time()
    batch_size = hparams(args, task, t).batch_size
    # CHOICE: the feature pass reuses a seeded shuffled drop_last loader (the code's accum_loader).
    loader = full_loader(task, batch_size, args.seed * 1000 + t + 700, args, device)
    vis = {n: m for n, m in lora.items() if n.startswith("visual.")}
    txt = {n: m for n, m in lora.items() if n.startswith("text.")}
    vis_forwards = (lambda b=b: model.encode_image(b[0].to(device, non_blocking=True))
                    for i, b in enumerate(loader) if args.feature_batches is None or i < args.feature_batches)
    with common.autocast(device, args.amp):                                 # the code: fp16 autocast
        K = feature_moments(vis, vis_forwards, args.feature_stat)           # vision: the training split
        # DEVIATION: text positions stop at the longest prompt (common's tokenizer), not all 77.
        K.update(feature_moments(txt, [lambda: model.encode_texts(
            [task.templates[0].format(c) for c in task.classnames], device)], args.feature_stat))  # class prompts
    for name in lora:
        M[name] = gpm_extend(M[name], K[name], args.eps_f)                  # M' <- [M', U_hat_k]
    frac = {tw: sum(M[n].shape[1] / M[n].shape[0] for n in M if n.startswith(tw))
            / sum(n.startswith(tw) for n in M) for tw in ("visual", "text")}
    return {"feature_seconds": round(time.time() - t0, 2),
            "protected_frac_visual": round(frac["visual"], 4), "protected_frac_text": round(frac["text"], 4)}


# ---------------------------------------------------------------------------------------------
# ---- PLUMBING: evaluation, checkpoint, main (setup, loop over tasks, evaluate, save) ----
# ---------------------------------------------------------------------------------------------


def evaluate(model: common.ClipView, method: dict, tasks: list, t: int, args, device) -> tuple[list[float], dict]:
    """The accuracy row after task t (t = -1: zero-shot): every dataset's zero-shot head, on the
    merged weights (the LoRA is zero between tasks), templates[0] and fp16 autocast as the code
    (@a17f9c2:MTIL/trainer/trainer.py:Trainer.evaluate_one); the alignment metrics on the
    held-out pairs (common.Alignment), through the same plain encoders: the task's LoRA is
    merged into W and zero by now."""
    return common.evaluate_all(model, tasks, args, device, t), method["align"].info(model, t, args, device)


def checkpoint(model: common.ClipView, method: dict) -> dict:
    """The merged q, k, v, out weights and M' per module (the rest of CLIP never changes)."""
    return {"W": {n: m.base.weight.detach().cpu() for n, m in method["lora"].items()},
            "M": {n: method["M"][n].cpu() for n in method["lora"]}}


def restore(model: common.ClipView, method: dict, state: dict, args, device) -> None:
    with torch.no_grad():
        for n, m in method["lora"].items():
            m.base.weight.copy_(state["W"][n])
    for n in method["lora"]:
        method["M"][n] = state["M"][n].to(device)


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
