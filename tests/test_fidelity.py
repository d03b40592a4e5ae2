"""Fidelity to the official codes on the real benchmark: the backbone's activation, each method's
resolved MTIL defaults (per task, both orders) against tables written from the official code,
its evaluation protocol (prompts, precision), its training inputs (transform, template, few-shot
images), and the numbers printed as ZSCL rounds them."""
import random
import warnings

import numpy as np
import open_clip
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import common
import data
import finetune
import gnsp
import igsp
import keeplora
import rank1_pool

I, II = data.MTIL_ORDERS["I"], data.MTIL_ORDERS["II"]

# ---- the backbone: OpenAI weights get QuickGELU, whatever path they take --------------------------


@pytest.fixture(scope="module")
def vit_b16_file(tmp_path_factory):
    """A random-weights state dict of ViT-B-16 on disk: stands in for the `openai` download."""
    torch.manual_seed(0)
    sd = open_clip.create_model("ViT-B-16", pretrained=None).state_dict()
    path = tmp_path_factory.mktemp("vitb16") / "open_clip_pytorch_model.bin"
    torch.save(sd, path)
    return path


def activations(view: common.ClipView) -> set[str]:
    return {type(blk.mlp.gelu).__name__ for tower in ("visual", "text") for blk in view.blocks(tower)}


def load_recording_warnings(*args, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        view = common.load_clip(*args, **kw)
    return view, [str(w.message) for w in caught]


@pytest.mark.slow
def test_openai_tag_gives_quickgelu_in_every_block_without_mismatch(vit_b16_file, monkeypatch):
    """`--pretrained openai` goes through open_clip's tag path (its download replaced by a local file):
    all 24 blocks of both towers must run QuickGELU and open_clip must not warn of a mismatch."""
    import open_clip.factory
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, **kw: str(vit_b16_file))
    assert common.wants_quick_gelu("ViT-B-16", "openai")
    view, msgs = load_recording_warnings("ViT-B-16", "openai", "cpu", progress_bar=False)
    assert activations(view) == {"QuickGELU"}, f"OpenAI weights built with {activations(view)}"
    assert len(list(view.blocks("visual"))) == 12 and len(list(view.blocks("text"))) == 12
    assert not [m for m in msgs if "QuickGELU mismatch" in m], msgs
    x = torch.linspace(-3, 3, 7)
    blk = view.blocks("visual")[0]
    assert torch.allclose(blk.mlp.gelu(x), x * torch.sigmoid(1.702 * x))   # the function, not only the name


@pytest.mark.slow
def test_other_sources_keep_or_get_the_right_activation(vit_b16_file, monkeypatch):
    import open_clip.factory
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, **kw: str(vit_b16_file))
    # a state-dict file for a model with an openai tag: taken as OpenAI's weights
    view, msgs = load_recording_warnings("ViT-B-16", str(vit_b16_file), "cpu", progress_bar=False)
    assert activations(view) == {"QuickGELU"}
    # a tag trained with GELU keeps GELU, and open_clip has nothing to warn about
    view, msgs = load_recording_warnings("ViT-B-16", "laion2b_s34b_b88k", "cpu", progress_bar=False)
    assert activations(view) == {"GELU"} and not [m for m in msgs if "QuickGELU" in m]
    # random init: the config's own activation
    assert not common.wants_quick_gelu("ViT-B-16", "none")
    # forcing GELU on OpenAI weights is possible, and open_clip's warning reaches the user
    view, msgs = load_recording_warnings("ViT-B-16", "openai", "cpu", progress_bar=False, quick_gelu=False)
    assert activations(view) == {"GELU"} and [m for m in msgs if "QuickGELU mismatch" in m]


def test_setup_model_records_the_resolved_activation(monkeypatch):
    seen = {}
    monkeypatch.setattr(common, "load_clip", lambda *a, **kw: seen.update(kw))
    args = finetune.parse_args(["--no-progress"])                          # MTIL: ViT-B-16, openai
    assert (args.model, args.pretrained, args.quick_gelu) == ("ViT-B-16", "openai", "auto")
    common.setup_model(args, torch.device("cpu"))
    assert args.quick_gelu == "on" and seen["quick_gelu"] is True       # config.json says what ran
    args = finetune.parse_args(["--benchmark", "toy", "--no-progress"])
    common.setup_model(args, torch.device("cpu"))
    assert args.quick_gelu == "off" and seen["quick_gelu"] is False


