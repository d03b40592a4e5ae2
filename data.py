"""Datasets: the MTIL benchmark (11 torchvision datasets), GNSP's ImageNet reference data, the
class-incremental (CIFAR-100, TinyImageNet) and X-TAIL protocols, and the procedural toy
benchmark that makes every script runnable on a laptop CPU.

MTIL = Multi-domain Task-Incremental Learning, from ZSCL (Zheng et al., ICCV 2023,
arXiv 2303.06628; code: Thunderbeee/ZSCL, mtil/src/datasets/collections.py). We follow that
code: the same torchvision loaders and splits (an 80/20 seed-42 random split for Caltech101,
EuroSAT and SUN397), ZSCL's class names and prompt templates (templates[0] trains, evaluation
ensembles all of them), Order I (alphabetical) and Order II. Datasets are built from file lists;
images are decoded only when an item is read. Nothing in here trains anything.

Contents, in file order:

  1. MTIL: `Task`, the 11 dataset names and Order I / II, CLIP's preprocessing
  2. MTIL: prompt templates (ZSCL's, and KeepLoRA's own lists) and hard-coded class names
  3. MTIL: where each dataset lives on disk and how to get it (`mtil_missing`, one-line errors)
  4. MTIL: loading one task with ZSCL's splits (`load_mtil_task`, `mtil_tasks`)
  5. MTIL: labels and few-shot subsets (`few_shot_subset`, `transformed_once`)
  6. GNSP's reference data: ImageNet-train images with captions (class names from open_clip)
  7. The toy benchmark: the procedural world, its tasks and orders, the tiny CLIP's config and
     pretraining recipe, its pretraining stream and reference pairs
  8. CIL and X-TAIL: MoE-Adapters' class orders and steps (`cil_tasks`), RAIL's cross-domain
     task-agnostic domains over MTIL's builders (`xtail_tasks`)
  9. The command line (`--check`, `--download`)

    python data.py --check --root DIR       # what is there; what is missing, where, how to get it
    python data.py --download --root DIR    # fetch what torchvision can still download
"""
import argparse
import copy
import importlib.util
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision import transforms as T

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES as OPENAI_IMAGENET_CLASSNAMES

# ---- 1. MTIL: tasks, orders, preprocessing ----

MTIL_DATASETS = ["Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food",
                 "MNIST", "OxfordPet", "StanfordCars", "SUN397"]
MTIL_ORDERS = {  # ZSCL mtil/scripts/ZSCL.sh (Order I) and ZSCL_minus.sh (Order II)
    "I": list(MTIL_DATASETS),
    "II": ["StanfordCars", "Food", "MNIST", "OxfordPet", "Flowers", "SUN397", "Aircraft",
           "Caltech101", "DTD", "EuroSAT", "CIFAR100"],
}


@dataclass
class Task:
    name: str
    classnames: list[str]
    templates: list[str]  # "{}" takes the class name; templates[0] trains, evaluation ensembles all
    train: Dataset        # items: (image tensor CxHxW, int label)
    test: Dataset


class MissingDataError(Exception):
    """Every missing dataset at once: `.missing` = [(name, expected path, how to get it)]."""

    def __init__(self, missing: list[tuple[str, str, str]]):
        self.missing = list(missing)
        lines = [f"{len(self.missing)} dataset(s) missing:"]
        for name, path, how in self.missing:
            lines += [f"  {name}: expected {path}", f"      how to get it: {how}"]
        super().__init__("\n".join(lines))


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def clip_transforms(image_size: int = 224) -> tuple[Callable, Callable]:
    """(train, eval) preprocessing as in ZSCL (mtil/clip/clip.py:_transform)."""
    bicubic = T.InterpolationMode.BICUBIC
    tail = [_to_rgb, T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    train = T.Compose([T.RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=bicubic), *tail])
    evaluate = T.Compose([T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size), *tail])
    return train, evaluate


# ---- 2. MTIL: prompt templates and hard-coded class names (ZSCL collections.py, cifar10.py) ----

TEMPLATES = {
    "Aircraft": ["a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft."],
    "Caltech101": [
        "a photo of a {}.", "a painting of a {}.", "a plastic {}.", "a sculpture of a {}.",
        "a sketch of a {}.", "a tattoo of a {}.", "a toy {}.", "a rendition of a {}.",
        "a embroidered {}.", "a cartoon {}.", "a {} in a video game.", "a plushie {}.",
        "a origami {}.", "art of a {}.", "graffiti of a {}.", "a drawing of a {}.",
        "a doodle of a {}.", "a photo of the {}.", "a painting of the {}.", "the plastic {}.",
        "a sculpture of the {}.", "a sketch of the {}.", "a tattoo of the {}.", "the toy {}.",
        "a rendition of the {}.", "the embroidered {}.", "the cartoon {}.",
        "the {} in a video game.", "the plushie {}.", "the origami {}.", "art of the {}.",
        "graffiti of the {}.", "a drawing of the {}.", "a doodle of the {}.",
    ],
    "CIFAR100": [
        "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
        "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
        "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.",
        "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
        "a low contrast photo of the {}.", "a high contrast photo of the {}.",
        "a bad photo of the {}.", "a good photo of the {}.", "a photo of the small {}.",
        "a photo of the big {}.",
    ],
    "DTD": ["a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} thing.",
            "a photo of a {} object.", "a photo of the {} texture.", "a photo of the {} pattern.",
            "a photo of the {} thing.", "a photo of the {} object."],
    "EuroSAT": ["a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                "a centered satellite photo of the {}."],
    "Flowers": ["a photo of a {}, a type of flower."],
    "Food": ["a photo of a {}, a type of food."],
    "MNIST": ['a photo of the number: "{}".'],
    "OxfordPet": ["a photo of a {}, a type of pet."],
    "StanfordCars": ["a photo of a {}, a type of car.", "a photo of a {}.", "a photo of the {}.",
                     "a photo of my {}.", "i love my {}!", "a photo of my dirty {}.",
                     "a photo of my clean {}.", "a photo of my new {}.", "a photo of my old {}."],
    "SUN397": ["a photo of a {}.", "a photo of the {}."],
}

# KeepLoRA's own template lists where they differ from ZSCL's (MaolinLuo/KeepLoRA@a17f9c2:
# MTIL/MTIL_datasets/collections.py). KeepLoRA trains and evaluates with templates[0] only, so the
# order matters: for DTD and SUN397 it is another sentence than ZSCL's templates[0], and for
# StanfordCars the first sentence itself differs ("the" for "a"). The other eight lists are ZSCL's.
KEEPLORA_TEMPLATES = {
    "DTD": ["a photo of a {} thing.", "a photo of a {} texture.", "a photo of a {} pattern.",
            "a photo of a {} object.", "a photo of the {} thing.", "a photo of the {} texture.",
            "a photo of the {} pattern.", "a photo of the {} object."],
    "StanfordCars": ["a photo of the {}, a type of car.", "a photo of a {}.", "a photo of the {}.",
                     "a photo of my {}.", "i love my {}!", "a photo of my dirty {}.",
                     "a photo of my clean {}.", "a photo of my new {}.", "a photo of my old {}."],
    "SUN397": ["a photo of the {}.", "a photo of a {}."],
}

# ZSCL's hard-coded names, in the order of torchvision's sorted class folders (sic: the double
# space in "head of a  crocodile" is ZSCL's, kept so zero-shot numbers stay comparable).
CALTECH101_CLASSNAMES = [
    "off-center face", "centered face", "leopard", "motorbike", "accordion", "airplane", "anchor",
    "ant", "barrel", "bass", "beaver", "binocular", "bonsai", "brain", "brontosaurus", "buddha",
    "butterfly", "camera", "cannon", "side of a car", "ceiling fan", "cellphone", "chair",
    "chandelier", "body of a cougar cat", "face of a cougar cat", "crab", "crayfish", "crocodile",
    "head of a  crocodile", "cup", "dalmatian", "dollar bill", "dolphin", "dragonfly",
    "electric guitar", "elephant", "emu", "euphonium", "ewer", "ferry", "flamingo",
    "head of a flamingo", "garfield", "gerenuk", "gramophone", "grand piano", "hawksbill",
    "headphone", "hedgehog", "helicopter", "ibis", "inline skate", "joshua tree", "kangaroo",
    "ketch", "lamp", "laptop", "llama", "lobster", "lotus", "mandolin", "mayfly", "menorah",
    "metronome", "minaret", "nautilus", "octopus", "okapi", "pagoda", "panda", "pigeon", "pizza",
    "platypus", "pyramid", "revolver", "rhino", "rooster", "saxophone", "schooner", "scissors",
    "scorpion", "sea horse", "snoopy (cartoon beagle)", "soccer ball", "stapler", "starfish",
    "stegosaurus", "stop sign", "strawberry", "sunflower", "tick", "trilobite", "umbrella",
    "watch", "water lilly", "wheelchair", "wild cat", "windsor chair", "wrench",
    "yin and yang symbol",
]
_CALTECH101_FOLDERS = """
Faces Faces_easy Leopards Motorbikes accordion airplanes anchor ant barrel bass beaver
binocular bonsai brain brontosaurus buddha butterfly camera cannon car_side ceiling_fan
cellphone chair chandelier cougar_body cougar_face crab crayfish crocodile crocodile_head
cup dalmatian dollar_bill dolphin dragonfly electric_guitar elephant emu euphonium ewer
ferry flamingo flamingo_head garfield gerenuk gramophone grand_piano hawksbill headphone
hedgehog helicopter ibis inline_skate joshua_tree kangaroo ketch lamp laptop llama
lobster lotus mandolin mayfly menorah metronome minaret nautilus octopus okapi pagoda
panda pigeon pizza platypus pyramid revolver rhino rooster saxophone schooner scissors
scorpion sea_horse snoopy soccer_ball stapler starfish stegosaurus stop_sign strawberry
sunflower tick trilobite umbrella watch water_lilly wheelchair wild_cat windsor_chair
wrench yin_yang
""".split()
EUROSAT_CLASSNAMES = [
    "annual crop land", "forest", "brushland or shrubland", "highway or road",
    "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
    "residential buildings or homes or apartments", "river", "lake or sea",
]
_EUROSAT_FOLDERS = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
                    "Pasture", "PermanentCrop", "Residential", "River", "SeaLake"]
