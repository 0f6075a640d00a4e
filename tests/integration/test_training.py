"""Training end to end on the synthetic data: quality, exact resume after a kill, MLflow tracking."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from captioning.config import PROJECT_ROOT
from captioning.inference.model_package import load_checkpoint, load_package
from captioning.settings import SettingsError
from captioning.training import TrainingError, train
from harness.settings import test_settings
from harness.trained import held_out_features, synthetic_data, tiny_params, train_tiny_model

pytestmark = pytest.mark.slow

# Runs training in a child process that kills itself (SIGKILL, no clean-up) at step KILL_AT.
KILLED_RUN = """
import json, os, signal, sys
from captioning.settings import Settings
from captioning.training import train

settings = Settings.model_validate(json.load(open(sys.argv[1])))
out_dir, kill_at = sys.argv[2], int(sys.argv[3])

class Kill:
    def on_batch_end(self, step, loss):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

train(settings, [Kill()], out_dir=out_dir, resume=True)
"""


def _bleu4(predictions: dict[str, str], references: dict[str, list[str]]) -> float:
    from pycocoevalcap.bleu.bleu import Bleu

    from captioning.vocab import tokenize

    gts = {key: [" ".join(tokenize(ref)) for ref in references[key]] for key in predictions}
    res = {key: [" ".join(tokenize(caption))] for key, caption in predictions.items()}
    return 100.0 * Bleu(4).compute_score(gts, res, verbose=0)[0][3]


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory) -> Path:
    return train_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_tiny_model_captions_held_out_images(tiny_package):
    from captioning.inference.predict import Captioner

    ids, features, references = held_out_features()
    captioner = Captioner.load(tiny_package, with_encoder=False)
    greedy = captioner.caption_features(features, captioner.settings_for(beam_size=1))
    predictions = {image_id: result["caption"] for image_id, result in zip(ids, greedy)}
    assert _bleu4(predictions, references) > 50.0

    beam = captioner.caption_features(features[:3], captioner.settings_for(beam_size=3))
    for result in beam:
        options = result["alternatives"]
        assert options[0]["caption"] == result["caption"] and len(options) >= 2
        assert [o["log_prob"] for o in options] == sorted((o["log_prob"] for o in options), reverse=True)
    config = json.loads((tiny_package / "config.json").read_text())
    assert config["metrics"]["val_CIDEr"] > 100.0 and config["encoder"] == "lite0"


def test_images_and_cached_features_caption_alike(tiny_package):
    """Serving (image files through open_image/preprocess/encoder) matches training's cached features."""
    from captioning.data.query import select
    from captioning.inference.predict import Captioner
    from harness.trained import TEST_QUERY

    ids, features, _ = held_out_features()
    with synthetic_data():
        paths = {record.image_id: record.path for record in select(TEST_QUERY)}
    captioner = Captioner.load(tiny_package)
    greedy = captioner.settings_for(beam_size=1)
    from_files = captioner.caption([paths[i] for i in ids[:4]], greedy, return_attention=True)
    from_cache = captioner.caption_features(features[:4], greedy)
    assert [r["caption"] for r in from_files] == [r["caption"] for r in from_cache]
    attention = from_files[0]["attention"]
    assert attention["words"] == from_files[0]["caption"].split()
    assert attention["grid"] == [7, 7] and len(attention["maps"]) == len(attention["words"])
    assert all(len(row) == 49 and abs(sum(row) - 1.0) < 1e-3 for row in attention["maps"])
    assert captioner.version == "local"


