"""gnsp.py -- GNSP: gradient null-space projection, contrastive distillation and modality
alignment preservation for continual learning of CLIP.

Paper:  Peng, Liu, Yang, Hong, Tian, "GNSP: Gradient Null Space Projection for Preserving
        Cross-Modal Alignment in VLMs Continual Learning", arXiv 2507.19839 (2025).
Code:   Ppp-Ttt/GNSP @ 55746ce (run_mtil.py, configs/mtil_order_{I,II}.json, src/args.py,
        src/models/finetune_gnsp.py, get_data_matrix.py, helpers.py). Only the paper's abstract
        could be read, so every default below is the official code's; file names in the comments
        (finetune_gnsp.py, get_data_matrix.py, helpers.py, run_mtil.py, configs/) are in that commit.

Idea:   Task 1 fine-tunes CLIP fully. After each task, one pass over its training images records
        the uncentered Gram matrix of the inputs of the 25 image-encoder weights that are trained
        from then on (the 24 MLP weights c_fc / c_proj and the visual projection). From task 2 on
        only those weights are trained, and their gradient is projected onto the "null space" of
        the accumulated Gram: the eigen-directions that together hold less than rho = 15 % of the
        input energy (g <- g P, P = U0 U0^T). A weight update g P barely changes the layer's
        output on inputs of earlier tasks (W x = (W - lr g P) x when P x = 0). Two losses on 64
        reference image-caption pairs (ImageNet) per step keep the zero-shot alignment of the
        original CLIP: contrastive distillation (CD) of its image<->text logits, and modality
        alignment preservation (MAP), a CLIP-style InfoNCE on the pairs.

Run:    python gnsp.py --benchmark toy                       # CPU, minutes
        python gnsp.py --order I --data-root ~/data          # MTIL (+ ImageNet train), GPU
        python gnsp.py --order II --ref-data none            # without CD / MAP (no ImageNet)
        python gnsp.py --benchmark toy --project none        # ablation: no null-space projection
        python gnsp.py --benchmark cil-cifar100 --steps 10 --data-root ~/data   # class-incremental (+ ImageNet)
        python gnsp.py --benchmark xtail --data-root ~/data  # X-TAIL; toy-cil / toy-xtail on the CPU

Structure (the hooks of finetune.py; `diff finetune.py gnsp.py` shows the method):
  setup       checks the MTIL data and ImageNet, loads CLIP and the tasks, draws the reference
              pairs, and from the untouched CLIP computes the teacher's reference logits Z0 of
              every task it will train; the held-out pairs of the alignment metrics and their
              zero-shot values as every script does (common.Alignment; on MTIL disjoint from the
              reference pairs). `method` = {refs, Z0, align, n_tasks, M}; M (the accumulated
              statistics) starts empty.
  train_task  builds the projectors P from M (task >= 2), trains the task, frees P.
  after_task  adds the task's statistics to M (not after the benchmark's last task).
  evaluate    the accuracy row, plus the alignment metrics on the held-out pairs.
  checkpoint  the weights and M (restore loads both; Z0 is recomputed by setup).
summary.json, besides the matrix: per task "loss", "protected_dims" (protected input directions,
all layers), "after_task_seconds", and, as in every script (--align-n, common.Alignment), the
paper's alignment claims made measurable on held-out image-caption pairs: "modality_gap" (the
distance between the mean image and mean caption feature), "i2t_r1", "t2i_r1" (image->text and
text->image Recall@1, %); "zero_shot_info" = the same metrics of the untouched CLIP.

Memory (ViT-B/16): the accumulated statistics M (25 matrices, 12*768^2 + 12*3072^2 + 768^2
floats = 484 MB fp32) live on the CPU and in the checkpoint; only the latest M is kept. The 25
projectors P (same size) are built on the training device by train_task at the start of each
task >= 2 and freed when it returns; the teacher (original CLIP) is only used to pre-compute its
reference logits.

Note: with AdamW, projecting the gradient (the code's default) does not keep the update in the
null space, because Adam rescales every coordinate; `--project update` projects AdamW's update
and keeps it there (tests/test_gnsp.py measures both). `--project none` switches the protection
off (an ablation: no statistics, no projector; CD and MAP unchanged).

Evaluation as the code (src/models/evaluation.py:evaluate, is_zero_shot): after task t the
zero-shot head of every dataset trained before t uses templates[0] only, task t and the later
datasets the full template ensemble; the zero-shot row uses the ensemble. fp32 throughout.
`--eval-prompts ensemble` gives ZSCL's ensemble everywhere (the protocol finetune.py uses).

Deviations from the official code (each marked `# DEVIATION:` where it happens):
  * Gram eigendecomposition with eigh in float64 (code: fp32 torch.svd of the same matrix)
  * teacher reference logits pre-computed once per task (code: a teacher forward every step)
  * reference images from a sorted file list, CLIP's ImageNet class names (marked in data.py)
Choices where paper and code are silent (`# CHOICE:`): reference seed = --seed + Order-I index
(the code's 42 + index at the default seed); the toy reference sample and toy hyper-parameters;
the held-out pairs of the alignment metrics and the metrics' definitions (common.py); float32 Gram
accumulation (as the code); class-prompt features computed once per task while the text tower
is frozen, and task and reference images in one forward pass (both give the same values).
The reference images and caption tokens are read once per task (`reference_batches`; the code
reads them on every pass of its loader; the eval transform is deterministic: the same values).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see common.py, section 1)

import time

import torch
import torch.nn.functional as F

import common
import data

# ---------------------------------------------------------------------------------------------
# ---- PLUMBING: every default (MTIL | toy) and the arguments (common flags first, then the method's) ----
# ---------------------------------------------------------------------------------------------

DEFAULTS = {  # name: (MTIL, toy). MTIL: GNSP configs/mtil_order_{I,II}.json, src/args.py. toy: CHOICE, measured, see notes/gnsp.md
    "iterations": (None, 100),                                  # MTIL: per task, "lr_iterations_per_task"
    "batch_size": (64, 64),                                     # configs: batch_size
    "lr": (None, 1e-3),                                         # MTIL: per task, "lr_iterations_per_task"
    "lr_iterations_per_task": ({                                # configs: learning_rate, iterations; per order
        "I": {"Aircraft": (1e-5, 100), "Caltech101": (2e-5, 500), "CIFAR100": (1e-5, 1000), "DTD": (5e-5, 500),
              "EuroSAT": (2e-5, 500), "Flowers": (2e-5, 1000), "Food": (5e-5, 1000), "MNIST": (1e-5, 500),
              "OxfordPet": (5e-5, 500), "StanfordCars": (5e-5, 1000), "SUN397": (2e-5, 1000)},
        "II": {"StanfordCars": (1e-5, 1000), "Food": (1e-5, 1000), "MNIST": (1e-5, 500), "OxfordPet": (1e-5, 500),
               "Flowers": (2e-5, 1000), "SUN397": (2e-5, 1000), "Aircraft": (5e-5, 1000), "Caltech101": (1e-5, 500),
               "DTD": (5e-5, 500), "EuroSAT": (1e-5, 500), "CIFAR100": (1e-5, 1000)}}, {}),
    "warmup": (100, 10),        # src/args.py warmup_length: 100 even for a 100-step task; toy: min(., iterations // 2)
    "weight_decay": (0.0, 0.0),                                 # src/args.py wd
    "label_smoothing": (0.2, 0.2),                              # configs: label_smoothing
    "first_task": ("full", "full"),                             # run_mtil.py: gnsp only for i > 0, task 1 full
    "rho": (0.15, 0.15),                                        # configs: gnsp_rho
    "project": ("gradient", "gradient"),                        # finetune_gnsp.py: the gradient is projected; none: ablation
    "accumulation": ("gnsp", "gnsp"),                           # get_data_matrix.py
    "distill_weight": (1.0, 1.0),                               # configs: distill
    "temperature": (2.0, 2.0),                                  # src/args.py T
    "map_weight": (0.75, 0.75),                                 # configs: map
    "ref_data": ("auto", "auto"),                               # configs: ref_dataset ImageNet1K
    "ref_n": (1000, 1000),                                      # configs: ref_data_nums
    "ref_batch_size": (None, None),                             # None: the task's batch size (finetune_gnsp.py)
    "gram_batch_size": (16, 16),                                # get_data_matrix.py: batch_size=16
    "gram_batches": (None, None),                               # None: the whole training split (get_data_matrix.py)
    "align_n": (1000, 1000),                                    # CHOICE: held-out pairs of the alignment metrics (common.Alignment)
    "amp": ("off", "off"),                                      # the code: fp32
    "eval_prompts": ("first-before", "first-before"),           # src/models/evaluation.py (common.eval_templates)
}

# CIL and X-TAIL (notes/protocols.md): what differs from the column above (cil, xtail: MTIL's;
# toy-cil, toy-xtail: toy's). CHOICE: a CIL step is one epoch at the source config's batch size
# (MoE-Adapters cil/configs/class/*.yaml) with the lr of GNSP's CIFAR100 task (configs:
# mtil_order_I.json, 1e-5); X-TAIL's domains keep their Order-I entries of the per-task table.
# Task-free: nothing changes, GNSP has no task id to lose: the statistics M grow per step / domain
# as per MTIL task, and every step / domain draws its own reference sample (reference_data).
PROTOCOL_DEFAULTS = {"cil": {"iterations": common.EPOCH, "batch_size": common.CIL_BATCH, "lr": 1e-5,
                             "lr_iterations_per_task": {}}}

def parse_args(argv=None):
    p = common.common_parser("gnsp", __doc__)
    g = p.add_argument_group("method")
    g.add_argument("--first-task", choices=["full", "restricted"],
                   help="task 1 trains every weight (code) or only the 25 protected ones, unprojected")
    g.add_argument("--rho", type=float, help="null space = eigen-directions holding < rho of the energy")
    g.add_argument("--project", choices=["gradient", "update", "none"],
                   help="project the raw gradient before AdamW (code) or AdamW's update (Adam-NSCL; ablation); "
                        "none: the protection off (ablation): no statistics, no projector, the 25 weights train "
                        "unprojected from task 2 on; CD and MAP unchanged")
    g.add_argument("--accumulation", choices=["gnsp", "sum"],
                   help="gnsp: sum for MLP layers, renormalise-then-add for visual.proj (code); sum: sum for all")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--distill-weight", type=float, help="lambda_CD")
    g.add_argument("--temperature", type=float, help="T of contrastive distillation")
    g.add_argument("--map-weight", type=float, help="lambda_MAP")
    g.add_argument("--ref-data", choices=["auto", "none"],
                   help="auto: ImageNet train (mtil) / toy reference split (toy); none: no CD / MAP")
    g.add_argument("--ref-n", type=int, help="reference pairs per task")
    g.add_argument("--ref-batch-size", type=int, help="reference pairs per step (default: the task's batch size)")
    g.add_argument("--gram-batch-size", type=int)
    g.add_argument("--gram-batches", type=int, help="batches of the after-task pass (default: all)")
    g.add_argument("--warmup", type=int, help="linear warm-up steps")
    g.add_argument("--weight-decay", type=float)
    args = common.finalize_args(p.parse_args(argv), "gnsp", DEFAULTS, PROTOCOL_DEFAULTS)
    if not 0 < args.rho <= 1:
        raise common.UserError(f"--rho must be in (0, 1], got {args.rho}")
    if not args.temperature > 0:
        raise common.UserError(f"--temperature must be > 0, got {args.temperature}")
    for name in ("ref_n", "ref_batch_size", "gram_batch_size", "gram_batches"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise common.UserError(f"--{name.replace('_', '-')} must be >= 1")
    return args


def hparams(args, task, t: int) -> common.HParams:
    """Task t's iterations, batch size, lr and warm-up: the flag if given, else DEFAULTS (MTIL:
    the task's entry of the order's config)."""
    d = common.defaults_for(args, DEFAULTS, PROTOCOL_DEFAULTS, task)
    lr, iterations = d["lr_iterations_per_task"].get(args.order, {}).get(task.name, (d["lr"], d["iterations"]))
    iterations = args.iterations or iterations
    # MTIL (and CIL, X-TAIL): the code's warm-up as given, even for a 100-step task (run_mtil.py);
    # the toy benchmarks: as finetune.py
    warmup = min(args.warmup, iterations // 2) if common.is_toy(args.benchmark) else args.warmup
    return common.HParams(iterations, args.batch_size or d["batch_size"], args.lr if args.lr is not None else lr,
                          warmup=warmup, schedule="warmup+cosine")


def ref_batch_size(args, task, t: int) -> int:
    """Reference pairs per step: the task's batch size, as the code (finetune_gnsp.py)."""
    return args.ref_batch_size or hparams(args, task, t).batch_size


