"""Corrected captions sent by users: stored in a database, read back as a dataset.

The service calls `FeedbackStore.add` for every correction; the `feedback`
dataset (`load_feedback`) turns the rows into records so the query DSL
(`feedback[train]`) and the retraining flow see them like any other data.
Images are kept as files named by their SHA-256, so the same picture sent
twice is stored once.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import DateTime, Integer, String, Text, create_engine, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from captioning.config import data_dir
from captioning.data.records import Dataset, Record

MAX_CAPTION_CHARS = 500


class FeedbackError(ValueError):
    """A correction that cannot be stored (says why)."""


class _Base(DeclarativeBase):
    pass


class FeedbackRow(_Base):
    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    image_file: Mapped[str] = mapped_column(String(200))  # relative to the store's image folder
    caption: Mapped[str] = mapped_column(Text)
    predicted_caption: Mapped[str | None] = mapped_column(Text, nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(100), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


@dataclass(frozen=True)
class Feedback:
    """One stored correction, detached from the database session."""

    id: int
    image_sha256: str
    image_path: str
    caption: str
    predicted_caption: str | None
    model_version: str | None
    created_at: datetime

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "image_sha256": self.image_sha256,
            "image_path": self.image_path,
            "caption": self.caption,
            "predicted_caption": self.predicted_caption,
            "model_version": self.model_version,
            "created_at": self.created_at.isoformat(),
        }


def default_root() -> Path:
    return data_dir() / "feedback"


def default_url(root: Path | None = None) -> str:
    """$CAPTIONING_FEEDBACK_DB, else a SQLite file in the feedback folder."""
    env = os.environ.get("CAPTIONING_FEEDBACK_DB")
    if env:
        return env
    return f"sqlite:///{(root or default_root()) / 'feedback.db'}"


class FeedbackStore:
    """Corrections in a SQL database (SQLite file by default, PostgreSQL by URL)."""

    def __init__(self, url: str | None = None, root: str | Path | None = None):
        self.root = Path(root) if root else default_root()
        self.image_dir = self.root / "images"
        self.url = url or default_url(self.root)
        connect_args = {}
        if self.url.startswith("sqlite"):
            # Several server workers may write at once: wait for the file lock.
            connect_args = {"timeout": 30}
            database = self.url.split("///", 1)[-1]
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(self.url, connect_args=connect_args)
        _Base.metadata.create_all(self.engine)

    def add(
        self,
        image_bytes: bytes,
        caption: str,
        model_version: str | None = None,
        predicted_caption: str | None = None,
    ) -> Feedback:
        """Store the image file and one row; refuses non-images and empty captions."""
        caption = _clean_caption(caption)
        digest = hashlib.sha256(image_bytes).hexdigest()
        filename = f"{digest}.jpg"
        self._write_image(image_bytes, self.image_dir / filename)
        row = FeedbackRow(
            image_sha256=digest,
            image_file=filename,
            caption=caption,
            predicted_caption=predicted_caption,
            model_version=model_version,
            created_at=datetime.now(timezone.utc),
        )
        with Session(self.engine) as session:
            session.add(row)
            session.commit()
            return self._to_feedback(row)

    def count(self) -> int:
        with Session(self.engine) as session:
            return session.scalar(select(func.count()).select_from(FeedbackRow)) or 0

    def since(self, timestamp: datetime | None = None) -> list[Feedback]:
        """Corrections stored after `timestamp` (all of them when None), oldest first."""
        query = select(FeedbackRow).order_by(FeedbackRow.id)
        if timestamp is not None:
            if timestamp.tzinfo is None:
                timestamp = timestamp.replace(tzinfo=timezone.utc)
            query = query.where(FeedbackRow.created_at > timestamp)
        with Session(self.engine) as session:
            return [self._to_feedback(row) for row in session.scalars(query)]

    def _write_image(self, image_bytes: bytes, path: Path) -> None:
        from captioning.images import ImageError, open_image

        try:
            image = open_image(image_bytes)
        except ImageError as error:
            raise FeedbackError(str(error)) from None
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if image_bytes[:3] == b"\xff\xd8\xff":  # already JPEG: keep the exact bytes
            data = image_bytes
        else:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=95)
            data = buffer.getvalue()
        # Write then rename, so a reader never sees half a file.
        partial = path.with_suffix(f".{os.getpid()}.part")
        partial.write_bytes(data)
        partial.replace(path)

    def _to_feedback(self, row: FeedbackRow) -> Feedback:
        created = row.created_at
        if created.tzinfo is None:  # SQLite returns naive datetimes
            created = created.replace(tzinfo=timezone.utc)
        return Feedback(
            id=row.id,
            image_sha256=row.image_sha256,
            image_path=str(self.image_dir / row.image_file),
            caption=row.caption,
            predicted_caption=row.predicted_caption,
            model_version=row.model_version,
            created_at=created,
        )


def _clean_caption(caption: str) -> str:
    if not isinstance(caption, str):
        raise FeedbackError("the caption must be text")
    caption = " ".join(caption.split())
    if not caption:
        raise FeedbackError("the caption is empty")
    if len(caption) > MAX_CAPTION_CHARS:
        raise FeedbackError(f"the caption has {len(caption)} characters, more than {MAX_CAPTION_CHARS}")
    return caption


def load_feedback(root: str | Path | None = None, url: str | None = None) -> Dataset:
    """The corrections as a dataset: one record per image (split "train"),
    its captions the corrections users sent for it, oldest first.
    """
    root = Path(root) if root else default_root()
    store = FeedbackStore(url=url, root=root)
    by_image: dict[str, list[Feedback]] = {}
    for item in store.since(None):
        by_image.setdefault(item.image_sha256, []).append(item)
    records = [
        Record(
            image_id=digest,
            path=items[0].image_path,
            split="train",
            captions=tuple(item.caption for item in items),
        )
        for digest, items in by_image.items()
    ]
    return Dataset(name="feedback", records=records, dropped=[])
