"""The official-format loaders, on tiny fixture copies of each format."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from captioning.data.datasets import DATASETS, load_dataset
from captioning.data.records import Record
from tests.fixtures.official import (
    FLICKR8K_QUIRK,
    captions_for,
    coco_id,
    flickr8k_name,
    make_flickr8k,
    make_flickr30k,
    make_mscoco,
)


def _sizes(dataset) -> dict[str, int]:
    return {split: len(records) for split, records in dataset.splits().items()}


@pytest.mark.parametrize("layout", ["official", "mirror"])
def test_flickr8k_reads_both_layouts_the_same_way(tmp_path, layout):
    root = make_flickr8k(tmp_path / layout, n_per_split=(4, 2, 2), layout=layout)
    dataset = load_dataset("flickr8k", root)

    assert dataset.name == "flickr8k"
    assert _sizes(dataset) == {"train": 4, "val": 2, "test": 2}
    first = dataset.records[0]
    assert isinstance(first, Record)
    assert first.image_id == flickr8k_name(0) and first.split == "train"
    assert first.captions == tuple(captions_for(0))
    images = "Flicker8k_Dataset" if layout == "official" else "images"
    assert Path(first.path) == root / images / first.image_id
    assert all(os.path.isfile(r.path) for r in dataset.records)
    assert first.to_dict()["captions"] == list(first.captions)


def test_flickr8k_drops_the_captions_of_the_image_in_no_split(tmp_path):
    dataset = load_dataset("flickr8k", make_flickr8k(tmp_path, quirk=True))

    assert all(FLICKR8K_QUIRK not in r.image_id for r in dataset.records)
    quirk = [line for line in dataset.dropped if line.startswith(FLICKR8K_QUIRK)]
    assert len(quirk) == 2  # `...jpg.1#0` and `...jpg#1-4` in the original file
    assert sum(int(line.split(": ")[1].split()[0]) for line in quirk) == 5
    assert all("in no split" in line for line in quirk)
    assert sum(len(r.captions) for r in dataset.records) == 8 * 5


def test_flickr8k_keeps_images_missing_on_disk(tmp_path):
    dataset = load_dataset("flickr8k", make_flickr8k(tmp_path, n_per_split=(2, 1, 2), missing=1))

    absent = [r for r in dataset.records if not os.path.exists(r.path)]
    assert [r.image_id for r in absent] == [flickr8k_name(4)]
    assert absent[0].split == "test" and len(absent[0].captions) == 5


def test_flickr8k_records_are_sorted_by_split_then_id(tmp_path):
    dataset = load_dataset("flickr8k", make_flickr8k(tmp_path, n_per_split=3))
    order = {name: i for i, name in enumerate(DATASETS["flickr8k"].splits)}
    keys = [(order[r.split], r.image_id) for r in dataset.records]
    assert keys == sorted(keys)
    assert load_dataset("flickr8k", tmp_path).records == dataset.records


def test_flickr30k_uses_the_token_file_and_karpathy_split(tmp_path):
    root = make_flickr30k(tmp_path, n_per_split=(3, 2, 1), unsplit=1)
    dataset = load_dataset("flickr30k", root)

    assert _sizes(dataset) == {"train": 3, "val": 2, "test": 1}
    assert dataset.records[0].image_id == "1000092795.jpg"
    assert Path(dataset.records[0].path).parent.name == "flickr30k-images"
    assert all(len(r.captions) == 5 for r in dataset.records)
    assert dataset.dropped == ["1000092897.jpg: 5 caption(s) dropped, image is in no split"]


def test_mscoco_with_karpathy_split(tmp_path):
    root = make_mscoco(tmp_path, karpathy=True, n_train=3, n_val=6)
    dataset = load_dataset("mscoco", root)

    assert _sizes(dataset) == {"train": 3, "restval": 2, "val": 2, "test": 2}
    first = dataset.records[0]
    assert first.image_id == str(coco_id("train", 0))
    assert Path(first.path) == root / "train2014" / f"COCO_train2014_{coco_id('train', 0):012d}.jpg"
    assert first.captions == tuple(captions_for(coco_id("train", 0)))
    assert [r.split for r in dataset.records] == ["train"] * 3 + ["restval"] * 2 + ["val"] * 2 + ["test"] * 2
    assert dataset.dropped == []


def test_mscoco_without_karpathy_uses_the_official_split(tmp_path):
    dataset = load_dataset("mscoco", make_mscoco(tmp_path, karpathy=False, n_train=3, n_val=2, missing=1))

    assert _sizes(dataset) == {"train": 3, "val": 2}
    val = dataset.splits()["val"]
    assert all(Path(r.path).parent.name == "val2014" for r in val)
    assert sum(not os.path.exists(r.path) for r in dataset.records) == 1  # kept for validation to report


def test_mscoco_prefers_2014_and_reads_2017_alone(tmp_path):
    both = load_dataset(
        "mscoco", make_mscoco(tmp_path / "both", karpathy=False, n_train=2, n_val=4, years=(2014, 2017))
    )
    assert _sizes(both) == {"train": 2, "val": 4}
    assert len({r.image_id for r in both.records}) == 6

    only = load_dataset("mscoco", make_mscoco(tmp_path / "y2017", karpathy=False, n_train=2, n_val=4, years=(2017,)))
    assert _sizes(only) == {"train": 4, "val": 2}
    assert all(Path(r.path).parent.name in ("train2017", "val2017") for r in only.records)


def test_mscoco_reports_images_absent_from_karpathy(tmp_path):
    root = make_mscoco(tmp_path, karpathy=True, n_train=2, n_val=3)
    karpathy = json.loads((root / "dataset_coco.json").read_text())
    karpathy["images"] = karpathy["images"][1:]
    (root / "dataset_coco.json").write_text(json.dumps(karpathy))

    dataset = load_dataset("mscoco", root)
    assert len(dataset.records) == 4
    assert dataset.dropped == [f"{coco_id('train', 0)}: 5 caption(s) dropped, image is in no split"]


def test_unknown_dataset_names_the_known_ones():
    with pytest.raises(KeyError) as error:
        load_dataset("imagenet")
    for name in ("flickr8k", "flickr30k", "mscoco", "synthetic", "feedback"):
        assert name in str(error.value)


def test_missing_dataset_folder_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="Flickr8k.token.txt.*acquire"):
        load_dataset("flickr8k", tmp_path / "nothing")


def test_default_root_is_the_data_dir(tmp_path):
    # conftest points CAPTIONING_DATA_DIR at tmp_path/data
    make_flickr8k(tmp_path / "data" / "flickr8k", n_per_split=1)
    assert len(load_dataset("flickr8k").records) == 3


def test_malformed_token_line_is_a_clear_error(tmp_path):
    root = make_flickr8k(tmp_path, n_per_split=1)
    with open(root / "Flickr8k.token.txt", "a", encoding="utf-8") as handle:
        handle.write("no tab and no number here\n")
    # 3 images x 5 captions + the 5 quirk lines = 20 lines before it
    with pytest.raises(ValueError, match="line 21 is not IMAGE#N<TAB>caption"):
        load_dataset("flickr8k", root)


def test_flickr8k_keeps_an_image_listed_in_two_splits_for_validation_to_report(tmp_path):
    root = make_flickr8k(tmp_path / "flickr8k")
    train_list = root / "Flickr_8k.trainImages.txt"
    test_list = root / "Flickr_8k.testImages.txt"
    first_train = train_list.read_text().split()[0]
    test_list.write_text(test_list.read_text().rstrip("\n") + f"\n{first_train}\n")

    dataset = load_dataset("flickr8k", root)

    splits = sorted(r.split for r in dataset.records if r.image_id == first_train)
    assert splits == ["test", "train"]