# ---------------------------------------------------------------------------------------------
# ---- PAPER: the protected layers and the null-space projector (finetune_gnsp.py, get_data_matrix.py) ----
# ---------------------------------------------------------------------------------------------


def protected_layers(model: common.ClipView) -> dict:
    """The 25 weights trained from task 2 on (ViT-B/16): visual.{b}.mlp.c_fc, visual.{b}.mlp.c_proj
    (b = 0..11) and visual.proj. Each is an nn.Linear, weight W: (d_out, d_in), y = x W^T."""
    return model.layers(towers=("visual",), kinds=("mlp.c_fc", "mlp.c_proj"), proj=True)


def set_trainable(model: common.ClipView, t: int, args) -> bool:
    """finetune_gnsp.py: task 1 trains everything but logit_scale; later tasks only the protected weights
    (no biases, LayerNorms, attention or text tower). Returns whether the text tower trains."""
    model.requires_grad_(False)
    if t == 0 and args.first_task == "full":
        model.requires_grad_(True)
        model.logit_scale.requires_grad_(False)                    # code: logit_scale never trained
        return True
    for lin in protected_layers(model).values():
        lin.weight.requires_grad_(True)
    return False


def null_space_projector(M: torch.Tensor, rho: float) -> tuple[torch.Tensor, int]:
    """P = U0 U0^T onto the eigen-directions of M (symmetric PSD, (d, d)) that hold less than rho
    of its trace (code: finetune_gnsp.py find_k_binary). k = the smallest number of top directions whose
    tail sum_{j >= k} lambda_j / sum_j lambda_j < rho (strict); these k are protected, P U_k = 0.
    Returns (P: (d, d) float32 on M's device, k). M = 0 protects nothing (P = I)."""
    # DEVIATION: eigh in float64 (code: fp32 torch.svd of the same symmetric matrix).
    lam, U = torch.linalg.eigh(M.double())                         # ascending; (d,), (d, d)
    lam, U = lam.flip(0).clamp(min=0), U.flip(1)                   # lambda_1 >= ... >= lambda_d
    tail = torch.cat([lam.flip(0).cumsum(0).flip(0), lam.new_zeros(1)])  # tail[j] = sum_{i>=j} lambda_i, (d+1,)
    k = int((tail >= rho * tail[0]).sum()) if tail[0] > 0 else 0  # tail is non-increasing
    U0 = U[:, k:]                                                  # null-space basis (d, d - k)
    return (U0 @ U0.T).float(), k                                  # (d, d)


