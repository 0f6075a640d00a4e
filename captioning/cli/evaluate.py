"""`captioning evaluate`, `captioning evaluate-predictions`, `captioning compare`.

Exit codes: 0 scored; 2 bad input (predictions file, data query, model reference), one line on stderr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from captioning.cli.common import (
    fail,
    model_store,
    params_option,
    print_json,
    set_option,
    settings,
    tracking_option,
)


def _bad_input_errors() -> tuple[type[Exception], ...]:
    from captioning.data.query import QueryError
    from captioning.evaluation.scoring import PredictionError
    from captioning.settings import SettingsError

    errors: list[type[Exception]] = [PredictionError, QueryError, SettingsError, FileNotFoundError, KeyError]
    try:
        from captioning.inference.model_package import PackageError
        from captioning.registry.store import RegistryError

        errors += [PackageError, RegistryError]
    except ImportError:
        pass
    return tuple(errors)


def _show(result, as_json: bool, out: Optional[Path], report: Optional[Path], title: str) -> None:
    payload = result.to_dict()
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    if report:
        from captioning.evaluation.report import write_report

        payload["report"] = str(write_report(result, report, title=title))
    if as_json:
        print_json(payload)
        return
    for name, value in result.metrics.items():
        typer.echo(f"{name:>8}: {value:6.2f}")
    typer.echo(
        f"{result.info.get('images')} images, {result.info.get('seconds')} s"
        + (f"; report: {payload['report']}" if report else "")
    )


def _model_pairs(models: list[str]) -> dict[str, str]:
    pairs = {}
    for item in models:
        name, sep, uri = item.partition("=")
        if not sep or not name or not uri:
            fail(f"--model {item!r} is not of the form NAME=URI")
        pairs[name] = uri
    return pairs


def _decoding_options(
    beam: Optional[int] = None,
    max_length: Optional[int] = None,
    rerank: Optional[str] = None,
    flip: Optional[bool] = None,
    neighbours: Optional[int] = None,
) -> dict:
    """The decoding settings the options give, by their settings' names (unset ones left out)."""
    options = {
        "beam_size": beam,
        "max_length": max_length,
        "rerank": rerank,
        "flip": flip,
        "rerank_neighbours": neighbours,
    }
    return {key: value for key, value in options.items() if value is not None}


def _check_decoding(chosen, options: dict) -> None:
    """Exit 2 before any work when the options are not valid decoding settings."""
    from captioning.settings import SettingsError

    try:
        chosen.decoding.replace(**options)
    except SettingsError as error:
        fail(str(error))


def evaluate_command(
    model: str = typer.Option(..., "--model", help="Package folder or models:/captioner@champion."),
    data: Optional[str] = typer.Option(None, "--data", help="Data query (default: params data.test_query)."),
    beam: Optional[int] = typer.Option(None, "--beam", help="Beam size (1: greedy; default params)."),
    max_length: Optional[int] = typer.Option(None, "--max-length"),
    rerank: Optional[str] = typer.Option(
        None,
        "--rerank",
        help="none or consensus: how the beam's captions are ordered (default: the model's decoding.rerank).",
    ),
    flip: Optional[bool] = typer.Option(
        None,
        "--flip/--no-flip",
        help="Also read each image mirrored left to right, averaging both views (default: the model's decoding.flip).",
    ),
    neighbours: Optional[int] = typer.Option(
        None,
        "--neighbours",
        help="Consensus reranking also weighs the "
        "captions of this many nearest training images (0: none; "
        "default: the model's decoding.rerank_neighbours).",
    ),
    batch_size: int = typer.Option(64, "--batch-size"),
    as_json: bool = typer.Option(False, "--json", help="Print metrics and details as JSON."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON to this file."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the HTML report here."),
    predictions_out: Optional[Path] = typer.Option(
        None, "--predictions-out", help="Write the captions (COCO results format)."
    ),
    tracking_uri: Optional[str] = tracking_option(),
    params_file: Optional[Path] = params_option(),
    assignments: list[str] = set_option(),
) -> None:
    """Caption a data query with a model and score it (BLEU, METEOR, ROUGE-L, CIDEr)."""
    from captioning.evaluation.scoring import evaluate_model, save_predictions
    from captioning.registry.locate import load_captioner

    chosen = settings(params_file, assignments)
    query = data or chosen.data.test_query
    options = _decoding_options(beam, max_length, rerank, flip, neighbours)
    _check_decoding(chosen, options)  # unset options are the model's own
    tracking = model_store(chosen, tracking_uri)
    try:
        captioner = load_captioner(model, tracking, with_encoder=False)  # features come from the cache
        decoding = captioner.settings_for(**options)
        result = evaluate_model(
            captioner, query, decoding, batch_size=batch_size, feature_dir=chosen.features.dir, tracking=tracking
        )
    except _bad_input_errors() as error:
        fail(str(error).strip("'\""))
    if predictions_out:
        save_predictions(result.predictions, predictions_out)
    _show(result, as_json, out, report, f"Evaluation of {model} on {query}")


