"""Data validation with a Great Expectations suite, reported as HTML and JSON.

The checks that need Python (does the file exist, does it decode, how big is
it) run first, in a thread pool, and become columns of three tables: one row
per image, one per caption, one per split. Great Expectations then checks
those tables; every failing row is turned back into a sentence naming the
image or caption.

Each check has a severity: an "error" makes the dataset fail, a "warning" is
reported but lets it pass (real data is dirty: Flickr8k has one-word captions
such as "A"). What the loader dropped is reported as warnings too.
"""

from __future__ import annotations

import html
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from captioning.data.records import Dataset

if TYPE_CHECKING:
    from captioning.settings import SyntheticSettings

# Failing rows listed per check (in the result, the JSON and the HTML).
MAX_EXAMPLES = 50


@dataclass(frozen=True)
class Expectations:
    """What a dataset should look like.

    splits: exact number of images per split; None skips the split checks.
    captions_per_image: inclusive (min, max); max None means no upper bound.
    words_per_caption: inclusive (min, max) for a caption to count as sane (a warning check).
    min_image_side: smallest acceptable width or height, pixels.
    """

    splits: dict[str, int] | None
    captions_per_image: tuple[int, int | None] = (5, 5)
    words_per_caption: tuple[int, int] = (2, 50)
    min_image_side: int = 32


# Documented split sizes: Flickr8k's official split; Flickr30k and MS-COCO as in
# Karpathy's split files (COCO's extra "restval" images are train data).
EXPECTATIONS: dict[str, Expectations] = {
    "flickr8k": Expectations({"train": 6000, "val": 1000, "test": 1000}),
    "flickr30k": Expectations({"train": 29000, "val": 1014, "test": 1000}),
    "mscoco": Expectations({"train": 82783, "restval": 30504, "val": 5000, "test": 5000}, captions_per_image=(5, 7)),
    "feedback": Expectations(None, captions_per_image=(1, None), words_per_caption=(1, 50)),
}


def expectations_for(name: str, synthetic: SyntheticSettings | None = None) -> Expectations:
    """The expectations of a known dataset; synthetic ones follow the settings it is generated with."""
    if name == "synthetic":
        if synthetic is None:
            raise ValueError("the synthetic dataset's expectations follow its settings: pass params `synthetic`")
        splits = {"train": synthetic.train, "val": synthetic.val, "test": synthetic.test}
        return Expectations(splits, min_image_side=min(32, synthetic.image_size))
    if name in EXPECTATIONS:
        return EXPECTATIONS[name]
    # An unknown dataset still gets the checks that need no documented numbers.
    return Expectations(None, captions_per_image=(1, None))


@dataclass
class ValidationResult:
    success: bool
    failures: list[str]
    warnings: list[str]
    summary: dict[str, Any] = field(default_factory=dict)


def inspect_image(path: str) -> dict[str, Any]:
    """Whether an image file exists and decodes, and its size (None when unreadable)."""
    from PIL import Image

    if not os.path.isfile(path):
        return {"exists": False, "decode_error": "", "width": None, "height": None}
    try:
        with Image.open(path) as image:
            image.verify()  # structure and checksums
        with Image.open(path) as image:
            image.load()  # full decode: catches truncated pixel data that verify() misses
            width, height = image.size
    except Exception as error:  # Pillow raises many types for broken files
        message = str(error) or type(error).__name__
        return {"exists": True, "decode_error": message, "width": None, "height": None}
    return {"exists": True, "decode_error": "", "width": width, "height": height}


def _inspect_all(paths: list[str], workers: int) -> dict[str, dict[str, Any]]:
    # Decoding releases the GIL, so threads use every core without process start-up costs.
    unique = sorted(set(paths))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(unique, pool.map(inspect_image, unique, chunksize=64)))