@torch.no_grad()
def project_gradients(W: dict, P: dict) -> None:
    """g <- g P for every protected weight (finetune_gnsp.py). W: (d_out, d_in), P: (d_in, d_in): the update
    then lies in the null space of the stored inputs x (rows of X), so (W + dW) x = W x on them.
    (open_clip's visual.proj is used as x @ proj and the code projects P g; our nn.Linear holds
    proj^T, so it is the same g P as for the MLP weights.)"""
    for name, w in W.items():
        if w.grad is not None:
            w.grad.copy_(w.grad @ P[name])                         # (d_out, d_in) @ (d_in, d_in)


# ---------------------------------------------------------------------------------------------
# ---- PAPER: contrastive distillation and modality alignment preservation (helpers.py, finetune_gnsp.py) ----
# ---------------------------------------------------------------------------------------------


def contrastive_distillation(Z0: torch.Tensor, Z: torch.Tensor, T: float) -> torch.Tensor:
    """L_CD = D(Z0, Z) + D(Z0^T, Z^T) with D(A, B) = T^2 mean_i -sum_j softmax(A_i/T)_j
    log softmax(B_i/T)_j (helpers.distillation): the teacher's image->text and text->image
    distributions over the reference batch as soft targets. Z0, Z: (R, R) logits."""
    def D(A, B):
        return -(F.softmax(A / T, -1) * F.log_softmax(B / T, -1)).sum(-1).mean() * T ** 2
    return D(Z0, Z) + D(Z0.T, Z.T)