FLOWERS102_CLASSNAMES = [  # indexed by the label in imagelabels.mat (minus 1)
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea",
    "english marigold", "tiger lily", "moon orchid", "bird of paradise", "monkshood",
    "globe thistle", "snapdragon", "colt's foot", "king protea", "spear thistle", "yellow iris",
    "globe-flower", "purple coneflower", "peruvian lily", "balloon flower",
    "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger",
    "grape hyacinth", "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke",
    "sweet william", "carnation", "garden phlox", "love in the mist", "mexican aster",
    "alpine sea holly", "ruby-lipped cattleya", "cape flower", "great masterwort", "siam tulip",
    "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia", "bolero deep blue",
    "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia",
    "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium",
    "orange dahlia", "pink-yellow dahlia", "cautleya spicata", "japanese anemone",
    "black-eyed susan", "silverbush", "californian poppy", "osteospermum", "spring crocus",
    "bearded iris", "windflower", "tree poppy", "gazania", "azalea", "water lily", "rose",
    "thorn apple", "morning glory", "passion flower", "lotus", "toad lily", "anthurium",
    "frangipani", "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia",
    "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove",
    "bougainvillea", "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower",
    "trumpet creeper", "blackberry lily",
]


def _folder_names(folders: list[str], known: list[str], names: list[str]) -> list[str]:
    # CHOICE: map class folder -> ZSCL name instead of using the list by position: identical on
    # the full dataset, and still right when some folders are absent (e.g. the fake test trees).
    table = dict(zip(known, names))
    return [table.get(f, f.replace("_", " ")) for f in folders]


# ---- 3. MTIL: where each dataset lives and how to get it ----

# Paths under the data root that torchvision's loaders read (torchvision 0.29); the first one is
# the dataset's own folder, so a wholly missing dataset is reported by that folder.
_LAYOUT = {
    "Aircraft": ["fgvc-aircraft-2013b", "fgvc-aircraft-2013b/data/images",
                 "fgvc-aircraft-2013b/data/variants.txt",
                 "fgvc-aircraft-2013b/data/images_variant_train.txt",
                 "fgvc-aircraft-2013b/data/images_variant_test.txt"],
    "Caltech101": ["caltech101", "caltech101/101_ObjectCategories"],
    "CIFAR100": ["cifar-100-python", "cifar-100-python/train", "cifar-100-python/test",
                 "cifar-100-python/meta"],
    "DTD": ["dtd/dtd", "dtd/dtd/images", "dtd/dtd/labels/train1.txt", "dtd/dtd/labels/test1.txt"],
    "EuroSAT": ["eurosat", "eurosat/2750"],
    "Flowers": ["flowers-102", "flowers-102/jpg", "flowers-102/imagelabels.mat",
                "flowers-102/setid.mat"],
    "Food": ["food-101", "food-101/images", "food-101/meta/train.json", "food-101/meta/test.json"],
    "MNIST": ["MNIST/raw", "MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/train-labels-idx1-ubyte",
              "MNIST/raw/t10k-images-idx3-ubyte", "MNIST/raw/t10k-labels-idx1-ubyte"],
    "OxfordPet": ["oxford-iiit-pet", "oxford-iiit-pet/images",
                  "oxford-iiit-pet/annotations/trainval.txt", "oxford-iiit-pet/annotations/test.txt"],
    "StanfordCars": ["stanford_cars", "stanford_cars/cars_train", "stanford_cars/cars_test",
                     "stanford_cars/devkit/cars_meta.mat", "stanford_cars/devkit/cars_train_annos.mat",
                     "stanford_cars/cars_test_annos_withlabels.mat"],
    "SUN397": ["SUN397", "SUN397/ClassName.txt"],
}
_NEEDS_SCIPY = {"Caltech101", "Flowers", "StanfordCars"}  # torchvision reads them with scipy.io
_DOWNLOAD = {  # name -> torchvision call that downloads it (StanfordCars and SUN397 cannot)
    "Aircraft": lambda root: datasets.FGVCAircraft(root, download=True),
    "Caltech101": lambda root: datasets.Caltech101(root, download=True),
    "CIFAR100": lambda root: datasets.CIFAR100(root, download=True),
    "DTD": lambda root: datasets.DTD(root, download=True),
    "EuroSAT": lambda root: datasets.EuroSAT(root, download=True),
    "Flowers": lambda root: datasets.Flowers102(root, download=True),
    "Food": lambda root: datasets.Food101(root, download=True),
    "MNIST": lambda root: datasets.MNIST(root, download=True),
    "OxfordPet": lambda root: datasets.OxfordIIITPet(root, download=True),
}


def _how_to_get(name: str, root: Path) -> str:
    if name in _DOWNLOAD:
        return f"python data.py --download --root {root} --datasets {name}  (torchvision download)"
    if name == "StanfordCars":
        return ("manual (torchvision cannot download it, the original URL is gone): get the images, "
                "car_devkit.tgz and cars_test_annos_withlabels.mat (e.g. the Kaggle copies; see "
                f"pytorch/vision#7545) and arrange {root}/stanford_cars/{{cars_train/, cars_test/, "
                "devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat}")
    return ("manual (torchvision's URL is dead): get the original SUN397.tar.gz (108,754 images) "
            f"and extract it into {root} so that {root}/SUN397/ClassName.txt and "
            f"{root}/SUN397/a/abbey/sun_*.jpg exist (a re-pack into train/test folders will not load)")


def _has_scipy() -> bool:
    return importlib.util.find_spec("scipy") is not None


def _first_absent(root: Path, name: str) -> Path | None:
    return next((root / p for p in _LAYOUT[name] if not (root / p).exists()), None)


def mtil_missing(root, names=MTIL_DATASETS) -> list[tuple[str, str, str]]:
    """(name, expected path, how to get it) for each dataset in `names` that cannot be loaded
    from `root`; [] if all can. File-existence checks only."""
    root = Path(root).expanduser()
    unknown = sorted(set(names) - set(_LAYOUT))
    if unknown:
        raise ValueError(f"unknown MTIL dataset(s) {unknown}; choose from {MTIL_DATASETS}")
    missing = []
    for name in names:
        absent = _first_absent(root, name)
        if absent is not None:
            missing.append((name, str(absent), _how_to_get(name, root)))
        elif name in _NEEDS_SCIPY and not _has_scipy():
            missing.append((name, str(root / _LAYOUT[name][0]),
                            "the files are there, but torchvision reads this dataset with scipy: "
                            "pip install scipy"))
    return missing


# ---- 4. MTIL: loading one task with ZSCL's splits ----

def _with_transform(ds: Dataset, transform) -> Dataset:
    ds = copy.copy(ds)  # shares the file list; only the transform differs
    ds.transform = transform
    return ds


def _split_80_20(full: Dataset, train_transform, eval_transform) -> tuple[Subset, Subset]:
    """ZSCL's ClassificationDataset.split_dataset: random_split(int(0.8 n), rest), seed 42."""
    n = len(full)
    n_train = int(0.8 * n)
    train_idx, test_idx = torch.utils.data.random_split(
        range(n), [n_train, n - n_train], generator=torch.Generator().manual_seed(42))
    return (Subset(_with_transform(full, train_transform), list(train_idx)),
            Subset(_with_transform(full, eval_transform), list(test_idx)))


def _sun397_sorted(root: Path) -> datasets.SUN397:
    full = datasets.SUN397(root)
    # DEVIATION: torchvision lists SUN397 with an unsorted Path.rglob, so ZSCL's seed-42 split
    # depends on the file system; we sort the list first (reproducible, not ZSCL's exact split).
    pairs = sorted(zip(full._image_files, full._labels))
    full._image_files, full._labels = [p for p, _ in pairs], [y for _, y in pairs]
    return full


def _underscores(classes: list[str]) -> list[str]:
    return [c.replace("_", " ") for c in classes]  # ZSCL process_labels()


def load_mtil_task(name: str, root, train_transform, eval_transform) -> Task:
    """One MTIL task with ZSCL's split, class names and templates."""
    root = Path(root).expanduser()
    missing = mtil_missing(root, [name])
    if missing:
        raise MissingDataError(missing)
    tt, et = train_transform, eval_transform
    if name == "Caltech101":  # BACKGROUND_Google is dropped by torchvision
        full = datasets.Caltech101(root)
        train, test = _split_80_20(full, tt, et)
        classnames = _folder_names(full.categories, _CALTECH101_FOLDERS, CALTECH101_CLASSNAMES)
    elif name == "EuroSAT":
        full = datasets.EuroSAT(root)
        train, test = _split_80_20(full, tt, et)
        classnames = _folder_names(full.classes, _EUROSAT_FOLDERS, EUROSAT_CLASSNAMES)
    elif name == "SUN397":
        full = _sun397_sorted(root)
        train, test = _split_80_20(full, tt, et)
        classnames = _underscores(full.classes)
    elif name == "Aircraft":  # "train", not "trainval"; annotation level "variant"
        train = datasets.FGVCAircraft(root, split="train", transform=tt)
        test = datasets.FGVCAircraft(root, split="test", transform=et)
        classnames = _underscores(train.classes)
    elif name == "CIFAR100":
        train = datasets.CIFAR100(root, train=True, transform=tt)
        test = datasets.CIFAR100(root, train=False, transform=et)
        classnames = _underscores(train.classes)
    elif name == "DTD":  # partition 1
        train = datasets.DTD(root, split="train", transform=tt)
        test = datasets.DTD(root, split="test", transform=et)
        classnames = _underscores(train.classes)
    elif name == "Flowers":  # "train" = 10 per class, not train+val
        train = datasets.Flowers102(root, split="train", transform=tt)
        test = datasets.Flowers102(root, split="test", transform=et)
        classnames = list(FLOWERS102_CLASSNAMES)
    elif name == "Food":
        train = datasets.Food101(root, split="train", transform=tt)
        test = datasets.Food101(root, split="test", transform=et)
        classnames = _underscores(train.classes)
    elif name == "MNIST":  # class names verbatim: "0 - zero", ...
        train = datasets.MNIST(root, train=True, transform=tt)
        test = datasets.MNIST(root, train=False, transform=et)
        classnames = list(train.classes)
    elif name == "OxfordPet":
        train = datasets.OxfordIIITPet(root, split="trainval", transform=tt)
        test = datasets.OxfordIIITPet(root, split="test", transform=et)
        classnames = _underscores(train.classes)
    else:  # StanfordCars; download=False: torchvision's download() always raises now
        train = datasets.StanfordCars(root, split="train", transform=tt)
        test = datasets.StanfordCars(root, split="test", transform=et)
        classnames = _underscores(train.classes)
    return Task(name, classnames, list(TEMPLATES[name]), train, test)


