"""`captioning data ...`: acquire, validate, query and list the datasets.

Exit codes: 0 done, 1 the work failed (download failed, data invalid, dataset not
acquired), 2 bad input (unknown dataset, bad query).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from captioning.cli.common import fail, params_option, print_json, set_option, settings

app = typer.Typer(
    name="data",
    help="Datasets: acquire, validate, query and list them.",
    no_args_is_help=True,
)


def _known(name: str) -> None:
    from captioning.data.datasets import DATASETS

    if name not in DATASETS:
        fail(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}", 2)


@app.command("acquire")
def acquire_command(
    name: str = typer.Argument(..., help="Dataset name, e.g. flickr8k (see `captioning data list`)."),
    dest: Optional[Path] = typer.Option(None, "--dest", help="Target folder (default: data/NAME)."),
    mirror: Optional[Path] = typer.Option(None, "--mirror", help="Folder holding NAME/ (default: $CAPTIONING_MIRROR)."),
    dvc: bool = typer.Option(
        False,
        "--dvc/--no-dvc",
        help="Afterwards `dvc add` the data folder. Off by default: inside `dvc repro` DVC holds its lock.",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    params_file: Optional[Path] = params_option(),
    assignments: list[str] = set_option(),
) -> None:
    """Put a dataset in its official layout under data/NAME (synthetic: generate it as params `synthetic` say)."""
    _known(name)
    chosen = settings(params_file, assignments)
    if name == "feedback":
        fail("feedback is collected by the service, not acquired", 2)
    if name == "synthetic":
        from captioning.config import data_dir
        from captioning.data.synthetic import load_synthetic

        path = Path(dest) if dest else data_dir() / "synthetic"
        dataset = load_synthetic(path, chosen.synthetic)
        typer.echo(f"synthetic: {len(dataset.records)} images in {path}")
    else:
        from captioning.data.acquire import AcquisitionError, acquire

        try:
            path = acquire(name, dest=dest, mirror=mirror, progress=progress)
        except AcquisitionError as error:
            fail(str(error), 1)
        except KeyError as error:
            fail(str(error.args[0] if error.args else error), 2)
        typer.echo(f"{name}: acquired in {path}")
    if dvc:
        from captioning.data.versioning import VersioningError, track_with_dvc

        try:
            dvc_file = track_with_dvc(path)
        except VersioningError as error:
            fail(str(error), 1)
        if dvc_file is None:
            typer.echo(f"not versioned: {path} is not inside a DVC repository", err=True)
        else:
            typer.echo(f"versioned with DVC: {dvc_file}")


@app.command("validate")
def validate_command(
    name: str = typer.Argument(..., help="Dataset name."),
    root: Optional[Path] = typer.Option(None, "--root", help="Dataset folder (default: data/NAME)."),
    report_dir: Optional[Path] = typer.Option(
        None, "--report-dir", help="Where validation.html/json go (default: reports/validation/NAME)."
    ),
    params_file: Optional[Path] = params_option(),
    assignments: list[str] = set_option(),
) -> None:
    """Check a dataset with the Great Expectations suite (synthetic: against params `synthetic`); exit 1 when it fails."""
    _known(name)
    from captioning.config import reports_dir
    from captioning.data.datasets import load_dataset
    from captioning.data.validate import expectations_for, validate_dataset

    expected = expectations_for(name, settings(params_file, assignments).synthetic)
    try:
        dataset = load_dataset(name, root)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error), 1)
    report_dir = report_dir or reports_dir() / "validation" / name
    result = validate_dataset(dataset, report_dir, expected)
    summary = result.summary
    typer.echo(
        f"{name}: {summary['images']} images, {summary['captions']} captions, splits {summary['splits']}; "
        f"{summary['checks']} checks, {summary['checks_failed']} failed, {len(result.warnings)} warnings "
        f"({summary['seconds_total']} s)"
    )
    for warning in result.warnings[:10]:
        typer.echo(f"warning: {warning}", err=True)
    if len(result.warnings) > 10:
        typer.echo(f"warning: ... {len(result.warnings) - 10} more in the report", err=True)
    typer.echo(f"report: {report_dir / 'validation.html'}")
    if not result.success:
        typer.echo(f"{name} FAILED validation:", err=True)
        for failure in result.failures:
            typer.echo(f"  - {failure}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{name} passed validation")


@app.command("query")
def query_command(
    query: str = typer.Argument(
        ..., help="e.g. flickr8k[test], flickr8k[train+val]-5000s7, synthetic, or a union: synthetic[train]+feedback"
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the records as JSON."),
) -> None:
    """Show the records a data query (or a `+` union of queries) selects."""
    from captioning.data.query import QueryError, format_selection, parse_selection, select

    try:
        parsed = parse_selection(query)
        records = select(parsed)
    except QueryError as error:
        fail(str(error), 2)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error), 1)
    # Image ids are unique only within a dataset: a union names each record's dataset.
    several = len({record.dataset for record in records}) > 1
    if as_json:
        print_json(
            [{"dataset": record.dataset, **record.to_dict()} if several else record.to_dict() for record in records]
        )
        return
    counts: dict[str, int] = {}
    for record in records:
        group = f"{record.dataset}[{record.split}]" if several else record.split
        counts[group] = counts.get(group, 0) + 1
    typer.echo(f"{format_selection(parsed)}: {len(records)} records {counts}")
    for record in records[:10]:
        caption = record.captions[0] if record.captions else ""
        name = f"{record.dataset}/{record.image_id}" if several else record.image_id
        typer.echo(f"  {name:<32} {record.split:<8} {caption}")
    if len(records) > 10:
        typer.echo(f"  ... {len(records) - 10} more (--json lists them all)")


@app.command("list")
def list_command(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Known datasets, their splits, and whether they are on disk."""
    from captioning.config import data_dir
    from captioning.data.acquire import read_marker
    from captioning.data.datasets import DATASETS
    from captioning.data.synthetic import MANIFEST

    rows = []
    for name, info in DATASETS.items():
        folder = data_dir() / name
        if name == "synthetic":
            present = (folder / MANIFEST).is_file()
        elif name == "feedback":
            present = folder.is_dir() and any(folder.iterdir())
        else:
            present = read_marker(folder) is not None
        rows.append({"name": name, "splits": list(info.splits), "acquired": present, "path": str(folder)})
    if as_json:
        print_json(rows)
        return
    for row in rows:
        mark = "yes" if row["acquired"] else "no"
        typer.echo(f"{row['name']:<10} splits: {'+'.join(row['splits']):<24} acquired: {mark:<4} {row['path']}")
