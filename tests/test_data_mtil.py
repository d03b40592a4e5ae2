"""MTIL data: loaders on fake on-disk trees in torchvision's real layouts, ZSCL's splits, class
names and templates, few-shot subsets, missing-data errors, the CLI, GNSP's ImageNet reference."""
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image
from torchvision.datasets import Flowers102

import data
from fake_mtil import (HAS_SCIPY, skip_md5_checks, write_fake_imagenet, write_fake_mtil)

REPO = Path(__file__).resolve().parents[1]
needs_scipy = pytest.mark.skipif(
    not HAS_SCIPY, reason="torchvision reads Flowers102 / StanfordCars (.mat) and Caltech101 items "
                          "with scipy, which is not installed")
ALL = [pytest.param(n, marks=needs_scipy) if n in ("Caltech101", "Flowers", "StanfordCars") else n
       for n in data.MTIL_DATASETS]
NO_SCIPY_NO_MD5 = ["Aircraft", "DTD", "EuroSAT", "Food", "MNIST", "OxfordPet", "SUN397"]
TT, ET = data.clip_transforms(16)
# The top folder of each dataset, read off torchvision 0.29's sources.
TOP = {"Aircraft": "fgvc-aircraft-2013b", "Caltech101": "caltech101", "CIFAR100": "cifar-100-python",
       "DTD": "dtd/dtd", "EuroSAT": "eurosat", "Flowers": "flowers-102", "Food": "food-101",
       "MNIST": "MNIST/raw", "OxfordPet": "oxford-iiit-pet", "StanfordCars": "stanford_cars",
       "SUN397": "SUN397"}


@pytest.fixture(scope="session")
def fake(tmp_path_factory):
    """(root, {name: expected sizes and class names}, {wnid: caption}); never modified."""
    root = tmp_path_factory.mktemp("mtil")
    return root, write_fake_mtil(root), write_fake_imagenet(root)


@pytest.fixture
def md5():
    with skip_md5_checks():
        yield


# ---- constants: orders, templates, hard-coded class names ----

def test_orders():
    assert data.MTIL_DATASETS == sorted(data.MTIL_DATASETS, key=str.lower) and len(data.MTIL_DATASETS) == 11
    assert data.MTIL_ORDERS["I"] == data.MTIL_DATASETS
    # ZSCL results.ipynb: statistics(..., order=2) permutes the alphabetical list like this
    assert [data.MTIL_DATASETS.index(n) for n in data.MTIL_ORDERS["II"]] == [9, 6, 7, 8, 5, 10, 0, 1, 3, 4, 2]


def test_templates():
    counts = {"Aircraft": 2, "Caltech101": 34, "CIFAR100": 18, "DTD": 8, "EuroSAT": 3, "Flowers": 1,
              "Food": 1, "MNIST": 1, "OxfordPet": 1, "StanfordCars": 9, "SUN397": 2}
    assert {n: len(t) for n, t in data.TEMPLATES.items()} == counts
    for templates in data.TEMPLATES.values():
        assert len(set(templates)) == len(templates)
        assert all(t.count("{}") == 1 and t.format("x") != t for t in templates)
    first = {n: t[0] for n, t in data.TEMPLATES.items()}  # the training template (ZSCL)
    assert first["Aircraft"] == "a photo of a {}, a type of aircraft."
    assert first["CIFAR100"] == first["Caltech101"] == first["SUN397"] == "a photo of a {}."
    assert first["MNIST"].format("0 - zero") == 'a photo of the number: "0 - zero".'
    assert first["StanfordCars"] == "a photo of a {}, a type of car."


