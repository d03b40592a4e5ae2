"""Behaviour tests of data.py's MTIL splits on small fake trees whose images encode their own
identity: the red channel of every pixel is the class, the green channel the file's rank in its
class folder. For the 80/20 datasets (Caltech101, EuroSAT, SUN397) each split must be exactly
ZSCL's seed-42 `random_split(range(n), [int(0.8 n), n - int(0.8 n)])` over the files in sorted
order (class folders sorted, files sorted), every sample must carry the label of its own file,
the class name at that label must be its folder's name, and the train split must use the train
transform, the test split the eval transform. Sizes are chosen where int(0.8 n) != round(0.8 n).
For the datasets with an official split, every sample's label must be its file's class."""
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import data
from fake_mtil import HAS_SCIPY, skip_md5_checks, write_fake_mtil

# class folder -> expected Task.classnames entry, in label order (= sorted folder order)
FOLDERS = {
    "EuroSAT": [("AnnualCrop", "annual crop land"), ("Forest", "forest"), ("Pasture", "pasture land"),
                ("SeaLake", "lake or sea")],
    "SUN397": [("a/abbey", "abbey"), ("b/beach", "beach"), ("c/canyon", "canyon"), ("d/desert/sand", "desert/sand")],
    "Caltech101": [("Faces", "off-center face"), ("Leopards", "leopard"), ("airplanes", "airplane"),
                   ("car_side", "side of a car")],
}
# per-class counts: n = 17 (0.8 n = 13.6) and n = 12 (0.8 n = 9.6): int and round differ
COUNTS = [(3, 5, 4, 5), (5, 3, 4)]
SPLIT_DATASETS = [pytest.param(n, marks=pytest.mark.skipif(not HAS_SCIPY, reason="Caltech101 items need scipy"))
                  if n == "Caltech101" else n for n in FOLDERS]


def _write(path: Path, c: int, j: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (10, 8), (30 + 40 * c, 20 + 12 * j, 128)).save(path)


def _file_names(name: str, folder: str, count: int) -> list[str]:
    """File names of one class folder, in WRITING order (not sorted)."""
    if name == "SUN397":
        return [f"sun_{x}.jpg" for x in "qbxmf"[:count]]
    if name == "EuroSAT":
        return [f"{folder}_{k}.jpg" for k in (3, 1, 5, 2, 4)[:count]]
    return [f"image_{k + 1:04d}.jpg" for k in range(count)]         # Caltech101 numbers its files 1..n


def _write_tree(root: Path, name: str, counts) -> list[tuple[int, int]]:
    """Write the fake dataset; returns (class, rank in folder) of every file in sorted order."""
    folders = FOLDERS[name][:len(counts)]
    base = {"EuroSAT": root / "eurosat" / "2750", "SUN397": root / "SUN397",
            "Caltech101": root / "caltech101" / "101_ObjectCategories"}[name]
    if name == "SUN397":
        base.mkdir(parents=True, exist_ok=True)
        (base / "ClassName.txt").write_text("".join(f"/{f}\n" for f, _ in folders))
    if name == "Caltech101":                                         # torchvision drops this folder
        for k in range(2):
            _write(base / "BACKGROUND_Google" / f"image_{k + 1:04d}.jpg", 5, k)
    order = []
    for c, ((folder, _), count) in enumerate(zip(folders, counts)):
        files = _file_names(name, folder.split("/")[-1], count)
        rank = sorted(files)
        for f in files:
            _write(base / folder / f, c, rank.index(f))
        order += [(c, j) for j in range(count)]
    return order


def _tag(marker):
    def transform(img):                                              # centre pixel (R, G) + split marker
        r, g, _ = img.convert("RGB").getpixel((5, 4))
        return torch.tensor([r, g, marker])
    return transform


TT, ET = _tag(0), _tag(1)


def _decode(x) -> tuple[int, int]:
    r, g = int(x[0]), int(x[1])
    c, j = round((r - 30) / 40), round((g - 20) / 12)
    assert abs(r - (30 + 40 * c)) <= 6 and abs(g - (20 + 12 * j)) <= 4, f"undecodable pixel {(r, g)}"
    return c, j


