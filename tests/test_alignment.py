"""The alignment diagnostics every script records (common.Alignment): the metrics' definitions
(hypothesis properties against hand computation), their wiring to a real CLIP, and the held-out
pairs, which are the same for every script (toy: the toy world's held-out split; MTIL: ImageNet
images outside GNSP's reference samples, skipped with a note where ImageNet is missing)."""
import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import common
import data

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
SCRIPTS = ["finetune", "gnsp", "keeplora", "rank1_pool", "igsp"]


def unit(n, e, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, e, generator=g, dtype=torch.float64), dim=-1).float()


def brute_force(U, V_of, idx):
    """The definitions written out with numpy loops. V_of(i): the (C, e) caption features image i
    is scored against; the gap pairs each image with its own caption's feature under V_of(i)."""
    U = U.double().numpy()
    N, C = len(U), V_of(0).shape[0]
    S = np.stack([V_of(i).double().numpy() @ U[i] for i in range(N)])            # (N, C)
    pair = np.stack([V_of(i).double().numpy()[idx[i]] for i in range(N)])       # (N, e)
    i2t = 100 * np.mean([int(np.argmax(S[i]) == idx[i]) for i in range(N)])
    t2i = 100 * np.mean([int(idx[int(np.argmax(S[:, c]))] == c) for c in range(C)])
    return np.linalg.norm(U.mean(0) - pair.mean(0)), i2t, t2i


# ---- the metrics' definitions -------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(C=st.integers(2, 12), e=st.integers(8, 24), seed=st.integers(0, 10_000))
def test_identical_image_and_caption_features_give_full_recall_and_no_gap(C, e, seed):
    """Each image's feature equals its (distinct) caption's: Recall@1 100 both ways, gap 0."""
    V = unit(C, e, seed)
    assume(float((V @ V.T - torch.eye(C)).max()) < 0.999)                        # distinct captions
    idx = torch.randperm(C, generator=torch.Generator().manual_seed(seed))
    m = common.alignment_from_features(V[idx], V, idx)
    assert m == {"modality_gap": 0.0, "i2t_r1": 100.0, "t2i_r1": 100.0}


@settings(max_examples=40, deadline=None)
@given(C=st.integers(2, 12), seed=st.integers(0, 10_000), data_=st.data())
def test_permuting_the_captions_leaves_only_the_fixed_points_retrieved(C, seed, data_):
    """Images matching their captions exactly, then the captions relabelled by a permutation
    sigma: Recall@1 both ways falls to the share of sigma's fixed points (below 100 unless
    sigma = id); the gap stays 0, as every caption is still used once."""
    V = unit(C, 16, seed)
    assume(float((V @ V.T - torch.eye(C)).max()) < 0.999)
    sigma = torch.tensor(data_.draw(st.permutations(list(range(C)))))
    idx = torch.arange(C)
    m = common.alignment_from_features(V, V, sigma[idx])                         # image i now "has" caption sigma(i)
    fixed = 100 * (sigma == idx).float().mean().item()
    assert m["i2t_r1"] == pytest.approx(fixed, abs=0.01) and m["t2i_r1"] == pytest.approx(fixed, abs=0.01)
    if not torch.equal(sigma, idx):
        assert m["i2t_r1"] < 100 and m["t2i_r1"] < 100
    assert m["modality_gap"] == 0.0


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 20), C=st.integers(1, 8), e=st.integers(2, 16), seed=st.integers(0, 10_000))
def test_gap_is_the_norm_of_the_mean_difference_and_recall_the_argmax_rule(N, C, e, seed):
    """Random features, captions shared by several images: the gap equals ||mean u - mean
    v_idx||, and both recalls equal the argmax rules written out (numpy loops)."""
    U, V = unit(N, e, seed), unit(C, e, seed + 1)
    idx = torch.randint(C, (N,), generator=torch.Generator().manual_seed(seed + 2))
    gap, i2t, t2i = brute_force(U, lambda i: V, idx)
    m = common.alignment_from_features(U, V, idx)
    assert m["modality_gap"] == pytest.approx(gap, abs=1e-4)
    assert m["i2t_r1"] == pytest.approx(i2t, abs=0.01) and m["t2i_r1"] == pytest.approx(t2i, abs=0.01)