def test_hardcoded_classnames():
    assert len(data.CALTECH101_CLASSNAMES) == len(data._CALTECH101_FOLDERS) == 101
    assert data._CALTECH101_FOLDERS == sorted(data._CALTECH101_FOLDERS)  # torchvision's order
    table = dict(zip(data._CALTECH101_FOLDERS, data.CALTECH101_CLASSNAMES))
    assert table["Faces"] == "off-center face" and table["Faces_easy"] == "centered face"
    assert table["car_side"] == "side of a car" and table["yin_yang"] == "yin and yang symbol"
    assert table["crocodile_head"] == "head of a  crocodile"  # ZSCL's double space
    assert len(data.EUROSAT_CLASSNAMES) == 10 and data._EUROSAT_FOLDERS == sorted(data._EUROSAT_FOLDERS)
    assert data.FLOWERS102_CLASSNAMES == [c.rstrip("?") for c in Flowers102.classes]
    assert len(data.IMAGENET_CLASSNAMES) == 1000 and len(set(data.IMAGENET_WNIDS)) == 1000
    assert data.IMAGENET_WNIDS == sorted(data.IMAGENET_WNIDS)
    assert (data.IMAGENET_WNIDS[0], data.IMAGENET_CLASSNAMES[0]) == ("n01440764", "tench")
    assert data.IMAGENET_CLASSNAMES[-1] == "toilet paper"


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_clip_transforms(mode):
    image = Image.new("RGB", (20, 13), tuple(round(255 * m) for m in data.CLIP_MEAN)).convert(mode)
    train, evaluate = data.clip_transforms(16)
    for t in (train, evaluate):
        x = t(image)
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.equal(evaluate(image), evaluate(image))
    if mode in ("RGB", "RGBA"):  # the CLIP mean colour normalises to ~0
        assert evaluate(image).abs().max() < 0.02


# ---- loading the 11 datasets ----

@pytest.mark.parametrize("name", ALL)
def test_load_task(fake, md5, name):
    root, info, _ = fake
    task = data.load_mtil_task(name, root, TT, ET)
    assert (task.name, task.templates) == (name, data.TEMPLATES[name])
    assert (len(task.train), len(task.test)) == (info[name]["train"], info[name]["test"])
    assert task.classnames == info[name]["classnames"]
    for ds in (task.train, task.test):
        items = [ds[i] for i in range(len(ds))]
        assert all(x.shape == (3, 16, 16) and x.dtype == torch.float32 for x, _ in items)
        labels = [int(y) for _, y in items]
        assert data.dataset_targets(ds) == labels  # read without decoding = decoded
        assert max(labels) < len(task.classnames)
    assert sorted(set(data.dataset_targets(task.train))) == [0, 1, 2]


@pytest.mark.parametrize("name", [pytest.param("Caltech101", marks=needs_scipy), "EuroSAT", "SUN397"])
def test_random_split(fake, name):
    root = fake[0]
    a = data.load_mtil_task(name, root, TT, ET)
    b = data.load_mtil_task(name, root, TT, ET)
    n = len(a.train.dataset)
    assert n == 15 and (len(a.train), len(a.test)) == (int(0.8 * n), n - int(0.8 * n))
    assert (a.train.indices, a.test.indices) == (b.train.indices, b.test.indices)  # deterministic
    assert not set(a.train.indices) & set(a.test.indices)
    assert sorted(a.train.indices + a.test.indices) == list(range(n))
    # exactly ZSCL's split_dataset: random_split on the dataset, seed 42
    zscl = torch.utils.data.random_split(a.train.dataset, [12, 3], generator=torch.Generator().manual_seed(42))
    assert (zscl[0].indices, zscl[1].indices) == (a.train.indices, a.test.indices)
    assert a.train.dataset.transform is TT and a.test.dataset.transform is ET


def test_sun397_split_ignores_file_system_order(fake, monkeypatch):
    root = fake[0]
    files = lambda task: [task.train.dataset._image_files[i] for i in task.train.indices]  # noqa: E731
    a = data.load_mtil_task("SUN397", root, TT, ET)
    assert a.train.dataset._image_files == sorted(a.train.dataset._image_files)
    rglob = Path.rglob
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: reversed(list(rglob(self, pattern))))
    assert files(data.load_mtil_task("SUN397", root, TT, ET)) == files(a)


@needs_scipy
@pytest.mark.parametrize("order", ["I", "II"])
def test_mtil_tasks(fake, md5, order):
    tasks = data.mtil_tasks(fake[0], order, TT, ET)
    assert [t.name for t in tasks] == data.MTIL_ORDERS[order]


def test_mtil_tasks_max_tasks_and_default_transforms(fake):
    (task,) = data.mtil_tasks(fake[0], "I", max_tasks=1)  # only Aircraft is needed
    assert task.name == "Aircraft" and task.test[0][0].shape == (3, 224, 224)
    with pytest.raises(ValueError, match="order"):
        data.mtil_tasks(fake[0], "III")


# ---- labels and few-shot subsets ----

