"""Evaluation speed: caption and score 1000 test images (beam 3, BLEU-1..4, METEOR, ROUGE-L, CIDEr).

Features come from the feature cache, filled before the clock starts (the benchmark
measures evaluation, not encoding). Without `--model`, the model is the `model:` section
of params.yaml with random weights and a vocabulary from the dataset's training captions:
random weights rarely emit the end token, so captions run to `max_length`, the slowest
case for both decoding and scoring. Its scores are therefore near zero; only the time matters.

    python -m benchmarks.evaluation [--data flickr8k[test]] [--model URI] [--threads 2]
                                    [--output reports/benchmark_evaluation.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import add_model_options, model_store, write_report

TARGET_SECONDS = 90.0


def random_package(out_dir: Path, dataset: str, params: dict) -> Path:
    """A package with params.yaml's model sizes, random weights, the dataset's training vocabulary."""
    import torch

    from captioning.data.query import select
    from captioning.features.encoder import ENCODERS
    from captioning.inference.model_package import save_package
    from captioning.models import build_model
    from captioning.vocab import Vocabulary

    encoder = params["features"]["encoder"]
    train = select(f"{dataset}[train]")
    vocab = Vocabulary.build((c for r in train for c in r.captions), params["vocab"]["min_freq"])
    torch.manual_seed(0)
    model = build_model(params["model"], len(vocab), ENCODERS[encoder].feature_dim)
    config = {"model": params["model"], "encoder": encoder, "decoding": params["decoding"]}
    return save_package(out_dir / "model", model, vocab, config)


def fill_cache(query: str, encoder: str, feature_dir: Path | None, batch_size: int) -> float:
    """Encode whatever the cache lacks (untimed by the benchmark); returns the seconds it took."""
    from captioning.data.query import parse_query, select
    from captioning.features.store import build_features, default_store_dir

    dataset = parse_query(query).dataset
    store_dir = feature_dir / encoder / dataset if feature_dir else default_store_dir(encoder, dataset)
    started = time.perf_counter()
    build_features(select(query), encoder, store_dir, batch_size)
    return time.perf_counter() - started


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def run(
    query: str, model: str | None, beam: int, feature_dir: Path | None, batch_size: int, tracking: str | None = None
) -> dict[str, Any]:
    import torch

    from captioning.config import PARAMS_FILE
    from captioning.data.query import parse_query
    from captioning.evaluation.scoring import evaluate_model
    from captioning.registry.locate import load_captioner
    from captioning.settings import load_settings

    params = load_settings(PARAMS_FILE).to_dict()
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        uri = model or str(random_package(Path(tmp), parse_query(query).dataset, params))
        encoder = (
            json.loads((Path(uri) / "config.json").read_text())["encoder"]
            if Path(uri).is_dir()
            else params["features"]["encoder"]
        )
        encode_seconds = fill_cache(query, encoder, feature_dir, params["features"]["batch_size"])
        started, cpu_before = time.perf_counter(), _cpu_seconds()
        captioner = load_captioner(uri, tracking, with_encoder=False)  # features come from the cache
        decoding = captioner.settings_for(beam_size=beam)
        result = evaluate_model(captioner, query, decoding, batch_size, attention_images=0, feature_dir=feature_dir)
        seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_before
    words = [len(c.split()) for c in result.predictions.values()]
    return {
        "benchmark": "evaluation",
        "data": query,
        "images": result.info["images"],
        "model": model or f"random weights, params.yaml model ({params['model']['decoder']})",
        "beam_size": beam,
        "max_length": result.info["max_length"],
        "mean_caption_words": round(sum(words) / max(1, len(words)), 2),
        "seconds": round(seconds, 2),
        "caption_seconds": result.info["caption_seconds"],
        "score_seconds": round(seconds - result.info["caption_seconds"] - result.info["feature_seconds"], 2),
        "cache_read_seconds": result.info["feature_seconds"],
        "images_per_s": round(result.info["images"] / seconds, 2),
        # CPU seconds of this process and its finished children (the METEOR and PTB Java
        # processes): less sensitive than wall time to other work sharing the machine.
        "cpu_seconds": round(cpu, 2),
        "target_seconds": TARGET_SECONDS,
        "within_target": seconds < TARGET_SECONDS,
        "metrics": {k: round(v, 3) for k, v in result.metrics.items()},
        "untimed_encoding_seconds": round(encode_seconds, 2),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
    }


def main() -> None:
    from captioning.config import disable_telemetry

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="flickr8k[test]", help="Data query (1000 images for Flickr8k test).")
    parser.add_argument("--model", default=None, help="Package folder or models:/ URI (default: random weights).")
    parser.add_argument("--beam", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--feature-dir", type=Path, default=None, help="Feature cache root (default artifacts).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--output", type=Path, default=None)
    add_model_options(parser)
    args = parser.parse_args()
    disable_telemetry()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    report = run(args.data, args.model, args.beam, args.feature_dir, args.batch_size, model_store(args))
    write_report(report, "evaluation", args.output)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
