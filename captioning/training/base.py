"""What every part of training shares: its error, its result, and calling the callbacks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable


class TrainingError(RuntimeError):
    """Training cannot start or continue as asked."""


@dataclass
class TrainResult:
    package_dir: Path
    best: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def notify(callbacks: Iterable, name: str, *args) -> None:
    """Call `name` on every callback that has it (a callback may implement any of the events)."""
    for callback in callbacks:
        method = getattr(callback, name, None)
        if method is not None:
            method(*args)