def test_dataset_targets_fallbacks():
    ds = [(None, 2), (None, 0), (None, 1), (None, 2)]  # any indexable of (x, y)
    assert data.dataset_targets(ds) == [2, 0, 1, 2]
    nested = torch.utils.data.Subset(torch.utils.data.Subset(ds, [3, 2, 1]), [0, 2])
    assert data.dataset_targets(nested) == [2, 0]


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 6), seed=st.integers(0, 2**32 - 1),
       counts=st.lists(st.integers(0, 8), min_size=1, max_size=5))
def test_few_shot_subset(k, seed, counts):
    ds = [(None, c) for c, n in enumerate(counts) for _ in range(n)]
    sub = data.few_shot_subset(ds, k, seed)
    assert Counter(ds[i][1] for i in sub.indices) == Counter({c: min(k, n) for c, n in enumerate(counts) if n})
    assert data.few_shot_subset(ds, k, seed).indices == sub.indices  # deterministic
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    for c in range(len(counts)):  # the first k of each class met in the seeded shuffled pass
        assert [i for i in sub.indices if ds[i][1] == c] == [i for i in perm if ds[i][1] == c][:k]


def test_few_shot_on_a_task(fake):
    task = data.load_mtil_task("EuroSAT", fake[0], TT, ET)  # a Subset (80/20 split)
    sub = data.few_shot_subset(task.train, 2, seed=0)
    assert Counter(data.dataset_targets(sub)) == {0: 2, 1: 2, 2: 2}
    assert sub.indices != data.few_shot_subset(task.train, 2, seed=1).indices or \
        sub.indices != data.few_shot_subset(task.train, 2, seed=2).indices
    assert len(data.few_shot_subset(task.train, 100)) == len(task.train)
    with pytest.raises(ValueError):
        data.few_shot_subset(task.train, 0)


# ---- missing data ----

def test_all_missing(tmp_path):
    missing = data.mtil_missing(tmp_path)
    assert [(m[0], m[1]) for m in missing] == [(n, str(tmp_path / TOP[n])) for n in data.MTIL_DATASETS]
    how = {name: h for name, _, h in missing}
    assert all("--download" in how[n] for n in data.MTIL_DATASETS if n not in ("StanfordCars", "SUN397"))
    assert "manual" in how["StanfordCars"] and "cars_test_annos_withlabels.mat" in how["StanfordCars"]
    assert "manual" in how["SUN397"] and "ClassName.txt" in how["SUN397"]
    message = str(data.MissingDataError(missing))
    assert all(n in message and str(tmp_path / TOP[n]) in message for n in data.MTIL_DATASETS)


def test_partly_missing(tmp_path):
    write_fake_mtil(tmp_path, ["DTD", "MNIST"])
    assert data.mtil_missing(tmp_path, ["DTD", "MNIST"]) == []
    (tmp_path / "dtd/dtd/labels/test1.txt").unlink()
    ((name, path, _),) = data.mtil_missing(tmp_path, ["MNIST", "DTD"])
    assert (name, path) == ("DTD", str(tmp_path / "dtd/dtd/labels/test1.txt"))
    with pytest.raises(data.MissingDataError, match="test1.txt"):
        data.load_mtil_task("DTD", tmp_path, TT, ET)
    # one error naming every dataset the order needs, in order; MNIST is there
    with pytest.raises(data.MissingDataError) as e:
        data.mtil_tasks(tmp_path, "II", TT, ET, max_tasks=4)
    assert [m[0] for m in e.value.missing] == ["StanfordCars", "Food", "OxfordPet"]
    assert "3 dataset(s) missing" in str(e.value)
    with pytest.raises(ValueError, match="unknown"):
        data.mtil_missing(tmp_path, ["ImageNet"])


def test_missing_scipy_is_reported(fake, monkeypatch):
    monkeypatch.setattr(data, "_has_scipy", lambda: False)
    names = [n for n in ("Caltech101", "Flowers", "StanfordCars") if n in fake[1]]
    missing = data.mtil_missing(fake[0], names + ["MNIST"])
    assert [m[0] for m in missing] == names and all("pip install scipy" in m[2] for m in missing)


# ---- command line ----