def same_caption(captions: list[str], device) -> torch.Tensor:
    """Y_ij = 1[c_i = c_j] / #{k: c_k = c_i}: pairs with the same caption are all positives (finetune_gnsp.py)."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    y = torch.tensor([ids[c] for c in captions], device=device)   # (R,)
    same = (y[:, None] == y[None, :]).float()                      # (R, R)
    return same / same.sum(1, keepdim=True)


def modality_alignment_preservation(Z: torch.Tensor, Y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """L_MAP = CE(Z, Y~) + CE(Z^T, Y~), Y~ = (1 - eps) Y + eps / R (soft targets with label
    smoothing; Y is symmetric). Z: (R, R) current logits, temperature = logit_scale."""
    return F.cross_entropy(Z, Y, label_smoothing=smoothing) + F.cross_entropy(Z.T, Y, label_smoothing=smoothing)


# ---------------------------------------------------------------------------------------------
# ---- PLUMBING: setup (data, CLIP, the method's state between tasks): reference pairs, teacher logits, alignment metrics ----
# ---------------------------------------------------------------------------------------------


def check_data(args) -> None:
    """Before loading the model: every missing dataset of the benchmark and the ImageNet reference data."""
    if common.is_toy(args.benchmark):
        return
    missing = common.missing_data(args)
    if args.ref_data != "none":
        missing += data.imagenet_missing(args.data_root)
    if missing:
        raise data.MissingDataError(missing)


def reference_data(args, tasks: list, model: common.ClipView) -> list | None:
    """Each task's reference pairs for CD and MAP, or None (--ref-data none)."""
    if args.ref_data == "none":
        return None
    if common.is_toy(args.benchmark):
        # CHOICE: one fixed toy reference sample for every task (the toy world's pretraining
        # distribution plays ImageNet's role).
        return [data.toy_reference(seed=0, n=args.ref_n, split="train")] * len(tasks)
    ev = data.clip_transforms(model.image_size)[1]
    # helpers.py:prepare_ref_dataset: 1000 ImageNet-train images per task, seed 42 + the task's index in Order I, eval transform.
    # CHOICE: seed = --seed + index (= the code's 42 + index at the default --seed 42); a CIL step
    # (no MTIL dataset) takes --seed + its step index.
    order = data.MTIL_ORDERS["I"]
    return [data.imagenet_reference(args.data_root, args.ref_n, args.seed + (order.index(task.name) if task.name in order
                                                                              else t), ev)
            for t, task in enumerate(tasks)]