def _load(monkeypatch, root, name, listing):
    if listing == "reversed":                                        # file-system order must not matter
        rglob, listdir = Path.rglob, os.listdir
        monkeypatch.setattr(Path, "rglob", lambda self, pattern: reversed(list(rglob(self, pattern))))
        monkeypatch.setattr(os, "listdir", lambda p=".": list(reversed(listdir(p))))
    try:
        return data.load_mtil_task(name, root, TT, ET)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("listing", ["native", "reversed"])
@pytest.mark.parametrize("counts", COUNTS, ids=["n17", "n12"])
@pytest.mark.parametrize("name", SPLIT_DATASETS)
def test_80_20_split_is_seeded_random_split_and_labels_follow_files(tmp_path, monkeypatch, name, counts, listing):
    order = _write_tree(tmp_path, name, counts)
    task = _load(monkeypatch, tmp_path, name, listing)
    n = len(order)
    n_train = int(0.8 * n)
    names = [nm for _, nm in FOLDERS[name][:len(counts)]]
    assert task.classnames == names, f"{name}: class names {task.classnames}, want {names} (sorted folders)"
    assert (len(task.train), len(task.test)) == (n_train, n - n_train), \
        f"{name} n={n}: split sizes {(len(task.train), len(task.test))}, want int(0.8 n) = {n_train} / {n - n_train}"
    ref = torch.utils.data.random_split(range(n), [n_train, n - n_train], generator=torch.Generator().manual_seed(42))
    for split, ds, idx, marker in (("train", task.train, ref[0].indices, 0), ("test", task.test, ref[1].indices, 1)):
        items = [ds[k] for k in range(len(ds))]
        got = [_decode(x) for x, _ in items]
        labels = [int(y) for _, y in items]
        bad = [(k, c, y) for k, ((c, _), y) in enumerate(zip(got, labels)) if y != c]
        assert not bad, f"{name} ({listing} listing) {split}: (index, file's class, label) with a wrong label: {bad}"
        assert data.dataset_targets(ds) == labels, f"{name} {split}: targets read from the lists != items' labels"
        want = [order[i] for i in idx]
        assert got == want, (f"{name} n={n} ({listing} listing) {split}: files (class, rank) {got}\n"
                             f"want random_split(range(n), seed 42) over the sorted files: {want}")
        assert all(int(x[2]) == marker for x, _ in items), f"{name} {split}: wrong transform (train/eval swapped?)"
    train_files = {order[i] for i in ref[0].indices}
    test_files = {_decode(task.test[k][0]) for k in range(len(task.test))}
    assert not train_files & test_files and len(train_files | test_files) == n, "splits must partition the files"


OFFICIAL = ["Aircraft", "DTD", "Food", "OxfordPet"] + [
    pytest.param(n, marks=pytest.mark.skipif(not HAS_SCIPY, reason="needs scipy")) for n in ("Flowers", "StanfordCars")]


@pytest.fixture(scope="module")
def official_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    names = ["Aircraft", "DTD", "Food", "OxfordPet"] + (["Flowers", "StanfordCars"] if HAS_SCIPY else [])
    return root, write_fake_mtil(root, names)


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_split_labels_follow_files(official_tree, name):
    """fake_mtil colours class c's images with red 40 + 70 c: every label must match its image."""
    root, info = official_tree
    red = lambda img: torch.tensor(img.convert("RGB").getpixel((5, 4))[0])  # noqa: E731
    with skip_md5_checks():
        task = data.load_mtil_task(name, root, red, red)
    assert task.classnames == info[name]["classnames"]
    for split, ds in (("train", task.train), ("test", task.test)):
        pairs = [(round((int(x) - 40) / 70), int(y)) for x, y in (ds[k] for k in range(len(ds)))]
        bad = [(k, c, y) for k, (c, y) in enumerate(pairs) if c != y]
        assert not bad, f"{name} {split}: (index, file's class, label) mismatched: {bad}"
        assert sorted({y for _, y in pairs}) == [0, 1, 2]