def mtil_tasks(root, order="I", train_transform=None, eval_transform=None, max_tasks=None) -> list[Task]:
    """The tasks of MTIL Order I or II (the first `max_tasks` of them). Transforms default to
    clip_transforms(224). Raises one MissingDataError naming every missing dataset."""
    if order not in MTIL_ORDERS:
        raise ValueError(f"unknown MTIL order {order!r}; choose from {list(MTIL_ORDERS)}")
    names = MTIL_ORDERS[order][:max_tasks]
    missing = mtil_missing(root, names)
    if missing:
        raise MissingDataError(missing)
    default_train, default_eval = clip_transforms()
    train_transform = default_train if train_transform is None else train_transform
    eval_transform = default_eval if eval_transform is None else eval_transform
    return [load_mtil_task(name, root, train_transform, eval_transform) for name in names]


# ---- 5. MTIL: labels and few-shot subsets ----

def dataset_targets(ds) -> list[int]:
    """Labels of `ds` in index order, read from the file lists (no image is decoded)."""
    if isinstance(ds, Subset):
        targets = dataset_targets(ds.dataset)
        return [targets[i] for i in ds.indices]
    for attr in ("targets", "_labels", "y"):  # CIFAR/MNIST/ImageFolder, most others, Caltech101
        if hasattr(ds, attr):
            labels = getattr(ds, attr)
            return [int(y) for y in (labels.tolist() if torch.is_tensor(labels) else labels)]
    if hasattr(ds, "_samples"):  # StanfordCars
        return [int(y) for _, y in ds._samples]
    return [int(ds[i][1]) for i in range(len(ds))]  # anything else: read the items


def few_shot_subset(ds, k: int, seed: int = 42) -> Subset:
    """The first k items of each class met in a seeded shuffled pass over `ds` (all of a class
    if it has fewer), in the order met."""
    if k < 1:
        raise ValueError(f"few-shot k must be >= 1, got {k}")
    targets = dataset_targets(ds)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed)).tolist()
    seen, keep = Counter(), []
    for i in order:
        if seen[targets[i]] < k:
            seen[targets[i]] += 1
            keep.append(i)
    return Subset(ds, keep)