def _cli(*args, env=None):
    return subprocess.run([sys.executable, str(REPO / "data.py"), *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=120)


def test_cli_check_missing(tmp_path):
    r = _cli("--check", "--root", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stdout.splitlines()
    for name in data.MTIL_DATASETS:
        (line,) = [s for s in lines if s.split()[1:2] == [name]]
        assert line.startswith("missing") and str(tmp_path / "nothing" / TOP[name]) in line
    assert any(s.startswith("missing  ImageNet") and "ImageNet/train" in s for s in lines)


def test_cli_check_found(fake):
    r = _cli("--check", "--datasets", *NO_SCIPY_NO_MD5, env={"MTIL_DATA": str(fake[0])})  # default root
    assert r.returncode == 0, r.stdout + r.stderr
    assert "found    MNIST         train     12  test      6  classes  10" in r.stdout
    assert "found    SUN397        train     12  test      3  classes   3" in r.stdout
    assert "found    ImageNet      3 class folders" in r.stdout


def test_check_in_process(fake, md5, capsys):
    assert data.main(["--check", "--root", str(fake[0])]) == (0 if HAS_SCIPY else 2)
    out = capsys.readouterr().out
    assert all(f"found    {n:<13}" in out for n in fake[1] if HAS_SCIPY or n != "Caltech101")
    assert HAS_SCIPY or "unusable Caltech101" in out and "pip install scipy" in out


def test_check_reports_a_corrupt_dataset(fake, capsys):
    # without the md5 patch the fake CIFAR100 looks corrupt: one line, exit 2, no traceback
    assert data.main(["--check", "--root", str(fake[0]), "--datasets", "CIFAR100"]) == 2
    assert "error    CIFAR100      " in capsys.readouterr().out


def test_cli_user_errors(tmp_path, capsys):
    for argv in (["--root", str(tmp_path)], ["--check", "--datasets", "ImageNet"],
                 ["--check", "--download"]):
        with pytest.raises(SystemExit) as e:
            data.main(argv)
        assert e.value.code == 2 and "error:" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        data.main(["--check", "--root", str(tmp_path / "file")])
    assert "not a directory" in capsys.readouterr().err


def test_download(tmp_path, monkeypatch, capsys):
    def unreachable(root):
        raise OSError("network is unreachable\n(offline)")

    # never touch the network: every torchvision download is replaced
    monkeypatch.setattr(data, "_DOWNLOAD", {**{n: unreachable for n in data._DOWNLOAD},
                                            "MNIST": lambda root: write_fake_mtil(root, ["MNIST"])})
    argv = ["--download", "--root", str(tmp_path / "new"), "--datasets", "MNIST", "DTD", "StanfordCars", "SUN397"]
    assert data.main(argv) == 2
    out = capsys.readouterr().out
    assert "done     MNIST" in out
    assert "failed   DTD: OSError: network is unreachable (offline)" in out
    assert "manual   StanfordCars" in out and "manual   SUN397" in out and "manual   ImageNet" in out
    assert data.main(["--download", "--root", str(tmp_path / "new"), "--datasets", "MNIST"]) == 0
    assert "present  MNIST" in capsys.readouterr().out


# ---- GNSP's ImageNet reference data ----

def test_imagenet_reference(fake):
    root, _, captions = fake
    ref = data.imagenet_reference(root, n=5, seed=0, transform=ET)
    assert len(ref) == 5
    x, caption = ref[0]
    assert x.shape == (3, 16, 16) and isinstance(caption, str)
    for file, caption in zip(ref.files, ref.captions):
        assert caption == captions[Path(file).parent.name]  # "a"/"an" + CLIP's class name
    # GNSP's sampler, on the sorted list of all train images (the stray folder is not a class)
    all_files = sorted(str(p) for w in captions for p in (root / "ImageNet/train" / w).iterdir())
    assert ref.files == [all_files[i] for i in np.random.RandomState(0).choice(12, 5, replace=False)]
    assert data.imagenet_reference(root, n=5, seed=0).files == ref.files
    assert any(data.imagenet_reference(root, n=5, seed=s).files != ref.files for s in (1, 2, 3))
    everything = data.imagenet_reference(root, n=1000, seed=0)
    assert sorted(everything.files) == all_files and everything[0][0].shape == (3, 224, 224)


def test_imagenet_missing(tmp_path):
    ((name, path, how),) = data.imagenet_missing(tmp_path)
    assert (name, path) == ("ImageNet", str(tmp_path / "ImageNet" / "train")) and "image-net.org" in how
    with pytest.raises(data.MissingDataError, match="ImageNet/train"):
        data.imagenet_reference(tmp_path)
    (tmp_path / "ImageNet/train/tench").mkdir(parents=True)  # class names instead of wnids
    assert data.imagenet_missing(tmp_path)[0][1] == str(tmp_path / "ImageNet/train/n01440764")
