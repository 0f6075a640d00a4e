"""Evaluation flow: score a model on the test query at each decoding setting, compare with the champion.

    python -m flows.evaluation --model artifacts/train/model [--data "flickr8k[test]"]

Writes reports/flows/metrics.json (the candidate at params decoding.beam_size), reports/flows/evaluation.html
and reports/flows/comparison.{md,json} (one row per model and decoding setting). `dvc repro` writes
the same files one level up; keeping them apart means neither entry point makes the other's outputs stale.
"""

from __future__ import annotations

import sys
from typing import Any

from prefect import flow

from captioning.settings import Settings
from flows import (
    finish,
    flow_reports,
    load_settings,
    parse_settings,
    run_parameter,
    run_settings,
    settings_parser,
    tracking_uri,
)
from tasks.artifacts import publish_evaluation
from tasks.evaluation import evaluate_model, write_comparison
from tasks.registry import champion_query


def run_name() -> str:
    return f"evaluate-{run_parameter('query') or run_settings().data.test_query}"


@flow(name="evaluation", flow_run_name=run_name)
def evaluation_flow(
    model: str, settings: Settings | None = None, query: str | None = None, with_champion: bool = True
) -> dict[str, Any]:
    """Score `model` on `query` (default params data.test_query) at params decoding.beam_size
    and each of evaluate.beam_sizes.

    When a champion exists and its stored metrics come from another query, it is scored on this
    query too, so the metric gate compares like with like.
    """
    from captioning.evaluation.scoring import decoding_setting
    from captioning.registry.versions import model_name

    settings = settings or load_settings()
    query = query or settings.data.test_query
    beam, max_length = settings.decoding.beam_size, settings.decoding.max_length
    feature_dir = settings.features.dir
    beams = sorted(set(settings.evaluate.beam_sizes) | {beam})
    tracking = tracking_uri(settings)
    reports = flow_reports()

    rows, metrics = [], {}
    for size in beams:
        main_setting = size == beam
        result = evaluate_model(
            model,
            query,
            size,
            max_length,
            feature_dir,
            tracking,
            report_path=str(reports / "evaluation.html") if main_setting else None,
            metrics_path=str(reports / "metrics.json") if main_setting else None,
        )
        rows.append({"model": "candidate", "decoding": decoding_setting(result), **result["metrics"]})
        if main_setting:
            metrics = result["metrics"]

    champion_metrics = None
    if with_champion:
        name = model_name(settings)
        champion = champion_query(tracking, name)
        if champion["version"] is not None and champion["query"] != query:
            uri = f"models:/{name}/{champion['version']}"
            scored = evaluate_model(uri, query, beam, max_length, feature_dir, tracking)
            champion_metrics = scored["metrics"]
            rows.append(
                {"model": f"champion v{champion['version']}", "decoding": decoding_setting(scored), **champion_metrics}
            )
    table = write_comparison(rows, str(reports))
    publish_evaluation(rows, query, str(reports / "evaluation.html"))
    return {
        "model": model,
        "query": query,
        "beam_size": beam,
        "metrics": metrics,
        "champion_metrics": champion_metrics,
        "comparison": table,
        "rows": rows,
        "metrics_file": str(reports / "metrics.json"),
        "report": str(reports / "evaluation.html"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = settings_parser("Evaluate a model and write the comparison table.")
    parser.add_argument("--model", required=True, help="package folder or models:/captioner@champion")
    parser.add_argument("--data", help="data query (default: params data.test_query)")
    parser.add_argument("--no-champion", action="store_true", help="do not score the current champion")
    args, settings = parse_settings(parser, argv)
    state = evaluation_flow(
        model=args.model, settings=settings, query=args.data, with_champion=not args.no_champion, return_state=True
    )
    return finish(
        state,
        lambda r: (
            f"{r['model']} on {r['query']} (beam {r['beam_size']}): {r['metrics']}\n"
            f"comparison: {r['comparison']['markdown']}"
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
