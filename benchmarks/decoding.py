"""Decoding speed: captions per second for greedy and beam search, per decoder.

Random weights and random features (49 x 1280, float16 as the feature cache stores them),
a 3000-word vocabulary and the `model:` sizes of params.yaml. Random weights rarely pick
the end token, so nearly every caption runs to `max_length`: a worst case for speed.
Also compares the batched beam search with the one-hypothesis-at-a-time reference.

    python -m benchmarks.decoding [--threads 1] [--output reports/benchmark_decoding.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from benchmarks import write_report
from captioning.config import PARAMS_FILE, reports_dir
from captioning.inference.decoding import beam_search, greedy
from captioning.models import MODELS, build_model
from captioning.settings import load_settings
from harness.reference import reference_beam_search

VOCAB_SIZE, POSITIONS, CHANNELS = 3000, 49, 1280
BATCH_SIZES = (1, 32)
BEAM = 3


def _timed(run: Callable[[], list], min_seconds: float) -> tuple[float, list]:
    """Seconds per call (best of the repeats that fit in `min_seconds`) and the last result."""
    times, result = [], []
    start = time.perf_counter()
    while not times or (time.perf_counter() - start < min_seconds and len(times) < 20):
        begin = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - begin)
    return min(times), result


def _rate(model, features: np.ndarray, batch: int, decode: Callable, min_seconds: float) -> dict[str, Any]:
    """Captions per second decoding `features` in batches of `batch` images."""
    chunks = [features[i : i + batch] for i in range(0, len(features), batch)]
    seconds, results = _timed(lambda: [r for chunk in chunks for r in decode(model, chunk)], min_seconds)
    lengths = [len(r[0].tokens) for r in results]
    return {
        "images": len(features),
        "seconds": round(seconds, 4),
        "captions_per_s": round(len(features) / seconds, 2),
        "mean_words": round(float(np.mean(lengths)), 2),
    }


def bench_decoder(name: str, config: dict, max_length: int, images: int, min_seconds: float) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model({**config, "decoder": name}, VOCAB_SIZE, CHANNELS)
    rng = np.random.default_rng(0)
    features = rng.standard_normal((images, POSITIONS, CHANNELS)).astype(np.float16)
    greedy_fn = lambda m, f: greedy(m, f, max_length)  # noqa: E731
    beam_fn = lambda m, f: beam_search(m, f, BEAM, max_length)  # noqa: E731
    result: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters())}
    for batch in BATCH_SIZES:
        result[f"greedy_batch{batch}"] = _rate(model, features, batch, greedy_fn, min_seconds)
        result[f"beam{BEAM}_batch{batch}"] = _rate(model, features, batch, beam_fn, min_seconds)
    batch = max(BATCH_SIZES)
    begin = time.perf_counter()
    reference = reference_beam_search(model, features[:batch], BEAM, max_length)
    reference_seconds = time.perf_counter() - begin
    batched_seconds = result[f"beam{BEAM}_batch{batch}"]["seconds"] * batch / images
    batched = beam_search(model, features[:batch], BEAM, max_length)
    result[f"reference_beam{BEAM}_batch{batch}"] = {
        "images": batch,
        "seconds": round(reference_seconds, 4),
        "captions_per_s": round(batch / reference_seconds, 2),
        "speedup_batched_vs_reference": round(reference_seconds / batched_seconds, 2),
        "speedup_batch32_vs_batch1": round(
            result[f"beam{BEAM}_batch{batch}"]["captions_per_s"] / result[f"beam{BEAM}_batch1"]["captions_per_s"], 2
        ),
        "same_captions": all([h.tokens for h in a] == [h.tokens for h in b] for a, b in zip(batched, reference)),
    }
    return result


def run(threads: int = 1, images: int = 32, min_seconds: float = 2.0, output: Path | None = None) -> dict[str, Any]:
    torch.set_num_threads(threads)
    params = load_settings(PARAMS_FILE).to_dict()
    config = dict(params["model"])
    max_length = int(params["decoding"]["max_length"])
    report: dict[str, Any] = {
        "benchmark": "decoding",
        "setup": {
            "vocab_size": VOCAB_SIZE,
            "features": [POSITIONS, CHANNELS],
            "model": {k: v for k, v in config.items() if k != "decoder"},
            "max_length": max_length,
            "beam_size": BEAM,
            "images": images,
            "weights": "random (captions mostly run to max_length)",
            "torch": torch.__version__,
            "threads": threads,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_at_start": list(os.getloadavg()),
        },
        "decoders": {},
    }
    for name in MODELS:
        report["decoders"][name] = bench_decoder(name, config, max_length, images, min_seconds)
        print(name, json.dumps(report["decoders"][name]), flush=True)
    report["setup"]["load_average_at_end"] = list(os.getloadavg())
    write_report(report, "decoding", output)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    report = run(args.threads, args.images, args.min_seconds, args.output)
    print(f"wrote {args.output or reports_dir() / 'benchmark_decoding.json'} ({len(report['decoders'])} decoders)")


if __name__ == "__main__":
    main()
