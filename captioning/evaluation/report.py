"""Evaluation reports: the HTML report of one evaluation, and the CSV files `dvc plots` draws.

The HTML report is one self-contained file (inline CSS, images as base64 PNG/JPEG). Sections:
what was evaluated, the metrics table, the best and worst captioned images with their
references, attention maps over the image per generated word, and every image's scores (a table
sortable by clicking its headers).

The CSV files are the training history (one row per epoch) and the comparison table (one row per
model and decoding setting); the DVC train and evaluate stages write them after the CLI:

    python -m captioning.evaluation.report history artifacts/train/history.json reports/training_history.csv
    python -m captioning.evaluation.report comparison reports/comparison.json reports/comparison.csv
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from captioning.evaluation.scoring import METRICS, PER_IMAGE_METRICS, EvaluationResult

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer}.card{display:flex;align-items:flex-start;gap:1em;margin:1em 0;padding:.5em;border:1px solid #eee}
.card img{border-radius:4px}.card ul{margin:.3em 0;padding-left:1.2em;color:#555}
.words{display:flex;flex-wrap:wrap;gap:.4em}.word{text-align:center;font-size:.85em}
.caption{font-weight:600}.muted{color:#777}
"""

# Clicking a header sorts the table by that column (numbers numerically).
SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
    var asc = th.dataset.asc !== '1'; th.dataset.asc = asc ? '1' : '0';
    rows.sort(function(a, b){
      var x = a.cells[col].dataset.v || a.cells[col].textContent, y = b.cells[col].dataset.v || b.cells[col].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 80} if fmt == "JPEG" else {}))
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _thumbnail(path: str | None, size: int) -> Image.Image | None:
    if not path or not Path(path).is_file():
        return None
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            return image
    except OSError:
        return None


def attention_overlay(
    image: Image.Image, weights, grid: int | tuple[int, int] | None = None, size: int = 112
) -> Image.Image:
    """The attention map (grid x grid weights) upsampled over the image as a red heat layer."""
    values = np.asarray(weights, dtype=np.float32)
    if values.ndim == 1:
        rows = cols = int(grid if isinstance(grid, int) else (grid[0] if grid else math.isqrt(values.size)))
        cols = values.size // rows
        values = values.reshape(rows, cols)
    span = float(values.max() - values.min())
    values = (values - values.min()) / span if span > 0 else np.zeros_like(values)
    base = image.convert("RGB").resize((size, size))
    heat = Image.fromarray((values * 255).astype(np.uint8), mode="L").resize((size, size), Image.BILINEAR)
    red = Image.new("RGB", (size, size), (255, 40, 0))
    dimmed = Image.blend(base, Image.new("RGB", (size, size), (0, 0, 0)), 0.45)
    # Bright, red-tinted where the model looks; dimmed elsewhere.
    lit = Image.blend(base, red, 0.35)
    return Image.composite(lit, dimmed, heat)


def _metrics_table(metrics: dict[str, float]) -> str:
    names = [m for m in METRICS if m in metrics] + [m for m in metrics if m not in METRICS]
    head = "".join(f"<th>{_esc(n)}</th>" for n in names)
    cells = "".join(f'<td class="num">{metrics[n]:.2f}</td>' for n in names)
    return f"<table><tr>{head}</tr><tr>{cells}</tr></table>"


def _info_table(info: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in info.items())
    return f"<table>{rows}</table>"


def _card(result: EvaluationResult, image_id: str, thumb: int) -> str:
    image = _thumbnail(result.paths.get(image_id), thumb)
    picture = (
        f'<img src="{_data_uri(image, "JPEG")}" alt="{_esc(image_id)}">'
        if image
        else '<div class="muted">(image not available)</div>'
    )
    scores = ", ".join(f"{k} {v:.1f}" for k, v in result.per_image.get(image_id, {}).items())
    refs = "".join(f"<li>{_esc(r)}</li>" for r in result.references.get(image_id, []))
    return (
        f'<div class="card">{picture}<div><div class="muted">{_esc(image_id)}</div>'
        f'<div class="caption">{_esc(result.predictions.get(image_id, ""))}</div>'
        f'<div class="muted">{_esc(scores)}</div>references:<ul>{refs}</ul></div></div>'
    )


