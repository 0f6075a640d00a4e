"""Read each dataset from its official layout into `Dataset` / `Record`.

The loaders find their files by looking under the dataset folder (by name, and for
images by which folder holds the listed files) rather than by assuming one layout,
so an official download and a re-packed mirror read the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from captioning.config import data_dir
from captioning.data.records import Dataset, Record

if TYPE_CHECKING:
    from captioning.settings import SyntheticSettings

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class DatasetInfo:
    splits: tuple[str, ...]
    loader: Callable[[Path], Dataset]


# ---------------------------------------------------------------- helpers


def _walk(root: Path):
    """os.walk in a fixed order, skipping macOS resource forks and hidden folders."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
        yield Path(folder), sorted(files)


def find_file(root: Path, name: str, required: bool = True) -> Path | None:
    """The first file called `name` under `root` (shallowest, then alphabetical)."""
    hits = [folder / name for folder, files in _walk(root) if name in files]
    if hits:
        return min(hits, key=lambda p: (len(p.parts), str(p)))
    if required:
        raise FileNotFoundError(f"no {name} under {root}: is the dataset acquired (`captioning data acquire`)?")
    return None


def find_image_folder(root: Path, names: set[str], default: str) -> Path:
    """The folder under `root` holding the most of the image files `names`.

    When none holds any, `root/default` (the official name) is returned, so records
    still get a path and validation can report the images as missing.
    """
    best, best_count = root / default, 0
    for folder, files in _walk(root):
        count = len(names.intersection(files))
        if count > best_count:
            best, best_count = folder, count
    return best


def _read_token_file(path: Path) -> dict[str, list[str]]:
    """Flickr `IMAGE.jpg#N<TAB>caption` lines -> {IMAGE.jpg: [captions in order]}."""
    captions: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if "\t" not in line or "#" not in line.split("\t", 1)[0]:
                raise ValueError(f"{path.name} line {number} is not IMAGE#N<TAB>caption: {line[:80]!r}")
            key, caption = line.split("\t", 1)
            captions.setdefault(key.rsplit("#", 1)[0], []).append(caption)
    return captions