@torch.no_grad()
def teacher_logits(model: common.ClipView, ref, batch_size: int, args, device) -> list[torch.Tensor]:
    """Z0 = s * u0 v0^T of the original CLIP on each (fixed, unshuffled) reference batch (finetune_gnsp.py).
    DEVIATION: computed once (deterministic eval transform), the code re-runs the teacher every step."""
    model.eval()
    Z0 = []
    for images, captions in common.make_loader(ref, batch_size, False, 0, args.workers, device=device):
        u0 = model.encode_image(images.to(device), normalize=True)  # (R, e)
        v0 = model.encode_texts(list(captions), device)             # (R, e)
        Z0.append(model.logit_scale.exp() * u0 @ v0.T)              # (R, R)
    return Z0


def reference_batches(model: common.ClipView, ref, batch_size: int, args, device) -> list[tuple]:
    """The task's fixed reference batches, read once per task: (images (R, 3, H, W) on the host,
    caption tokens (R, L) and the MAP targets same_caption (R, R) on `device`). The code reads
    them again on every pass of its loader; the eval transform is deterministic, so the images
    are the same."""
    out = []
    for images, captions in common.make_loader(ref, batch_size, False, 0, args.workers, device=device):
        out.append((images, model.tokenize(list(captions)).to(device), same_caption(list(captions), device)))
    return out


def setup(args, device):
    """Check the data, load CLIP and the tasks, draw the reference pairs, and compute from the
    untouched CLIP (before any --resume state is loaded) the teacher's reference logits of every
    task this run trains; the held-out pairs of the alignment metrics and their zero-shot values
    as every script (common.Alignment), disjoint from the reference pairs on MTIL."""
    check_data(args)
    model = common.setup_model(args, device)
    tasks = common.load_tasks(args, model)
    refs = reference_data(args, tasks, model)
    if refs is None:
        print("reference data: none -> contrastive distillation and MAP are off (CE only)", flush=True)
    # the teacher is the original CLIP: its reference logits, for each task, before any training
    Z0 = [teacher_logits(model, refs[t], ref_batch_size(args, tasks[t], t), args, device)
          for t in range(common.n_train_tasks(args, tasks))] if refs else None
    # the reference images are never held out (MTIL; toy: another split)
    seen = {f for r in refs for f in r.files} if refs and not common.is_toy(args.benchmark) and args.align_n else None
    return model, tasks, {"refs": refs, "Z0": Z0, "align": common.Alignment(model, args, device, exclude=seen),
                          "n_tasks": len(tasks), "M": {}}   # M: layer name -> accumulated statistics (d_in, d_in), CPU


