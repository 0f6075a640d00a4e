"""Training flow: fill the feature cache for the train/val/test queries, then train a caption model.

python -m flows.training [--params FILE] [--set train.epochs=2] [--out DIR]
"""

from __future__ import annotations

import sys
from typing import Any

from prefect import flow

from captioning.settings import Settings
from flows import finish, load_settings, parse_settings, run_settings, settings_parser, tracking_uri
from tasks.artifacts import publish_features
from tasks.features import build_features
from tasks.training import train_model


def run_name() -> str:
    """train-DECODER (train-attention, train-transformer, ...)."""
    return f"train-{run_settings().model.decoder}"


@flow(name="training", flow_run_name=run_name)
def training_flow(settings: Settings | None = None, out_dir: str | None = None, track: bool = True) -> dict[str, Any]:
    """Encode the images of the data queries once, then train into `out_dir`.

    Default settings: params.yaml. Default out_dir: artifacts/training/<settings hash>, so the same
    settings resume or reuse a run (artifacts/train belongs to `dvc repro`).

    Returns the package folder, the best epoch's metrics and the per-epoch history.
    """
    from captioning.config import artifacts_dir
    from captioning.registry.lineage import training_hash

    settings = settings or load_settings()
    data = settings.data
    queries = dict.fromkeys(q for q in (data.train_query, data.val_query, data.test_query) if q)
    publish_features([build_features(query, settings.features) for query in queries], settings.features.encoder)
    tracking = tracking_uri(settings) if track else None
    out_dir = out_dir or str(artifacts_dir() / "training" / training_hash(settings))
    return train_model(settings, out_dir, tracking=tracking)


def main(argv: list[str] | None = None) -> int:
    parser = settings_parser("Train a caption model on cached image features.")
    parser.add_argument("--out", help="output folder (default: artifacts/training/<settings hash>)")
    parser.add_argument("--no-track", action="store_true", help="do not log the run to MLflow")
    args, settings = parse_settings(parser, argv)
    state = training_flow(settings=settings, out_dir=args.out, track=not args.no_track, return_state=True)
    return finish(state, lambda r: f"model package: {r['package_dir']}; best: {r['best']}")


if __name__ == "__main__":
    sys.exit(main())
