"""Time `validate_dataset` on the full Flickr8k (8091 images) and write reports/benchmark_validate_flickr8k.json.

Usage: python -m benchmarks.validate_flickr8k [FLICKR8K_ROOT]   (default: the acquired data/flickr8k)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from benchmarks import write_report
from captioning.config import data_dir, reports_dir
from captioning.data.datasets import load_dataset
from captioning.data.validate import validate_dataset


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else data_dir() / "flickr8k"
    out = reports_dir() / "benchmark_validate_flickr8k"
    start = time.perf_counter()
    dataset = load_dataset("flickr8k", root)
    loaded = time.perf_counter()
    result = validate_dataset(dataset, out)
    done = time.perf_counter()
    figures = {
        "dataset_root": str(root),
        "cpus": os.cpu_count(),
        "records": len(dataset.records),
        "seconds_load": round(loaded - start, 2),
        "seconds_validate": round(done - loaded, 2),
        "seconds_image_checks": result.summary["seconds_image_checks"],
        "success": result.success,
        "failures": len(result.failures),
        "warnings": len(result.warnings),
        "report": str(out / "validation.html"),
    }
    write_report(figures, "validate_flickr8k")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