def transformed_once(ds, seed: int = 42) -> torch.utils.data.TensorDataset:
    """Every item of `ds` read once (its random transform drawn once, from `seed`) and kept in
    memory, as DAC's and MoE-Adapters' few-shot code stacks the transformed images into a
    TensorDataset. For small (few-shot) sets only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        items = [ds[i] for i in range(len(ds))]
    images = torch.stack([x for x, _ in items])                             # (N, C, H, W)
    return torch.utils.data.TensorDataset(images, torch.tensor([int(y) for _, y in items]))


# ---- 6. GNSP: ImageNet reference images with captions ----

def _imagenet_how(root: Path) -> str:
    return ("manual (only gnsp.py needs it): get ILSVRC2012_img_train.tar from image-net.org, "
            "extract it and each per-class tar inside it so that "
            f"{root}/ImageNet/train/n01440764/n01440764_10026.JPEG etc. exist (1000 wnid folders)")


def _wnid_folders(train: Path) -> list[str]:
    return sorted(w for w in set(os.listdir(train)) & set(IMAGENET_WNIDS) if (train / w).is_dir())


def imagenet_missing(root) -> list[tuple[str, str, str]]:
    """[("ImageNet", expected path, how)] if <root>/ImageNet/train/<wnid>/ is absent, else []."""
    root = Path(root).expanduser()
    train = root / "ImageNet" / "train"
    if not train.is_dir():
        return [("ImageNet", str(train), _imagenet_how(root))]
    if not _wnid_folders(train):
        return [("ImageNet", str(train / IMAGENET_WNIDS[0]), _imagenet_how(root))]
    return []


class ImageNetReference(Dataset):
    """Image-caption pairs: items (image tensor, "a photo of a/an {class name}")."""

    def __init__(self, files: list[str], captions: list[str], transform):
        self.files, self.captions, self.transform = files, captions, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(Image.open(self.files[i]).convert("RGB")), self.captions[i]


def imagenet_reference(root, n: int = 1000, seed: int = 0, transform=None) -> ImageNetReference:
    """GNSP's reference data (src/datasets/imagenet1k.py): n ImageNet-train images drawn without
    replacement, np.random.RandomState(seed).choice over all files; eval transform by default."""
    root = Path(root).expanduser()
    missing = imagenet_missing(root)
    if missing:
        raise MissingDataError(missing)
    names = dict(zip(IMAGENET_WNIDS, IMAGENET_CLASSNAMES))
    train = root / "ImageNet" / "train"
    # DEVIATION: GNSP walks os.listdir (file-system order); we sort, so a seed picks the same
    # images on every machine.
    files, wnids = [], []
    for wnid in _wnid_folders(train):
        for f in sorted(os.listdir(train / wnid)):
            if f.lower().endswith((".jpeg", ".jpg", ".png")):
                files.append(str(train / wnid / f))
                wnids.append(wnid)
    # CHOICE: fewer than n images available -> use them all.
    pick = np.random.RandomState(seed).choice(len(files), min(n, len(files)), replace=False)
    # DEVIATION: captions use OpenAI CLIP's ImageNet class names; GNSP takes the first WordNet
    # synonym from a labels.txt file. "an" before a vowel, as GNSP.
    captions = [f"a photo of {'an' if names[wnids[i]][0].lower() in 'aeiou' else 'a'} {names[wnids[i]]}"
                for i in pick]
    return ImageNetReference([files[i] for i in pick], captions, transform or clip_transforms()[1])


# The 1000 ILSVRC-2012 wnids (sorted = the standard class order) and OpenAI CLIP's class names
# for them (openai/CLIP notebooks/Prompt_Engineering_for_ImageNet.ipynb, shipped by open_clip as
# open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES), index-aligned.
IMAGENET_WNIDS = """
n01440764 n01443537 n01484850 n01491361 n01494475 n01496331 n01498041 n01514668 n01514859 n01518878
n01530575 n01531178 n01532829 n01534433 n01537544 n01558993 n01560419 n01580077 n01582220 n01592084
n01601694 n01608432 n01614925 n01616318 n01622779 n01629819 n01630670 n01631663 n01632458 n01632777
n01641577 n01644373 n01644900 n01664065 n01665541 n01667114 n01667778 n01669191 n01675722 n01677366
n01682714 n01685808 n01687978 n01688243 n01689811 n01692333 n01693334 n01694178 n01695060 n01697457
n01698640 n01704323 n01728572 n01728920 n01729322 n01729977 n01734418 n01735189 n01737021 n01739381
n01740131 n01742172 n01744401 n01748264 n01749939 n01751748 n01753488 n01755581 n01756291 n01768244
n01770081 n01770393 n01773157 n01773549 n01773797 n01774384 n01774750 n01775062 n01776313 n01784675
n01795545 n01796340 n01797886 n01798484 n01806143 n01806567 n01807496 n01817953 n01818515 n01819313
n01820546 n01824575 n01828970 n01829413 n01833805 n01843065 n01843383 n01847000 n01855032 n01855672
n01860187 n01871265 n01872401 n01873310 n01877812 n01882714 n01883070 n01910747 n01914609 n01917289
n01924916 n01930112 n01943899 n01944390 n01945685 n01950731 n01955084 n01968897 n01978287 n01978455
n01980166 n01981276 n01983481 n01984695 n01985128 n01986214 n01990800 n02002556 n02002724 n02006656
n02007558 n02009229 n02009912 n02011460 n02012849 n02013706 n02017213 n02018207 n02018795 n02025239
n02027492 n02028035 n02033041 n02037110 n02051845 n02056570 n02058221 n02066245 n02071294 n02074367
n02077923 n02085620 n02085782 n02085936 n02086079 n02086240 n02086646 n02086910 n02087046 n02087394
n02088094 n02088238 n02088364 n02088466 n02088632 n02089078 n02089867 n02089973 n02090379 n02090622
n02090721 n02091032 n02091134 n02091244 n02091467 n02091635 n02091831 n02092002 n02092339 n02093256
n02093428 n02093647 n02093754 n02093859 n02093991 n02094114 n02094258 n02094433 n02095314 n02095570
n02095889 n02096051 n02096177 n02096294 n02096437 n02096585 n02097047 n02097130 n02097209 n02097298
n02097474 n02097658 n02098105 n02098286 n02098413 n02099267 n02099429 n02099601 n02099712 n02099849
n02100236 n02100583 n02100735 n02100877 n02101006 n02101388 n02101556 n02102040 n02102177 n02102318
n02102480 n02102973 n02104029 n02104365 n02105056 n02105162 n02105251 n02105412 n02105505 n02105641
n02105855 n02106030 n02106166 n02106382 n02106550 n02106662 n02107142 n02107312 n02107574 n02107683
n02107908 n02108000 n02108089 n02108422 n02108551 n02108915 n02109047 n02109525 n02109961 n02110063
n02110185 n02110341 n02110627 n02110806 n02110958 n02111129 n02111277 n02111500 n02111889 n02112018
n02112137 n02112350 n02112706 n02113023 n02113186 n02113624 n02113712 n02113799 n02113978 n02114367
n02114548 n02114712 n02114855 n02115641 n02115913 n02116738 n02117135 n02119022 n02119789 n02120079
n02120505 n02123045 n02123159 n02123394 n02123597 n02124075 n02125311 n02127052 n02128385 n02128757
n02128925 n02129165 n02129604 n02130308 n02132136 n02133161 n02134084 n02134418 n02137549 n02138441
n02165105 n02165456 n02167151 n02168699 n02169497 n02172182 n02174001 n02177972 n02190166 n02206856
n02219486 n02226429 n02229544 n02231487 n02233338 n02236044 n02256656 n02259212 n02264363 n02268443
n02268853 n02276258 n02277742 n02279972 n02280649 n02281406 n02281787 n02317335 n02319095 n02321529
n02325366 n02326432 n02328150 n02342885 n02346627 n02356798 n02361337 n02363005 n02364673 n02389026
n02391049 n02395406 n02396427 n02397096 n02398521 n02403003 n02408429 n02410509 n02412080 n02415577
n02417914 n02422106 n02422699 n02423022 n02437312 n02437616 n02441942 n02442845 n02443114 n02443484
n02444819 n02445715 n02447366 n02454379 n02457408 n02480495 n02480855 n02481823 n02483362 n02483708
n02484975 n02486261 n02486410 n02487347 n02488291 n02488702 n02489166 n02490219 n02492035 n02492660
n02493509 n02493793 n02494079 n02497673 n02500267 n02504013 n02504458 n02509815 n02510455 n02514041
n02526121 n02536864 n02606052 n02607072 n02640242 n02641379 n02643566 n02655020 n02666196 n02667093
n02669723 n02672831 n02676566 n02687172 n02690373 n02692877 n02699494 n02701002 n02704792 n02708093
n02727426 n02730930 n02747177 n02749479 n02769748 n02776631 n02777292 n02782093 n02783161 n02786058
n02787622 n02788148 n02790996 n02791124 n02791270 n02793495 n02794156 n02795169 n02797295 n02799071
n02802426 n02804414 n02804610 n02807133 n02808304 n02808440 n02814533 n02814860 n02815834 n02817516
n02823428 n02823750 n02825657 n02834397 n02835271 n02837789 n02840245 n02841315 n02843684 n02859443
n02860847 n02865351 n02869837 n02870880 n02871525 n02877765 n02879718 n02883205 n02892201 n02892767
n02894605 n02895154 n02906734 n02909870 n02910353 n02916936 n02917067 n02927161 n02930766 n02939185
n02948072 n02950826 n02951358 n02951585 n02963159 n02965783 n02966193 n02966687 n02971356 n02974003
n02977058 n02978881 n02979186 n02980441 n02981792 n02988304 n02992211 n02992529 n02999410 n03000134
n03000247 n03000684 n03014705 n03016953 n03017168 n03018349 n03026506 n03028079 n03032252 n03041632
n03042490 n03045698 n03047690 n03062245 n03063599 n03063689 n03065424 n03075370 n03085013 n03089624
n03095699 n03100240 n03109150 n03110669 n03124043 n03124170 n03125729 n03126707 n03127747 n03127925
n03131574 n03133878 n03134739 n03141823 n03146219 n03160309 n03179701 n03180011 n03187595 n03188531
n03196217 n03197337 n03201208 n03207743 n03207941 n03208938 n03216828 n03218198 n03220513 n03223299
n03240683 n03249569 n03250847 n03255030 n03259280 n03271574 n03272010 n03272562 n03290653 n03291819
n03297495 n03314780 n03325584 n03337140 n03344393 n03345487 n03347037 n03355925 n03372029 n03376595
n03379051 n03384352 n03388043 n03388183 n03388549 n03393912 n03394916 n03400231 n03404251 n03417042
n03424325 n03425413 n03443371 n03444034 n03445777 n03445924 n03447447 n03447721 n03450230 n03452741
n03457902 n03459775 n03461385 n03467068 n03476684 n03476991 n03478589 n03481172 n03482405 n03483316
n03485407 n03485794 n03492542 n03494278 n03495258 n03496892 n03498962 n03527444 n03529860 n03530642
n03532672 n03534580 n03535780 n03538406 n03544143 n03584254 n03584829 n03590841 n03594734 n03594945
n03595614 n03598930 n03599486 n03602883 n03617480 n03623198 n03627232 n03630383 n03633091 n03637318
n03642806 n03649909 n03657121 n03658185 n03661043 n03662601 n03666591 n03670208 n03673027 n03676483
n03680355 n03690938 n03691459 n03692522 n03697007 n03706229 n03709823 n03710193 n03710637 n03710721
n03717622 n03720891 n03721384 n03724870 n03729826 n03733131 n03733281 n03733805 n03742115 n03743016
n03759954 n03761084 n03763968 n03764736 n03769881 n03770439 n03770679 n03773504 n03775071 n03775546
n03776460 n03777568 n03777754 n03781244 n03782006 n03785016 n03786901 n03787032 n03788195 n03788365
n03791053 n03792782 n03792972 n03793489 n03794056 n03796401 n03803284 n03804744 n03814639 n03814906
n03825788 n03832673 n03837869 n03838899 n03840681 n03841143 n03843555 n03854065 n03857828 n03866082
n03868242 n03868863 n03871628 n03873416 n03874293 n03874599 n03876231 n03877472 n03877845 n03884397
n03887697 n03888257 n03888605 n03891251 n03891332 n03895866 n03899768 n03902125 n03903868 n03908618
n03908714 n03916031 n03920288 n03924679 n03929660 n03929855 n03930313 n03930630 n03933933 n03935335
n03937543 n03938244 n03942813 n03944341 n03947888 n03950228 n03954731 n03956157 n03958227 n03961711
n03967562 n03970156 n03976467 n03976657 n03977966 n03980874 n03982430 n03983396 n03991062 n03992509
n03995372 n03998194 n04004767 n04005630 n04008634 n04009552 n04019541 n04023962 n04026417 n04033901
n04033995 n04037443 n04039381 n04040759 n04041544 n04044716 n04049303 n04065272 n04067472 n04069434
n04070727 n04074963 n04081281 n04086273 n04090263 n04099969 n04111531 n04116512 n04118538 n04118776
n04120489 n04125021 n04127249 n04131690 n04133789 n04136333 n04141076 n04141327 n04141975 n04146614
n04147183 n04149813 n04152593 n04153751 n04154565 n04162706 n04179913 n04192698 n04200800 n04201297
n04204238 n04204347 n04208210 n04209133 n04209239 n04228054 n04229816 n04235860 n04238763 n04239074
n04243546 n04251144 n04252077 n04252225 n04254120 n04254680 n04254777 n04258138 n04259630 n04263257
n04264628 n04265275 n04266014 n04270147 n04273569 n04275548 n04277352 n04285008 n04286575 n04296562
n04310018 n04311004 n04311174 n04317175 n04325704 n04326547 n04328186 n04330267 n04332243 n04335435
n04336792 n04344873 n04346328 n04347754 n04350905 n04355338 n04355933 n04356056 n04357314 n04366367
n04367480 n04370456 n04371430 n04371774 n04372370 n04376876 n04380533 n04389033 n04392985 n04398044
n04399382 n04404412 n04409515 n04417672 n04418357 n04423845 n04428191 n04429376 n04435653 n04442312
n04443257 n04447861 n04456115 n04458633 n04461696 n04462240 n04465501 n04467665 n04476259 n04479046
n04482393 n04483307 n04485082 n04486054 n04487081 n04487394 n04493381 n04501370 n04505470 n04507155
n04509417 n04515003 n04517823 n04522168 n04523525 n04525038 n04525305 n04532106 n04532670 n04536866
n04540053 n04542943 n04548280 n04548362 n04550184 n04552348 n04553703 n04554684 n04557648 n04560804
n04562935 n04579145 n04579432 n04584207 n04589890 n04590129 n04591157 n04591713 n04592741 n04596742
n04597913 n04599235 n04604644 n04606251 n04612504 n04613696 n06359193 n06596364 n06785654 n06794110
n06874185 n07248320 n07565083 n07579787 n07583066 n07584110 n07590611 n07613480 n07614500 n07615774
n07684084 n07693725 n07695742 n07697313 n07697537 n07711569 n07714571 n07714990 n07715103 n07716358
n07716906 n07717410 n07717556 n07718472 n07718747 n07720875 n07730033 n07734744 n07742313 n07745940
n07747607 n07749582 n07753113 n07753275 n07753592 n07754684 n07760859 n07768694 n07802026 n07831146
n07836838 n07860988 n07871810 n07873807 n07875152 n07880968 n07892512 n07920052 n07930864 n07932039
n09193705 n09229709 n09246464 n09256479 n09288635 n09332890 n09399592 n09421951 n09428293 n09468604
n09472597 n09835506 n10148035 n10565667 n11879895 n11939491 n12057211 n12144580 n12267677 n12620546
n12768682 n12985857 n12998815 n13037406 n13040303 n13044778 n13052670 n13054560 n13133613 n15075141
""".split()
IMAGENET_CLASSNAMES = list(OPENAI_IMAGENET_CLASSNAMES)  # open_clip's copy of OpenAI's 1000 names

# ---- 7. The toy benchmark: a procedural image-text world and its tiny CLIP (no files shipped) ----
# 32x32 RGB images from six visual domains, one per task, the way MTIL's eleven datasets are
# eleven domains (TOY_DOMAINS): filled objects on a plain background, full-frame patterns, groups
# of dots on white, outlines on ruled paper, mosaics of grey tiles, and brush strokes on black.
# Each toy task asks one question of its own domain's images, with its own class names and prompt
# templates (TOY_TASKS). The tiny CLIP below is pretrained once (common.load_clip, cached) on
# captions of all six domains that mention each attribute only part of the time (_CAPTION_P), so
# zero-shot accuracy is above chance but not saturated. notes/toy_world.md measures what the
# world shows: per-task zero-shot accuracy, how far each task can be learned on its own
# (tools/learnability.py), and each method's forgetting and keeping.

# The tiny CLIP: an open_clip ViT config (built by common.load_clip as "toy-tiny") and its
# pretraining recipe (symmetric InfoNCE on toy_pretraining_batches, common.pretrain_contrastive).
# Both are part of the cache key of the pretrained weights (with TOY_WORLD_VERSION and the seed).
TOY_CLIP_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# CHOICE: recipe measured on 2 CPU cores (notes/toy_world.md).
TOY_CLIP_PRETRAIN = {"steps": 800, "batch_size": 128, "lr": 2e-3, "warmup": 80, "weight_decay": 0.1}
TOY_WORLD_VERSION = 7  # part of the tiny-CLIP cache key: bump when rendering or captions change
TOY_SIZE = 32
TOY_SHAPES = ["circle", "square", "triangle", "cross", "diamond", "ring"]
# twelve hues 30 degrees apart (red at 0, orange at 30, ...): a fine-grained colour vocabulary
TOY_COLOURS = ["red", "orange", "yellow", "lime", "green", "mint", "cyan", "azure", "blue", "violet",
               "magenta", "pink"]
TOY_TEXTURES = ["striped", "banded", "diagonal", "dotted", "checkered", "grid"]  # stripes across, down, slanted
TOY_COUNTS = ["one", "two", "three", "four"]
TOY_POSITIONS = ["top left", "top right", "bottom left", "bottom right"]
TOY_SIZES = ["small", "medium", "large"]
TOY_TONES = ["black", "charcoal", "dark", "grey", "silver", "light", "pale", "white"]
TOY_VALUES = {"shape": TOY_SHAPES, "colour": TOY_COLOURS, "texture": TOY_TEXTURES, "count": TOY_COUNTS,
              "position": TOY_POSITIONS, "size": TOY_SIZES, "tone": TOY_TONES}
# domain -> the attributes its images vary in (each drawn uniformly and independently)
TOY_DOMAINS = {
    "objects": ["shape", "colour", "position", "tone"],  # one filled object on a plain background
    "patterns": ["texture", "colour", "tone"],           # a full-frame two-colour pattern (DTD's role)
    "dots": ["count", "shape", "colour"],                # one to four small objects on white
    "outlines": ["size", "shape", "colour"],             # one hollow shape on ruled paper
    "tiles": ["tone"],                                   # a mosaic of grey tiles around one tone
    "strokes": ["colour"],                               # one broad brush stroke on black
}
# task name -> (domain, attribute asked, templates; templates[0] is the training template);
# the class names are TOY_VALUES[attribute]
TOY_TASKS = {
    "Colours": ("objects", "colour", ["a {} object.", "something {}.", "a {} thing."]),
    "Counts": ("dots", "count", ["{} objects.", "a picture of {} things."]),
    "Inks": ("strokes", "colour", ["a {} stroke.", "a line painted in {}."]),
    "Sizes": ("outlines", "size", ["a {} outline.", "an outline of a {} shape."]),
    "Textures": ("patterns", "texture", ["a {} pattern.", "a {} texture."]),
    "Tones": ("tiles", "tone", ["a {} mosaic.", "a {} picture."]),
}
TOY_ORDERS = {"I": ["Colours", "Counts", "Inks", "Sizes", "Textures", "Tones"],  # alphabetical, as MTIL's
              "II": ["Tones", "Textures", "Counts", "Inks", "Sizes", "Colours"]}
_TONE_LEVEL = (0.08, 0.2, 0.32, 0.44, 0.56, 0.68, 0.8, 0.92)  # 0.12 apart: Tones is fine-grained
_SIZE_RADIUS = ((4.0, 5.0), (7.5, 8.5), (11.0, 12.5))
_QUADRANT = ((0.28, 0.28), (0.72, 0.28), (0.28, 0.72), (0.72, 0.72))  # (x, y) centre of each position, / S


def toy_attributes(n: int, g: torch.Generator, domain: str) -> dict[str, torch.Tensor]:
    """Sample n images' attributes of one domain: name -> (n,) integer codes."""
    return {k: torch.randint(len(TOY_VALUES[k]), (n,), generator=g) for k in TOY_DOMAINS[domain]}


