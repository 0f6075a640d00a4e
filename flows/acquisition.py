"""Acquisition flow: put a dataset in data/NAME (mirror or official downloads), then version it with DVC.

python -m flows.acquisition [--dataset flickr8k] [--force] [--no-version]
"""

from __future__ import annotations

import sys
from typing import Any

from prefect import flow

from captioning.settings import Settings
from flows import finish, load_settings, parse_settings, run_parameter, run_settings, settings_parser
from tasks.artifacts import publish_acquisition
from tasks.data import acquire_dataset, version_data


def run_name() -> str:
    return f"acquire-{run_parameter('dataset') or run_settings().data.dataset}"


@flow(name="acquisition", flow_run_name=run_name)
def acquisition_flow(
    dataset: str | None = None, settings: Settings | None = None, force: bool = False, version: bool = True
) -> dict[str, Any]:
    """Acquire `dataset` (default params data.dataset); `dvc add data` when data/ is this repository's."""
    settings = settings or load_settings()
    name = dataset or settings.data.dataset
    path = acquire_dataset(name, settings.synthetic, force=force)
    data_hash = version_data() if version else None
    publish_acquisition(name, path, data_hash)
    return {"dataset": name, "path": path, "data_hash": data_hash}


def main(argv: list[str] | None = None) -> int:
    parser = settings_parser("Acquire a dataset and version it with DVC.")
    parser.add_argument("--dataset", help="dataset name (default: params data.dataset)")
    parser.add_argument("--force", action="store_true", help="acquire again even if present")
    parser.add_argument("--no-version", action="store_true", help="do not run `dvc add data`")
    args, settings = parse_settings(parser, argv)
    state = acquisition_flow(
        dataset=args.dataset, settings=settings, force=args.force, version=not args.no_version, return_state=True
    )
    return finish(state, lambda r: f"{r['dataset']} in {r['path']} (DVC hash: {r['data_hash'] or 'not versioned'})")


if __name__ == "__main__":
    sys.exit(main())