# ---- the resolved MTIL defaults, per method, task and order ----------------------------------------

# ZSCL scripts/finetune.sh: 1000 iterations, batch 64, lr 1e-5 (5e-5 for Aircraft and MNIST), 100 warm-up.
ZSCL_LR = {n: 5e-5 if n in ("Aircraft", "MNIST") else 1e-5 for n in I}

# GNSP configs/mtil_order_{I,II}.json: learning_rate and iterations lists, batch 64, warm-up 100.
GNSP = {
    "I": {"lr": [1e-5, 2e-5, 1e-5, 5e-5, 2e-5, 2e-5, 5e-5, 1e-5, 5e-5, 5e-5, 2e-5],
          "it": [100, 500, 1000, 500, 500, 1000, 1000, 500, 500, 1000, 1000]},
    "II": {"lr": [1e-5, 1e-5, 1e-5, 1e-5, 2e-5, 2e-5, 5e-5, 1e-5, 5e-5, 1e-5, 1e-5],
           "it": [1000, 1000, 500, 500, 1000, 1000, 1000, 500, 500, 500, 1000]},
}

# KeepLoRA MTIL/configs/keeplora_order{1,2}.yaml: epoch_list, AdamW lr 1e-3, batch 64, OneCycleLR.
KEEPLORA_EPOCHS = {"I": [10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 5], "II": [5, 2, 5, 5, 5, 5, 10, 10, 10, 10, 10]}

# DAC mtil/scripts/train/train.sh: 500 iterations, batch 32, 5-shot, lr 2e-3 (Order II: the commented list).
DAC_LR = {"I": [2e-3] * 11, "II": [2e-3, 2e-3, 1e-3, 2e-3, 2e-3, 2e-3, 3e-3, 2e-3, 2e-3, 1e-3, 3e-3]}

# MoE-Adapters scripts/train/train_{full,few}_shot_router11_experts22_1000iters.sh (Order I lrs, by dataset).
MOE_LR_FULL = dict(zip(I, [5e-3, 1e-3, 5e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-3]))
MOE_LR_FEW = dict(zip(I, [8e-3, 5e-4, 2e-4, 5e-3, 1e-3, 1e-3, 1e-2, 1e-4, 1e-2, 1e-2, 1e-2]))


class FakeTask:
    def __init__(self, name, n_train=0):
        self.name, self.train = name, range(n_train)


@pytest.mark.parametrize("order", ["I", "II"])
def test_finetune_defaults(order):
    args = finetune.parse_args(["--order", order])
    assert (args.amp, args.eval_prompts, args.label_smoothing, args.weight_decay) == ("off", "ensemble", 0.2, 0.0)
    for name in data.MTIL_ORDERS[order]:
        hp = finetune.hparams(args, FakeTask(name), 0)
        assert hp == common.HParams(1000, 64, ZSCL_LR[name], warmup=100, schedule="warmup+cosine"), name


@pytest.mark.parametrize("order", ["I", "II"])
def test_gnsp_defaults(order):
    args = gnsp.parse_args(["--order", order])
    assert (args.amp, args.eval_prompts) == ("off", "first-before")
    assert (args.rho, args.project, args.first_task, args.accumulation) == (0.15, "gradient", "full", "gnsp")
    assert (args.distill_weight, args.temperature, args.map_weight, args.label_smoothing) == (1.0, 2.0, 0.75, 0.2)
    assert (args.ref_n, args.weight_decay, args.gram_batch_size) == (1000, 0.0, 16)
    for k, name in enumerate(data.MTIL_ORDERS[order]):
        want = common.HParams(GNSP[order]["it"][k], 64, GNSP[order]["lr"][k], warmup=100, schedule="warmup+cosine")
        assert gnsp.hparams(args, FakeTask(name), k) == want, f"{name}: {gnsp.hparams(args, FakeTask(name), k)} != {want}"