def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.meshgrid(torch.arange(TOY_SIZE).float(), torch.arange(TOY_SIZE).float(), indexing="ij")


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return (lo + (hi - lo) * torch.rand(n, generator=g)).view(n, 1, 1)


def _shape_mask(shape: torch.Tensor, cx, cy, r) -> torch.Tensor:
    """Filled shapes: (n,) codes, (n, 1, 1) centres and radii -> (n, S, S) bool."""
    ys, xs = _grid()
    dx, dy = xs - cx, ys - cy                                                  # (n, S, S)
    masks = torch.stack([dx ** 2 + dy ** 2 < r ** 2,                                       # circle
                         torch.maximum(dx.abs(), dy.abs()) < 0.8 * r,                      # square
                         (dy < 0.7 * r) & (dy > -0.9 * r) & (dx.abs() < (dy + 0.9 * r) * 0.6),  # triangle
                         ((dx.abs() < 0.3 * r) | (dy.abs() < 0.3 * r)) & (torch.maximum(dx.abs(), dy.abs()) < r),  # cross
                         dx.abs() + dy.abs() < r,                                           # diamond
                         (dx ** 2 + dy ** 2 < r ** 2) & (dx ** 2 + dy ** 2 > (0.55 * r) ** 2)], 1)  # ring
    return masks[torch.arange(len(shape)), shape]


def _paint(colour: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image's colour: its hue +-10 degrees, saturation and value 0.7-1 (HSV to RGB,
    vectorised): (n,) codes -> (n, 3, 1, 1)."""
    n = len(colour)
    h = (colour * 30.0 + (torch.rand(n, generator=g) - 0.5) * 20.0) % 360 / 60  # (n,) in [0, 6)
    s, v = 0.7 + 0.3 * torch.rand(n, generator=g), 0.7 + 0.3 * torch.rand(n, generator=g)
    k = (torch.tensor([5.0, 3.0, 1.0]).view(1, 3) + h.view(n, 1)) % 6          # (n, 3) for R, G, B
    rgb = v.view(n, 1) - (v * s).view(n, 1) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return rgb.view(n, 3, 1, 1)


def _background(level: torch.Tensor) -> torch.Tensor:
    """(n, 1, 1) grey levels, or (n, S, S) grey images -> (n, 3, S, S)."""
    return level.expand(-1, TOY_SIZE, TOY_SIZE).unsqueeze(1).repeat(1, 3, 1, 1)


def _render_objects(a: dict, g: torch.Generator) -> torch.Tensor:
    n, S = len(a["shape"]), TOY_SIZE
    bg = _background(torch.tensor(_TONE_LEVEL)[a["tone"]].view(n, 1, 1) + _uniform(n, -0.06, 0.06, g))
    q = torch.tensor(_QUADRANT)[a["position"]] * S                             # (n, 2)
    cx, cy = q[:, 0].view(n, 1, 1) + _uniform(n, -2, 2, g), q[:, 1].view(n, 1, 1) + _uniform(n, -2, 2, g)
    mask = _shape_mask(a["shape"], cx, cy, _uniform(n, 5.5, 8.0, g)).unsqueeze(1).float()
    return bg * (1 - mask) + _paint(a["colour"], g) * mask


def _render_patterns(a: dict, g: torch.Generator) -> torch.Tensor:
    n = len(a["texture"])
    ys, xs = _grid()
    # CHOICE: stripes 3 px wide, narrower than a 4 px patch: every patch holds an edge, so its
    # orientation is visible patch by patch (at 4 px an aligned phase leaves patches plain)
    half = torch.full((n, 1, 1), 3.0)
    ph = torch.randint(8, (n, 1, 1), generator=g).float()
    Y, X = (ys + ph) // half, (xs + ph) // half                                # (n, S, S) cell indices
    pats = torch.stack([Y % 2, X % 2, ((xs + ys + ph) // half) % 2,             # striped, banded, diagonal
                        ((Y % 2 == 0) & (X % 2 == 0)).float(),                  # dotted
                        (Y + X) % 2,                                            # checkered
                        (((ys + ph) % (2 * half) < 2) | ((xs + ph) % (2 * half) < 2)).float()], 1)  # grid
    pat = pats[torch.arange(n), a["texture"]].unsqueeze(1)                     # (n, 1, S, S)
    bg = _background(torch.tensor(_TONE_LEVEL)[a["tone"]].view(n, 1, 1))
    return bg * (1 - pat) + _paint(a["colour"], g) * pat


def _render_dots(a: dict, g: torch.Generator) -> torch.Tensor:
    n, S = len(a["count"]), TOY_SIZE
    img = _background(torch.full((n, 1, 1), 0.92))
    slots = torch.rand(n, 4, generator=g).argsort(1)                           # (n, 4) a random order of the quadrants
    colour = _paint(a["colour"], g)
    for k in range(4):
        q = torch.tensor(_QUADRANT)[slots[:, k]] * S
        cx, cy = q[:, 0].view(n, 1, 1) + _uniform(n, -2, 2, g), q[:, 1].view(n, 1, 1) + _uniform(n, -2, 2, g)
        mask = (_shape_mask(a["shape"], cx, cy, torch.full((n, 1, 1), 4.5)) & (a["count"] >= k).view(n, 1, 1))
        img = img * (1 - mask.unsqueeze(1).float()) + colour * mask.unsqueeze(1).float()
    return img


def _render_outlines(a: dict, g: torch.Generator) -> torch.Tensor:
    n, S = len(a["size"]), TOY_SIZE
    ys, _ = _grid()
    paper = 0.88 + _uniform(n, -0.04, 0.04, g) - 0.12 * ((ys + 2) % 8 == 0).float()  # (n, S, S) ruled paper
    img = _background(paper)
    lo, hi = torch.tensor(_SIZE_RADIUS).T
    r = (lo[a["size"]] + torch.rand(n, generator=g) * (hi - lo)[a["size"]]).view(n, 1, 1)
    cx, cy = S / 2 + _uniform(n, -2, 2, g), S / 2 + _uniform(n, -2, 2, g)
    mask = (_shape_mask(a["shape"], cx, cy, r) & ~_shape_mask(a["shape"], cx, cy, r - 3)).unsqueeze(1).float()
    return img * (1 - mask) + _paint(a["colour"], g) * mask


def _render_tiles(a: dict, g: torch.Generator) -> torch.Tensor:
    n, S = len(a["tone"]), TOY_SIZE
    jitter = (torch.rand(n, S // 4, S // 4, generator=g) - 0.5) * 0.24                 # (n, 8, 8) per tile
    level = torch.tensor(_TONE_LEVEL)[a["tone"]].view(n, 1, 1) + jitter
    level = level.repeat_interleave(4, 1).repeat_interleave(4, 2)                    # (n, S, S) 4 px tiles
    return _background(level.clamp(0, 1))


def _render_strokes(a: dict, g: torch.Generator) -> torch.Tensor:
    n, S = len(a["colour"]), TOY_SIZE
    ys, xs = _grid()
    theta = _uniform(n, 0, torch.pi, g)
    cx, cy, width = S / 2 + _uniform(n, -4, 4, g), S / 2 + _uniform(n, -4, 4, g), _uniform(n, 4, 7, g)
    mask = (((xs - cx) * torch.sin(theta) - (ys - cy) * torch.cos(theta)).abs() < width / 2).unsqueeze(1).float()
    return _background(0.1 + _uniform(n, -0.05, 0.05, g)) * (1 - mask) + _paint(a["colour"], g) * mask


_RENDER = {"objects": _render_objects, "patterns": _render_patterns, "dots": _render_dots,
           "outlines": _render_outlines, "tiles": _render_tiles, "strokes": _render_strokes}


def toy_render(a: dict[str, torch.Tensor], g: torch.Generator, domain: str) -> torch.Tensor:
    """Render one domain's attribute codes to images in [0, 1]: (n,) codes -> (n, 3, 32, 32)."""
    img = _RENDER[domain](a, g)
    return (img + 0.05 * torch.randn(img.shape, generator=g)).clamp(0, 1)