def _tables(dataset: Dataset, expected: Expectations, workers: int):
    """The image, caption and split tables that the suite checks."""
    import pandas as pd

    records = dataset.records
    files = _inspect_all([record.path for record in records], workers)
    splits_of: dict[str, set[str]] = {}
    for record in records:
        splits_of.setdefault(record.image_id, set()).add(record.split)

    images = []
    captions = []
    for row, record in enumerate(records):
        info = files[record.path]
        sides = [side for side in (info["width"], info["height"]) if side is not None]
        images.append(
            {
                "row": row,
                "image_id": record.image_id,
                "split": record.split,
                "path": record.path,
                "exists": info["exists"],
                "decode_error": info["decode_error"],
                "width": info["width"],
                "height": info["height"],
                "min_side": min(sides) if sides else None,
                "n_captions": len(record.captions),
                "n_splits": len(splits_of[record.image_id]),
                "all_splits": "+".join(sorted(splits_of[record.image_id])),
            }
        )
        for number, caption in enumerate(record.captions):
            text = caption.strip() if isinstance(caption, str) else ""
            captions.append(
                {
                    "row": len(captions),
                    "image_id": record.image_id,
                    "caption_no": number,
                    "caption": caption if isinstance(caption, str) else repr(caption),
                    "length": len(text),
                    # Empty captions are caught by the length check; None keeps them out of the word check.
                    "n_words": len(text.split()) if text else None,
                }
            )

    counts: dict[str, int] = {}
    for record in records:
        counts[record.split] = counts.get(record.split, 0) + 1
    wanted = expected.splits or {}
    split_rows = [
        {"row": row, "split": name, "count": counts.get(name, 0), "expected": wanted.get(name)}
        for row, name in enumerate(sorted(set(counts) | set(wanted)))
    ]
    image_columns = [
        "row",
        "image_id",
        "split",
        "path",
        "exists",
        "decode_error",
        "width",
        "height",
        "min_side",
        "n_captions",
        "n_splits",
        "all_splits",
    ]
    caption_columns = ["row", "image_id", "caption_no", "caption", "length", "n_words"]
    return (
        pd.DataFrame(images, columns=image_columns),
        pd.DataFrame(captions, columns=caption_columns),
        pd.DataFrame(split_rows, columns=["row", "split", "count", "expected"]).astype({"expected": "float"}),
    )


@dataclass
class _Check:
    """One expectation, the table it runs on, and how a failing row reads."""

    table: str
    title: str
    severity: str  # error | warning
    expectation: Any
    explain: Callable[[dict], str] | None = None  # row -> sentence; None for table-level checks
    explain_table: Callable[[dict], str] | None = None  # GX result -> sentence


def _checks(expected: Expectations, gxe) -> list[_Check]:
    """The expectations on the images, captions and splits tables, in the report's order."""
    return _image_checks(expected, gxe) + _caption_checks(expected, gxe) + _split_checks(expected, gxe)


def _image_checks(expected: Expectations, gxe) -> list[_Check]:
    low, high = expected.captions_per_image
    side = expected.min_image_side
    per_image = f"{low}" if low == high else f"{low}-{high}" if high else f"at least {low}"
    return [
        _Check(
            "images",
            "the dataset has records",
            "error",
            gxe.ExpectTableRowCountToBeBetween(min_value=1),
            explain_table=lambda result: "the dataset has no records",
        ),
        _Check(
            "images",
            "every image file exists",
            "error",
            gxe.ExpectColumnValuesToBeInSet(column="exists", value_set=[True]),
            lambda r: f"image file missing: {r['image_id']} ({r['split']}) at {r['path']}",
        ),
        _Check(
            "images",
            "every image decodes",
            "error",
            gxe.ExpectColumnValuesToBeInSet(column="decode_error", value_set=[""]),
            lambda r: f"image does not decode: {r['image_id']} ({r['split']}): {r['decode_error']}",
        ),
        _Check(
            "images",
            f"images are at least {side}x{side} pixels",
            "error",
            gxe.ExpectColumnValuesToBeBetween(column="min_side", min_value=side),
            lambda r: f"image too small: {r['image_id']} is {r['width']:.0f}x{r['height']:.0f} (minimum {side})",
        ),
        _Check(
            "images",
            f"{per_image} captions per image",
            "error",
            gxe.ExpectColumnValuesToBeBetween(column="n_captions", min_value=low, max_value=high),
            lambda r: f"wrong number of captions: {r['image_id']} has {r['n_captions']} (expected {per_image})",
        ),
        _Check(
            "images",
            "image ids are unique within a split",
            "error",
            gxe.ExpectCompoundColumnsToBeUnique(column_list=["image_id", "split"]),
            lambda r: f"image listed more than once in {r['split']}: {r['image_id']}",
        ),
        _Check(
            "images",
            "no image is in two splits",
            "error",
            gxe.ExpectColumnValuesToBeBetween(column="n_splits", min_value=1, max_value=1),
            lambda r: f"image in more than one split: {r['image_id']} is in {r['all_splits']}",
        ),
    ]


