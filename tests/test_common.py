"""Tests of common.py: CLIP view parity, text-context cut, LoRA, Gram hooks, linear algebra,
metrics, run folder."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import common
import data

FAST = settings(max_examples=25, deadline=None)


# ---- CLIP view -----------------------------------------------------------------------------

def test_view_parity_with_open_clip():
    torch.manual_seed(0)
    plain = common.open_clip.create_model("ViT-B-32", pretrained=None, **data.TOY_CLIP_CFG).eval()
    view = common.ClipView(copy.deepcopy(plain), common.open_clip.get_tokenizer("ViT-B-32", context_length=20), 20).eval()
    x = torch.randn(3, 3, 32, 32)
    texts = ["a red circle", "a photo of a big blue star on a striped background", "x"]
    tok = view.tokenizer(texts)
    with torch.no_grad():
        assert torch.allclose(plain.encode_image(x), view.encode_image(x), atol=1e-5)
        assert torch.allclose(plain.encode_text(tok), view.encode_text(tok), atol=1e-5)


def test_adapted_layers_are_called_and_canonical(tiny_clip):
    layers = tiny_clip.layers()
    n_vis, n_txt = len(tiny_clip.blocks("visual")), len(tiny_clip.blocks("text"))
    assert len(layers) == 6 * (n_vis + n_txt) + 1
    assert list(layers)[:7] == [f"visual.0.{k}" for k in common.ClipView.KINDS] + ["visual.1.attn.q"]
    assert all(isinstance(m, nn.Linear) for m in layers.values())
    called = set()
    with common.input_hooks(layers, lambda n, x: called.add(n)):
        tiny_clip.encode_image(torch.randn(2, 3, 32, 32))
        tiny_clip.encode_texts(["a red circle"], "cpu")
    assert called == set(layers)


def test_set_layer_changes_output(tiny_clip):
    x = torch.randn(2, 3, 32, 32)
    before = tiny_clip.encode_image(x).detach()
    lin = tiny_clip.get_layer("visual.1.mlp.c_fc")

    class Shifted(nn.Module):            # a wrapper the way the methods wrap: base + a branch
        def __init__(self, base):
            super().__init__()
            self.base, self.shift = base, nn.Parameter(torch.zeros(base.out_features))

        def forward(self, x):
            return self.base(x) + self.shift

    wrap = Shifted(lin)
    tiny_clip.set_layer("visual.1.mlp.c_fc", wrap)
    assert torch.equal(tiny_clip.encode_image(x).detach(), before)     # zero branch: unchanged
    with torch.no_grad():
        wrap.shift.normal_()
    assert not torch.allclose(tiny_clip.encode_image(x), before)
    assert tiny_clip.get_layer("visual.1.mlp.c_fc") is wrap


def test_text_context_cut_is_exact(tiny_clip):
    texts = ["a", "a small red circle in the top left on a dark striped background", "two words"]
    full = tiny_clip.tokenizer(texts)
    cut = tiny_clip.tokenize(texts)
    assert cut.shape[1] < full.shape[1] and torch.equal(cut, full[:, :cut.shape[1]])
    with torch.no_grad():
        assert torch.allclose(tiny_clip.encode_text(full), tiny_clip.encode_text(cut), atol=1e-5)


# ---- Gram hooks ----------------------------------------------------------------------------------

def test_gram_hooks_match_direct_computation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    batches = [torch.randn(5, 7, 4) for _ in range(3)]   # (N, tokens, d): all tokens count
    grams = common.accumulate_grams(lambda b: net(b), batches, {"l0": net[0], "l2": net[2]})
    X0 = torch.cat([b.reshape(-1, 4) for b in batches]).double()
    X2 = torch.cat([torch.relu(net[0](b)).reshape(-1, 6) for b in batches]).double().detach()
    assert torch.allclose(grams["l0"], X0.T @ X0, atol=1e-8)
    assert torch.allclose(grams["l2"], X2.T @ X2, atol=1e-6)
    g32 = common.accumulate_grams(lambda b: net(b), batches, {"l0": net[0]}, dtype=torch.float32)
    assert g32["l0"].dtype == torch.float32


# ---- linear algebra -----------------------------------------------------------------------------

@FAST
@given(d=st.integers(2, 10), k=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_orthonormalize_spans_the_columns_and_drops_repeats(d, k, seed):
    k = min(k, d)
    torch.manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0][:, :k]
    X = torch.cat([U, 2 * U, U[:, :1] - U[:, -1:]], 1)                      # rank k, k + 1 extra columns
    Q = common.orthonormalize(X)
    assert Q.shape == (d, k), "one column per dimension of the span"
    assert torch.allclose(Q.T @ Q, torch.eye(k, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(Q @ (Q.T @ U), U, atol=1e-10), "the span is kept"


# ---- metrics ---------------------------------------------------------------------------------------

@pytest.mark.ex1
def test_metrics_hand_computed():
    A = [[10, 20, 30], [40, 50, 60], [70, 80, 90]]
    m = common.mtil_metrics(A)
    # Transfer: d=2 -> A[0,1]=20; d=3 -> mean(A[0,2], A[1,2]) = 45; mean = 32.5
    assert m["transfer"] == pytest.approx(32.5)
    assert m["average"] == pytest.approx(50.0)
    assert m["last"] == pytest.approx(80.0)
    assert m["transfer_per_dataset"] == [20.0, 45.0]


@pytest.mark.ex1
def test_metrics_partial_run():
    A = [[10, 20, 30, 40], [50, 60, 70, 80]]     # stopped after 2 of 4 tasks
    m = common.mtil_metrics(A)
    # d=2: 20; d=3: mean(30, 70)=50; d=4: mean(40, 80)=60  -> 43.33
    assert m["transfer"] == pytest.approx((20 + 50 + 60) / 3)
    assert m["average"] == pytest.approx(np.mean(A))
    assert m["last"] == pytest.approx(65.0)


@pytest.mark.ex1
def test_metrics_zero_shot_repeated_rows():
    z = [24.3, 88.4, 68.2, 44.6, 54.9, 71.0, 88.5, 59.4, 89.0, 64.7, 65.2]   # ZSCL's CLIP ViT-B/16
    m = common.mtil_metrics([z] * 11)
    assert round(m["transfer"], 1) == 69.4 and round(m["average"], 1) == 65.3 and round(m["last"], 1) == 65.3


# ---- the run folder ----------------------------------------------------------------------------------

def _args(tmp_path, **kw):
    p = common.common_parser("x")
    a = common.finalize_args(p.parse_args(["--benchmark", "toy", "--out", str(tmp_path / "run")]), "x", {})
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def test_run_folder_checkpoint_resume_and_errors(tmp_path, capsys):
    args = _args(tmp_path)
    tasks = [data.Task(n, [], [], [], []) for n in ("a", "b")]
    plan = [common.HParams(5, 4, 1e-3), common.HParams(6, 4, 2e-3, warmup=1)]
    run = common.Run(args, tasks, plan)
    run.set_zero_shot([1.0, 2.0], {"gap": 0.5, "note": "printed only"})
    run.finish_task(0, [3.0, 4.0], {"w": torch.ones(2)}, {"trainable_params": 7, "loss": 0.25, "note": "from training"},
                    {"k": 3, "note": "from after_task"}, {})
    out = capsys.readouterr().out
    assert "printed only" in out and "loss 0.250" in out, "the zero-shot note and the loss are printed"
    assert "from training" in out and "from after_task" in out, "every hook's note is printed"
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["acc_matrix"] == [[3.0, 4.0]] and s["zero_shot"] == [1.0, 2.0] and s["trainable_params"] == 7
    assert s["loss"] == [0.25] and s["k"] == [3] and "note" not in s, "per-task info lists; notes are not saved"
    assert s["zero_shot_info"] == {"gap": 0.5}
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["per_task"] == [{"task": "a", "iterations": 5, "batch_size": 4, "lr": 1e-3, "warmup": 0,
                                "schedule": "cosine"},
                               {"task": "b", "iterations": 6, "batch_size": 4, "lr": 2e-3, "warmup": 1,
                                "schedule": "cosine"}], "config.json must hold the resolved per-task values"
    assert (tmp_path / "run" / "acc_matrix.png").is_file()
    assert (tmp_path / "run" / "acc_matrix.csv").read_text().splitlines()[1] == "a,3.00,4.00"
    with pytest.raises(common.UserError, match="already holds a run"):
        common.Run(args, tasks, plan)
    args.resume = True
    r2 = common.Run(args, tasks, plan)
    assert r2.start_task == 1 and torch.equal(r2.state["w"], torch.ones(2))
    args.seed = 3
    with pytest.raises(common.UserError, match="--seed"):
        common.Run(args, tasks, plan)
    args.seed = 42
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(common.UserError, match="corrupt"):
        common.Run(args, tasks, plan)


def test_bad_numbers_are_user_errors(tmp_path):
    p = common.common_parser("x")
    for bad in (["--iterations", "0"], ["--lr", "-1"], ["--batch-size", "-3"]):
        with pytest.raises(common.UserError):
            common.finalize_args(p.parse_args(bad), "x", {})


def test_toy_pretraining_is_a_function_of_its_seed_only(tmp_path, monkeypatch):
    """The cached toy CLIP must not depend on the caller's RNG state (its initial weights must
    not come from the global stream), and a run that pretrains must leave the
    caller's RNG streams exactly as a run that finds the cache does."""
    import random as pyrandom

    import numpy as np
    recipe = {"steps": 2, "batch_size": 8, "lr": 1e-3, "warmup": 1, "weight_decay": 0.1}

    def load(caller_seed):
        torch.manual_seed(caller_seed)
        pyrandom.seed(caller_seed)
        np.random.seed(caller_seed)
        m = common.load_clip(common.TOY_MODEL, "toy", "cpu", toy_pretrain=recipe, progress_bar=False)
        return m, (torch.random.get_rng_state(), pyrandom.random(), np.random.rand())

    weights = []
    for i, caller_seed in enumerate((1, 2)):
        monkeypatch.setenv("CLCLIP_CACHE", str(tmp_path / f"cache{i}"))
        m, fresh = load(caller_seed)          # pretrains
        _, cached = load(caller_seed)         # reads the cache
        assert torch.equal(fresh[0], cached[0]) and fresh[1:] == cached[1:]
        weights.append({k: v.clone() for k, v in m.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