def _read_list(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def _drop_message(image: str, count: int, why: str) -> str:
    return f"{image}: {count} caption(s) dropped, {why}"


def _sorted(records: list[Record], splits: tuple[str, ...]) -> list[Record]:
    order = {name: index for index, name in enumerate(splits)}
    return sorted(records, key=lambda r: (order.get(r.split, len(order)), r.split, r.image_id))


def _flickr_records(
    captions: dict[str, list[str]], split_of: dict[str, str] | list[tuple[str, str]], image_folder: Path
) -> tuple[list[Record], list[str]]:
    """Records for the images a split lists; messages for captions of images in no split.

    `split_of` may list an image under two splits: both records are kept so validation reports it.
    """
    pairs = list(split_of.items()) if isinstance(split_of, dict) else split_of
    listed = {image for image, _ in pairs}
    records = [
        Record(image, str(image_folder / image), split, tuple(captions.get(image, ()))) for image, split in pairs
    ]
    dropped = [
        _drop_message(image, len(texts), "image is in no split")
        for image, texts in sorted(captions.items())
        if image not in listed
    ]
    return records, dropped


# ---------------------------------------------------------------- loaders

FLICKR8K_SPLITS = {"train": "trainImages", "val": "devImages", "test": "testImages"}


def load_flickr8k(root: Path) -> Dataset:
    """Flickr8k.token.txt + Flickr_8k.{train,dev,test}Images.txt + the image folder."""
    captions = _read_token_file(find_file(root, "Flickr8k.token.txt"))
    split_of = [
        (image, split)
        for split, stem in FLICKR8K_SPLITS.items()
        for image in _read_list(find_file(root, f"Flickr_8k.{stem}.txt"))
    ]
    folder = find_image_folder(root, {image for image, _ in split_of}, "Flicker8k_Dataset")
    records, dropped = _flickr_records(captions, split_of, folder)
    return Dataset("flickr8k", _sorted(records, DATASETS["flickr8k"].splits), dropped)


def _karpathy_splits(path: Path, key: str) -> dict[str, str]:
    """{image key: split} from one of Karpathy's dataset_*.json files."""
    with open(path, encoding="utf-8") as handle:
        images = json.load(handle)["images"]
    return {str(image[key]): image["split"] for image in images}


def load_flickr30k(root: Path) -> Dataset:
    """results_20130124.token + images, split by Karpathy's dataset_flickr30k.json."""
    captions = _read_token_file(find_file(root, "results_20130124.token"))
    split_of = _karpathy_splits(find_file(root, "dataset_flickr30k.json"), "filename")
    folder = find_image_folder(root, set(split_of), "flickr30k-images")
    records, dropped = _flickr_records(captions, split_of, folder)
    return Dataset("flickr30k", _sorted(records, DATASETS["flickr30k"].splits), dropped)


def _coco_year(root: Path) -> str:
    """2014 when its caption files are there (Karpathy's split is defined on 2014), else 2017."""
    for year in ("2014", "2017"):
        if any(find_file(root, f"captions_{part}{year}.json", required=False) for part in ("train", "val")):
            return year
    raise FileNotFoundError(f"no annotations/captions_{{train,val}}{{2014,2017}}.json under {root}")


def load_mscoco(root: Path) -> Dataset:
    """annotations/captions_{train,val}YEAR.json + {train,val}YEAR/ images.

    Split: Karpathy's (train/restval/val/test) when dataset_coco.json is present,
    else the official train/val of that year. image_id is the numeric COCO id.
    """
    year = _coco_year(root)
    images: dict[str, tuple[str, str]] = {}  # id -> (official split, file path)
    captions: dict[str, list[str]] = {}
    for part in ("train", "val"):
        path = find_file(root, f"captions_{part}{year}.json", required=False)
        if path is None:
            continue
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
        names = {image["file_name"] for image in content["images"]}
        folder = find_image_folder(root, names, f"{part}{year}")
        for image in content["images"]:
            images[str(image["id"])] = (part, str(folder / image["file_name"]))
        for note in sorted(content["annotations"], key=lambda a: a["id"]):
            captions.setdefault(str(note["image_id"]), []).append(note["caption"])

    karpathy = find_file(root, "dataset_coco.json", required=False)
    split_of = _karpathy_splits(karpathy, "cocoid") if karpathy else {i: s for i, (s, _) in images.items()}
    records, dropped = [], []
    for image_id, (_, path) in images.items():
        if image_id in split_of:
            records.append(Record(image_id, path, split_of[image_id], tuple(captions.get(image_id, ()))))
        else:
            dropped.append(_drop_message(image_id, len(captions.get(image_id, ())), "image is in no split"))
    missing = sorted(set(split_of) - set(images))
    if missing:
        dropped.append(
            f"{len(missing)} image(s) of dataset_coco.json are absent from captions_*{year}.json, e.g. {missing[:3]}"
        )
    return Dataset("mscoco", _sorted(records, DATASETS["mscoco"].splits), sorted(dropped))


def load_synthetic(root: Path) -> Dataset:
    from captioning.data.synthetic import load_synthetic as load

    return load(root)


def load_feedback(root: Path) -> Dataset:
    from captioning.data.feedback import load_feedback as load

    return load(root)


DATASETS: dict[str, DatasetInfo] = {
    "flickr8k": DatasetInfo(("train", "val", "test"), load_flickr8k),
    "flickr30k": DatasetInfo(("train", "val", "test"), load_flickr30k),
    "mscoco": DatasetInfo(("train", "restval", "val", "test"), load_mscoco),
    "synthetic": DatasetInfo(("train", "val", "test"), load_synthetic),
    "feedback": DatasetInfo(("train",), load_feedback),
}


def load_dataset(name: str, root: str | Path | None = None, synthetic: SyntheticSettings | None = None) -> Dataset:
    """Read dataset `name` from `root` (default data_dir()/name).

    `synthetic`: the settings the synthetic dataset is (re)generated with when missing or made
    with others; without them the generated one on disk is read.
    """
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    folder = Path(root) if root else data_dir() / name
    if name == "synthetic" and synthetic is not None:
        from captioning.data.synthetic import load_synthetic as generate_or_load

        return generate_or_load(folder, synthetic)
    return DATASETS[name].loader(folder)