# ---------------------------------------------------------------------------------------------
# ---- PAPER: GNSP, one task (finetune_gnsp.py) ----
# ---------------------------------------------------------------------------------------------


def train_loop(model: common.ClipView, task, t: int, args, device, P: dict | None = None,
               ref=None, Z0: list | None = None) -> float:
    """Train task t: CE on the task (+ CD and MAP on the reference pairs `ref` against the
    teacher logits Z0, one per reference batch), the protected weights' gradient (or update)
    projected by P (layer name -> (d_in, d_in); None: unprojected). Returns the mean loss."""
    hp = hparams(args, task, t)
    text_trains = set_trainable(model, t, args)                     # finetune_gnsp.py
    W = {n: lin.weight for n, lin in protected_layers(model).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=args.weight_decay)  # code: wd 0, betas (0.9, 0.999)
    batches = common.forever(common.make_loader(task.train, hp.batch_size, shuffle=True, seed=args.seed * 1000 + t,
                                                workers=args.workers, device=device))
    if ref is not None:   # code: fixed unshuffled reference batches, cycled
        ref_steps = reference_batches(model, ref, ref_batch_size(args, task, t), args, device)
    tokens = common.class_tokens(model, task.classnames, task.templates[0], device)  # (C, L) once per task
    if not text_trains:   # CHOICE: frozen text tower -> class features once (identical values, faster)
        with torch.no_grad():
            text = common.class_text_features(model, task.classnames, task.templates[0], device, tokens)  # (C, e)
    scaler = common.grad_scaler(device, args.amp)
    losses = common.LossLog(task.name, hp.iterations, device)       # read every 50 steps, not every step
    model.train()
    for step in common.progress(range(hp.iterations), args.progress, desc=task.name, leave=False):
        common.set_lr(opt, common.cosine_lr(step, hp.lr, hp.warmup, hp.iterations))
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        n = len(images)
        if ref is not None:   # CHOICE: task and reference images in one forward pass (same result)
            ref_images, ref_tokens, Y = ref_steps[step % len(ref_steps)]
            images = torch.cat([images, ref_images.to(device, non_blocking=True)])  # (n + R, 3, H, W)
        with common.autocast(device, args.amp):                     # off by default (the code: fp32)
            if text_trains:
                text = common.class_text_features(model, task.classnames, task.templates[0], device, tokens)  # (C, e)
            feats = model.encode_image(images, normalize=True).float()  # (n [+ R], e)
            s = model.logit_scale.exp()                              # frozen: 100 for OpenAI CLIP
            # ---- PAPER: L = L_CE + lambda_CD L_CD + lambda_MAP L_MAP (finetune_gnsp.py) ----
            loss = F.cross_entropy(s * feats[:n] @ text.float().T, labels, label_smoothing=args.label_smoothing)
            if ref is not None:
                v = model.encode_text(ref_tokens, normalize=True).float()  # (R, e) current text tower
                Z = s * feats[n:] @ v.T                              # (R, R) image->text logits
                loss = loss + args.distill_weight * contrastive_distillation(Z0[step % len(Z0)], Z, args.temperature)
                loss = loss + args.map_weight * modality_alignment_preservation(Z, Y, args.label_smoothing)
        losses.add(loss, step)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)                                         # true gradients before projecting (fp16)
        # ---- PAPER: null-space projection (finetune_gnsp.py) ----
        if P is not None and args.project == "gradient":
            project_gradients(W, P)                                  # g <- g P, then AdamW
        if P is not None and args.project == "update":
            W_old = {name: w.detach().clone() for name, w in W.items()}
            scaler.step(opt)
            with torch.no_grad():                                    # W <- W_old + (W - W_old) P
                for name, w in W.items():
                    w.copy_(W_old[name] + (w - W_old[name]) @ P[name])  # (d_out, d_in) @ (d_in, d_in)
        else:
            scaler.step(opt)
        scaler.update()
    model.eval()
    return losses.mean(hp.iterations)


