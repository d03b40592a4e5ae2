"""The toy world (data.py): determinism, labels, one image domain per task, captions, the
pretraining stream."""
import colorsys
import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import data


def test_tasks_are_deterministic_labelled_and_balanced():
    for name, (domain, attr, templates) in data.TOY_TASKS.items():
        a, b = data.toy_task(name, n_train=300, n_test=50), data.toy_task(name, n_train=300, n_test=50)
        assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.targets, b.test.targets)
        assert a.classnames == data.TOY_VALUES[attr] and attr in data.TOY_DOMAINS[domain]
        assert all("{}" in t for t in templates)
        counts = torch.bincount(a.train.targets, minlength=len(a.classnames))
        assert len(counts) == len(a.classnames) and counts.min() > 0, f"{name}: a class never drawn"
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


def test_each_domain_is_its_own_image_distribution():
    """Tasks of different domains are told apart from the pixels alone (as MTIL's datasets are):
    a ridge-regression classifier on 8x8 average-pooled images and the quantiles of their pixels'
    brightness and colourfulness
    names the domain of held-out images 95 % of the time on average, and at least 80 % for every
    domain (objects on a light background come closest to the outlines and dots)."""
    def feats(x):                                                   # (n, 3, S, S) -> (n, 3*64 + 64 + 64 + 1)
        pooled = torch.nn.functional.avg_pool2d(x, 4).flatten(1)
        grey = x.mean(1).flatten(1).sort(1).values[:, ::16]          # brightness quantiles
        sat = (x.max(1).values - x.min(1).values).flatten(1).sort(1).values[:, ::16]  # colourfulness quantiles
        return torch.cat([pooled, grey, sat, torch.ones(len(x), 1)], 1)
    X, Y, Xt, Yt = [], [], [], []
    for i, d in enumerate(data.TOY_DOMAINS):
        g = torch.Generator().manual_seed(i)
        X.append(feats(data.toy_render(data.toy_attributes(400, g, d), g, d)))
        Xt.append(feats(data.toy_render(data.toy_attributes(100, g, d), g, d)))
        Y += [i] * 400
        Yt += [i] * 100
    X, Xt = torch.cat(X), torch.cat(Xt)
    onehot = torch.nn.functional.one_hot(torch.tensor(Y)).float()
    W = torch.linalg.solve(X.T @ X + 1e-1 * torch.eye(X.shape[1]), X.T @ onehot)     # (F, D)
    pred = (Xt @ W).argmax(1)
    hits = [(pred[torch.tensor(Yt) == i] == i).float().mean().item() for i in range(len(data.TOY_DOMAINS))]
    assert min(hits) >= 0.8 and sum(hits) / len(hits) >= 0.95, dict(zip(data.TOY_DOMAINS, hits))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(sorted(data.TOY_DOMAINS)))
def test_captions_only_name_the_image_s_own_values(seed, domain):
    g, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    a = data.toy_attributes(4, g, domain)
    for i in range(4):
        codes = {k: int(v[i]) for k, v in a.items()}
        caption = f" {data.toy_caption(domain, codes, rng)} "
        for attr, words in data.TOY_VALUES.items():
            named = [w for w in words if f" {w} " in caption]
            allowed = ([], [words[codes[attr]]]) if attr in codes else ([],)
            if domain == "strokes" and attr == "tone":
                allowed = ([], ["black"])                          # every stroke is painted on black
            assert named in allowed, (domain, caption, attr, named)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_render_paints_the_object_colour(seed):
    """The pixel at a filled circle's centre has the object's hue (30 degrees per colour, +-10
    jitter, plus pixel noise) in most images of a batch."""
    g = torch.Generator().manual_seed(seed)
    n = 64
    a = data.toy_attributes(n, g, "objects")
    a["shape"] = torch.zeros(n, dtype=torch.long)          # circles: the centre is always inside
    img = data.toy_render(a, torch.Generator().manual_seed(seed), "objects")
    q = torch.tensor(data._QUADRANT)[a["position"]] * data.TOY_SIZE                     # (n, 2)
    centre = img[torch.arange(n), :, q[:, 1].long(), q[:, 0].long()]                  # (n, 3)
    hue = torch.tensor([colorsys.rgb_to_hsv(*c.tolist())[0] * 360 for c in centre])
    off = ((hue - a["colour"] * 30.0 + 180) % 360 - 180).abs()
    assert (off < 20).float().mean() > 0.8, off


def test_pretraining_stream_is_a_function_of_the_seed():
    a, b = data.toy_pretraining_batches(3, 8, pool=100), data.toy_pretraining_batches(3, 8, pool=100)
    for _ in range(3):
        (xa, ca), (xb, cb) = next(a), next(b)
        assert torch.equal(xa, xb) and ca == cb
    (xc, cc) = next(data.toy_pretraining_batches(4, 8, pool=100))
    assert not torch.equal(xc, xa)
    domains = {c.split()[0] for c in next(data.toy_pretraining_batches(3, 64, pool=400))[1]}
    assert "an" in domains or "a" in domains                         # objects / patterns / outlines
