"""MLflow experiment tracking as a training callback.

MLflow is imported when the callback is constructed, never at module import. The
callback talks to one tracking store through an explicit MlflowClient (no global
`mlflow.set_tracking_uri`), so several runs and stores can coexist in one process.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from captioning.registry.lineage import data_version, git_commit

logger = logging.getLogger(__name__)

# Per-batch losses are sent in batches: one database write per batch would slow training.
FLUSH_EVERY = 50
SAMPLE_IMAGES = 4


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": "0.001"} (lists and scalars as text)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


def _artifact_location(uri: str) -> str | None:
    """Artifacts beside a SQLite store (mlartifacts/), so the store folder holds everything."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()
    return None


class MLflowCallback:
    """Logs one training run: params, losses, validation metrics, samples and the model.

    `run_id` exists from construction on (other code tags or registers the run).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        sample_images: int = SAMPLE_IMAGES,
    ):
        import mlflow  # noqa: F401  (fails here, loudly, when MLflow is missing)
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        existing = self.client.get_experiment_by_name(experiment)
        if existing is not None:
            experiment_id = existing.experiment_id
        else:
            experiment_id = self.client.create_experiment(
                experiment, artifact_location=_artifact_location(tracking_uri)
            )
        self.experiment_id = experiment_id
        run = self.client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
        self.run_id: str = run.info.run_id
        self.sample_images = sample_images
        self._pending: list = []
        self._examples: list[dict] = []
        self._started = time.time()
        self._closed = False

    # ---- callback hooks -------------------------------------------------
    def on_train_start(self, info: dict[str, Any]) -> None:
        from mlflow.entities import Param, RunTag

        params = info.get("params") or {}
        flat = flatten(
            {key: params[key] for key in ("data", "features", "vocab", "model", "train", "decoding") if key in params}
        )
        for key in (
            "vocab_size",
            "train_images",
            "train_pairs",
            "val_images",
            "parameters",
            "device",
            "precision",
            "world_size",
        ):
            if key in info:
                flat[f"run.{key}"] = str(info[key])
        data = params.get("data") or {}
        tags = {
            "data_query": str(data.get("train_query")),
            "val_query": str(data.get("val_query")),
            "git_commit": git_commit() or "unknown",
            "data_hash": data_version() or "none",
            # An ensemble's decoders joined: "attention+transformer".
            "decoder": "+".join(
                map(
                    str,
                    [(params.get("model") or {}).get("decoder"), *((params.get("model") or {}).get("ensemble") or [])],
                )
            ),
            "encoder": str((params.get("features") or {}).get("encoder", "lite0")),
        }
        if info.get("resumed_from"):
            tags["resumed_from"] = json.dumps(info["resumed_from"])
        items = [Param(key, value[:6000]) for key, value in flat.items()]
        for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per call
            self.client.log_batch(self.run_id, params=items[start : start + 100])
        self.client.log_batch(self.run_id, tags=[RunTag(key, value) for key, value in tags.items()])
        vocab = info.get("vocab")
        if vocab is not None:
            self.client.log_dict(self.run_id, vocab.to_dict(), "vocab.json")
        self._examples = list(info.get("val_examples") or [])[: self.sample_images]

    def on_batch_end(self, step: int, loss: float) -> None:
        from mlflow.entities import Metric

        self._pending.append(Metric("batch_train_loss", float(loss), int(time.time() * 1000), int(step)))
        if len(self._pending) >= FLUSH_EVERY:
            self._flush()

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        self._flush()
        now = int(time.time() * 1000)
        numbers = [
            Metric(key, float(value), now, int(epoch))
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and key != "epoch"
        ]
        self.client.log_batch(self.run_id, metrics=numbers)
        if metrics.get("samples"):
            self.client.log_dict(self.run_id, metrics["samples"], f"samples/epoch_{epoch:03d}.json")

    def on_train_end(self, result) -> None:
        from mlflow.entities import Metric

        self._flush()
        now = int(time.time() * 1000)
        best = [
            Metric(f"best_{key}", float(value), now, 0)
            for key, value in (result.best or {}).items()
            if isinstance(value, (int, float)) and key != "step"
        ]
        if best:
            self.client.log_batch(self.run_id, metrics=best)
        package = Path(result.package_dir)
        if package.is_dir():
            self.client.log_artifacts(self.run_id, str(package), "model")
            self._log_samples(package)
        self.close("FINISHED")

    def on_train_failed(self, error: BaseException) -> None:
        self._flush()
        self.client.set_tag(self.run_id, "error", f"{type(error).__name__}: {error}"[:5000])
        self.close("FAILED")

    # ---- helpers --------------------------------------------------------
    def close(self, status: str = "FINISHED") -> None:
        if not self._closed:
            self._closed = True
            self.client.set_terminated(self.run_id, status)

    def _flush(self) -> None:
        while self._pending:
            chunk, self._pending = self._pending[:1000], self._pending[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def _log_samples(self, package: Path) -> None:
        """Captions of a few validation images and their attention maps as PNGs."""
        if not self._examples:
            return
        from captioning.images import ImageError
        from captioning.inference.predict import Captioner, render_attention

        try:
            captioner = Captioner.load(package)
            results = captioner.caption([example["path"] for example in self._examples], return_attention=True)
        except (ImageError, OSError) as error:
            logger.warning("no sample captions logged: %s", error)
            return
        samples = []
        with tempfile.TemporaryDirectory() as folder:
            for example, result in zip(self._examples, results):
                samples.append(
                    {
                        "image_id": example["image_id"],
                        "caption": result["caption"],
                        "alternatives": result["alternatives"],
                        "references": example["references"],
                    }
                )
                if result.get("attention"):
                    name = Path(example["image_id"]).stem + ".png"
                    render_attention(example["path"], result["attention"]).save(Path(folder) / name)
            if any(Path(folder).iterdir()):
                self.client.log_artifacts(self.run_id, folder, "attention")
        self.client.log_dict(self.run_id, samples, "samples/val_captions.json")
