"""`captioning features`, `captioning train` and `captioning caption`."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import typer

from captioning.cli.common import (
    fail,
    is_registry_reference,
    model_store,
    params_option,
    print_json,
    set_option,
    settings,
    tracking_option,
)


def _check_selection(text: str) -> None:
    """Check a query or a `+` union of queries; exit 2 with a one-line reason when bad."""
    from captioning.data.query import QueryError, check_query, parse_selection

    try:
        for query in parse_selection(text):
            check_query(query)
    except QueryError as error:
        fail(error.reason)


def features_command(
    query: str = typer.Argument(..., help="Data query, e.g. flickr8k[train+val]."),
    encoder: Optional[str] = typer.Option(
        None, help="lite0, lite2, lite2_260 or lite2_320 (default: params features.encoder)."
    ),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per encoder pass."),
    params_file: Optional[Path] = params_option(),
    assignments: list[str] = set_option(),
) -> None:
    """Encode the images of QUERY (or a `+` union of queries) into the feature cache (only those not cached yet)."""
    from captioning.data.query import QueryError, select_by_dataset
    from captioning.features.store import build_selection_features
    from captioning.images import ImageError
    from captioning.settings import SettingsError

    options = {"encoder": encoder, "batch_size": batch_size}
    try:
        feat = settings(params_file, assignments).features.replace(
            **{key: value for key, value in options.items() if value is not None}
        )
    except SettingsError as error:
        fail(str(error))
    _check_selection(query)
    try:
        groups = select_by_dataset(query)
    except (QueryError, FileNotFoundError) as error:
        fail(str(error))
    start = time.perf_counter()
    try:
        built = build_selection_features(groups, feat.encoder, feat.dir, feat.batch_size, num_workers=feat.workers)
    except ImageError as error:
        fail(str(error), code=1)
    stores = {
        dataset: {
            "store": str(store.root),
            "images": len({r.image_id for r in groups[dataset]}),
            "encoded": added,
            "stored": len(store),
        }
        for dataset, (store, added) in built.items()
    }
    first = next(iter(stores.values()))
    summary = {
        **first,
        "encoder": feat.encoder,
        "images": sum(s["images"] for s in stores.values()),
        "encoded": sum(s["encoded"] for s in stores.values()),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if len(stores) > 1:
        summary["stores"] = stores
    print_json(summary)


def train_command(
    params_file: Optional[Path] = params_option(),
    assignments: list[str] = set_option(),
    data: Optional[str] = typer.Option(None, "--data", help="Training data query (data.train_query)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default artifacts/train)."),
    tracking: bool = typer.Option(True, "--tracking/--no-tracking", help="Log the run to MLflow."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from out/checkpoint.pt if present."),
) -> None:
    """Train a caption model; the best one is saved as a package in OUT/model."""
    from captioning.images import ImageError
    from captioning.training import TrainingError, train

    chosen = settings(params_file, assignments)
    if data:
        chosen = chosen.replace(data=chosen.data.replace(train_query=data))
    _check_selection(chosen.data.train_query)
    _check_selection(chosen.data.val_query)
    callbacks = []
    # Under torchrun every rank runs this command: rank 0 alone opens the MLflow run.
    if tracking and int(os.environ.get("RANK", "0")) == 0:
        from captioning.training.tracking import MLflowCallback

        callbacks.append(MLflowCallback(chosen.tracking.uri, chosen.tracking.experiment))
    try:
        result = train(chosen, callbacks, out_dir=out, resume=resume)
    except (TrainingError, ImageError, FileNotFoundError) as error:
        fail(str(error), code=1)
    payload = {"package": str(result.package_dir), "best": result.best, "epochs": len(result.history)}
    if callbacks:
        payload["run_id"] = callbacks[0].run_id
    print_json(payload)


def caption_command(
    images: list[Path] = typer.Argument(..., help="Image files."),
    model: str = typer.Option(..., "--model", help="Package folder, or models:/NAME@ALIAS / runs:/ URI."),
    beam: Optional[int] = typer.Option(None, "--beam", min=1, help="Beam size (1: greedy; default: the model's)."),
    max_length: Optional[int] = typer.Option(None, "--max-length", min=1, help="Words per caption at most."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    tracking_uri: Optional[str] = tracking_option(),
    params_file: Optional[Path] = params_option(),
    assignments: list[str] = set_option(),
) -> None:
    """Caption images with a trained model."""
    from captioning.images import ImageError
    from captioning.inference.model_package import PackageError
    from captioning.registry.locate import load_captioner

    missing = [str(path) for path in images if not path.is_file()]
    if missing:
        fail(f"no such image file: {missing[0]}")
    registered = is_registry_reference(model)
    if not registered and not Path(model).is_dir():
        fail(f"no such model package folder: {model}")
    store = model_store(settings(params_file, assignments), tracking_uri) if registered else None
    try:
        captioner = load_captioner(model, store)
    except PackageError as error:
        fail(str(error))
    except Exception as error:  # registry look-ups fail in many ways (unknown name, alias, store)
        fail(f"cannot load model {model!r}: {error}")
    try:
        decoding = captioner.settings_for(beam_size=beam, max_length=max_length)
        results = captioner.caption([str(path) for path in images], decoding)
    except (ImageError, PackageError) as error:
        fail(str(error))
    rows = [
        {"image": str(path), "caption": result["caption"], "alternatives": result["alternatives"]}
        for path, result in zip(images, results)
    ]
    if as_json:
        print_json(rows)
    else:
        for row in rows:
            typer.echo(f"{row['image']}\t{row['caption']}")
