"""Run every benchmark in turn (`make benchmark`); each writes its JSON into reports/.

Benchmarks measure, they never pass or fail: a benchmark that cannot run (for example
the Flickr8k ones before the data is acquired) is reported and the others go on.
"""

from __future__ import annotations

import subprocess
import sys
import time

BENCHMARKS = ["decoding", "inference", "training", "evaluation", "serving", "validate_flickr8k", "release"]


def main() -> int:
    names = sys.argv[1:] or BENCHMARKS
    failed = []
    for name in names:
        print(f"== benchmarks.{name}", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", f"benchmarks.{name}"])
        print(f"== benchmarks.{name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"could not run: {', '.join(failed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
