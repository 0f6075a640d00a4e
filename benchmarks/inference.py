"""Inference speed of the whole path, JPEG bytes in and caption out, against the encoder alone.

For each batch of images (default 32; decoding as the package's settings say) the same run times:
- the encoder alone on already decoded, resized and normalised pixels (the floor of the cost);
- the full path, `Captioner.caption(list of JPEG bytes)`: decoding, resizing, encoding and beam search;
- its parts: image decoding and preprocessing, encoding, caption decoding.
Batches alternate between the two measurements, so a change of load hits both alike.
Target (--target): full path images/s at least 0.5 times the encoder's.

    python -m benchmarks.inference [--model models:/captioner@champion] [--data 'flickr8k[test]-128s0']
                                   [--batch-size 32] [--beam N] [--threads 0] [--target 0.5]
                                   [--tracking-uri URI] [--params FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from benchmarks import add_model_options, model_store, write_report

DEFAULT_MODELS = ("models:/captioner@champion", "artifacts/train/model")


def _load_captioner(source: str | None, tracking: str | None):
    from captioning.registry.locate import load_captioner

    candidates = [source] if source else list(DEFAULT_MODELS)
    errors = []
    for candidate in candidates:
        try:
            return load_captioner(candidate, tracking, device="cpu"), candidate
        except Exception as error:  # noqa: BLE001 - try the next default, report all at the end
            errors.append(f"{candidate}: {error}")
    raise SystemExit("no model to benchmark: " + "; ".join(errors))


def _images(query: str) -> list[bytes]:
    from captioning.data.query import select

    return [Path(record.path).read_bytes() for record in select(query)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--data", default="flickr8k[test]-128s0")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--beam", type=int, default=None, help="default: the package's decoding.beam_size")
    parser.add_argument("--target", type=float, default=0.5, help="the full path's target share of the encoder's rate")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--output", type=Path)
    add_model_options(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from captioning.images import open_image, preprocess, views

    captioner, source = _load_captioner(args.model, model_store(args))
    images = _images(args.data)
    batches = [images[i : i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    batches = [batch for batch in batches if len(batch) == args.batch_size] or batches
    decoding = captioner.settings_for(beam_size=args.beam)
    captioner.caption(batches[0][:2], decoding)  # warm-up: encoder built, first calls paid

    timing = {"encoder": 0.0, "full": 0.0, "image_decoding": 0.0, "encoding": 0.0, "caption_decoding": 0.0}
    words = 0
    with torch.inference_mode():
        for batch in batches:
            pixels = preprocess([open_image(data) for data in batch], captioner.image_size)
            start = time.perf_counter()
            captioner.encoder(pixels)
            timing["encoder"] += time.perf_counter() - start

            start = time.perf_counter()
            results = captioner.caption(batch, decoding)
            timing["full"] += time.perf_counter() - start
            words += sum(len(result["caption"].split()) for result in results)

            # The same work again in its parts, to show where the time goes (a package that
            # decodes with `decoding.flip` encodes each image and its mirror).
            start = time.perf_counter()
            pixels = [
                preprocess(view, captioner.image_size)
                for view in views([open_image(data) for data in batch], decoding.flip)
            ]
            middle = time.perf_counter()
            features = torch.cat([captioner.encoder(view) for view in pixels], dim=1)
            end = time.perf_counter()
            captioner.caption_features(features, decoding)
            timing["image_decoding"] += middle - start
            timing["encoding"] += end - middle
            timing["caption_decoding"] += time.perf_counter() - end

    count = sum(len(batch) for batch in batches)
    encoder_rate, full_rate = count / timing["encoder"], count / timing["full"]
    report = {
        "benchmark": "inference",
        "setup": {
            "model": source,
            "model_version": captioner.version,
            "decoder": captioner.config["model"]["decoder"],
            "encoder": captioner.encoder_name,
            "data": args.data,
            "images": count,
            "batch_size": args.batch_size,
            "beam_size": decoding.beam_size,
            "precision": captioner.precision,  # as run on this device (the package asks decoding.precision)
            "threads": torch.get_num_threads(),
            "length_penalty": decoding.length_penalty,
            "early_stop": decoding.early_stop,
            "rerank": decoding.rerank,
            "flip": decoding.flip,
            "rerank_neighbours": decoding.rerank_neighbours if decoding.rerank == "consensus" else 0,
            "rerank_score_weight": decoding.rerank_score_weight if decoding.rerank == "consensus" else 0.0,
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "encoder_images_per_s": round(encoder_rate, 2),
        "full_path_images_per_s": round(full_rate, 2),
        "ratio": round(full_rate / encoder_rate, 3),
        "target_ratio": args.target,
        "share_of_full_path": {
            name: round(
                timing[name] / max(1e-9, timing["image_decoding"] + timing["encoding"] + timing["caption_decoding"]), 3
            )
            for name in ("image_decoding", "encoding", "caption_decoding")
        },
        "mean_caption_words": round(words / count, 2),
    }
    path = write_report(report, "inference", args.output)
    print(
        f"encoder {encoder_rate:.1f} images/s, full path {full_rate:.1f} images/s, "
        f"ratio {report['ratio']:.2f} (target {args.target}); parts {report['share_of_full_path']}; written {path}"
    )


if __name__ == "__main__":
    main()
