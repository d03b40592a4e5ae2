"""The class-incremental (MoE-Adapters' cil/) and X-TAIL (RAIL) protocols of data.py: class orders
and steps against the sources, loaders on fake CIFAR-100 and TinyImageNet trees in their real
layouts, X-TAIL's few-shot domains and union offsets, `--check`, and the index-mapping helpers."""
import pickle

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st
from PIL import Image
from torch.utils.data import Dataset

import data
from fake_mtil import HAS_SCIPY, skip_md5_checks, write_fake_mtil

TT, ET = data.clip_transforms(16)
CIFAR_PER_CLASS = {"train": 2, "test": 1}
TINY_TRAIN, TINY_VAL = 2, 1  # images per class


def _cifar_name(c: int) -> str:
    return f"class_{c:03d}" if c % 10 == 0 else f"c{c:03d}"  # some with "_", as "aquarium_fish"


def write_fake_cifar100(root) -> None:
    """<root>/cifar-100-python/{train,test,meta}: torchvision's pickles, 100 classes."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, k in CIFAR_PER_CLASS.items():
        labels = [c for c in range(100) for _ in range(k)]
        images = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        (d / split).write_bytes(pickle.dumps({"data": images, "fine_labels": labels, "coarse_labels": labels}))
    names = [_cifar_name(c) for c in range(100)]
    (d / "meta").write_bytes(pickle.dumps({"fine_label_names": names, "coarse_label_names": names[:20]}))


def write_fake_tinyimagenet(root) -> list[str]:
    """<root>/tiny-imagenet-200 in the cs231n archive's layout, 200 ImageNet wnids listed in
    wnids.txt in a shuffled (not sorted) order. Returns the wnids in wnids.txt order."""
    d = root / "tiny-imagenet-200"
    wnids = [data.IMAGENET_WNIDS[i] for i in np.random.default_rng(1).permutation(1000)[:200]]
    (d / "val" / "images").mkdir(parents=True)
    (d / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (d / "words.txt").write_text("".join(f"{w}\tsome words, more words\n" for w in wnids))
    rows = []
    for c, w in enumerate(wnids):
        (d / "train" / w / "images").mkdir(parents=True)
        for i in range(TINY_TRAIN):
            Image.new("RGB", (8, 8), (c, i, 0)).save(d / "train" / w / "images" / f"{w}_{i}.JPEG")
        boxes = "".join(f"{w}_{i}.JPEG\t0\t0\t8\t8\n" for i in range(TINY_TRAIN))
        (d / "train" / w / f"{w}_boxes.txt").write_text(boxes)
        for i in range(TINY_VAL):
            name = f"val_{c * TINY_VAL + i}.JPEG"
            Image.new("L", (8, 8), c).save(d / "val" / "images" / name)  # a greyscale one, as in the archive
            rows.append(f"{name}\t{w}\t0\t0\t8\t8\n")
    (d / "val" / "val_annotations.txt").write_text("".join(rows))
    return wnids


@pytest.fixture(scope="module")
def cil_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cil")
    write_fake_cifar100(root)
    return root, write_fake_tinyimagenet(root)


@pytest.fixture
def md5():
    with skip_md5_checks():
        yield


# ---- class orders and steps, against MoE-Adapters' cil/class_orders and cil/configs/class ----

def test_class_orders_are_the_sources():
    cifar, tiny = data.CIL_CLASS_ORDERS["cil-cifar100"], data.CIL_CLASS_ORDERS["cil-tinyimagenet"]
    assert sorted(cifar) == list(range(100)) and sorted(tiny) == list(range(200))
    # entries read off cil/class_orders/cifar100.yaml and tinyimagenet.yaml (@4572d97)
    assert cifar[:10] == [87, 0, 52, 58, 44, 91, 68, 97, 51, 15] and cifar[-5:] == [55, 54, 26, 35, 39]
    assert cifar[50:53] == [1, 28, 6]
    assert tiny[:10] == [131, 181, 22, 172, 144, 92, 97, 187, 58, 93] and tiny[-5:] == [66, 10, 107, 194, 98]
    assert tiny[99:102] == [50, 87, 69]
    # a fingerprint of each whole order, computed from the yaml files
    assert sum((i + 1) * c for i, c in enumerate(cifar)) == 240401
    assert sum((i + 1) * c for i, c in enumerate(tiny)) == 1987442


@pytest.mark.parametrize("name, steps, first, size, n_tasks", [
    ("cil-cifar100", 10, 10, 10, 10), ("cil-cifar100", 20, 5, 5, 20), ("cil-cifar100", 50, 2, 2, 50),
    ("cil-tinyimagenet", 5, 100, 20, 6), ("cil-tinyimagenet", 10, 100, 10, 11),
    ("cil-tinyimagenet", 20, 100, 5, 21)])
def test_increments(name, steps, first, size, n_tasks):
    inc = data.cil_increments(name, steps)
    assert inc == [first] + [size] * (n_tasks - 1)
    assert sum(inc) == len(data.CIL_CLASS_ORDERS[name])


def test_increments_reject_other_protocols():
    with pytest.raises(ValueError, match="10, 20, 50"):
        data.cil_increments("cil-cifar100", 5)
    with pytest.raises(ValueError, match="unknown CIL dataset"):
        data.cil_increments("CIFAR100", 10)
    assert data.CIL_TEMPLATES == ["a bad photo of a {}."]


# ---- the loaders on fake trees ----

def _check_steps(tasks, name, steps, raw_names, train_per_class, test_per_class, order):
    inc = data.cil_increments(name, steps)
    assert len(tasks) == len(inc)
    union = tasks[-1].classnames
    assert union == [raw_names[c] for c in order]
    seen = 0
    for k, (task, size) in enumerate(zip(tasks, inc)):
        assert task.name == f"{name}-step{k + 1}" and task.templates == data.CIL_TEMPLATES
        assert task.new_start == seen and task.classnames == union[:seen + size]  # the union grows
        assert task.union_classnames == task.classnames
        seen += size
        train_y = data.dataset_targets(task.train)
        assert sorted(set(train_y)) == list(range(task.new_start, seen))  # only the new classes
        assert len(train_y) == size * train_per_class
        test_y = data.dataset_targets(task.test)
        assert sorted(set(test_y)) == list(range(seen)) and len(test_y) == seen * test_per_class
        # the union label of an item is the position of its original class in the order
        base = data.dataset_targets(task.train.dataset)
        assert all(order[y] == base[i] for i, y in zip(task.train.indices, train_y))
        for ds in (task.train, task.test):
            for i in (0, len(ds) - 1):  # decoding agrees with the labels read from the lists
                x, y = ds[i]
                assert x.shape == (3, 16, 16) and y == data.dataset_targets(ds)[i]


@pytest.mark.parametrize("steps", [10, 20, 50])
def test_cil_cifar100(cil_root, md5, steps):
    tasks = data.cil_tasks("cil-cifar100", steps, cil_root[0], train_transform=TT, eval_transform=ET)
    _check_steps(tasks, "cil-cifar100", steps, [_cifar_name(c) for c in range(100)],
                 CIFAR_PER_CLASS["train"], CIFAR_PER_CLASS["test"], data.CIL_CLASS_ORDERS["cil-cifar100"])
    assert tasks[-1].classnames[:3] == ["c087", "class_000", "c052"]  # the source keeps "_"


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_cil_tinyimagenet(cil_root, steps):
    root, wnids = cil_root
    tasks = data.cil_tasks("cil-tinyimagenet", steps, root, train_transform=TT, eval_transform=ET)
    openai = dict(zip(data.IMAGENET_WNIDS, data.IMAGENET_CLASSNAMES))
    _check_steps(tasks, "cil-tinyimagenet", steps, [openai[w] for w in wnids], TINY_TRAIN, TINY_VAL,
                 data.CIL_CLASS_ORDERS["cil-tinyimagenet"])
    assert len(tasks[0].classnames) == 100 and tasks[1].new_start == 100
    # labels follow wnids.txt lines (not sorted wnids); val labels come from val_annotations.txt
    test = tasks[-1].test.dataset
    assert test.wnids == wnids and all(Path(f).parts[-3:] == ("val", "images", f"val_{y}.JPEG")
                                       for f, y in zip(test.files, test.targets))


def test_cil_seed_and_names(cil_root, md5):
    root = cil_root[0]
    source = data.cil_tasks("cil-cifar100", 10, root)[-1].classnames
    shuffled = data.cil_tasks("cil-cifar100", 10, root, seed=3)[-1].classnames
    assert shuffled == data.cil_tasks("cil-cifar100", 10, root, seed=3)[-1].classnames  # a function of the seed
    assert shuffled != source and sorted(shuffled) == sorted(source)
    clean = data.cil_tasks("cil-cifar100", 10, root, clean_names=True)[-1].classnames
    assert clean == [c.replace("_", " ") for c in source] and "class 000" in clean


def test_cil_missing(tmp_path):
    for name, path in (("cil-cifar100", "cifar-100-python"), ("cil-tinyimagenet", "tiny-imagenet-200")):
        with pytest.raises(data.MissingDataError) as e:
            data.cil_tasks(name, min(data.CIL_STEPS[name]), tmp_path)
        ((got, where, how),) = e.value.missing
        assert got == name and where == str(tmp_path / path) and how
    assert "tiny-imagenet-200.zip" in data.cil_missing(tmp_path)[1][2]


def test_tinyimagenet_not_imagenet_wnids(tmp_path):
    write_fake_tinyimagenet(tmp_path)
    wnids = tmp_path / "tiny-imagenet-200" / "wnids.txt"
    wnids.write_text(wnids.read_text().replace(wnids.read_text().split()[0], "n99999999"))
    with pytest.raises(ValueError, match="not tiny-imagenet-200"):
        data.cil_tasks("cil-tinyimagenet", 10, tmp_path)


# ---- the command line ----

def test_check_reports_cil(cil_root, md5, tmp_path, capsys):
    data.main(["--check", "--root", str(cil_root[0])])
    out = capsys.readouterr().out
    assert "found    cil-cifar100  train    200  test    100  classes 100  (CIL)" in out
    assert "found    cil-tinyimagenet train    400  test    200  classes 200  (CIL)" in out
    assert data.main(["--check", "--root", str(tmp_path)]) == 2
    lines = capsys.readouterr().out.splitlines()
    (cifar,) = [s for s in lines if s.startswith("missing  cil-cifar100 ")]
    (tiny,) = [s for s in lines if s.startswith("missing  cil-tinyimagenet ")]
    assert f"expected {tmp_path / 'cifar-100-python'}  ->  python data.py --download" in cifar
    assert f"expected {tmp_path / 'tiny-imagenet-200'}  ->  manual" in tiny


def test_download_names_tinyimagenet(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "_DOWNLOAD", {"MNIST": lambda root: write_fake_mtil(root, ["MNIST"])})  # offline
    assert data.main(["--download", "--root", str(tmp_path), "--datasets", "MNIST"]) == 0
    assert "manual   cil-tinyimagenet: manual (torchvision has no TinyImageNet)" in capsys.readouterr().out


# ---- X-TAIL ----

@pytest.fixture(scope="module")
def mtil_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("xtail")
    return root, write_fake_mtil(root)


def _picked(tasks):
    return [t.train.indices for t in tasks]


@pytest.mark.skipif(not HAS_SCIPY, reason="the fake Flowers and StanfordCars need scipy (.mat files)")
def test_xtail(mtil_root, md5):
    root, info = mtil_root
    assert data.XTAIL_DOMAINS == [n for n in data.MTIL_ORDERS["I"] if n != "CIFAR100"]
    assert data.XTAIL_DOMAINS[:3] == ["Aircraft", "Caltech101", "DTD"] and len(data.XTAIL_DOMAINS) == 10
    assert data.xtail_tasks.__defaults__[1] == data.XTAIL_SHOTS == 16
    tasks = data.xtail_tasks(root, seed=0, shots=2, train_transform=TT, eval_transform=ET)
    assert [t.name for t in tasks] == data.XTAIL_DOMAINS
    union = tasks[0].union_classnames
    assert len(union) == sum(len(t.classnames) for t in tasks)
    end = 0
    for t in tasks:
        assert t.offset == end and union[t.offset:t.offset + len(t.classnames)] == t.classnames
        assert t.union_classnames is union and t.templates == data.RAIL_TEMPLATES == ["a photo of a {}."]
        end += len(t.classnames)
        assert t.classnames == info[t.name]["classnames"] and len(t.test) == info[t.name]["test"]
        test_y = data.dataset_targets(t.test)  # the domain's own test set, its own labels
        assert max(test_y) < len(t.classnames)
        counts = np.bincount(data.dataset_targets(t.train), minlength=len(t.classnames))
        available = np.bincount(data.dataset_targets(t.train.dataset), minlength=len(t.classnames))
        assert available.max() > 2 and (counts == np.minimum(available, 2)).all()  # 2 shots of every class
    # deterministic per seed
    assert _picked(data.xtail_tasks(root, seed=0, shots=2)) == _picked(tasks)
    assert _picked(data.xtail_tasks(root, seed=1, shots=2)) != _picked(tasks)
    # fewer images than shots: all of them (4 train images per class in the fakes)
    full = data.xtail_tasks(root, seed=0, max_tasks=2)
    assert [len(t.train) for t in full] == [info[n]["train"] for n in data.XTAIL_DOMAINS[:2]]
    assert full[1].offset == len(full[0].classnames) and len(full[0].union_classnames) == full[1].offset + 3


def test_xtail_missing(tmp_path):
    with pytest.raises(data.MissingDataError) as e:
        data.xtail_tasks(tmp_path)
    assert [m[0] for m in e.value.missing] == data.XTAIL_DOMAINS


# ---- index-mapping helpers (property tests) ----

@given(st.integers(1, 60).flatmap(lambda n: st.permutations(list(range(n)))))
def test_label_map_inverts_the_order(order):
    label_map = data.cil_label_map(order)
    assert [label_map[c] for c in order] == list(range(len(order)))
    assert [order[j] for j in label_map] == list(range(len(order)))


@given(st.lists(st.integers(0, 9), min_size=2, max_size=12).filter(lambda o: sorted(o) != list(range(len(o)))))
def test_label_map_rejects_non_permutations(order):
    with pytest.raises(ValueError):
        data.cil_label_map(order)


@given(st.lists(st.integers(0, 50), max_size=15))
def test_union_offsets_partition_the_union(sizes):
    offsets = data.union_offsets(sizes)
    assert len(offsets) == len(sizes) and all(o >= 0 for o in offsets)
    blocks = [list(range(o, o + s)) for o, s in zip(offsets, sizes)]
    assert [i for b in blocks for i in b] == list(range(sum(sizes)))  # each union index exactly once, in order


@given(st.lists(st.integers(0, 5), min_size=1, max_size=40), st.data())
def test_relabelled_keeps_items_and_maps_labels(base_labels, draw):
    class Base(Dataset):
        targets = base_labels

        def __len__(self):
            return len(base_labels)

        def __getitem__(self, i):
            return f"x{i}", base_labels[i]

    indices = draw.draw(st.lists(st.integers(0, len(base_labels) - 1), max_size=20))
    label_map = draw.draw(st.permutations(list(range(6))))
    ds = data.Relabelled(Base(), indices, [label_map[base_labels[i]] for i in indices])
    assert [ds[k] for k in range(len(ds))] == [(f"x{i}", label_map[base_labels[i]]) for i in indices]
    assert data.dataset_targets(ds) == [y for _, y in (ds[k] for k in range(len(ds)))]