_CAPTION_P = {"colour": 0.4, "shape": 0.6, "texture": 0.7, "position": 0.4, "size": 0.2, "count": 0.5, "tone": 0.12}


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def toy_caption(domain: str, a: dict[str, int], rng: random.Random) -> str:
    """One caption from a small grammar, one form per domain; each attribute is mentioned only
    part of the time (_CAPTION_P)."""
    say = {k: rng.random() < _CAPTION_P[k] for k in a}
    word = {k: TOY_VALUES[k][v] for k, v in a.items()}
    if domain == "tiles":
        return _a(f"{word['tone']} mosaic" if say["tone"] else rng.choice(["mosaic", "tiled wall"]))
    colour = word["colour"] + " " if say["colour"] else ""
    if domain == "strokes":
        return _a(colour + rng.choice(["stroke", "brush stroke", "line"])) + (" on black" if rng.random() < 0.3 else "")
    if domain == "patterns":
        tex = word["texture"] + " " if say["texture"] else ""
        tone = f" on {word['tone']}" if say["tone"] else ""
        return f"{_a(colour + tex + 'pattern')}{tone}"
    shape = word["shape"] if say["shape"] else rng.choice(["object", "thing"])
    if domain == "dots":
        count = word["count"] if say["count"] else "some"
        return f"{count} {colour}{shape if count == 'one' else shape + ('es' if shape.endswith('ss') else 's')}"
    if domain == "outlines":
        size = word["size"] + " " if say["size"] else ""
        return f"an outline of {_a(size + colour + shape)}"
    where = f" in the {word['position']}" if say["position"] else ""
    tone = f" on a {word['tone']} background" if say["tone"] else ""
    return f"{_a(colour + shape)}{where}{tone}"                                # objects


class ToyImages(torch.utils.data.Dataset):
    """A fixed set of toy images with integer labels, normalised with CLIP's mean/std."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        self.images = (images - mean) / std                                    # (n, 3, 32, 32)
        self.targets = labels.long()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], int(self.targets[i])


class ToyPairs(torch.utils.data.Dataset):
    """Image-caption pairs of the toy world (the reference split, ImageNet's role for GNSP)."""

    def __init__(self, images: torch.Tensor, captions: list[str]):
        self.images = ToyImages(images, torch.zeros(len(captions))).images
        self.captions = captions

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return self.images[i], self.captions[i]


def _task_seed(seed: int, name: str, split: str) -> int:
    return (seed * 1_000_003 + sum(ord(c) * 31 ** i for i, c in enumerate(name + split))) % 2**31


def toy_task(name: str, seed: int = 0, n_train: int = 2000, n_test: int = 500) -> Task:
    domain, attr, templates = TOY_TASKS[name]
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        g = torch.Generator().manual_seed(_task_seed(seed, name, split))
        a = toy_attributes(n, g, domain)
        splits[split] = ToyImages(toy_render(a, g, domain), a[attr])
    return Task(name, list(TOY_VALUES[attr]), list(templates), splits["train"], splits["test"])


def toy_tasks(order: str = "I", seed: int = 0, max_tasks: int | None = None, **kw) -> list[Task]:
    return [toy_task(n, seed, **kw) for n in TOY_ORDERS[order][:max_tasks]]


def toy_mixture(n: int, g: torch.Generator) -> tuple[torch.Tensor, list[tuple[str, dict[str, int]]]]:
    """n images drawn evenly from all domains, shuffled: (n, 3, 32, 32) in [0, 1], and each
    image's (domain, attribute codes), from which toy_caption makes a caption."""
    images, makers = [], []
    for i, domain in enumerate(TOY_DOMAINS):
        m = n // len(TOY_DOMAINS) + (i < n % len(TOY_DOMAINS))
        a = toy_attributes(m, g, domain)
        images.append(toy_render(a, g, domain))
        makers += [(domain, {k: int(v[j]) for k, v in a.items()}) for j in range(m)]
    perm = torch.randperm(n, generator=g)
    return torch.cat(images)[perm], [makers[int(i)] for i in perm]


def toy_reference(seed: int = 0, n: int = 1000, split: str = "train") -> ToyPairs:
    """Reference image-caption pairs from all domains (split 'train' for GNSP's distillation,
    'heldout' for the alignment metrics)."""
    g = torch.Generator().manual_seed(_task_seed(seed, "reference", split))
    rng = random.Random(_task_seed(seed, "reference-captions", split))
    images, codes = toy_mixture(n, g)
    return ToyPairs(images, [toy_caption(d, a, rng) for d, a in codes])


def toy_pretraining_batches(seed: int, batch_size: int, pool: int = 20000):
    """Endless stream of pretraining batches (normalised images, captions), a function of seed
    only: a pool of rendered images of all domains, each drawn with a fresh random caption
    every time."""
    g = torch.Generator().manual_seed(_task_seed(seed, "pretrain", "stream"))
    rng = random.Random(_task_seed(seed, "pretrain-captions", "stream"))
    images, codes = toy_mixture(pool, g)
    images = ToyImages(images, torch.zeros(pool)).images                      # (pool, 3, 32, 32)
    while True:
        idx = torch.randint(pool, (batch_size,), generator=g)
        yield images[idx], [toy_caption(*codes[int(i)], rng) for i in idx]


# ---- 8. Class-incremental learning (CIL) and X-TAIL: class orders, steps, loaders ----
# CIL as MoE-Adapters runs it (JiazuoYu/MoE-Adapters4CL@4572d97, cil/, on continuum's
# ClassIncremental scenario): one dataset, its classes in a fixed order, cut into steps. Step k
# trains on the images of its new classes only and is tested on the test images of every class
# seen so far, with one classifier over all of them (no task id). X-TAIL (RAIL: Xu et al.,
# NeurIPS 2024, arXiv 2406.18868; linghan1997/Regression-based-Analytic-Incremental-Learning@eaac644):
# the MTIL domains without CIFAR100, 16 shots per class, and every domain's test images classified
# over the union of all domains' class names. Protocols, hyper-parameters, metrics and published
# numbers: notes/protocols.md.

CIL_DATASETS = ["cil-cifar100", "cil-tinyimagenet"]
# MoE-Adapters cil/class_orders/{cifar100,tinyimagenet}.yaml, exactly: entry j is the original id
# (torchvision's CIFAR-100 label; the line of wnids.txt for TinyImageNet) of the class that takes
# index j in the union of seen classes.
CIL_CLASS_ORDERS = {
    "cil-cifar100": [
        87, 0, 52, 58, 44, 91, 68, 97, 51, 15, 94, 92, 10, 72, 49, 78, 61, 14, 8, 86, 84, 96, 18,
        24, 32, 45, 88, 11, 4, 67, 69, 66, 77, 47, 79, 93, 29, 50, 57, 83, 17, 81, 41, 12, 37, 59,
        25, 20, 80, 73, 1, 28, 6, 46, 62, 82, 53, 9, 31, 75, 38, 63, 33, 74, 27, 22, 36, 3, 16, 21,
        60, 19, 70, 90, 89, 43, 5, 42, 65, 76, 40, 30, 23, 85, 2, 95, 56, 48, 71, 64, 98, 13, 99, 7,
        34, 55, 54, 26, 35, 39,
    ],
    "cil-tinyimagenet": [
        131, 181, 22, 172, 144, 92, 97, 187, 58, 93, 6, 70, 106, 68, 153, 168, 179, 199, 29, 46, 9,
        142, 134, 88, 193, 110, 26, 32, 117, 112, 17, 39, 166, 13, 94, 138, 109, 147, 51, 101, 59,
        188, 116, 5, 170, 99, 100, 167, 180, 146, 65, 1, 104, 43, 38, 184, 123, 171, 137, 162, 71,
        44, 95, 174, 12, 7, 54, 152, 21, 47, 28, 176, 34, 2, 132, 118, 42, 189, 150, 14, 165, 41,
        192, 45, 82, 128, 63, 57, 197, 160, 53, 75, 108, 135, 121, 159, 183, 67, 169, 50, 87, 69,
        89, 196, 115, 19, 148, 96, 86, 11, 8, 60, 33, 173, 78, 4, 119, 105, 182, 127, 177, 30, 186,
        40, 49, 178, 76, 157, 161, 73, 164, 151, 31, 74, 191, 27, 125, 198, 81, 20, 155, 114, 139,
        36, 61, 56, 145, 48, 16, 83, 62, 85, 126, 0, 102, 23, 3, 140, 15, 195, 133, 113, 190, 141,
        52, 163, 156, 80, 111, 90, 175, 143, 120, 84, 18, 25, 79, 37, 154, 136, 64, 158, 24, 185,
        72, 35, 129, 55, 149, 91, 122, 77, 103, 124, 130, 66, 10, 107, 194, 98,
    ],
}
# steps -> (initial_increment, increment) of cil/configs/class/*.yaml. CIFAR-100: `steps` equal
# steps (10-10, 5-5, 2-2); TinyImageNet: 100 base classes, then `steps` steps (100-20, 100-10,
# 100-5), so steps + 1 tasks.
CIL_STEPS = {
    "cil-cifar100": {10: (10, 10), 20: (5, 5), 50: (2, 2)},
    "cil-tinyimagenet": {5: (100, 20), 10: (100, 10), 20: (100, 5)},
}
CIL_TEMPLATES = ["a bad photo of a {}."]  # every config's prompt_template: trains and evaluates
# cil/configs/class/*.yaml batch_size: 128 for CIFAR-100 10-10 and 5-5, 64 for 2-2 and every TinyImageNet config
CIL_BATCH_SIZE = {"cil-cifar100": {10: 128, 20: 128, 50: 64}, "cil-tinyimagenet": {5: 64, 10: 64, 20: 64}}

XTAIL_DOMAINS = [n for n in MTIL_ORDERS["I"] if n != "CIFAR100"]  # RAIL configs/analytic_clip.yaml
XTAIL_SHOTS = 16                                                   # ... num_shots
RAIL_TEMPLATES = ["a photo of a {}."]  # the one template of RAIL's union classifier (primal_RAIL.py)


@dataclass
class CILTask(Task):
    new_start: int  # union_classnames[new_start:] are the step's new classes (its train labels' range)
    union_classnames: list[str] = field(default_factory=list)  # every class seen up to this step (the test head)


@dataclass
class XTailTask(Task):
    offset: int                  # union label = offset + the domain's own label
    union_classnames: list[str]  # every loaded domain's class names, concatenated in domain order


def cil_increments(name: str, steps: int) -> list[int]:
    """Classes per task: the config's initial_increment, then increment until the classes run out
    (continuum ClassIncremental._define_increments). E.g. [100, 20, 20, 20, 20, 20] for
    cil-tinyimagenet in 5 steps."""
    if name not in CIL_STEPS:
        raise ValueError(f"unknown CIL dataset {name!r}; choose from {CIL_DATASETS}")
    if steps not in CIL_STEPS[name]:
        raise ValueError(f"{name} runs in {sorted(CIL_STEPS[name])} steps, not {steps}")
    first, increment = CIL_STEPS[name][steps]
    return [first] + [increment] * ((len(CIL_CLASS_ORDERS[name]) - first) // increment)


def cil_label_map(order: list[int]) -> list[int]:
    """The inverse of a class order: label_map[c] = the union index of original class c, its
    position in `order` (continuum: class_order.argsort()[y])."""
    if sorted(order) != list(range(len(order))):
        raise ValueError("a class order must be a permutation of 0..n-1")
    label_map = [0] * len(order)
    for j, c in enumerate(order):
        label_map[c] = j
    return label_map


def union_offsets(sizes: list[int]) -> list[int]:
    """Where each block of classes starts in their concatenation: [0, s0, s0 + s1, ...]."""
    offsets, total = [], 0
    for s in sizes:
        offsets.append(total)
        total += s
    return offsets


class Relabelled(Dataset):
    """Items `indices` of `dataset`, labelled `labels` (one per index) instead of their own labels;
    `.targets` = labels, so dataset_targets and few_shot_subset read them without decoding."""

    def __init__(self, dataset: Dataset, indices: list[int], labels: list[int]):
        if len(indices) != len(labels):
            raise ValueError(f"{len(indices)} indices but {len(labels)} labels")
        self.dataset, self.indices, self.targets = dataset, list(indices), list(labels)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]][0], self.targets[i]


