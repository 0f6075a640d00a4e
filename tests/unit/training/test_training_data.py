"""Training pairs over several feature stores: records of a union keep their own dataset's features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from captioning.data.query import SelectedRecord
from captioning.data.records import Record
from captioning.features.store import FeatureStore
from captioning.settings import FeatureSettings
from captioning.training import (
    FeatureStores,
    TrainingError,
    caption_data,
    image_keys,
    load_split,
    references_by_key,
)
from captioning.vocab import Vocabulary
from harness.trained import ensure_synthetic

POSITIONS, DIM = 3, 4


def make_store(root, ids: list[str], offset: float) -> FeatureStore:
    """A real store on disk; image n holds the value offset + n everywhere."""
    store = FeatureStore.open_or_create(root, "lite0", POSITIONS, DIM)
    values = np.stack([np.full((POSITIONS, DIM), offset + n, dtype=np.float16) for n in range(len(ids))])
    store.append(ids, values)
    store.flush()
    return FeatureStore.open(root)


@pytest.fixture
def union(tmp_path):
    """Records of two datasets sharing the id "same.jpg", and their two stores."""
    stores = FeatureStores(
        {
            "synthetic": make_store(tmp_path / "synthetic", ["a.png", "same.jpg", "b.png"], 10.0),
            "feedback": make_store(tmp_path / "feedback", ["same.jpg", "c.jpg"], 100.0),
        }
    )
    records = [
        SelectedRecord("b.png", "/s/b.png", "train", ("two red circles", "red circles"), "synthetic"),
        SelectedRecord("same.jpg", "/s/same.jpg", "train", ("a blue star",), "synthetic"),
        SelectedRecord("same.jpg", "/f/same.jpg", "train", ("a teapot",), "feedback"),
        SelectedRecord("c.jpg", "/f/c.jpg", "train", ("a kettle", "a small kettle"), "feedback"),
    ]
    return records, stores


@pytest.mark.parametrize("preload", [True, False])
def test_each_image_gets_its_own_datasets_features(union, preload):
    records, stores = union
    vocab = Vocabulary.build([c for r in records for c in r.captions])
    data = caption_data(records, stores, vocab, max_length=8, preload=preload)
    assert data.image_ids == ["synthetic/b.png", "synthetic/same.jpg", "feedback/same.jpg", "feedback/c.jpg"]
    assert data.paths == ["/s/b.png", "/s/same.jpg", "/f/same.jpg", "/f/c.jpg"]
    assert (data.store_rows is None) == preload  # memory maps, gathered per store, when not preloaded
    feats = data.image_features([0, 1, 2, 3], "cpu")
    assert feats.shape == (4, POSITIONS, DIM) and feats.dtype == torch.float32
    # Row values: synthetic b.png is row 2 (12), same.jpg row 1 (11); feedback same.jpg row 0 (100), c.jpg row 1 (101).
    assert feats[:, 0, 0].tolist() == [12.0, 11.0, 100.0, 101.0]

    assert len(data) == 6 and data.rows.tolist() == [0, 0, 1, 2, 3, 3]
    captions = [vocab.decode(row.tolist()) for row in data.tokens]
    assert captions[3:] == ["a teapot", "a kettle", "a small kettle"]
    batch_feats, tokens = data.batch([4, 2], "cpu")
    assert batch_feats[:, 0, 0].tolist() == [101.0, 11.0] and tokens.shape[0] == 2


def test_references_use_the_same_keys(union):
    records, _ = union
    references = references_by_key(records)
    assert references["feedback/same.jpg"] == ["a teapot"] and references["synthetic/same.jpg"] == ["a blue star"]
    # Records of one dataset keep their plain ids (packages, samples and checkpoints unchanged).
    assert image_keys(records[:2]) == ["b.png", "same.jpg"]


def test_one_store_and_plain_records_work_as_before(union):
    _, stores = union
    records = [Record("c.jpg", "/f/c.jpg", "train", ("a kettle",)), Record("same.jpg", "/f/s.jpg", "train", ("a",))]
    data = caption_data(records, stores["feedback"], Vocabulary.build(["a kettle"]), max_length=4)
    assert data.image_ids == ["c.jpg", "same.jpg"]
    assert data.image_features([0, 1], "cpu")[:, 0, 0].tolist() == [101.0, 100.0]


def test_a_record_without_a_store_is_an_error(union):
    records, stores = union
    del stores["feedback"]
    with pytest.raises(TrainingError, match=r"no feature store for dataset\(s\) \['feedback'\]"):
        caption_data(records, stores, Vocabulary.build(["a"]), max_length=4)


def test_load_split_gives_one_store_per_dataset(tmp_path):
    """A union of synthetic and feedback: each dataset's images are encoded into its own store."""
    import io

    from PIL import Image

    from captioning.data.feedback import FeedbackStore

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (20, 120, 200)).save(buffer, format="PNG")
    store = FeedbackStore()
    stored = store.add(buffer.getvalue(), "a plain blue picture")
    store.approve([stored.id])  # admitted into training by an operator

    features = FeatureSettings(encoder="lite0", batch_size=4, workers=0, dir=str(tmp_path / "features"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the synthetic data is generated into the per-test data folder (about 2 s)
        ensure_synthetic()
        records, stores = load_split("synthetic[train]-2+feedback", features, progress=False, rank=0)
    finally:
        torch.set_num_threads(threads)
    assert [r.dataset for r in records] == ["synthetic", "synthetic", "feedback"]
    assert list(stores) == ["synthetic", "feedback"] and stores.dim == 1280 and stores.positions == 49
    assert stores["feedback"].root == tmp_path / "features" / "lite0" / "feedback"
    assert stores["feedback"].ids == [stored.image_sha256]
    assert set(stores["synthetic"].ids) == {r.image_id for r in records[:2]}


def test_captions_per_image_draws_each_images_own_captions(union):
    records, stores = union
    data = caption_data(records, stores, Vocabulary.build(["a b"], 1), 8)
    chosen = data.captions_per_image(2, seed=0)
    assert chosen.shape == (len(data.image_ids), 2)
    for image, pairs in enumerate(chosen):
        own = set(np.flatnonzero(data.rows == image))
        assert set(pairs) <= own
        # Two captions: both, once each; one caption: it, twice.
        assert sorted(pairs) == sorted(own) if len(own) == 2 else list(pairs) == [min(own)] * 2
    assert np.array_equal(chosen, data.captions_per_image(2, seed=0))  # the seed fixes the draw (exact resume)
    # The batch holds one feature row per image, in the order of its pairs.
    feats, tokens = data.batch(chosen[[2, 0]].reshape(-1), "cpu", per_image=2)
    assert feats.shape == (2, POSITIONS, DIM) and tokens.shape[0] == 4
    expected, _ = data.batch(chosen[[2, 0]].reshape(-1)[::2], "cpu")
    assert torch.equal(feats, expected)


def test_the_drift_reference_is_fitted_on_the_training_images_pooled_features(tmp_path, caplog):
    from captioning.features.drift import pool
    from captioning.training.data import drift_reference
    from harness.settings import test_settings

    rng = np.random.default_rng(0)
    ids = [f"{n}.png" for n in range(60)]
    values = rng.normal(size=(60, POSITIONS, 8)).astype(np.float16)
    store = FeatureStore.open_or_create(tmp_path / "store", "lite0", POSITIONS, 8)
    store.append(ids, values)
    store.flush()
    store = FeatureStore.open(tmp_path / "store")
    records = [SelectedRecord(key, f"/s/{key}", "train", ("a red circle",), "synthetic") for key in ids]
    vocab = Vocabulary.build(["a red circle"], 1)
    settings = test_settings(drift={"enabled": True, "window": 10})

    fitted = drift_reference(caption_data(records, store, vocab, max_length=4), settings)
    assert (fitted.images, fitted.window, fitted.encoder) == (60, 10, "lite0")
    np.testing.assert_allclose(fitted.mean, pool(values).mean(axis=0), rtol=1e-5)
    # Read from the memory map instead of memory: the same reference, byte for byte.
    mapped = drift_reference(caption_data(records, store, vocab, max_length=4, preload=False), settings)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert mapped.save(tmp_path / "a").read_bytes() == fitted.save(tmp_path / "b").read_bytes()

    assert (
        drift_reference(
            caption_data(records, store, vocab, 4), settings.replace(drift={"enabled": False, "window": 10})
        )
        is None
    )
    too_wide = settings.replace(drift={"enabled": True, "window": 31})
    assert drift_reference(caption_data(records, store, vocab, 4), too_wide) is None
    assert "60 training images, a window of 31 needs 62" in caplog.text
