"""Training-side speed: the encoder, the feature cache and the decoder training step.

- encoder: images/s of each encoder (`lite0`, `lite2`, `lite2_260`) on a batch of 32 preprocessed images;
- feature caching: wall time of `build_features` for N real image files (PNG decoding,
  preprocessing and encoding), with 0 and 2 decoding workers; a second call shows the
  cache hit (no work);
- training: captions/s of `training_step` per decoder on cached-style features
  (float16, 49 x 1280 by default: `--positions 81` for lite2_260), the `model:` sizes of
  params.yaml, a 2500-word vocabulary and 12-word captions (Flickr8k-like), batch 64; and
  the share of the time spent assembling batches (`CaptionData.batch`). Measured twice:
  batches of shuffled captions, and `train.captions_per_image: 5` (12 images x 5 captions
  a step, the image-side work done once per image), and shuffled captions again with the
  forward pass in bfloat16 (`train.precision: bfloat16`).

    python -m benchmarks.training [--threads 2] [--images 96] [--positions 49] [--output reports/benchmark_training.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import write_report
from captioning.config import reports_dir
from captioning.features.encoder import ENCODERS
from captioning.models import MODELS
from harness.settings import test_settings

VOCAB_SIZE, CAPTION_WORDS, BATCH = 2500, 12, 64


def bench_encoder(name: str, batch: int = 32, repeats: int = 3) -> dict[str, Any]:
    from captioning.features.encoder import build_encoder

    encoder = build_encoder(name).optimize_for_inference()
    pixels = torch.rand(batch, 3, encoder.image_size, encoder.image_size) * 2 - 1
    times = []
    with torch.inference_mode():
        encoder(pixels)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            encoder(pixels)
            times.append(time.perf_counter() - start)
    best = min(times)
    return {
        "batch": batch,
        "image_size": encoder.image_size,
        "seconds_per_batch": round(best, 3),
        "images_per_s": round(batch / best, 1),
        "median_images_per_s": round(batch / float(np.median(times)), 1),
    }


def _image_records(folder: Path, count: int):
    """Real PNG files (synthetic scenes) and their records."""
    import random

    from captioning.data.records import Record
    from captioning.data.synthetic import captions_for, make_scene, render

    records = []
    for n in range(count):
        scene = make_scene(random.Random(f"benchmark/{n}"), 224)
        path = folder / f"bench_{n:05d}.png"
        render(scene, 224).save(path)
        records.append(Record(path.name, str(path), "train", captions_for(scene)))
    return records


def bench_caching(count: int) -> dict[str, Any]:
    from captioning.features.store import build_features

    work = Path(tempfile.mkdtemp(prefix="bench-features-"))
    try:
        records = _image_records(work, count)
        result: dict[str, Any] = {"images": count}
        for workers in (0, 2):
            store_dir = work / f"store-{workers}"
            start = time.perf_counter()
            build_features(records, "lite0", store_dir, 32, progress=False, num_workers=workers)
            seconds = time.perf_counter() - start
            result[f"workers_{workers}"] = {"seconds": round(seconds, 2), "images_per_s": round(count / seconds, 1)}
        start = time.perf_counter()
        build_features(records, "lite0", work / "store-2", 32, progress=False)
        result["cached_rerun_seconds"] = round(time.perf_counter() - start, 4)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_training(
    decoder: str,
    model_params: dict,
    steps: int,
    pairs: int = 2050,
    positions: int = 49,
    per_image: int = 0,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    from captioning.models import build_model
    from captioning.training import CaptionData, lr_factor, training_step

    generator = torch.Generator().manual_seed(0)
    images = (pairs + 4) // 5
    features = (torch.randn(images, positions, 1280, generator=generator) * 0.5).half()
    tokens = torch.zeros(pairs, CAPTION_WORDS + 2, dtype=torch.long)
    tokens[:, 0] = 1
    tokens[:, 1 : CAPTION_WORDS + 1] = torch.randint(4, VOCAB_SIZE, (pairs, CAPTION_WORDS), generator=generator)
    tokens[:, CAPTION_WORDS + 1] = 2
    data = CaptionData(features, None, np.arange(pairs) // 5, tokens, [str(i) for i in range(images)])

    torch.manual_seed(0)
    model = build_model({**model_params, "decoder": decoder}, VOCAB_SIZE, 1280)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, 10, 1000))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    device = torch.device("cpu")
    if per_image:
        # Steps of BATCH // per_image images, each with per_image adjacent captions.
        step_images = BATCH // per_image
        captions = data.captions_per_image(per_image, 0)
        order = torch.randperm(images, generator=generator).numpy()
        batches = [
            captions[order[i : i + step_images]].reshape(-1).tolist()
            for i in range(0, images - step_images + 1, step_images)
        ]
    else:
        order = torch.randperm(pairs, generator=generator).tolist()
        batches = [order[i : i + BATCH] for i in range(0, pairs - BATCH + 1, BATCH)]
    data_time = step_time = 0.0
    captions_done = 0
    for step in range(steps + 1):
        batch = batches[step % len(batches)]
        tick = time.perf_counter()
        feats, toks = data.batch(batch, device, max(1, per_image))
        tock = time.perf_counter()
        training_step(model, optimizer, scheduler, scaler, feats, toks, 0.1, 1.0, 5.0, dtype=dtype)
        done = time.perf_counter()
        if step > 0:  # the first step pays for allocations
            data_time += tock - tick
            step_time += done - tock
            captions_done += len(batch)
    total = data_time + step_time
    return {
        "steps": steps,
        "captions_per_step": len(batches[0]),
        "positions": positions,
        "captions_per_image": per_image,
        "precision": str(dtype or torch.float32).removeprefix("torch."),
        "captions_per_s": round(captions_done / total, 1),
        "seconds_per_step": round(total / steps, 4),
        "data_time_share": round(data_time / total, 4),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def run(threads: int, images: int, steps: int, output: Path | None, positions: int = 49) -> dict[str, Any]:
    torch.set_num_threads(threads)
    model_params = test_settings().model.to_dict()
    report: dict[str, Any] = {
        "setup": {
            "threads": threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_at_start": list(os.getloadavg()),
            "model": model_params,
            "vocab_size": VOCAB_SIZE,
            "caption_words": CAPTION_WORDS,
        },
        "encoder": {},
        "training": {},
        "training_captions_per_image_5": {},
        "training_bfloat16": {},
    }
    for name in ENCODERS:
        report["encoder"][name] = bench_encoder(name)
        print("encoder", name, json.dumps(report["encoder"][name]), flush=True)
    report["feature_caching"] = bench_caching(images)
    print("caching", json.dumps(report["feature_caching"]), flush=True)
    for decoder in MODELS:
        for key, per_image, dtype in (
            ("training", 0, None),
            ("training_captions_per_image_5", 5, None),
            ("training_bfloat16", 0, torch.bfloat16),
        ):
            report[key][decoder] = bench_training(
                decoder, model_params, steps, positions=positions, per_image=per_image, dtype=dtype
            )
            print(key, decoder, json.dumps(report[key][decoder]), flush=True)
    report["setup"]["load_average_at_end"] = list(os.getloadavg())
    write_report(report, "training", output)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=96, help="image files for the caching benchmark")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per decoder")
    parser.add_argument("--positions", type=int, default=49, help="feature positions: 49 (7 x 7), 81 (lite2_260)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    run(args.threads, args.images, args.steps, args.output, args.positions)
    print(f"wrote {args.output or reports_dir() / 'benchmark_training.json'}")


if __name__ == "__main__":
    main()