@settings(max_examples=30, deadline=None)
@given(N=st.integers(1, 16), C=st.integers(1, 6), R=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_routed_text_features_score_each_image_under_its_own_route(N, C, R, seed):
    """V per route (igsp: the MoE sits in the text tower too): image i is scored against, and
    paired with, the caption features of route[i]; one route = the plain form."""
    U = unit(N, 8, seed)
    V = {r: unit(C, 8, seed + 10 + r) for r in range(-1, R - 1)}                # routes -1 (CLIP), 0, 1...
    g = torch.Generator().manual_seed(seed + 3)
    idx, route = torch.randint(C, (N,), generator=g), torch.randint(-1, R - 1, (N,), generator=g)
    gap, i2t, t2i = brute_force(U, lambda i: V[int(route[i])], idx)
    m = common.alignment_from_features(U, V, idx, route)
    assert m["modality_gap"] == pytest.approx(gap, abs=1e-4)
    assert m["i2t_r1"] == pytest.approx(i2t, abs=0.01) and m["t2i_r1"] == pytest.approx(t2i, abs=0.01)
    assert common.alignment_from_features(U, {7: V[-1]}, idx, torch.full((N,), 7)) == \
        common.alignment_from_features(U, V[-1], idx)


def test_metrics_of_a_clip_are_those_of_its_encoders(tiny_clip):
    """alignment_metrics on a CLIP and pairs (shared captions, batches smaller than the set) =
    the definitions applied to its normalised image and caption features."""
    g = torch.Generator().manual_seed(0)
    caps = ["a red circle", "a blue square", "a red circle", "a green star", "a big red circle"] * 3
    pairs = [(torch.randn(3, 32, 32, generator=g), c) for c in caps]
    args = SimpleNamespace(eval_batch_size=4, workers=0, amp="off")
    m = common.alignment_metrics(tiny_clip, pairs, args, CPU)
    uniq = list(dict.fromkeys(caps))
    with torch.no_grad():
        U = F.normalize(tiny_clip.encode_image(torch.stack([p[0] for p in pairs])), dim=-1)
        V = F.normalize(tiny_clip.encode_text(tiny_clip.tokenize(uniq)), dim=-1)
    gap, i2t, t2i = brute_force(U, lambda i: V, torch.tensor([uniq.index(c) for c in caps]))
    assert m["modality_gap"] == pytest.approx(gap, abs=1e-4)
    assert (m["i2t_r1"], m["t2i_r1"]) == (pytest.approx(i2t, abs=0.01), pytest.approx(t2i, abs=0.01))


# ---- the held-out pairs: the same for every script ----------------------------------------------


def parse(script, *flags):
    return importlib.import_module(script).parse_args(["--out", "/nonexistent", "--no-progress", *flags])


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_takes_align_n_and_toy_pairs_are_the_toy_heldout_split(script):
    """Default 1000 (both benchmarks); toy pairs = data.toy_reference(0, n, "heldout"), whatever
    the script and --seed; --align-n 0 = off; a negative count is a one-line user error."""
    assert parse(script).align_n == parse(script, "--benchmark", "toy").align_n == 1000
    args = parse(script, "--benchmark", "toy", "--align-n", "30", "--seed", "7")
    pairs, want = common.alignment_pairs(args, None), data.toy_reference(seed=0, n=30, split="heldout")
    assert pairs.captions == want.captions and torch.equal(pairs.images, want.images)
    assert common.alignment_pairs(parse(script, "--benchmark", "toy", "--align-n", "0"), None) is None
    with pytest.raises(common.UserError, match="--align-n"):
        parse(script, "--benchmark", "toy", "--align-n", "-1")


@pytest.mark.parametrize("script", ["finetune", "keeplora", "rank1_pool", "igsp"])
def test_mtil_without_imagenet_skips_the_metrics_with_a_note(script, tmp_path, capsys):
    args = parse(script, "--data-root", str(tmp_path))
    assert common.alignment_pairs(args, SimpleNamespace(image_size=32)) is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no ImageNet" in out and "not reported" in out


def test_mtil_pairs_are_gnsp_heldout_pairs_for_every_script(tmp_path, monkeypatch):
    """With ImageNet: every script gets the held-out pairs gnsp uses at its default reference
    size, none of them in any task's reference sample. (A fake tree of 120 images: the default
    size, 1000 per task, is scaled down to gnsp's --ref-n 4 here.)"""
    sys.path.insert(0, str(ROOT / "tests"))
    import fake_mtil
    import gnsp
    fake_mtil.write_fake_imagenet(tmp_path, per_class=40)
    model = SimpleNamespace(image_size=32)
    g_args = parse("gnsp", "--data-root", str(tmp_path), "--ref-n", "4", "--align-n", "30")
    refs = gnsp.reference_data(g_args, [SimpleNamespace(name=n) for n in data.MTIL_ORDERS["I"]], model)
    seen = {f for r in refs for f in r.files}
    held = common.alignment_pairs(g_args, model, exclude=seen)
    assert len(held) == 30 and not seen & set(held.files)
    monkeypatch.setattr(common, "ALIGN_EXCLUDED_REF_N", 4)
    for script in ["finetune", "keeplora", "rank1_pool", "igsp"]:
        other = common.alignment_pairs(parse(script, "--data-root", str(tmp_path), "--align-n", "30"), model)
        assert other.files == held.files and other.captions == held.captions, script