def test_flip_reads_each_image_and_its_mirror_from_files_and_from_the_cache(tiny_package, tmp_path):
    """`decoding.flip`: images and cached features of both views caption alike; the cache keeps the mirrors apart."""
    from PIL import ImageOps

    from captioning.data.query import select
    from captioning.evaluation.scoring import decoding_name, evaluate_model
    from captioning.features.store import FeatureStore
    from captioning.images import open_image
    from captioning.inference.predict import Captioner
    from harness.trained import TEST_QUERY

    captioner = Captioner.load(tiny_package)
    decoding = captioner.settings_for(beam_size=3, flip=True)
    with synthetic_data():
        records = select(TEST_QUERY)
        result = evaluate_model(captioner, TEST_QUERY, decoding, feature_dir=tmp_path, attention_images=2)
    paths = [record.path for record in records]
    features = captioner.encode(paths[:4], flip=True)
    mirrored = captioner.encode([ImageOps.mirror(open_image(path)) for path in paths[:4]], flip=False)
    assert features.shape[1] == 2 * 49 and torch.allclose(features[:, 49:], mirrored, atol=1e-5)

    from_files = captioner.caption(paths, decoding)
    assert result.predictions == {r.image_id: out["caption"] for r, out in zip(records, from_files)}
    assert _bleu4(result.predictions, result.references) > 50.0
    assert result.info["flip"] is True and decoding_name(decoding) == "beam 3, flip"
    assert FeatureStore.open(tmp_path / "lite0-flip" / "synthetic").encoder == "lite0-flip"
    assert FeatureStore.open(tmp_path / "lite0" / "synthetic").encoder == "lite0"
    assert all(len(row) == 49 for maps in result.attention.values() for row in maps["maps"])

    # The command line scores the same captions; --no-flip reads the image alone.
    from typer.testing import CliRunner

    from captioning.cli import app

    runner, command = (
        CliRunner(),
        ["evaluate", "--model", str(tiny_package), "--data", TEST_QUERY, "--beam", "3", "--json"],
    )
    with synthetic_data(), pytest.MonkeyPatch.context() as patch:
        patch.setenv("CAPTIONING_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
        flipped, alone = runner.invoke(app, [*command, "--flip"]), runner.invoke(app, [*command, "--no-flip"])
    assert flipped.exit_code == 0 and alone.exit_code == 0, flipped.output + alone.output
    flipped, alone = json.loads(flipped.stdout), json.loads(alone.stdout)
    assert flipped["flip"] is True and flipped["metrics"] == pytest.approx(result.metrics)
    assert alone["flip"] is False and (tmp_path / "artifacts" / "features" / "lite0-flip" / "synthetic").is_dir()


def test_package_remembers_its_training_images_for_reranking_with_their_captions(tiny_package, tmp_path):
    """`decoding.rerank_neighbours`: a package trained with it carries the training split's caption
    memory, and the library and the command line rerank with it alike; other packages go without."""
    from typer.testing import CliRunner

    from captioning.cli import app
    from captioning.data.query import select
    from captioning.evaluation.scoring import decoding_name, evaluate_model
    from captioning.features.store import FeatureStore
    from captioning.inference.model_package import PackageError
    from captioning.inference.neighbours import pool
    from captioning.inference.predict import Captioner
    from harness.trained import TEST_QUERY, TRAIN_QUERY, shared_dir

    without = Captioner.load(tiny_package, with_encoder=False)
    assert without.memory is None and not (tiny_package / "neighbours.npz").exists()
    _, features, _ = held_out_features()
    with pytest.raises(PackageError, match="rerank_neighbours above 0"):
        without.caption_features(
            features[:2], without.settings_for(beam_size=3, rerank="consensus", rerank_neighbours=5)
        )

    package = train_tiny_model(tmp_path, decoding={"beam_size": 5, "rerank": "consensus", "rerank_neighbours": 5})
    captioner = Captioner.load(package, with_encoder=False)
    assert captioner.decoding.rerank_neighbours == 5
    with synthetic_data():
        train_records = select(TRAIN_QUERY)
    memory = captioner.memory
    assert len(memory) == len(train_records) and memory.dim == 1280
    assert memory.image_ids == [record.image_id for record in train_records]
    assert memory.captions[:10] == [[captioner.vocab.encode(c, 16) for c in r.captions] for r in train_records[:10]]
    # A training image's own features find it first.
    store = FeatureStore.open(shared_dir() / "features" / "lite0" / "synthetic")
    own = store.get(memory.image_ids[:5])
    assert memory.nearest(pool(own), 1)[:, 0].tolist() == [0, 1, 2, 3, 4]

    with synthetic_data():
        result = evaluate_model(package, TEST_QUERY, feature_dir=tmp_path)
        beam_only = evaluate_model(
            captioner, TEST_QUERY, captioner.settings_for(rerank_neighbours=0), feature_dir=tmp_path
        )
    assert result.info["rerank_neighbours"] == 5 and beam_only.info["rerank_neighbours"] == 0
    assert result.info["rerank_neighbour_weight"] == captioner.decoding.rerank_neighbour_weight
    assert _bleu4(result.predictions, result.references) > 50.0
    assert decoding_name(captioner.decoding) == "beam 5, consensus with 5 neighbours"

    runner = CliRunner()
    command = ["evaluate", "--model", str(package), "--data", TEST_QUERY, "--json"]
    with synthetic_data(), pytest.MonkeyPatch.context() as patch:
        patch.setenv("CAPTIONING_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
        done = runner.invoke(app, [*command, "--neighbours", "5"])
        wrong = runner.invoke(app, [*command, "--neighbours", "-1"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["metrics"] == pytest.approx(result.metrics)
    assert wrong.exit_code != 0 and "rerank_neighbours" in wrong.output


def test_caption_command(tiny_package, tmp_path):
    from typer.testing import CliRunner

    from captioning.cli import app
    from captioning.data.query import select
    from harness.trained import TEST_QUERY

    with synthetic_data():
        images = [record.path for record in select(TEST_QUERY)[:2]]
    runner = CliRunner()
    done = runner.invoke(app, ["caption", *images, "--model", str(tiny_package), "--beam", "2", "--json"])
    assert done.exit_code == 0, done.output
    rows = json.loads(done.stdout)
    assert [row["image"] for row in rows] == images
    assert all(row["caption"] and row["alternatives"][0]["caption"] == row["caption"] for row in rows)

    missing = runner.invoke(app, ["caption", images[0], "--model", str(tmp_path / "absent")])
    assert missing.exit_code == 2 and "absent" in missing.stderr and missing.stderr.strip().count("\n") == 0
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    bad = runner.invoke(app, ["caption", str(not_image), "--model", str(tiny_package)])
    assert bad.exit_code == 2 and "notes.png" in bad.stderr


def test_resume_after_kill_gives_the_same_weights(tiny_package, tmp_path):
    # The loop, not the decoder, decides whether a resume is exact: the fastest decoder will do.
    params = tiny_params("show_tell", epochs=2, checkpoint_every=3, batch_size=64)
    params["model"].update(embed_dim=32, hidden_dim=64)
    with synthetic_data() as data:
        uninterrupted = train(test_settings(**params), out_dir=tmp_path / "full", resume=False)

    params_file = tmp_path / "params.json"
    params_file.write_text(json.dumps(test_settings(**params).to_dict()))
    env = {**os.environ, "CAPTIONING_DATA_DIR": str(data), "PYTHONPATH": str(PROJECT_ROOT)}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(params_file), str(tmp_path / "run"), "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert (checkpoint["epoch"], checkpoint["batch"], checkpoint["step"]) == (0, 3, 3)  # mid-epoch
    assert not checkpoint["finished"]

    changed = json.loads(json.dumps(params))
    changed["train"]["lr"] = 1e-3
    with synthetic_data(), pytest.raises(TrainingError, match="other params"):
        train(test_settings(**changed), out_dir=tmp_path / "run", resume=True)

    with synthetic_data():
        resumed = train(test_settings(**params), out_dir=tmp_path / "run", resume=True)

    final_a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    final_b = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert final_a["finished"] and final_b["finished"] and final_a["step"] == final_b["step"]
    assert final_a["model"].keys() == final_b["model"].keys()
    assert all(torch.equal(final_a["model"][key], final_b["model"][key]) for key in final_a["model"])
    strip = lambda history: [
        {k: v for k, v in h.items() if k not in ("captions_per_s", "data_time_share")} for h in history
    ]
    assert strip(resumed.history) == strip(uninterrupted.history)
    best_a, _, _ = load_package(uninterrupted.package_dir)
    best_b, _, _ = load_package(resumed.package_dir)
    assert all(torch.equal(a, b) for a, b in zip(best_a.state_dict().values(), best_b.state_dict().values()))

    # A finished run is not trained again.
    with synthetic_data():
        again = train(test_settings(**params), out_dir=tmp_path / "run", resume=True)
    assert again.best == resumed.best


def test_mlflow_tracking(tiny_package, tmp_path):
    from mlflow.tracking import MlflowClient

    from captioning.training.tracking import MLflowCallback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    callback = MLflowCallback(uri, "tests", run_name="tiny")
    train_tiny_model(tmp_path, epochs=1, callbacks=[callback])

    client = MlflowClient(uri)
    run = client.get_run(callback.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.params["model.decoder"] == "attention"
    assert float(run.data.params["train.lr"]) == pytest.approx(4e-3)
    assert run.data.tags["data_query"] == "synthetic[train]-160" and run.data.tags["git_commit"]
    assert "data_hash" in run.data.tags
    losses = client.get_metric_history(callback.run_id, "batch_train_loss")
    assert sorted(m.step for m in losses) == list(range(1, 26))  # 800 captions / batch 32, one epoch
    assert [m.step for m in client.get_metric_history(callback.run_id, "val_CIDEr")] == [1]
    assert run.data.metrics["captions_per_s"] > 0 and "best_val_CIDEr" in run.data.metrics

    artifacts = {item.path for item in client.list_artifacts(callback.run_id)}
    assert {"vocab.json", "model", "samples", "attention"} <= artifacts
    model_files = {Path(item.path).name for item in client.list_artifacts(callback.run_id, "model")}
    assert {"config.json", "vocab.json", "weights.pt"} <= model_files
    pngs = [item.path for item in client.list_artifacts(callback.run_id, "attention")]
    assert pngs and all(path.endswith(".png") for path in pngs)
    local = Path(client.download_artifacts(callback.run_id, "samples/val_captions.json", str(tmp_path / "dl")))
    samples = json.loads(local.read_text())
    assert samples and all(sample["caption"] and sample["references"] for sample in samples)


def test_self_critical_epochs_follow_and_resume_exactly(tmp_path):
    # One cross-entropy epoch, then two self-critical ones; killed inside the first of those.
    params = tiny_params(
        "show_tell",
        epochs=1,
        batch_size=64,
        checkpoint_every=2,
        scst_epochs=2,
        scst_samples=4,
        scst_lr=1e-3,
        scst_top_k=5,
    )
    params["model"].update(embed_dim=32, hidden_dim=64)
    with synthetic_data() as data:
        uninterrupted = train(test_settings(**params), out_dir=tmp_path / "full", resume=False)
    history = uninterrupted.history
    assert len(history) == 3 and "train_reward" not in history[0]
    assert all(h["train_reward"] > 0 for h in history[1:])
    assert uninterrupted.best["val_CIDEr"] == max(h["val_CIDEr"] for h in history)

    xe_steps = history[0]["step"]
    params_file = tmp_path / "params.json"
    params_file.write_text(json.dumps(test_settings(**params).to_dict()))
    env = {**os.environ, "CAPTIONING_DATA_DIR": str(data), "PYTHONPATH": str(PROJECT_ROOT)}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(params_file), str(tmp_path / "run"), str(xe_steps + 3)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert checkpoint["epoch"] == 1 and checkpoint["batch"] > 0  # inside the first self-critical epoch
    with synthetic_data():
        resumed = train(test_settings(**params), out_dir=tmp_path / "run", resume=True)
    final_a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    final_b = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert all(torch.equal(final_a["model"][key], final_b["model"][key]) for key in final_a["model"])
    assert [h["val_CIDEr"] for h in resumed.history] == [h["val_CIDEr"] for h in history]

    with synthetic_data(), pytest.raises(TrainingError, match="frozen encoder"):
        train(
            test_settings(**{**params, "train": {**params["train"], "finetune_blocks": 1}}),
            out_dir=tmp_path / "ft",
            resume=False,
        )


def test_captions_per_image_trains_and_resumes_exactly(tmp_path):
    # Steps of 12 images with all 5 of their captions; killed mid-epoch and resumed.
    params = tiny_params("transformer", epochs=2, batch_size=64, checkpoint_every=3, captions_per_image=5)

    class Start:
        def on_train_start(self, info):
            self.info = info

    start = Start()
    with synthetic_data() as data:
        uninterrupted = train(test_settings(**params), [start], out_dir=tmp_path / "full", resume=False)
    images = start.info["train_images"]
    assert start.info["train_pairs"] == 5 * images  # so each epoch draws every caption once
    steps = -(-images // 12)
    assert start.info["steps_per_epoch"] == steps
    assert [h["step"] for h in uninterrupted.history] == [steps, 2 * steps]
    assert uninterrupted.best["val_CIDEr"] > 100  # the synthetic captions are learnable; a random model scores ~0

    params_file = tmp_path / "params.json"
    params_file.write_text(json.dumps(test_settings(**params).to_dict()))
    env = {**os.environ, "CAPTIONING_DATA_DIR": str(data), "PYTHONPATH": str(PROJECT_ROOT)}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(params_file), str(tmp_path / "run"), str(steps + 4)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert checkpoint["epoch"] == 1 and checkpoint["batch"] > 0  # inside the second epoch
    with synthetic_data():
        resumed = train(test_settings(**params), out_dir=tmp_path / "run", resume=True)
    final_a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    final_b = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert all(torch.equal(final_a["model"][key], final_b["model"][key]) for key in final_a["model"])
    assert [h["val_CIDEr"] for h in resumed.history] == [h["val_CIDEr"] for h in uninterrupted.history]

    for bad, message in [
        ({"captions_per_image": 65}, "1..batch_size"),
        ({"finetune_blocks": 1}, "needs cached features"),
    ]:
        with synthetic_data(), pytest.raises(TrainingError, match=message):
            train(
                test_settings(**{**params, "train": {**params["train"], **bad}}), out_dir=tmp_path / "bad", resume=False
            )
    with pytest.raises(SettingsError, match="train.captions_per_image"):
        test_settings(**{**params, "train": {**params["train"], "captions_per_image": -1}})


def test_bfloat16_training_is_recorded_and_bad_precisions_are_refused_first(tmp_path):
    class Info:
        def on_train_start(self, info):
            self.precision = info["precision"]

    seen = Info()
    with synthetic_data():
        result = train(
            test_settings(**tiny_params("transformer", epochs=1, precision="bfloat16")),
            callbacks=[seen],
            out_dir=tmp_path / "bf16",
            resume=False,
        )
        assert seen.precision == "bfloat16"
        assert result.history[0]["val_CIDEr"] > 0 and math.isfinite(result.history[0]["train_loss"])
        model, _, _ = load_package(result.package_dir)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        with pytest.raises(TrainingError, match="needs CUDA"):
            train(test_settings(**tiny_params("transformer", epochs=1, precision="float16")), out_dir=tmp_path / "fp16")
        assert not (tmp_path / "fp16").exists()  # refused before any work
        with pytest.raises(SettingsError, match="train.precision"):
            test_settings(**tiny_params("transformer", epochs=1, precision="half"))


def test_early_stopping_ends_only_the_cross_entropy_phase(tmp_path):
    # A learning rate of ~0 leaves the model as it was: epoch 2 is no better than epoch 1, and
    # with patience 1 the cross-entropy phase stops there, a planned epoch early.
    params = tiny_params("show_tell", epochs=3, lr=1e-12, patience=1, scst_epochs=1, scst_samples=2, scst_lr=1e-3)
    params["model"].update(embed_dim=32, hidden_dim=64)
    with synthetic_data():
        result = train(test_settings(**params), out_dir=tmp_path / "run", resume=False)
    assert [h["epoch"] for h in result.history] == [1, 2, 4]
    assert "train_reward" in result.history[-1] and "train_reward" not in result.history[1]
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["finished"]


def test_ensemble_trains_its_members_and_packages_them(tmp_path):
    from captioning.evaluation.report import history_from_checkpoint
    from captioning.inference.predict import Captioner
    from captioning.models import Ensemble

    params = tiny_params("show_tell", epochs=2)
    params["model"]["ensemble"] = ["attention"]
    epochs: list[tuple[int, Any]] = []

    class Events:
        def on_epoch_end(self, epoch, metrics):
            epochs.append((epoch, metrics.get("member")))

    with synthetic_data():
        result = train(test_settings(**params), [Events()], out_dir=tmp_path / "run", resume=True)
    members = sorted(path.name for path in (tmp_path / "run" / "members").iterdir())
    assert members == ["0-show_tell", "1-attention"]
    seeds = [load_checkpoint(tmp_path / "run" / "members" / name / "checkpoint.pt")["fingerprint"] for name in members]
    assert seeds[0] != seeds[1]
    # Epochs count on across the members; the last event is the ensemble's validation.
    assert epochs == [(1, 0), (2, 0), (3, 1), (4, 1), (5, None)]
    assert result.best["member"] == "ensemble" and result.best["val_CIDEr"] > 0
    model, _, config = load_package(result.package_dir)
    assert isinstance(model, Ensemble) and [m["decoder"] for m in config["model"]["members"]] == [
        "show_tell",
        "attention",
    ]
    # The members learnt from the same features: the ensemble carries the first one's drift reference.
    first = tmp_path / "run" / "members" / "0-show_tell" / "model" / "drift.npz"
    assert config["drift_sha256"] and (result.package_dir / "drift.npz").read_bytes() == first.read_bytes()
    history = history_from_checkpoint(tmp_path / "run" / "history.json")
    assert [row["member"] for row in history] == [0, 0, 1, 1, "ensemble"]

    # The package holds the members' own weights, and captions held-out images sensibly.
    for number, name in enumerate(members):
        trained, _, _ = load_package(tmp_path / "run" / "members" / name / "model")
        own = model.members[number].state_dict()
        assert all(torch.equal(value, own[key]) for key, value in trained.state_dict().items())
    ids, features, references = held_out_features()
    captioner = Captioner.load(result.package_dir, with_encoder=False)
    captions = {
        i: r["caption"] for i, r in zip(ids, captioner.caption_features(features, captioner.settings_for(beam_size=3)))
    }
    assert _bleu4(captions, references) > 25.0

    # The ensemble carries its members' training n-gram frequencies, for consensus reranking.
    member_frequencies = Captioner.load(tmp_path / "run" / "members" / members[0] / "model", with_encoder=False)
    assert captioner.frequencies.df == member_frequencies.frequencies.df and captioner.frequencies.images > 0
    reranked = captioner.caption_features(features, captioner.settings_for(beam_size=3, rerank="consensus"))
    assert _bleu4({i: r["caption"] for i, r in zip(ids, reranked)}, references) > 25.0

    # Run again: every member's finished run is reused, nothing trains.
    class Steps:
        def on_batch_end(self, step, loss):
            raise AssertionError("a finished member trained again")

    with synthetic_data():
        again = train(test_settings(**params), [Steps()], out_dir=tmp_path / "run", resume=True)
    assert again.best["val_CIDEr"] == pytest.approx(result.best["val_CIDEr"])

    params["train"]["finetune_blocks"] = 1
    with pytest.raises(TrainingError, match="frozen encoder"):
        train(test_settings(**params), out_dir=tmp_path / "other")


def test_ensemble_members_take_their_own_settings(tmp_path):
    params = tiny_params("show_tell", epochs=1)
    params["model"]["ensemble"] = [{"decoder": "show_tell", "model": {"embed_dim": 16}, "train": {"epochs": 2}}]
    with synthetic_data():
        result = train(test_settings(**params), out_dir=tmp_path / "run", resume=False)
    assert [(row["member"], row["epoch"]) for row in result.history[:-1]] == [(0, 1), (1, 2), (1, 3)]
    _, _, config = load_package(result.package_dir)
    assert [m["embed_dim"] for m in config["model"]["members"]] == [params["model"]["embed_dim"], 16]

    params["model"]["ensemble"] = [{"decoder": "show_tell", "train": {"epochs_typo": 2}}]
    with pytest.raises(SettingsError, match="train.epochs_typo is not a setting a member can take"):
        test_settings(**params)
