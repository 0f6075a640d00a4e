"""The feature cache encodes each image once and keeps what it finished."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from captioning.data.records import Record
from captioning.features.store import DATA_FILE, INDEX_FILE, FeatureStore, build_features
from captioning.images import ImageError, preprocess

COLOURS = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (235, 195, 20), (120, 40, 160), (20, 20, 20)]


def _records(folder, count, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for n in range(start, start + count):
        path = folder / f"img{n}.png"
        image = Image.new("RGB", (96, 96), (250, 250, 250))
        image.paste(COLOURS[n % len(COLOURS)], (10 + 8 * n, 20, 60 + 8 * n, 70))
        image.save(path)
        records.append(Record(f"img{n}.png", str(path), "train", (f"a shape number {n}",)))
    return records


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_build_get_and_reuse(tmp_path):
    records = _records(tmp_path / "images", 3)
    store = build_features(records, "lite0", tmp_path / "store", batch_size=2, progress=False, num_workers=0)
    assert len(store) == 3 and store.positions == 49 and store.dim == 1280
    features = store.get(["img2.png", "img0.png"])
    assert features.shape == (2, 49, 1280) and features.dtype == np.float16

    # The cached rows are what the encoder gives for the image through the shared preprocessing.
    from captioning.features.encoder import build_encoder

    with torch.inference_mode():
        direct = build_encoder("lite0")(preprocess([records[2].path], 224)).numpy()
    np.testing.assert_allclose(features[0].astype(np.float32), direct[0], rtol=1e-2, atol=1e-2)

    # Re-running does no work: with the image files gone, any re-encoding would fail.
    data_before = (tmp_path / "store" / DATA_FILE).read_bytes()
    for record in records:
        (tmp_path / "images" / record.image_id).unlink()
    again = build_features(records, "lite0", tmp_path / "store", batch_size=2, progress=False)
    assert len(again) == 3
    assert (tmp_path / "store" / DATA_FILE).read_bytes() == data_before

    # New images are appended; the old rows stay byte for byte.
    more = _records(tmp_path / "more", 2, start=3)
    grown = build_features(records + more, "lite0", tmp_path / "store", batch_size=4, progress=False, num_workers=1)
    assert grown.ids == ["img0.png", "img1.png", "img2.png", "img3.png", "img4.png"]
    assert (tmp_path / "store" / DATA_FILE).read_bytes()[: len(data_before)] == data_before
    reopened = FeatureStore.open(tmp_path / "store")
    np.testing.assert_array_equal(reopened.get(["img2.png"]), features[:1])
    with pytest.raises(KeyError, match="img9.png"):
        reopened.get(["img9.png"])


def test_corrupt_image_is_named_and_finished_batches_are_kept(tmp_path):
    records = _records(tmp_path / "images", 4)
    bad = tmp_path / "images" / "img2.png"
    bad.write_bytes(bad.read_bytes()[:60])  # a truncated PNG
    with pytest.raises(ImageError, match="img2.png"):
        build_features(records, "lite0", tmp_path / "store", batch_size=2, progress=False, num_workers=1)
    kept = FeatureStore.open(tmp_path / "store")
    assert kept.ids == ["img0.png", "img1.png", "img3.png"]  # every readable image encoded so far is kept
    # Once the file is repaired, only it is encoded.
    _records(tmp_path / "images", 3)
    repaired = build_features(records, "lite0", tmp_path / "store", batch_size=2, progress=False, num_workers=0)
    assert repaired.ids == ["img0.png", "img1.png", "img3.png", "img2.png"]


def test_unindexed_rows_from_an_interrupted_run_are_dropped(tmp_path):
    store = FeatureStore.open_or_create(tmp_path / "store", "lite0", 4, 8)
    store.append(["a", "b"], np.ones((2, 4, 8), dtype=np.float32))
    store.flush()
    # A run killed after writing rows but before updating the index leaves extra bytes.
    with open(tmp_path / "store" / DATA_FILE, "ab") as handle:
        handle.write(np.zeros((1, 4, 8), dtype=np.float16).tobytes())
    reopened = FeatureStore.open(tmp_path / "store")
    assert reopened.ids == ["a", "b"]
    assert (tmp_path / "store" / DATA_FILE).stat().st_size == 2 * 4 * 8 * 2
    assert json.loads((tmp_path / "store" / INDEX_FILE).read_text())["ids"] == ["a", "b"]


def test_store_refuses_other_encoders_duplicates_and_bad_shapes(tmp_path):
    store = FeatureStore.open_or_create(tmp_path / "store", "lite0", 4, 8)
    store.append(["a"], np.ones((1, 4, 8)))
    store.flush()
    with pytest.raises(ValueError, match="lite0"):
        FeatureStore.open_or_create(tmp_path / "store", "lite2", 4, 8)
    with pytest.raises(ValueError, match="already stored"):
        store.append(["a"], np.ones((1, 4, 8)))
    with pytest.raises(ValueError, match="shape"):
        store.append(["b"], np.ones((1, 5, 8)))
    with pytest.raises(FileNotFoundError):
        FeatureStore.open(tmp_path / "nothing")
    with pytest.raises(KeyError, match="lite7"):
        build_features([], "lite7", tmp_path / "other")
