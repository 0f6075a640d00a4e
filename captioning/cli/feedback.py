"""`captioning feedback list` and `captioning feedback approve`: the review of corrections.

Corrections sent to the service enter training only once admitted by params.yaml's rule
(`retrain.feedback_review`, see captioning/data/feedback.py). `list --pending` shows the ones
waiting; `approve ID...` admits them whatever the rule. Both act on the service's store
($CAPTIONING_FEEDBACK_DB, else the SQLite file under the data folder) or on `--url`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from captioning.cli.common import fail, params_option, print_json, set_option, settings

app = typer.Typer(help="Corrections sent by users: list them, approve them for training.", no_args_is_help=True)


def _store(url: Optional[str]):
    from captioning.data.feedback import FeedbackStore

    try:
        return FeedbackStore(url=url)
    except Exception as error:  # noqa: BLE001 (a bad URL or an unreachable database: one line)
        fail(f"cannot open the feedback store: {type(error).__name__}: {str(error).splitlines()[0]}", 1)


def _review(params: Optional[Path], overrides: list[str]):
    from captioning.data.feedback import Review

    retrain = settings(params, overrides).retrain
    return Review(retrain.feedback_review, retrain.feedback_min_clients)


@app.command("list")
def list_command(
    pending: bool = typer.Option(False, "--pending", help="Only the corrections not admitted into training."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    url: Optional[str] = typer.Option(None, "--url", help="Database URL (default: the service's store)."),
    params: Optional[Path] = params_option(),
    overrides: list[str] = set_option(),
) -> None:
    """The stored corrections, oldest first, each admitted or pending under params' review rule."""
    review = _review(params, overrides)
    store = _store(url)
    admitted = {item.id: moment for item, moment in store.admitted(review)}
    rows = [
        {
            "id": item.id,
            "created_at": item.created_at.isoformat(),
            "client": item.client,
            "caption": item.caption,
            "image_sha256": item.image_sha256,
            "approved": item.approved_at is not None,
            "admitted": item.id in admitted,
        }
        for item in store.since(None)
        if not (pending and item.id in admitted)
    ]
    if as_json:
        print_json(rows)
        return
    typer.echo(f"review rule: {review.rule} (min clients {review.min_clients}); {len(rows)} correction(s)")
    for row in rows:
        state = "admitted" if row["admitted"] else "pending"
        typer.echo(
            f"{row['id']:>6}  {state:<8}  {row['client'] or '-':<20}  {row['image_sha256'][:12]}  {row['caption']}"
        )


@app.command("approve")
def approve_command(
    ids: list[int] = typer.Argument(..., help="Correction ids (from `captioning feedback list`)."),
    url: Optional[str] = typer.Option(None, "--url", help="Database URL (default: the service's store)."),
) -> None:
    """Admit corrections into training (an operator's review)."""
    store = _store(url)
    known = {item.id for item in store.since(None)}
    unknown = [number for number in ids if number not in known]
    if unknown:
        fail(f"no correction with id {', '.join(map(str, unknown))}; nothing approved")
    store.approve(ids)
    typer.echo(f"approved {len(ids)} correction(s): {', '.join(map(str, ids))}")