class TinyImageNet(Dataset):
    """tiny-imagenet-200 as continuum's TinyImageNet200 reads it: the label of a class is its line
    in wnids.txt; split "train" = train/<wnid>/images/*, split "val" = val/images/* labelled by
    val/val_annotations.txt (the CIL test set, 50 images per class)."""

    def __init__(self, root, split: str, transform=None):
        d = Path(root).expanduser() / "tiny-imagenet-200"
        self.wnids = (d / "wnids.txt").read_text().split()
        index = {w: i for i, w in enumerate(self.wnids)}
        if split == "train":
            # CHOICE: list train/<wnid>/images/ sorted; continuum reads each class's file names
            # from train/<wnid>/<wnid>_boxes.txt (the same files in the official archive).
            pairs = [(d / "train" / w / "images" / f, index[w]) for w in self.wnids
                     for f in sorted(os.listdir(d / "train" / w / "images"))
                     if f.lower().endswith((".jpeg", ".jpg", ".png"))]
        elif split == "val":
            rows = [line.split()[:2] for line in (d / "val" / "val_annotations.txt").read_text().splitlines()]
            pairs = [(d / "val" / "images" / f, index[w]) for f, w in rows if w in index]
        else:
            raise ValueError(f"TinyImageNet split must be 'train' or 'val', got {split!r}")
        self.files = [str(p) for p, _ in pairs]
        self.targets = [y for _, y in pairs]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        image = Image.open(self.files[i]).convert("RGB")  # a few TinyImageNet JPEGs are greyscale
        return (image if self.transform is None else self.transform(image)), self.targets[i]


_TINYIMAGENET_LAYOUT = ["tiny-imagenet-200", "tiny-imagenet-200/wnids.txt", "tiny-imagenet-200/train",
                        "tiny-imagenet-200/val/images", "tiny-imagenet-200/val/val_annotations.txt"]


def _tinyimagenet_how(root: Path) -> str:
    return ("manual (torchvision has no TinyImageNet): download http://cs231n.stanford.edu/tiny-imagenet-200.zip "
            f"(the archive continuum fetches) and unzip it in {root} so that "
            f"{root}/tiny-imagenet-200/{{wnids.txt, train/<wnid>/images/, val/images/, val/val_annotations.txt}} exist")


def cil_missing(root, names=CIL_DATASETS) -> list[tuple[str, str, str]]:
    """(name, expected path, how to get it) for each CIL dataset in `names` missing under `root`.
    cil-cifar100 reads MTIL's CIFAR100 files (<root>/cifar-100-python/)."""
    root = Path(root).expanduser()
    unknown = sorted(set(names) - set(CIL_DATASETS))
    if unknown:
        raise ValueError(f"unknown CIL dataset(s) {unknown}; choose from {CIL_DATASETS}")
    missing = []
    for name in names:
        if name == "cil-cifar100":
            missing += [(name, path, how) for _, path, how in mtil_missing(root, ["CIFAR100"])]
            continue
        absent = next((root / p for p in _TINYIMAGENET_LAYOUT if not (root / p).exists()), None)
        if absent is not None:
            missing.append((name, str(absent), _tinyimagenet_how(root)))
    return missing


def _cil_dataset(name: str, root: Path, train_transform, eval_transform) -> tuple[Dataset, Dataset, list[str]]:
    """(train, test, class names indexed by original class id) of a CIL dataset, as the source names
    them (MoE-Adapters cil/continual_clip/datasets.py:get_dataset)."""
    if name == "cil-cifar100":
        # CHOICE: <root>/cifar-100-python/, the files MTIL's CIFAR100 reads (the source: <root>/cifar100/...).
        train = datasets.CIFAR100(root, train=True, transform=train_transform)
        test = datasets.CIFAR100(root, train=False, transform=eval_transform)
        return train, test, list(train.classes)  # continuum's dataset.dataset.classes: "aquarium_fish"
    # The source reads cil/dataset_reqs/tinyimagenet_classes.txt (line i: i, wnid, name): for all 200
    # wnids its name is OpenAI CLIP's ImageNet class name (checked one by one), so we map each
    # wnid through IMAGENET_CLASSNAMES instead of shipping that file; words.txt is not read.
    names = dict(zip(IMAGENET_WNIDS, IMAGENET_CLASSNAMES))
    wnids = (root / "tiny-imagenet-200" / "wnids.txt").read_text().split()
    unknown = [w for w in wnids if w not in names]
    if unknown:
        raise ValueError(f"{root / 'tiny-imagenet-200/wnids.txt'} lists wnids outside ImageNet-1k "
                         f"({', '.join(unknown[:3])}...): not tiny-imagenet-200")
    train = TinyImageNet(root, "train", train_transform)
    test = TinyImageNet(root, "val", eval_transform)
    return train, test, [names[w] for w in wnids]


def cil_tasks(name: str, steps: int, root, seed: int | None = None, train_transform=None,
              eval_transform=None, clean_names: bool = False) -> list[CILTask]:
    """The tasks of a class-incremental run of `name` (cil-cifar100 in 10/20/50 steps,
    cil-tinyimagenet in 100 + 5/10/20 steps), as MoE-Adapters' cil/ builds them. Task k:
      classnames  the union: every class seen up to task k, in class-order position
      train       the train images of task k's new classes only
      test        the test images of every class seen so far
      new_start   classnames[new_start:] are task k's new classes
    Labels of train and test are union indices (original class c -> its position in the order).
    seed: None = the source's class order (CIL_CLASS_ORDERS), which made the published numbers;
    an int = a seeded random permutation of the classes instead. Transforms default to
    clip_transforms(224). clean_names: "_" -> " " in class names (the source keeps "aquarium_fish").
    Raises MissingDataError when the dataset is not under `root`."""
    increments = cil_increments(name, steps)
    root = Path(root).expanduser()
    missing = cil_missing(root, [name])
    if missing:
        raise MissingDataError(missing)
    default_train, default_eval = clip_transforms()
    # DEVIATION: the source evaluates with its *train* transform (cil/continual_clip/models.py keeps
    # clip.load's first transform, RandomResizedCrop(scale 0.9-1), and main.py passes it to both
    # scenarios); we default to the deterministic eval transform. Pass eval_transform=the train
    # transform to evaluate as the source does.
    train, test, names = _cil_dataset(name, root, default_train if train_transform is None else train_transform,
                                      default_eval if eval_transform is None else eval_transform)
    n = len(CIL_CLASS_ORDERS[name])
    if len(names) != n:
        raise ValueError(f"{name}: {len(names)} classes under {root}, the protocol has {n}")
    order = (list(CIL_CLASS_ORDERS[name]) if seed is None
             else np.random.RandomState(seed).permutation(n).tolist())
    label_map = cil_label_map(order)
    union = [names[c].replace("_", " ") if clean_names else names[c] for c in order]
    by_label = {"train": [[] for _ in range(n)], "test": [[] for _ in range(n)]}
    for split, ds in (("train", train), ("test", test)):
        for i, y in enumerate(dataset_targets(ds)):
            by_label[split][label_map[y]].append(i)

    def items(split, lo, hi):  # (indices, union labels) of the split's items with lo <= label < hi
        pairs = sorted((i, y) for y in range(lo, hi) for i in by_label[split][y])
        return [i for i, _ in pairs], [y for _, y in pairs]

    tasks = []
    for k, (start, size) in enumerate(zip(union_offsets(increments), increments)):
        stop = start + size
        tasks.append(CILTask(f"{name}-step{k + 1}", union[:stop], list(CIL_TEMPLATES),
                             Relabelled(train, *items("train", start, stop)),
                             Relabelled(test, *items("test", 0, stop)), start, union[:stop]))
    return tasks


def new_classes_only(task: CILTask) -> CILTask:
    """The step as MoE-Adapters trains it (cil/continual_clip/models.py:ClassIncremental.train):
    the text head of the step's new classes only, train labels shifted to start at 0
    (`targets -= shift`). classnames = the new classes; union_classnames and the test set (union
    labels) are kept for evaluation."""
    targets = dataset_targets(task.train)
    train = Relabelled(task.train, list(range(len(targets))), [y - task.new_start for y in targets])
    return CILTask(task.name, task.union_classnames[task.new_start:], list(task.templates), train, task.test,
                   task.new_start, list(task.union_classnames))