def _attention_section(result: EvaluationResult, image_id: str, size: int) -> str:
    attention = result.attention[image_id]
    image = _thumbnail(result.paths.get(image_id), 448)
    if image is None:
        return ""
    words, maps, grid = attention.get("words", []), attention.get("maps", []), attention.get("grid")
    tiles = []
    for word, weights in zip(words, maps):
        overlay = attention_overlay(image, weights, grid, size)
        tiles.append(f'<div class="word"><img src="{_data_uri(overlay)}" alt="{_esc(word)}"><br>{_esc(word)}</div>')
    return (
        f'<h3>{_esc(image_id)}: <span class="caption">{_esc(result.predictions.get(image_id, ""))}'
        f'</span></h3><div class="words">{"".join(tiles)}</div>'
    )


def _per_image_table(result: EvaluationResult) -> str:
    names = [m for m in PER_IMAGE_METRICS if any(m in s for s in result.per_image.values())]
    head = "<th>image</th><th>caption</th>" + "".join(f"<th>{_esc(n)}</th>" for n in names)
    rows = []
    for image_id in result.ranked():
        scores = result.per_image[image_id]
        cells = "".join(
            f'<td class="num" data-v="{scores.get(n, 0.0):.6f}">{scores.get(n, 0.0):.1f}</td>' for n in names
        )
        rows.append(f"<tr><td>{_esc(image_id)}</td><td>{_esc(result.predictions.get(image_id, ''))}</td>{cells}</tr>")
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def write_report(
    result: EvaluationResult,
    out_path: str | Path,
    title: str = "Caption evaluation",
    examples: int = 3,
    thumbnail: int = 160,
    attention_size: int = 112,
) -> Path:
    """Write the self-contained HTML report for one evaluation; returns its path."""
    ranked = result.ranked()
    best, worst = ranked[:examples], ranked[::-1][:examples]
    parts = [
        f'<!doctype html><html><head><meta charset="utf-8"><title>{_esc(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{_esc(title)}</h1>",
        _info_table(result.info),
        "<h2>Metrics (percent)</h2>",
        _metrics_table(result.metrics),
        "<h2>Best captioned images (CIDEr)</h2>",
        *(_card(result, i, thumbnail) for i in best),
        "<h2>Worst captioned images (CIDEr)</h2>",
        *(_card(result, i, thumbnail) for i in worst),
    ]
    if result.attention:
        parts.append("<h2>Attention per generated word</h2>")
        parts.extend(_attention_section(result, i, attention_size) for i in result.attention)
    parts += [
        "<h2>Every image (click a header to sort)</h2>",
        _per_image_table(result),
        f"<script>{SORT_JS}</script></body></html>",
    ]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n".join(parts), encoding="utf-8")
    return out_path


# --------------------------------------------------------------------------- CSV files for dvc plots

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
    from captioning.inference.model_package import load_checkpoint

    if Path(checkpoint).suffix == ".json":
        return list(json.loads(Path(checkpoint).read_text(encoding="utf-8")))
    return list(load_checkpoint(checkpoint).get("history") or [])


def write_comparison_csv(table_json: str | Path, path: str | Path) -> Path:
    """comparison.json ({"model decoding": {metric: value}}) as rows, one per model and decoding."""
    from captioning.evaluation.scoring import TABLE_COLUMNS

    table = json.loads(Path(table_json).read_text(encoding="utf-8"))
    rows = [{"setting": setting, **values} for setting, values in table.items()]
    return write_csv(rows, ("setting", *TABLE_COLUMNS), path)


def main(argv: list[str]) -> int:
    """`history SOURCE OUT` or `comparison TABLE_JSON OUT`: write the CSV, print its path."""
    commands = {
        "history": lambda source, out: write_history(history_from_checkpoint(source), out),
        "comparison": write_comparison_csv,
    }
    if len(argv) != 3 or argv[0] not in commands:
        print(__doc__.split("\n\n")[-1].strip(), file=sys.stderr)
        return 2
    try:
        print(commands[argv[0]](argv[1], argv[2]))
    except (OSError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