@pytest.mark.parametrize("order", ["I", "II"])
@pytest.mark.parametrize("variant", ["keeplora++", "keeplora"])
def test_keeplora_defaults(order, variant):
    args = keeplora.parse_args(["--order", order, "--variant", variant])
    assert (args.amp, args.eval_prompts, args.template_list) == ("fp16", "first", "keeplora")
    assert (args.rank, args.alpha, args.eps_w_vision, args.eps_w_text, args.eps_f) == (16, 1.0, 0.85, 0.2, 0.99)
    assert (args.principal_side, args.feature_stat, args.weight_decay) == ("code", "sum", 0.01)
    assert (args.b_init, args.gamma) == (("zero", 0.2) if variant == "keeplora++" else ("svd", 1.0))
    for t, name in enumerate(data.MTIL_ORDERS[order]):
        n = 1000 + 7 * t                                                     # any training-set size
        steps = KEEPLORA_EPOCHS[order][t] * -(-n // 64)                      # epochs * ceil(n / 64)
        hp = keeplora.hparams(args, FakeTask(name, n), t)
        assert (hp.iterations, hp.batch_size, hp.lr, hp.schedule) == (steps, 64, 1e-3, "onecycle"), name


@pytest.mark.parametrize("order", ["I", "II"])
def test_rank1_pool_defaults(order):
    args = rank1_pool.parse_args(["--order", order])
    assert (args.amp, args.eval_prompts, args.few_shot, args.template) == ("off", "ensemble", 5, "random")
    assert (args.rank, args.top_k, args.merge_k, args.alpha, args.dropout) == (12, 8, 4, 1.0, 0.2)
    assert (args.router, args.ago, args.ago_lambda, args.weight_decay, args.eta_min) == ("fixed", "code", 0.1, 0.01, 1e-6)
    for k, name in enumerate(data.MTIL_ORDERS[order]):
        assert rank1_pool.hparams(args, FakeTask(name), k) == common.HParams(500, 32, DAC_LR[order][k], warmup=0,
                                                                             schedule="cosine"), name


@pytest.mark.parametrize("order", ["I", "II"])
@pytest.mark.parametrize("few", [0, 5])
def test_moe_adapters_and_igsp_defaults(order, few):
    for variant in ("moe-adapters", "igsp"):
        args = igsp.parse_args(["--order", order, "--variant", variant, "--few-shot", str(few)])
        assert (args.amp, args.eval_prompts, args.label_smoothing, args.weight_decay) == ("off", "ensemble", 0.2, 0.0)
        assert (args.warmup, args.bottleneck, args.adapter_scale, args.adapter_dropout) == (100, 64, 0.1, 0.1)
        assert (args.experts, args.top_k, args.freeze_per_task) == (22, 2, 2)
        for name in data.MTIL_ORDERS[order]:   # no Order II lrs were released: each dataset keeps its lr
            want = (500, 64, MOE_LR_FEW[name]) if few else (1000, 64, MOE_LR_FULL[name])
            hp = igsp.hparams(args, FakeTask(name), 0)
            assert (hp.iterations, hp.batch_size, hp.lr, hp.warmup) == (*want, 100), (variant, name)


# ---- training inputs: the transform, the template, few-shot images ---------------------------------


class _Stop(Exception):
    pass


@pytest.mark.parametrize("module, kwargs", [
    (finetune, {}), (gnsp, {}), (keeplora, {"train_transform": "eval"}),
    (rank1_pool, {"few_shot_once": True}), (igsp, {"few_shot_once": True})])
def test_each_script_asks_for_its_codes_training_inputs(module, kwargs, monkeypatch, tiny_clip):
    """What main asks load_tasks for on MTIL: KeepLoRA trains on the eval transform (no
    augmentation); DAC and MoE-Adapters transform their few-shot images once."""
    seen = {}

    def spy(args, model, **kw):
        seen.update(kw)
        raise _Stop

    monkeypatch.setattr(common, "check_data", lambda args: None)
    monkeypatch.setattr(module, "check_data", lambda args: None, raising=False)
    monkeypatch.setattr(common, "setup_model", lambda args, device: tiny_clip)
    monkeypatch.setattr(common, "load_tasks", spy)
    with pytest.raises(_Stop):
        module.main(["--device", "cpu", "--no-progress"])
    assert {k: v for k, v in seen.items() if v not in ("train", False)} == kwargs


def _transform_of(ds):
    while isinstance(ds, torch.utils.data.Subset):
        ds = ds.dataset
    return ds.transform


def test_load_tasks_training_transform_and_few_shot_images(tmp_path, monkeypatch):
    """train_transform='eval' gives the training split the deterministic eval transform; the
    default gives ZSCL's random crop; few_shot_once keeps one transformed draw of each image."""
    from fake_mtil import write_fake_mtil
    write_fake_mtil(tmp_path, ["EuroSAT"])
    monkeypatch.setitem(data.MTIL_ORDERS, "I", ["EuroSAT"])
    model = type("M", (), {"image_size": 32})()
    args = finetune.parse_args(["--data-root", str(tmp_path), "--order", "I"])
    names = lambda tf: [type(x).__name__ for x in tf.transforms]          # noqa: E731
    task = common.load_tasks(args, model)[0]
    assert names(_transform_of(task.train))[0] == "RandomResizedCrop"
    assert names(_transform_of(task.test))[:2] == ["Resize", "CenterCrop"]
    task = common.load_tasks(args, model, train_transform="eval")[0]
    assert names(_transform_of(task.train))[:2] == ["Resize", "CenterCrop"], "KeepLoRA: no augmentation"
    args.few_shot = 2
    task = common.load_tasks(args, model, few_shot_once=True)[0]
    assert isinstance(task.train, torch.utils.data.TensorDataset) and len(task.train) == 2 * 3
    torch.manual_seed(0)
    a = task.train[0][0]
    torch.manual_seed(1)
    assert torch.equal(a, task.train[0][0]) and a.shape == (3, 32, 32)
    assert isinstance(common.load_tasks(args, model)[0].train, torch.utils.data.Subset)


def test_rank1_pool_template_is_drawn_as_the_code_draws_it():
    """python random seeded with the seed (42), then one randint: the index per dataset below."""
    args = rank1_pool.parse_args([])
    want = {"Aircraft": 0, "Caltech101": 7, "CIFAR100": 3, "DTD": 1, "EuroSAT": 2, "Flowers": 0, "Food": 0,
            "MNIST": 0, "OxfordPet": 0, "StanfordCars": 1, "SUN397": 0}
    for name, i in want.items():
        assert rank1_pool.training_template_index(data.TEMPLATES[name], args) == i, name
    random.seed(123)                                          # the global stream plays no part
    assert rank1_pool.training_template_index(data.TEMPLATES["Caltech101"], args) == 7
    assert rank1_pool.training_template_index(data.TEMPLATES["Caltech101"], rank1_pool.parse_args(["--template", "first"])) == 0


def test_keeplora_uses_its_own_template_lists(monkeypatch, tiny_clip):
    """KeepLoRA's first sentences (its loss and every zero-shot head) for DTD, StanfordCars, SUN397."""
    assert data.KEEPLORA_TEMPLATES["DTD"][0] == "a photo of a {} thing."
    assert data.KEEPLORA_TEMPLATES["StanfordCars"][0] == "a photo of the {}, a type of car."
    assert data.KEEPLORA_TEMPLATES["SUN397"][0] == "a photo of the {}."
    for name, lst in data.KEEPLORA_TEMPLATES.items():
        assert len(lst) == len(data.TEMPLATES[name]) and lst[0] != data.TEMPLATES[name][0]
    tasks = [data.Task(n, ["a", "b"], list(data.TEMPLATES[n]), [], []) for n in I]
    seen = {}

    class Stop(Exception):
        pass

    def fake_run(args, tasks_, plan):
        seen.update({t.name: t.templates[0] for t in tasks})
        raise Stop

    monkeypatch.setattr(common, "check_data", lambda args: None)
    monkeypatch.setattr(common, "setup_model", lambda args, device: tiny_clip)
    monkeypatch.setattr(common, "load_tasks", lambda *a, **kw: tasks)
    monkeypatch.setattr(common, "Run", fake_run)
    with pytest.raises(Stop):
        keeplora.main(["--device", "cpu", "--no-progress"])
    assert seen["DTD"] == "a photo of a {} thing." and seen["SUN397"] == "a photo of the {}."
    assert seen["Aircraft"] == data.TEMPLATES["Aircraft"][0]


def test_transformed_once_keeps_one_draw(tmp_path):
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return torch.rand(3, 2, 2), i % 3
    ds = data.transformed_once(Noisy(), seed=1)
    assert torch.equal(ds[0][0], ds[0][0]) and len(ds) == 6 and [int(ds[i][1]) for i in range(6)] == [0, 1, 2, 0, 1, 2]
    assert torch.equal(data.transformed_once(Noisy(), seed=1).tensors[0], ds.tensors[0])


# ---- evaluation prompts and precision ----------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), d=st.integers(0, 10), t=st.integers(-1, 10))
def test_eval_templates_rules(n, d, t):
    T = [f"t{i} {{}}" for i in range(n)]
    assert common.eval_templates(T, d, t, "ensemble") == T
    assert common.eval_templates(T, d, t, "first") == T[:1]
    # GNSP's code: templates[0] for datasets trained before the task just trained, the ensemble otherwise
    assert common.eval_templates(T, d, t, "first-before") == (T[:1] if d < t else T)


def test_gnsp_evaluation_rows_use_the_codes_prompts(monkeypatch, tiny_clip):
    used = []
    def fake_evaluate(model, task, device, batch_size=128, workers=0, amp="off", progress_bar=False,
                      templates=None, heads=None):
        used.append((task.name, templates))
        return 0.0
    monkeypatch.setattr(common, "evaluate", fake_evaluate)
    tasks = [data.Task(n, ["a"], ["x {}", "y {}"], [], []) for n in "ABC"]
    args = gnsp.parse_args(["--benchmark", "toy"])
    common.evaluate_all(tiny_clip, tasks, args, "cpu", 1)                  # the row after task B
    assert used == [("A", ["x {}"]), ("B", ["x {}", "y {}"]), ("C", ["x {}", "y {}"])]
    used.clear()
    common.evaluate_all(tiny_clip, tasks, args, "cpu")                     # the zero-shot row
    assert all(p == ["x {}", "y {}"] for _, p in used)


def test_autocast_only_on_cuda_and_only_when_asked():
    cpu = torch.device("cpu")
    for amp in ("off", "fp16", "bf16"):
        with common.autocast(cpu, amp):
            assert not torch.is_autocast_enabled("cpu")
    assert not common.grad_scaler(cpu, "fp16").is_enabled()
    with pytest.raises(SystemExit):
        finetune.parse_args(["--amp", "on"])


@pytest.mark.slow
def test_moe_adapters_trainable_count_is_the_codes():
    """MoE-Adapters counts 22 experts per block and encoder plus its 11 pre-allocated routers and
    noise matrices (all requires_grad) on ViT-B/16: 43,625,472 + 11 * 675,840 at the first task."""
    model = common.load_clip("ViT-B-16", "none", "cpu", progress_bar=False)
    args = igsp.parse_args(["--variant", "moe-adapters", "--no-progress"])
    moes = igsp.attach_moe(model, args)
    igsp.begin_task(moes, 0, args)
    trained = common.trainable_params(model)
    assert trained == 43_625_472 + 675_840                                  # experts + this task's router
    assert igsp.moe_adapters_trainable(trained, moes, 0, 11) == 43_625_472 + 11 * 675_840 == 51_059_712


# ---- numbers as ZSCL prints them -----------------------------------------------------------------------


def test_rounding_matches_zscl_results_notebook():
    """ZSCL's zero-shot row (mtil/results.ipynb) in Order II: Transfer 65.35 prints as 65.4 there."""
    zs = dict(zip(I, [24.3, 88.4, 68.2, 44.6, 54.9, 71.0, 88.5, 59.4, 89.0, 64.7, 65.2]))
    row = [zs[n] for n in II]
    m = common.mtil_metrics([row] * 11)
    assert common.r1(m["transfer"]) == f"{np.around(m['transfer'], 1):.1f}" == "65.4"
    assert "Transfer 65.4" in common.format_table(II, [row] * 11)
    assert common.r1(65.25) == "65.2" and common.r1(88.55) == "88.6"
