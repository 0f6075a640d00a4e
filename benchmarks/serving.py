"""Serving benchmark: the real service under bounded loopback load, with and without
adaptive batching, against the model's own throughput on the same CPU.

    python -m benchmarks.serving [--model PATH|models:/captioner@champion] [--requests 300]
                                 [--concurrency 16] [--beam-size N] [--data 'flickr8k[test]-64s0']
                                 [--batching both|on|off]

Without --model a tiny model is trained on synthetic data first (what the tests use). Requests carry
one image each, from --data (photos of a data query) or synthetic scenes; without --beam-size and
--max-length they leave decoding to the package's own settings.
Writes reports/benchmark_serving.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from benchmarks import add_model_options, model_store, write_report  # noqa: E402
from captioning.config import disable_telemetry  # noqa: E402

disable_telemetry()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def direct_throughput(
    model: str, images: list[bytes], total: int, batch_size: int, options: dict, threads: int
) -> dict:
    """Captioner.caption called directly on the same images: images per second."""
    import torch

    from captioning.registry.locate import load_captioner

    torch.set_num_threads(threads)
    captioner = load_captioner(model)
    decoding = captioner.settings_for(**options)
    captioner.caption(images[:batch_size], decoding)  # warm-up
    done, started = 0, time.perf_counter()
    while done < total:
        count = min(batch_size, total - done)
        batch = [images[(done + i) % len(images)] for i in range(count)]
        captioner.caption(batch, decoding)
        done += count
    elapsed = time.perf_counter() - started
    return {
        "images": total,
        "batch_size": batch_size,
        "seconds": round(elapsed, 3),
        "images_per_s": round(total / elapsed, 2),
        "model_version": str(captioner.version),
    }


async def _load(url: str, images: list[bytes], total: int, concurrency: int, options: dict) -> dict:
    import aiohttp

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    queue = iter(range(total))

    async def worker(session: aiohttp.ClientSession) -> None:
        for index in queue:
            form = aiohttp.FormData()
            form.add_field("image", images[index % len(images)], filename="scene.jpg", content_type="image/jpeg")
            for key, value in options.items():
                form.add_field(key, str(value).lower())
            started = time.perf_counter()
            async with session.post(url + "/caption", data=form) as response:
                await response.read()
                statuses[response.status] = statuses.get(response.status, 0) + 1
            latencies.append(time.perf_counter() - started)

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        # Warm-up outside the measurement (first calls train BentoML's batching optimiser).
        for index in range(min(8, len(images))):
            form = aiohttp.FormData()
            form.add_field("image", images[index], filename="scene.jpg", content_type="image/jpeg")
            async with session.post(url + "/caption", data=form) as response:
                await response.read()
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ok = statuses.get(200, 0)
    return {
        "requests": total,
        "concurrency": concurrency,
        "seconds": round(elapsed, 3),
        "requests_per_s": round(ok / elapsed, 2),
        "statuses": {str(k): v for k, v in statuses.items()},
        "errors": total - ok,
        "latency_ms": {f"p{q}": round(percentile(latencies, q) * 1000, 1) for q in (50, 95, 99)}
        | {"mean": round(statistics.fmean(latencies) * 1000, 1)},
    }


def served_throughput(
    model: str,
    images: list[bytes],
    total: int,
    concurrency: int,
    options: dict,
    batching: bool,
    home: Path,
    threads: int,
) -> dict:
    from harness.serving import start_service

    env = {
        "CAPTIONING_ADAPTIVE_BATCHING": "1" if batching else "0",
        "CAPTIONING_TORCH_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
    }
    server = start_service(model, home, env)
    try:
        result = asyncio.run(_load(server.url, images, total, concurrency, options))
        result["batch_sizes"] = _batch_sizes(server.url)
    finally:
        server.stop()
    return result


def _batch_sizes(url: str) -> dict:
    """Mean images per model call, from the service's own Prometheus histogram."""
    import requests

    text = requests.get(url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        for name in ("captioning_model_batch_size_sum", "captioning_model_batch_size_count"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[-1])
    count = values.get("captioning_model_batch_size_count", 0)
    return {
        "model_calls": int(count),
        "mean_batch_size": round(values.get("captioning_model_batch_size_sum", 0) / count, 2) if count else None,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="package folder or models:/ URI (default: train a tiny model)")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--beam-size", type=int, default=None, help="default: the package's")
    parser.add_argument("--max-length", type=int, default=None, help="default: the package's")
    parser.add_argument("--images", type=int, default=16, help="distinct synthetic images")
    parser.add_argument("--data", help="a data query whose photos the requests send, e.g. 'flickr8k[test]-64s0'")
    parser.add_argument("--batching", choices=("both", "on", "off"), default="both", help="served runs to make")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads, the same for the direct run and the model service"
    )
    parser.add_argument("--output", type=Path, default=None)
    add_model_options(parser)
    args = parser.parse_args(argv)
    store = model_store(args)
    if args.model and store:
        # The direct runs and the model service read a models:/ reference from the same store.
        os.environ["MLFLOW_TRACKING_URI"] = store

    from harness.serving import synthetic_jpeg

    work = Path(tempfile.mkdtemp(prefix="benchmark-serving-"))
    model = args.model
    if not model:
        from harness.trained import train_tiny_model

        model = str(train_tiny_model(work / "tiny"))
    if args.data:
        from captioning.data.query import select

        images = [Path(record.path).read_bytes() for record in select(args.data)]
    else:
        images = [synthetic_jpeg(seed) for seed in range(args.images)]
    options = {key: value for key, value in (("beam_size", args.beam_size), ("max_length", args.max_length)) if value}
    batch = int(os.environ.get("CAPTIONING_MAX_BATCH_SIZE", "16"))

    # The machine may be shared: measure the model alone before and after the served runs
    # and compare against the mean, and record the load average next to the figures.
    print(f"model {model}: direct throughput ...", flush=True)
    load_before = os.getloadavg()
    direct_before = direct_throughput(model, images, args.requests, batch, options, args.threads)
    direct_single = direct_throughput(model, images, max(32, args.requests // 8), 1, options, args.threads)
    runs = {}
    for batching in {"both": (True, False), "on": (True,), "off": (False,)}[args.batching]:
        label = "adaptive_batching" if batching else "no_batching"
        print(f"served, {label} ...", flush=True)
        runs[label] = served_throughput(
            model,
            images,
            args.requests,
            args.concurrency,
            {**options, "return_attention": False},
            batching,
            work / label,
            args.threads,
        )
    direct_after = direct_throughput(model, images, args.requests, batch, options, args.threads)
    load_after = os.getloadavg()
    direct_rate = (direct_before["images_per_s"] + direct_after["images_per_s"]) / 2
    for run in runs.values():
        run["ratio_to_model_throughput"] = round(run["requests_per_s"] / direct_rate, 3)
    direct = direct_before
    report = {
        "model": model if args.model else "tiny model trained on synthetic data (harness/trained.py)",
        "model_version": direct["model_version"],
        "options": options or "the package's decoding settings",
        "images": args.data or f"{args.images} synthetic scenes",
        "torch_threads": args.threads,
        "cpu": {"count": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor()},
        "model_direct": {
            "batched_before": direct_before,
            "batched_after": direct_after,
            "batched_mean_images_per_s": round(direct_rate, 2),
            "one_at_a_time": direct_single,
        },
        "load_average_1m": {"before": round(load_before[0], 2), "after": round(load_after[0], 2)},
        "served": runs,
        "note": "ratio = served requests/s over Captioner.caption images/s on the same images and CPU; "
        "load generator, API and model server share the machine's cores.",
    }
    output = write_report(report, "serving", args.output)
    print(json.dumps(report, indent=2))
    print(f"wrote {output}")
    return report


if __name__ == "__main__":
    main()