def train_task(model: common.ClipView, method: dict, task, t: int, args, device) -> dict:
    """Task t with the projectors of the statistics M of the earlier tasks (none for task 1)."""
    M = method["M"]
    P, k = None, {}
    if t > 0 and M and args.project != "none":   # projectors on the training device for this task only (freed on return)
        P, k = {}, {}
        for name, M_l in M.items():
            P[name], k[name] = null_space_projector(M_l.to(device), args.rho)
    loss = train_loop(model, task, t, args, device, P, method["refs"][t] if method["refs"] else None,
                      method["Z0"][t] if method["Z0"] else None)
    note = ""
    if k:
        d = sum(M_l.shape[0] for M_l in M.values())
        note = (f"protected input directions (all {len(k)} layers): {sum(k.values())} of {d}, "
                f"visual.proj {k['visual.proj']} of {M['visual.proj'].shape[0]}")
    info = {"loss": loss, "trainable_params": common.trainable_params(model), "protected_dims": sum(k.values())}
    return {**info, "note": note} if note else info


# ---------------------------------------------------------------------------------------------
# ---- PAPER: after a task, accumulate the input statistics of the protected layers (get_data_matrix.py) ----
# ---------------------------------------------------------------------------------------------


def accumulate_statistics(model: common.ClipView, task, t: int, args, device, M: dict) -> None:
    """One pass over the task's training split (train transform, batch 16, trained model):
        S_t = sum_B G_B / ||G_B||_F,  G_B = X_B^T X_B  (X_B: all tokens of the batch, (B*L, d);
              the CLS row after ln_post for visual.proj, (B, d))
        S^_t = S_t / ||S_t||_F
        M_t = M_{t-1} + S^_t                        MLP layers
        M_t = M_{t-1} / ||M_{t-1}||_F + S^_t        visual.proj (code; --accumulation sum: plain sum)
    M (name -> (d_in, d_in) float32) is updated in place and kept on the CPU."""
    loader = common.make_loader(task.train, args.gram_batch_size, shuffle=True, seed=args.seed * 1000 + t,
                                workers=args.workers, device=device)
    model.eval()
    # CHOICE: float32 accumulation as the code; the eigendecomposition is float64.
    S = common.accumulate_grams(lambda b: model.encode_image(b[0].to(device, non_blocking=True)), loader,
                                protected_layers(model), dtype=torch.float32, max_batches=args.gram_batches,
                                per_batch=lambda name, G: G / G.norm())      # G_B / ||G_B||_F, (d, d)
    for name, S_t in S.items():
        S_hat = S_t / S_t.norm()                                      # task-level normalisation
        if name in M:
            M_prev = M[name].to(device)
            if name == "visual.proj" and args.accumulation == "gnsp":
                M_prev = M_prev / M_prev.norm()                       # recent tasks weigh more (get_data_matrix.py)
            S_hat = M_prev + S_hat
        M[name] = S_hat.cpu()


def after_task(model: common.ClipView, method: dict, task, t: int, args, device) -> dict:
    """Add task t's statistics to M, except after the benchmark's last task (nothing left to protect)
    and with --project none (nothing is projected)."""
    t0 = time.time()
    if t < method["n_tasks"] - 1 and args.project != "none":
        accumulate_statistics(model, task, t, args, device, method["M"])
    return {"after_task_seconds": round(time.time() - t0, 2)}


# ---------------------------------------------------------------------------------------------
# ---- PLUMBING: evaluation, checkpoint, main (setup, loop over tasks, evaluate, save) ----
# ---------------------------------------------------------------------------------------------


def evaluate(model: common.ClipView, method: dict, tasks: list, t: int, args, device) -> tuple[list[float], dict]:
    """The accuracy row after task t (t = -1: zero-shot; the code's prompts, common.eval_templates),
    and the alignment metrics on the held-out pairs (modality_gap, i2t_r1, t2i_r1; common.Alignment)."""
    return common.evaluate_all(model, tasks, args, device, t), method["align"].info(model, t, args, device)


def checkpoint(model: common.ClipView, method: dict) -> dict:
    return {"model": model.state_dict(), "M": method["M"]}


def restore(model: common.ClipView, method: dict, state: dict, args, device) -> None:
    model.load_state_dict(state["model"])
    method["M"] = state["M"]


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