def xtail_tasks(root, seed: int = 42, shots: int = XTAIL_SHOTS, train_transform=None,
                eval_transform=None, max_tasks: int | None = None) -> list[XTailTask]:
    """The X-TAIL domains in RAIL's order (Order I without CIFAR100; the first `max_tasks`), each
    from MTIL's own builder (load_mtil_task), train = `shots` images per class (few_shot_subset:
    a function of `seed` alone; shots 0 = full train set), test = the domain's own test set with
    its own labels. X-TAIL classifies each test image over `union_classnames` (all loaded domains'
    classes): union label = task.offset + label. Raises one MissingDataError naming every missing
    dataset."""
    names = XTAIL_DOMAINS[:max_tasks]
    missing = mtil_missing(root, names)
    if missing:
        raise MissingDataError(missing)
    default_train, default_eval = clip_transforms()
    # DEVIATION: RAIL reads CoOp's split files (split_zhou_*.json) and CoOp's class names; we keep
    # ZSCL's splits and class names (MTIL's builders). As RAIL, one template for every domain,
    # training and test: RAIL_TEMPLATES, "a photo of a {}." (primal_RAIL.py).
    tt = default_train if train_transform is None else train_transform
    et = default_eval if eval_transform is None else eval_transform
    domains = [load_mtil_task(n, root, tt, et) for n in names]
    # CHOICE: the union is the plain concatenation with duplicate names kept, as RAIL's
    # merged_classnames (here Caltech101 and Flowers share "lotus" and "sunflower").
    union = [c for t in domains for c in t.classnames]
    # DEVIATION: a class with fewer than `shots` train images keeps them all (ZSCL's Flowers train
    # split has 10 per class); CoOp's sampler (RAIL) draws `shots` with replacement instead.
    offsets = union_offsets([len(t.classnames) for t in domains])
    return [XTailTask(t.name, t.classnames, list(RAIL_TEMPLATES),
                      few_shot_subset(t.train, shots, seed) if shots else t.train, t.test, offset, union)
            for t, offset in zip(domains, offsets)]


# ---- toy versions of both protocols (no files; the toy world of section 7) ----
# CHOICE: in one label space the toy tasks' bare class names ("red", "small", "two") read poorly
# and meet (Colours and Inks both have "red"); every class name takes its task's noun, the one of
# the task's first template (Colours "a {} object." -> "red object", Inks "a {} stroke." -> "red
# stroke"). With this world's six tasks the 45 names are then distinct (tests/test_protocols.py).
# Each task being its own image domain, a pooled class is defined by its image alone.
TOY_UNION_NAMES = {"Colours": "{} object", "Counts": "{} objects", "Inks": "{} stroke", "Sizes": "{} outline",
                   "Textures": "{} pattern", "Tones": "{} mosaic"}
TOY_CIL_STEPS = 5             # CHOICE: 45 classes in 5 steps of 9
TOY_CIL_ORDER_SEED = 0        # CHOICE: the class order, a fixed seeded permutation of the 45 pooled classes
TOY_CIL_PER_CLASS = (140, 35)  # CHOICE: train / test images per class (every class of seed 0 has at least 148 / 35)


def toy_union_classnames(name: str) -> list[str]:
    """The class names of toy task `name` in a label space shared with the other toy tasks."""
    return [TOY_UNION_NAMES[name].format(c) for c in TOY_VALUES[TOY_TASKS[name][1]]]


def toy_cil_tasks(steps: int = TOY_CIL_STEPS, seed: int = 0) -> list[CILTask]:
    """toy-cil: the classes of the six toy tasks (toy_task(name, seed), Order I) pooled into one
    label space of 45 classes (toy_union_classnames), the first TOY_CIL_PER_CLASS train / test
    images of each, ordered by a fixed seeded permutation (TOY_CIL_ORDER_SEED) and cut into
    `steps` equal steps; CILTasks as cil_tasks builds them (union labels, CIL_TEMPLATES)."""
    names = TOY_ORDERS["I"]
    parts = [toy_task(n, seed) for n in names]
    pooled = [(i, c) for i, p in enumerate(parts) for c in range(len(p.classnames))]  # (task, class)
    if len(pooled) % steps:
        raise ValueError(f"toy-cil: {len(pooled)} classes do not split into {steps} equal steps")
    order = np.random.RandomState(TOY_CIL_ORDER_SEED).permutation(len(pooled)).tolist()
    union = [toy_union_classnames(names[pooled[j][0]])[pooled[j][1]] for j in order]
    splits = {}
    for s, (split, cap) in enumerate(zip(("train", "test"), TOY_CIL_PER_CLASS)):
        ds = torch.utils.data.ConcatDataset([getattr(p, split) for p in parts])
        starts = union_offsets([len(getattr(p, split)) for p in parts])
        idx, lab = [], []
        for u, j in enumerate(order):                               # union label u = position in the order
            i, c = pooled[j]
            mine = (getattr(parts[i], split).targets == c).nonzero().squeeze(1)[:cap]
            idx += (starts[i] + mine).tolist()
            lab += [u] * len(mine)
        splits[split] = (ds, idx, lab)

    def items(split, lo, hi):
        ds, idx, lab = splits[split]
        keep = [k for k, y in enumerate(lab) if lo <= y < hi]
        return Relabelled(ds, [idx[k] for k in keep], [lab[k] for k in keep])

    size = len(pooled) // steps
    return [CILTask(f"toy-cil-step{k + 1}", union[:(k + 1) * size], list(CIL_TEMPLATES),
                    items("train", k * size, (k + 1) * size), items("test", 0, (k + 1) * size), k * size,
                    union[:(k + 1) * size]) for k in range(steps)]


def toy_xtail_tasks(seed: int = 42, shots: int = XTAIL_SHOTS, world_seed: int = 0) -> list[XTailTask]:
    """toy-xtail: the six toy tasks in Order I as X-TAIL domains: `shots` train images per class
    (few_shot_subset with `seed`; 0 = all), the task's own test set, class names in the shared
    label space (toy_union_classnames), one template RAIL_TEMPLATES, and the union of all six
    tasks' class names."""
    domains = [toy_task(n, world_seed) for n in TOY_ORDERS["I"]]
    names = [toy_union_classnames(t.name) for t in domains]
    union = [c for n in names for c in n]
    offsets = union_offsets([len(n) for n in names])
    return [XTailTask(t.name, n, list(RAIL_TEMPLATES), few_shot_subset(t.train, shots, seed) if shots else t.train,
                      t.test, offset, union) for t, n, offset in zip(domains, names, offsets)]


# ---- 9. The command line ----

def _check(root: Path, names: list[str]) -> int:
    print(f"data root: {root.resolve()}")
    ok = True
    for name in names:
        missing = mtil_missing(root, [name])
        if missing:
            ok = False
            _, path, how = missing[0]
            if Path(path).exists():  # files there, scipy not
                print(f"unusable {name:<13} {path}: {how}")
            else:
                print(f"missing  {name:<13} expected {path}  ->  {how}")
            continue
        try:
            task = load_mtil_task(name, root, None, None)
        except Exception as e:  # a corrupt or partial dataset: report it, keep checking
            ok = False
            print(f"error    {name:<13} {root / _LAYOUT[name][0]}: {type(e).__name__}: "
                  f"{' '.join(str(e).split())}")
            continue
        print(f"found    {name:<13} train {len(task.train):>6}  test {len(task.test):>6}  "
              f"classes {len(task.classnames):>3}")
    missing = imagenet_missing(root)
    if missing:
        print(f"missing  {'ImageNet':<13} expected {missing[0][1]}  ->  {missing[0][2]}")
    else:
        n = len(_wnid_folders(root / "ImageNet" / "train"))
        print(f"found    {'ImageNet':<13} {n} class folders (GNSP reference data)")
    for name in CIL_DATASETS:
        missing = cil_missing(root, [name])
        if missing:
            print(f"missing  {name:<13} expected {missing[0][1]}  ->  {missing[0][2]}")
            continue
        try:
            train, test, names = _cil_dataset(name, root, None, None)
        except Exception as e:  # a corrupt or partial dataset: report it, keep checking
            print(f"error    {name:<13} {type(e).__name__}: {' '.join(str(e).split())}")
            continue
        print(f"found    {name:<13} train {len(train):>6}  test {len(test):>6}  classes {len(names):>3}  (CIL)")
    # CHOICE: the exit code reflects the MTIL datasets only; ImageNet (gnsp.py) and the CIL
    # datasets are optional extras.
    return 0 if ok else 2


def _download(root: Path, names: list[str]) -> int:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        if _first_absent(root, name) is None:
            print(f"present  {name}")
            continue
        if name not in _DOWNLOAD:
            print(f"manual   {name}: {_how_to_get(name, root)}")
            continue
        print(f"fetching {name} ...", flush=True)
        try:
            _DOWNLOAD[name](root)
            error = ""
        except Exception as e:  # one failed dataset must not stop the others
            error = f"{type(e).__name__}: {' '.join(str(e).split())}"
        if _first_absent(root, name) is None:  # e.g. Flowers fails after downloading if no scipy
            print(f"done     {name}")
        else:
            print(f"failed   {name}: {error or 'files still missing'}")
    if imagenet_missing(root):
        print(f"manual   ImageNet: {_imagenet_how(root)}")
    if cil_missing(root, ["cil-tinyimagenet"]):  # cil-cifar100 reads the CIFAR100 files above
        print(f"manual   cil-tinyimagenet: {_tinyimagenet_how(root)}")
    missing = mtil_missing(root, names)
    if missing:
        print(MissingDataError(missing))
    return 2 if missing else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Check or download the MTIL datasets; --check also reports "
                                            "ImageNet and the CIL datasets.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="report found / missing datasets")
    mode.add_argument("--download", action="store_true", help="download what torchvision can")
    p.add_argument("--root", type=Path, default=Path(os.environ.get("MTIL_DATA", "./data")),
                   help="data root (default: $MTIL_DATA or ./data)")
    p.add_argument("--datasets", nargs="+", choices=MTIL_DATASETS, default=MTIL_DATASETS,
                   metavar="NAME", help=f"subset of {' '.join(MTIL_DATASETS)} (default: all)")
    args = p.parse_args(argv)
    root = args.root.expanduser()
    if root.exists() and not root.is_dir():
        p.error(f"--root {root} is not a directory")
    return _check(root, args.datasets) if args.check else _download(root, args.datasets)


if __name__ == "__main__":
    sys.exit(main())
