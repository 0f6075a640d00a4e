"""Fine-tuning the encoder's last stages: what trains, what the package carries, which features it is scored on."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from captioning.features.encoder import EncoderError, build_encoder, encoder_key
from captioning.inference.model_package import ENCODER_FILE, PackageError, load_package, read_config
from captioning.training import TrainingError, augment, fingerprint, train
from harness.settings import test_settings
from harness.trained import synthetic_data, tiny_params

TRAIN_QUERY = "synthetic[train]-16"
VAL_QUERY = "synthetic[val]-4"
TEST_QUERY = "synthetic[test]-4"


def finetune_params(blocks: int = 1, **train_settings) -> dict:
    settings = {"epochs": 1, "batch_size": 16, "finetune_blocks": blocks, "encoder_lr": 1e-3, **train_settings}
    params = tiny_params("attention", **settings)
    params["data"].update(train_query=TRAIN_QUERY, val_query=VAL_QUERY, test_query=TEST_QUERY)
    params["features"]["workers"] = 1  # JPEG/PNG decoding in a DataLoader worker, as in real runs
    return params


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> Path:
    """A package trained for one epoch with the last encoder stage fine-tuned (augmented images)."""
    with synthetic_data():
        result = train(
            test_settings(**finetune_params(augment=True)),
            out_dir=tmp_path_factory.mktemp("ft") / "train",
            resume=False,
        )
    return Path(result.package_dir)


def _records(query: str):
    from captioning.data.query import select

    with synthetic_data():
        return select(query)


def test_only_the_last_stage_and_head_change(finetuned):
    pretrained = build_encoder("lite0").backbone.state_dict()
    tuned = torch.load(finetuned / ENCODER_FILE, map_location="cpu", weights_only=True)
    assert tuned.keys() == pretrained.keys()
    changed = {key for key in tuned if not torch.equal(tuned[key], pretrained[key])}
    trained = ("blocks.6.", "conv_head.", "bn2.")
    assert changed and all(key.startswith(trained) for key in changed)
    # Weights and batch-norm statistics of the trained parts moved; nothing frozen did.
    assert {"blocks.6.0.conv_pwl.weight", "conv_head.weight", "bn2.running_mean"} <= changed
    assert not any(key.startswith(("conv_stem.", "bn1.", "blocks.0.", "blocks.5.")) for key in changed)


def test_frozen_parts_stay_in_eval_mode_and_bad_block_counts_are_refused():
    encoder = build_encoder("lite0")
    trainable = encoder.finetune(2)
    encoder.train()
    assert {id(p) for p in trainable} == {id(p) for p in encoder.parameters() if p.requires_grad}
    assert all(not m.training for m in encoder.frozen_modules() for m in m.modules())
    assert encoder.backbone.blocks[5].training and encoder.backbone.bn2.training
    assert not encoder.backbone.blocks[4].training and not encoder.backbone.bn1.training
    pixels = torch.rand(2, 3, 224, 224) * 2 - 1
    with torch.no_grad():  # the folded copy running the frozen stages computes what they compute
        plain = build_encoder("lite0")(pixels)
        assert torch.allclose(encoder.eval()(pixels), plain, atol=1e-3)
    for bad in (0, 8):
        with pytest.raises(ValueError, match="between 1 and 7"):
            build_encoder("lite0").finetune(bad)
    with pytest.raises(EncoderError, match="optimised for inference"):
        build_encoder("lite0").optimize_for_inference().finetune(1)
    params = finetune_params(blocks=9)
    with synthetic_data(), pytest.raises(TrainingError, match="finetune_blocks"):
        train(test_settings(**params), resume=False)


def test_augmentation_is_fixed_by_its_seed():
    from PIL import Image

    image = Image.linear_gradient("L").convert("RGB").resize((300, 200))
    first = augment(image, 224, random.Random("42:0:7"))
    again = augment(image, 224, random.Random("42:0:7"))
    assert first.size == (224, 224) and first.tobytes() == again.tobytes()
    others = {augment(image, 224, random.Random(f"42:0:{n}")).tobytes() for n in range(6)}
    assert len(others) > 1


def test_package_round_trip_and_captions_from_files_match_its_features(finetuned, tmp_path):
    from captioning.features.store import build_features
    from captioning.inference.predict import Captioner

    config = read_config(finetuned)
    entry = config["encoder_weights"]
    assert entry["file"] == ENCODER_FILE and entry["trainable_blocks"] == 1
    key = encoder_key("lite0", finetuned / ENCODER_FILE)
    assert key == f"lite0-{entry['fingerprint']}"
    load_package(finetuned)

    captioner = Captioner.load(finetuned)
    assert captioner.feature_key == key and captioner.encoder_weights == finetuned / ENCODER_FILE
    records = _records(TEST_QUERY)
    paths = [record.path for record in records]
    store = build_features(
        records,
        "lite0",
        tmp_path / key / "synthetic",
        batch_size=4,
        progress=False,
        num_workers=0,
        weights=captioner.encoder_weights,
    )
    assert store.encoder == key
    cached = torch.from_numpy(store.get([record.image_id for record in records]).astype("float32"))
    encoded = captioner.encode(paths)
    assert torch.allclose(encoded, cached, atol=2e-2, rtol=1e-2)  # float16 storage
    pixels = _pixels(paths)
    with torch.inference_mode():  # the package's encoder is not the pretrained one
        pretrained = build_encoder("lite0").optimize_for_inference()(pixels)
        assert not torch.allclose(captioner.encoder(pixels), pretrained, atol=1e-3)
    beam = captioner.settings_for(beam_size=2)
    from_files = captioner.caption(paths, beam)
    from_cache = captioner.caption_features(cached, beam)
    assert [r["caption"] for r in from_files] == [r["caption"] for r in from_cache]

    # The pretrained cache is never mixed in: the fine-tuned store refuses plain lite0 features.
    with pytest.raises(ValueError, match="lite0"):
        build_features(records, "lite0", tmp_path / key / "synthetic", progress=False, num_workers=0)


def _pixels(paths):
    from captioning.images import preprocess

    return preprocess(paths, 224)


def test_missing_or_replaced_encoder_weights_are_refused(finetuned, tmp_path):
    from captioning.inference.predict import Captioner

    copy = Path(shutil.copytree(finetuned, tmp_path / "pkg"))
    model, vocab, config = load_package(copy)
    bare = Captioner(model, vocab, config)  # built without the package folder: no silent pretrained encoder
    with pytest.raises(PackageError, match="fine-tuned encoder"):
        bare.encode([_records(TEST_QUERY)[0].path])
    state = torch.load(copy / ENCODER_FILE, weights_only=True)
    state["conv_head.weight"] = state["conv_head.weight"] * 0
    torch.save(state, copy / ENCODER_FILE)
    with pytest.raises(PackageError, match="checksum"):
        Captioner.load(copy)
    (copy / ENCODER_FILE).unlink()
    with pytest.raises(PackageError, match="no encoder.pt"):
        load_package(copy)


def test_evaluation_uses_the_package_encoder(finetuned, tmp_path):
    from captioning.config import artifacts_dir
    from captioning.evaluation.scoring import PredictionError, evaluate_model
    from captioning.inference.predict import Captioner

    captioner = Captioner.load(finetuned, with_encoder=False)
    key, greedy = captioner.feature_key, captioner.settings_for(beam_size=1)
    with synthetic_data():
        result = evaluate_model(str(finetuned), TEST_QUERY, greedy, batch_size=4, attention_images=0)
        with pytest.raises(PredictionError, match="fine-tuned"):
            evaluate_model(captioner, TEST_QUERY, greedy, encoder="lite2", attention_images=0)
    assert result.info["encoder"] == key
    stores = sorted(p.name for p in (artifacts_dir() / "features").iterdir())
    assert stores == [key]  # no pretrained-encoder store was built or read
    records = _records(TEST_QUERY)
    expected = Captioner.load(finetuned).caption([r.path for r in records], greedy)
    assert [result.predictions[r.image_id] for r in records] == [e["caption"] for e in expected]


def test_frozen_encoder_package_has_no_encoder_file(tmp_path):
    params = finetune_params(blocks=0)
    with synthetic_data():
        result = train(test_settings(**params), out_dir=tmp_path / "frozen", resume=False)
    assert not (result.package_dir / ENCODER_FILE).exists()
    config = json.loads((result.package_dir / "config.json").read_text())
    assert "encoder_weights" not in config
    checkpoint = torch.load(tmp_path / "frozen" / "checkpoint.pt", weights_only=True)
    assert "encoder" not in checkpoint


class _Interrupt(Exception):
    pass


class _StopAt:
    def __init__(self, step: int):
        self.step = step

    def on_batch_end(self, step, loss):
        if step == self.step:
            raise _Interrupt


def test_resume_continues_fine_tuning_exactly(tmp_path):
    params = finetune_params(augment=True, checkpoint_every=2, batch_size=8)
    params["model"] = {**params["model"], "decoder": "show_tell", "embed_dim": 16, "hidden_dim": 32}
    params["data"]["train_query"] = "synthetic[train]-8"  # 40 captions: 5 steps
    with synthetic_data():
        full = train(test_settings(**params), out_dir=tmp_path / "full", resume=False)
        with pytest.raises(_Interrupt):
            train(test_settings(**params), [_StopAt(3)], out_dir=tmp_path / "run", resume=False)
        checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
        assert (checkpoint["step"], checkpoint["finished"]) == (2, False) and "encoder" in checkpoint
        resumed = train(test_settings(**params), out_dir=tmp_path / "run", resume=True)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert a["finished"] and b["finished"] and a["step"] == b["step"] == 5
    for part in ("model", "encoder"):
        assert all(torch.equal(a[part][key], b[part][key]) for key in a[part])
    assert [h["train_loss"] for h in full.history] == [h["train_loss"] for h in resumed.history]


def test_frozen_runs_keep_their_resume_fingerprint():
    frozen = test_settings(**finetune_params(blocks=0))
    unused = frozen.replace(train=frozen.train.replace(encoder_lr=0.5, augment=not frozen.train.augment).to_dict())
    assert fingerprint(frozen) == fingerprint(unused)  # settings that do nothing while the encoder is frozen
    tuned = frozen.replace(train=frozen.train.replace(finetune_blocks=1).to_dict())
    assert fingerprint(frozen) != fingerprint(tuned)
