"""Small report files that `dvc plots` draws: the training history and the comparison table as CSV.

    python -m tasks.reports history artifacts/train/history.json reports/training_history.csv
    python -m tasks.reports comparison reports/comparison.json reports/comparison.csv

The training flow writes the history CSV beside each run; the DVC train and evaluate stages call
this module after the CLI. No Prefect import: it runs inside `dvc repro` stages.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Iterable

HISTORY_COLUMNS = (
    "epoch",
    "member",
    "step",
    "train_loss",
    "val_loss",
    "val_CIDEr",
    "val_BLEU-4",
    "lr",
    "captions_per_s",
)


def write_csv(rows: Iterable[dict[str, Any]], columns: Iterable[str], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(columns)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key, "") for key in columns})
    return path


def write_history(history: list[dict[str, Any]], path: str | Path) -> Path:
    """One row per epoch: losses, validation scores, learning rate, throughput."""
    return write_csv(history, HISTORY_COLUMNS, path)


def history_from_checkpoint(checkpoint: str | Path) -> list[dict[str, Any]]:
    """The history in a training checkpoint, or in the history.json a training run writes."""
    from captioning.package import load_checkpoint

    if Path(checkpoint).suffix == ".json":
        return list(json.loads(Path(checkpoint).read_text(encoding="utf-8")))
    return list(load_checkpoint(checkpoint).get("history") or [])


def write_comparison_csv(table_json: str | Path, path: str | Path) -> Path:
    """comparison.json ({"model decoding": {metric: value}}) as rows, one per model and decoding."""
    from captioning.evaluation import TABLE_COLUMNS

    table = json.loads(Path(table_json).read_text(encoding="utf-8"))
    rows = [{"setting": setting, **values} for setting, values in table.items()]
    return write_csv(rows, ("setting", *TABLE_COLUMNS), path)


def main(argv: list[str]) -> int:
    commands = {
        "history": lambda source, out: write_history(history_from_checkpoint(source), out),
        "comparison": write_comparison_csv,
    }
    if len(argv) != 3 or argv[0] not in commands:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        print(commands[argv[0]](argv[1], argv[2]))
    except (OSError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
