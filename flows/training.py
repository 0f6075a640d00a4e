"""Training flow: fill the feature cache for the train/val/test queries, then train a caption model.

python -m flows.training [--params FILE] [--set train.epochs=2] [--out DIR]
"""

from __future__ import annotations

import sys
from typing import Any

from prefect import flow

from flows import finish, load_settings, settings_parser, tracking_uri
from tasks.features import build_features
from tasks.training import train_model


@flow(name="training")
def training_flow(
    params: dict[str, Any] | None = None, out_dir: str | None = None, track: bool = True
) -> dict[str, Any]:
    """Encode the images of the data queries once, then train into `out_dir`.

    Default out_dir: artifacts/training/<settings hash>, so the same settings resume or reuse a run
    (artifacts/train belongs to `dvc repro`).

    Returns the package folder, the best epoch's metrics and the per-epoch history.
    """
    from captioning.config import artifacts_dir
    from tasks.state import params_hash

    params = params or load_settings()
    data, features = params["data"], params.get("features") or {}
    encoder, batch_size = features.get("encoder", "lite0"), int(features.get("batch_size", 32))
    queries = [data[key] for key in ("train_query", "val_query", "test_query") if data.get(key)]
    for query in dict.fromkeys(queries):
        build_features(query, encoder, batch_size, features.get("dir"))
    tracking = tracking_uri(params) if track else None
    return train_model(params, out_dir or str(artifacts_dir() / "training" / params_hash(params)), tracking=tracking)


def main(argv: list[str] | None = None) -> int:
    parser = settings_parser("Train a caption model on cached image features.")
    parser.add_argument("--out", help="output folder (default: artifacts/training/<settings hash>)")
    parser.add_argument("--no-track", action="store_true", help="do not log the run to MLflow")
    args = parser.parse_args(argv)
    params = load_settings(args.params, args.overrides)
    state = training_flow(params=params, out_dir=args.out, track=not args.no_track, return_state=True)
    return finish(state, lambda r: f"model package: {r['package_dir']}; best: {r['best']}")


if __name__ == "__main__":
    sys.exit(main())