def _caption_checks(expected: Expectations, gxe) -> list[_Check]:
    wmin, wmax = expected.words_per_caption
    return [
        _Check(
            "captions",
            "captions are not empty",
            "error",
            gxe.ExpectColumnValuesToBeBetween(column="length", min_value=1),
            lambda r: f"empty caption: {r['image_id']} caption #{r['caption_no']} is {r['caption']!r}",
        ),
        _Check(
            "captions",
            f"captions have {wmin}-{wmax} words",
            "warning",
            gxe.ExpectColumnValuesToBeBetween(column="n_words", min_value=wmin, max_value=wmax),
            lambda r: (
                f"odd caption length: {r['image_id']} caption #{r['caption_no']} has "
                f"{r['n_words']:.0f} words: {r['caption']!r}"
            ),
        ),
    ]


def _split_checks(expected: Expectations, gxe) -> list[_Check]:
    if expected.splits is None:
        return []
    names = sorted(expected.splits)
    return [
        _Check(
            "splits",
            f"splits are {', '.join(names)}",
            "error",
            gxe.ExpectColumnValuesToBeInSet(column="split", value_set=names),
            lambda r: f"unexpected split {r['split']!r} with {r['count']} images (expected splits: {', '.join(names)})",
        ),
        _Check(
            "splits",
            "split sizes as documented",
            "error",
            gxe.ExpectColumnPairValuesToBeEqual(
                column_A="count", column_B="expected", ignore_row_if="either_value_is_missing"
            ),
            lambda r: f"split {r['split']} has {r['count']} images, expected {r['expected']:.0f}",
        ),
    ]


def _run_suite(frames: dict, checks: list[_Check]) -> list[dict[str, Any]]:
    """Validate every table with Great Expectations; one outcome per check, in order."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = context.data_sources.add_pandas("captioning")
    outcomes: dict[int, dict[str, Any]] = {}
    for table, frame in frames.items():
        mine = [(index, check) for index, check in enumerate(checks) if check.table == table]
        if not mine:
            continue
        asset = source.add_dataframe_asset(name=table)
        batch = asset.add_batch_definition_whole_dataframe(f"{table}-all").get_batch(
            batch_parameters={"dataframe": frame}
        )
        suite = gx.ExpectationSuite(name=f"captioning-{table}")
        for index, check in mine:
            # The check's index travels in `meta`, so each result finds its check.
            check.expectation.meta = {"check": index}
            suite.add_expectation(check.expectation)
        result = batch.validate(
            suite,
            result_format={
                "result_format": "COMPLETE",
                "unexpected_index_column_names": ["row"],
            },
        )
        for item in result.results:
            index = item.expectation_config.meta["check"]
            outcomes[index] = _outcome(checks[index], item, frame)
    return [outcomes[index] for index in range(len(checks))]


def _outcome(check: _Check, result, frame) -> dict[str, Any]:
    details = result.result or {}
    messages: list[str] = []
    if not result.success:
        if result.exception_info and result.exception_info.get("raised_exception"):
            messages.append(f"check could not run: {result.exception_info.get('exception_message')}")
        elif check.explain is not None:
            rows = frame.set_index("row", drop=False)
            for item in details.get("unexpected_index_list") or []:
                messages.append(check.explain(rows.loc[item["row"]].to_dict()))
        elif check.explain_table is not None:
            messages.append(check.explain_table(details))
    return {
        "check": check.title,
        "table": check.table,
        "severity": check.severity,
        "expectation": result.expectation_config.type,
        "success": bool(result.success),
        "unexpected_count": int(details.get("unexpected_count", len(messages)) or 0),
        "element_count": details.get("element_count"),
        "observed_value": details.get("observed_value"),
        "messages": messages,
    }


def validate_dataset(
    dataset: Dataset, report_dir: str | Path, expected: Expectations | None = None, workers: int | None = None
) -> ValidationResult:
    """Run the suite on a dataset; writes validation.html and validation.json into report_dir."""
    start = time.perf_counter()
    expected = expected or expectations_for(dataset.name)
    workers = workers or min(8, 2 * (os.cpu_count() or 1))
    images, captions, splits = _tables(dataset, expected, workers)
    inspected = time.perf_counter()

    import great_expectations.expectations as gxe

    checks = _checks(expected, gxe)
    outcomes = _run_suite({"images": images, "captions": captions, "splits": splits}, checks)

    failures: list[str] = []
    warnings: list[str] = [f"dropped by the loader: {item}" for item in dataset.dropped]
    for outcome in outcomes:
        if outcome["success"]:
            continue
        target = failures if outcome["severity"] == "error" else warnings
        target.extend(_capped(outcome))
    summary = {
        "dataset": dataset.name,
        "images": int(images["image_id"].nunique()) if len(images) else 0,
        "records": len(images),
        "captions": len(captions),
        "splits": {row["split"]: int(row["count"]) for row in splits.to_dict("records")},
        "dropped": len(dataset.dropped),
        "checks": len(outcomes),
        "checks_failed": sum(1 for o in outcomes if not o["success"] and o["severity"] == "error"),
        "checks_warned": sum(1 for o in outcomes if not o["success"] and o["severity"] == "warning"),
        "seconds_image_checks": round(inspected - start, 2),
        "seconds_total": round(time.perf_counter() - start, 2),
    }
    result = ValidationResult(not failures, failures, warnings, summary)
    _write_reports(Path(report_dir), result, outcomes, expected)
    return result


def _capped(outcome: dict[str, Any]) -> list[str]:
    messages = outcome["messages"][:MAX_EXAMPLES]
    extra = outcome["unexpected_count"] - len(messages)
    if extra > 0:
        messages.append(f"... and {extra} more failing '{outcome['check']}'")
    return messages or [f"check failed: {outcome['check']}"]


def _write_reports(report_dir: Path, result: ValidationResult, outcomes: list[dict], expected: Expectations) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "success": result.success,
        "summary": result.summary,
        "expectations": {
            "splits": expected.splits,
            "captions_per_image": list(expected.captions_per_image),
            "words_per_caption": list(expected.words_per_caption),
            "min_image_side": expected.min_image_side,
        },
        "failures": result.failures,
        "warnings": result.warnings,
        "checks": [dict(o, messages=o["messages"][:MAX_EXAMPLES]) for o in outcomes],
    }
    (report_dir / "validation.json").write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    (report_dir / "validation.html").write_text(_html(result, outcomes), encoding="utf-8")


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;max-width:70rem;color:#222}
table{border-collapse:collapse;width:100%}td,th{border:1px solid #ccc;padding:.4rem;vertical-align:top;text-align:left}
.pass{color:#176f2c;font-weight:bold}.fail{color:#b00020;font-weight:bold}.warn{color:#8a5a00;font-weight:bold}
ul{margin:.2rem 0;padding-left:1.2rem}code{background:#f3f3f3}
"""