def evaluate_predictions_command(
    predictions: Path = typer.Argument(..., help="JSON list of {image_id, caption} (COCO results)."),
    data: Optional[str] = typer.Option(None, "--data", help="Data query (default: params data.test_query)."),
    as_json: bool = typer.Option(False, "--json"),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON to this file."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the HTML report here."),
    params_file: Optional[Path] = params_option(),
    assignments: list[str] = set_option(),
) -> None:
    """Score captions from any system against the references of a data query."""
    from captioning.evaluation.scoring import evaluate_predictions

    query = data or settings(params_file, assignments).data.test_query
    try:
        result = evaluate_predictions(predictions, query)
    except _bad_input_errors() as error:
        fail(str(error).strip("'\""))
    _show(result, as_json, out, report, f"Evaluation of {predictions.name} on {query}")


def compare_command(
    models: list[str] = typer.Option(..., "--model", help="NAME=URI, repeatable."),
    beams: Optional[list[int]] = typer.Option(
        None, "--beam", help="Beam sizes, repeatable (default params evaluate.beam_sizes)."
    ),
    data: Optional[str] = typer.Option(None, "--data"),
    max_length: Optional[int] = typer.Option(None, "--max-length"),
    batch_size: int = typer.Option(64, "--batch-size"),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Default: the reports folder."),
    as_json: bool = typer.Option(False, "--json"),
    published: Optional[str] = typer.Option(
        None, "--published", help="Add the published results on this dataset's test split (flickr8k)."
    ),
    stem: str = typer.Option("comparison", "--name", help="File name of the table, without suffix."),
    tracking_uri: Optional[str] = tracking_option(),
    params_file: Optional[Path] = params_option(),
    assignments: list[str] = set_option(),
) -> None:
    """Comparison table (Markdown + JSON) of models x decoding settings."""
    from captioning.config import reports_dir
    from captioning.evaluation.scoring import PUBLISHED, compare_models, comparison_table, write_comparison
    from captioning.settings import SettingsError

    chosen = settings(params_file, assignments)
    if published is not None and published not in PUBLISHED:
        fail(f"no published results for {published!r} (known: {', '.join(sorted(PUBLISHED))})")
    try:
        if beams:
            chosen = chosen.replace(evaluate=chosen.evaluate.replace(beam_sizes=beams))
    except SettingsError as error:
        fail(str(error))
    _check_decoding(chosen, _decoding_options(max_length=max_length))
    pairs = _model_pairs(models)
    query = data or chosen.data.test_query
    tracking = model_store(chosen, tracking_uri)
    try:
        rows = compare_models(
            _contenders(pairs, chosen.evaluate.beam_sizes, max_length, tracking),
            query,
            batch_size=batch_size,
            feature_dir=chosen.features.dir,
            tracking=tracking,
        )
    except _bad_input_errors() as error:
        fail(str(error).strip("'\""))
    rows += PUBLISHED.get(published or "", [])
    md_path, json_path = write_comparison(rows, out_dir or reports_dir(), stem)
    markdown, table = comparison_table(rows)
    if as_json:
        print_json(table)
    else:
        typer.echo(markdown + f"\nwritten: {md_path}, {json_path}")


def _contenders(pairs: dict[str, str], beam_sizes: list[int], max_length: Optional[int], tracking: str) -> dict:
    """Each model of the table, loaded, with its own decoding settings at each beam size (beam 1
    is greedy decoding) and `max_length` when given."""
    from captioning.registry.locate import load_captioner

    contenders = {}
    for name, uri in pairs.items():
        captioner = load_captioner(uri, tracking, with_encoder=False)  # features come from the cache
        decodings = [captioner.settings_for(beam_size=beam, max_length=max_length) for beam in beam_sizes]
        contenders[name] = (captioner, decodings)
    return contenders
