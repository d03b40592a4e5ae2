"""Tiny fake MTIL (and ImageNet) trees in torchvision 0.29's on-disk layouts, for tests.

    info = write_fake_mtil(tmp_path)            # {name: {"train": n, "test": n, "classnames": [...]}}
    with skip_md5_checks():                     # CIFAR100 and Flowers102 verify md5 sums of
        tasks = data.mtil_tasks(tmp_path, ...)  # their files; fakes cannot match them

Flowers and StanfordCars keep their annotations in .mat files, written (and read by
torchvision) with scipy: without scipy they are left out unless asked for by name.
Caltech101's __getitem__ also imports scipy (its constructor does not).
"""
import contextlib
import importlib.util
import json
import pickle
import struct
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image

HAS_SCIPY = importlib.util.find_spec("scipy") is not None
SCIPY_DATASETS = ("Flowers", "StanfordCars")
N_TRAIN, N_TEST = 4, 2  # per class, for the datasets with an official split
N_SPLIT = 5             # per class, for the 80/20 random-split datasets (3 classes -> 12 / 3)


def _image(path: Path, label: int, i: int, mode: str = "RGB", size=(10, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = (40 + 70 * label, 255 - 20 * i, 90) if mode == "RGB" else 40 + 70 * label
    Image.new(mode, size, colour).save(path)


def _lines(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def _splits(classes):
    """(class index, class, split, i) for N_TRAIN train and N_TEST test items per class."""
    return [(c, name, split, i) for c, name in enumerate(classes)
            for split, n in (("train", N_TRAIN), ("test", N_TEST)) for i in range(n)]


def _aircraft(root: Path) -> list[str]:
    classes = ["707-320", "A300B4", "BAE 146-200"]  # variant names may hold spaces
    d = root / "fgvc-aircraft-2013b" / "data"
    _lines(d / "variants.txt", classes)
    rows = {"train": [], "test": []}
    for c, name, split, i in _splits(classes):
        image_id = f"{1000000 + 100 * c + 10 * (split == 'test') + i}"
        _image(d / "images" / f"{image_id}.jpg", c, i)
        rows[split].append(f"{image_id} {name}")
    for split, lines in rows.items():
        _lines(d / f"images_variant_{split}.txt", lines)
    return classes


def _caltech101(root: Path) -> list[str]:
    d = root / "caltech101" / "101_ObjectCategories"
    for i in range(2):  # torchvision drops this folder
        _image(d / "BACKGROUND_Google" / f"image_{i + 1:04d}.jpg", 0, i)
    folders = ["Faces_easy", "Leopards", "car_side"]
    for c, folder in enumerate(folders):
        for i in range(N_SPLIT):
            _image(d / folder / f"image_{i + 1:04d}.jpg", c, i, mode="L" if c == 0 else "RGB")
    return ["centered face", "leopard", "side of a car"]


def _cifar100(root: Path) -> list[str]:
    classes = ["apple", "aquarium_fish", "baby"]
    d = root / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        labels = [c for c in range(len(classes)) for _ in range(n)]
        data = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        (d / split).write_bytes(pickle.dumps({"data": data, "fine_labels": labels, "coarse_labels": labels}))
    (d / "meta").write_bytes(pickle.dumps({"fine_label_names": classes, "coarse_label_names": classes}))
    return ["apple", "aquarium fish", "baby"]


def _dtd(root: Path) -> list[str]:
    classes = ["banded", "blotchy", "braided"]
    d = root / "dtd" / "dtd"
    rows = {"train": [], "test": []}
    for c, name, split, i in _splits(classes):
        file = f"{name}_{split}_{i:04d}.jpg"
        _image(d / "images" / name / file, c, i)
        rows[split].append(f"{name}/{file}")
    for split, lines in rows.items():
        _lines(d / "labels" / f"{split}1.txt", lines)
    _lines(d / "labels" / "val1.txt", rows["test"])
    return classes


def _eurosat(root: Path) -> list[str]:
    for c, folder in enumerate(["AnnualCrop", "Forest", "SeaLake"]):
        for i in range(N_SPLIT):
            _image(root / "eurosat" / "2750" / folder / f"{folder}_{i + 1}.jpg", c, i)
    return ["annual crop land", "forest", "lake or sea"]


def _flowers(root: Path) -> list[str]:
    from scipy.io import savemat

    d = root / "flowers-102"
    labels, ids = [], {"trnid": [], "valid": [], "tstid": []}
    for c in range(3):  # labels 1..3 in the .mat files
        for key, n in (("trnid", N_TRAIN), ("valid", 1), ("tstid", N_TEST)):
            for i in range(n):
                labels.append(c + 1)
                ids[key].append(len(labels))
                _image(d / "jpg" / f"image_{len(labels):05d}.jpg", c, i)
    savemat(d / "imagelabels.mat", {"labels": np.array(labels, dtype=np.uint8)})
    savemat(d / "setid.mat", {k: np.array(v, dtype=np.uint16) for k, v in ids.items()})
    from torchvision.datasets import Flowers102

    return [c.rstrip("?") for c in Flowers102.classes]  # ZSCL's 102 names = torchvision's, sans "?"


def _food(root: Path) -> list[str]:
    classes = ["apple_pie", "baby_back_ribs", "baklava"]
    d = root / "food-101"
    meta = {"train": {}, "test": {}}
    for c, name, split, i in _splits(classes):
        image_id = f"{100 * c + 10 * (split == 'test') + i}"
        _image(d / "images" / name / f"{image_id}.jpg", c, i)
        meta[split].setdefault(name, []).append(f"{name}/{image_id}")
    for split, m in meta.items():
        (d / "meta").mkdir(parents=True, exist_ok=True)
        (d / "meta" / f"{split}.json").write_text(json.dumps(m))
    _lines(d / "meta" / "classes.txt", classes)
    return ["apple pie", "baby back ribs", "baklava"]


def _idx(path: Path, array: np.ndarray) -> None:
    """MNIST's idx format: magic (0, 0, type 0x08 = ubyte, ndim), big-endian dims, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _mnist(root: Path) -> list[str]:
    d = root / "MNIST" / "raw"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        labels = np.array([c for c in range(3) for _ in range(n)], dtype=np.uint8)
        _idx(d / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (len(labels), 28, 28)))
        _idx(d / f"{prefix}-labels-idx1-ubyte", labels)
    return ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six",
            "7 - seven", "8 - eight", "9 - nine"]


def _oxford_pet(root: Path) -> list[str]:
    breeds = [("Abyssinian", 1), ("american_bulldog", 2), ("american_pit_bull_terrier", 2)]  # (breed, species)
    d = root / "oxford-iiit-pet"
    rows = {"trainval": [], "test": []}
    for c, (breed, species), split, i in _splits(breeds):
        image_id = f"{breed}_{100 * (split == 'test') + i + 1}"
        _image(d / "images" / f"{image_id}.jpg", c, i)
        rows["trainval" if split == "train" else "test"].append(f"{image_id} {c + 1} {species} {c + 1}")
    for split, lines in rows.items():
        _lines(d / "annotations" / f"{split}.txt", lines)
    return ["Abyssinian", "American Bulldog", "American Pit Bull Terrier"]


def _stanford_cars(root: Path) -> list[str]:
    from scipy.io import savemat

    classes = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]
    d = root / "stanford_cars"
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    annos = {"train": [], "test": []}
    for c, _, split, i in _splits(classes):
        fname = f"{len(annos[split]) + 1:05d}.jpg"
        _image(d / f"cars_{split}" / fname, c, i)
        annos[split].append((1, 1, 9, 7, c + 1, fname))
    for split, path in (("train", d / "devkit" / "cars_train_annos.mat"),
                        ("test", d / "cars_test_annos_withlabels.mat")):
        records = np.array(annos[split], dtype=[(f, object) for f in fields])
        path.parent.mkdir(parents=True, exist_ok=True)
        savemat(path, {"annotations": records})
    savemat(d / "devkit" / "cars_meta.mat", {"class_names": np.array(classes, dtype=object)})
    return classes


def _sun397(root: Path) -> list[str]:
    classes = ["a/abbey", "a/airplane_cabin", "a/apartment_building/outdoor"]
    d = root / "SUN397"
    _lines(d / "ClassName.txt", [f"/{c}" for c in classes])
    for c, name in enumerate(classes):
        for i in range(N_SPLIT):  # names not in class order, so that sorting matters
            _image(d / name / f"sun_{'zyxwv'[i]}{c}.jpg", c, i)
    return ["abbey", "airplane cabin", "apartment building/outdoor"]


_WRITERS = {"Aircraft": _aircraft, "Caltech101": _caltech101, "CIFAR100": _cifar100, "DTD": _dtd,
            "EuroSAT": _eurosat, "Flowers": _flowers, "Food": _food, "MNIST": _mnist,
            "OxfordPet": _oxford_pet, "StanfordCars": _stanford_cars, "SUN397": _sun397}
_SPLIT_80_20 = {"Caltech101", "EuroSAT", "SUN397"}


def write_fake_mtil(root, names=None) -> dict[str, dict]:
    """Write tiny fake datasets under `root` (3 classes each; 4 train + 2 test images per class,
    or 5 per class split 80/20 -> 12 train + 3 test). Returns, per dataset written,
    {"train": size, "test": size, "classnames": expected Task.classnames}.
    names=None writes all 11, or the 9 without .mat files when scipy is not installed."""
    root = Path(root)
    if names is None:
        names = [n for n in _WRITERS if HAS_SCIPY or n not in SCIPY_DATASETS]
    info = {}
    for name in names:
        if name in SCIPY_DATASETS and not HAS_SCIPY:
            raise RuntimeError(f"writing the fake {name} needs scipy (.mat files)")
        classnames = _WRITERS[name](root)
        total = 3 * N_SPLIT
        sizes = ((int(0.8 * total), total - int(0.8 * total)) if name in _SPLIT_80_20
                 else (3 * N_TRAIN, 3 * N_TEST))
        info[name] = {"train": sizes[0], "test": sizes[1], "classnames": classnames}
    return info


def write_fake_imagenet(root, per_class: int = 4) -> dict[str, str]:
    """<root>/ImageNet/train/<wnid>/<wnid>_<i>.JPEG for 3 wnids (+ a stray non-wnid folder).
    Returns {wnid: expected caption}."""
    captions = {"n01440764": "a photo of a tench", "n01496331": "a photo of an electric ray",
                "n01518878": "a photo of an ostrich"}
    train = Path(root) / "ImageNet" / "train"
    for c, wnid in enumerate(captions):
        for i in range(per_class):
            _image(train / wnid / f"{wnid}_{i}.JPEG", c, i, size=(12, 9))
    _image(train / "not_a_wnid" / "x.JPEG", 0, 0)
    return captions


@contextlib.contextmanager
def skip_md5_checks():
    """Let CIFAR100 and Flowers102 accept fake files (torchvision checks their md5 sums), as
    torchvision's own dataset tests do; existence is still checked."""
    exists = lambda fpath, md5=None: Path(fpath).is_file()  # noqa: E731
    with mock.patch("torchvision.datasets.cifar.check_integrity", exists), \
            mock.patch("torchvision.datasets.flowers102.check_integrity", exists):
        yield