def _html(result: ValidationResult, outcomes: list[dict]) -> str:
    esc = html.escape
    summary = result.summary
    verdict = '<span class="pass">PASSED</span>' if result.success else '<span class="fail">FAILED</span>'
    rows = []
    for o in outcomes:
        if o["success"]:
            status = '<span class="pass">pass</span>'
        elif o["severity"] == "warning":
            status = '<span class="warn">warning</span>'
        else:
            status = '<span class="fail">fail</span>'
        examples = "".join(f"<li>{esc(m)}</li>" for m in o["messages"][:MAX_EXAMPLES])
        more = o["unexpected_count"] - min(len(o["messages"]), MAX_EXAMPLES)
        if more > 0:
            examples += f"<li>... and {more} more</li>"
        rows.append(
            f"<tr><td>{esc(o['check'])}</td><td><code>{esc(o['expectation'])}</code><br>{esc(o['table'])}</td>"
            f"<td>{status}</td><td>{o['unexpected_count']}</td><td><ul>{examples}</ul></td></tr>"
        )
    failures = "".join(f"<li>{esc(f)}</li>" for f in result.failures)
    warnings = "".join(f"<li>{esc(w)}</li>" for w in result.warnings[: 4 * MAX_EXAMPLES])
    facts = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(json.dumps(v))}</td></tr>" for k, v in summary.items())
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Validation of {esc(str(summary.get('dataset')))}</title><style>{_STYLE}</style></head><body>"
        f"<h1>Validation of {esc(str(summary.get('dataset')))}: {verdict}</h1>"
        f"<h2>Failures ({len(result.failures)})</h2><ul>{failures or '<li>none</li>'}</ul>"
        f"<h2>Summary</h2><table>{facts}</table>"
        "<h2>Expectations</h2><table><tr><th>check</th><th>expectation</th><th>result</th>"
        f"<th>failing rows</th><th>failing examples</th></tr>{''.join(rows)}</table>"
        f"<h2>Warnings ({len(result.warnings)})</h2><ul>{warnings or '<li>none</li>'}</ul>"
        "</body></html>"
    )
