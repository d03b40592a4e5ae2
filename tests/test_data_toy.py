"""The toy world (data.py): determinism, labels, captions, the pretraining stream."""
import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import data

VALUES = {"shape": data.TOY_SHAPES, "colour": list(data.TOY_COLOURS), "texture": data.TOY_TEXTURES,
          "position": data.TOY_POSITIONS, "size": data.TOY_SIZES, "tone": data.TOY_TONES}


def test_tasks_are_deterministic_labelled_and_balanced():
    for name, (_, classnames, templates) in data.TOY_TASKS.items():
        a, b = data.toy_task(name, n_train=300, n_test=50), data.toy_task(name, n_train=300, n_test=50)
        assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.targets, b.test.targets)
        assert a.classnames == classnames and all("{}" in t for t in templates)
        counts = torch.bincount(a.train.targets, minlength=len(classnames))
        assert len(counts) == len(classnames) and counts.min() > 0, f"{name}: a class never drawn"
        assert not torch.equal(a.train.images[:50], a.test.images), f"{name}: test split repeats train"
    assert sorted(data.TOY_ORDERS["I"]) == sorted(data.TOY_ORDERS["II"]) == sorted(data.TOY_TASKS)


def test_labels_are_in_the_pixels():
    """A task's label changes its images, not just its caption: class-mean images differ."""
    for name in data.TOY_TASKS:
        task = data.toy_task(name, n_train=400, n_test=10)
        x, y = task.train.images, task.train.targets
        means = torch.stack([x[y == c].mean(0) for c in range(len(task.classnames))])  # (C, 3, 32, 32)
        gaps = (means[:, None] - means[None]).abs().mean((2, 3, 4))                   # (C, C)
        off = gaps[~torch.eye(len(means), dtype=torch.bool)]
        assert off.min() > 0.01, f"{name}: two classes with the same mean image"


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_captions_only_name_the_image_s_own_values(seed):
    g, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    a = data.toy_attributes(4, g)
    for i in range(4):
        codes = {k: int(v[i]) for k, v in a.items()}
        caption = f" {data.toy_caption(codes, rng)} "
        for attr, words in VALUES.items():
            named = [w for w in words if f" {w} " in caption]
            assert named in ([], [words[codes[attr]]]), (caption, attr, named)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_render_paints_the_object_colour(seed):
    """Where the shape mask is, the pixel is the object's colour (up to jitter and noise): the
    pixel nearest the object's centre is closer to its colour than to any other palette colour
    more often than not, over a batch."""
    g = torch.Generator().manual_seed(seed)
    n = 64
    a = data.toy_attributes(n, g)
    a["shape"] = torch.zeros(n, dtype=torch.long)          # circles: the centre is always inside
    a["size"] = torch.full((n,), 2)                        # large: radius >= 9 > the 2 px centre jitter
    img = data.toy_render(a, torch.Generator().manual_seed(seed))
    qx = torch.tensor([0.27, 0.73, 0.27, 0.73])[a["position"]] * data.TOY_SIZE
    qy = torch.tensor([0.27, 0.27, 0.73, 0.73])[a["position"]] * data.TOY_SIZE
    centre = img[torch.arange(n), :, qy.long(), qx.long()]                               # (n, 3)
    palette = torch.tensor(list(data.TOY_COLOURS.values())).float() / 255                  # (8, 3)
    nearest = torch.cdist(centre, palette).argmin(1)
    assert (nearest == a["colour"]).float().mean() > 0.6


def test_pretraining_stream_is_a_function_of_the_seed():
    a, b = data.toy_pretraining_batches(3, 8, pool=100), data.toy_pretraining_batches(3, 8, pool=100)
    for _ in range(3):
        (xa, ca), (xb, cb) = next(a), next(b)
        assert torch.equal(xa, xb) and ca == cb
    (xc, cc) = next(data.toy_pretraining_batches(4, 8, pool=100))
    assert not torch.equal(xc, xa)
