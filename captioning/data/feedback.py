"""Corrected captions sent by users: stored in a database, read back as a dataset.

The service calls `FeedbackStore.add` for every correction; the `feedback`
dataset (`load_feedback`) turns the rows into records so the query DSL
(`feedback[train]`) and the retraining flow see them like any other data.

Images are stored re-encoded as JPEG no larger than DECODE_SIDE (640 px on the long side, twice
the largest encoder input), upright (the EXIF orientation applied) and with
no metadata (no EXIF, GPS, comments or colour profiles), in a file named by the SHA-256
of the stored bytes: the same picture sent twice is stored once, and a file whose bytes
no longer match its name is known to be damaged and is written again. Files are written
to a uniquely named temporary file in the same folder, flushed to disk, then renamed
over the final name, so any number of writers (threads, processes, pods sharing a
volume) leave one intact file. Texts are checked before anything is written: bad ones
raise FeedbackError (the service answers 422), never a database error.

`CAPTIONING_FEEDBACK_MAX_BYTES` (or `max_bytes=`) caps the bytes kept under the store's
folder; past it a new image is refused with FeedbackQuotaError. The cap is checked
before each write, so writers racing at the cap may pass it by one image each.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import re
import tempfile
import time
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image
from sqlalchemy import DateTime, Integer, String, Text, create_engine, func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from captioning.config import data_dir
from captioning.data.records import Dataset, Record

MAX_CAPTION_CHARS = 500
MAX_VERSION_CHARS = 100  # the model_version column is VARCHAR(100)
# Registry versions ("7"), package checksums ("local-1a2b3c4d5e6f"), bento tags ("captioning:v3").
VERSION_PATTERN = re.compile(r"[A-Za-z0-9._:@/+-]+")
JPEG_QUALITY = 95
MAX_BYTES_ENV = "CAPTIONING_FEEDBACK_MAX_BYTES"
STALE_PART_SECONDS = 3600  # a temporary file this old was left by a writer that died
PART_SUFFIX = ".part"


class FeedbackError(ValueError):
    """A correction that cannot be stored (says why)."""


class FeedbackQuotaError(FeedbackError):
    """The store holds its quota of bytes: nothing more is stored until some is freed."""


class _Base(DeclarativeBase):
    pass


class FeedbackRow(_Base):
    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    image_file: Mapped[str] = mapped_column(String(200))  # relative to the store's image folder
    caption: Mapped[str] = mapped_column(Text)
    predicted_caption: Mapped[str | None] = mapped_column(Text, nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(MAX_VERSION_CHARS), nullable=True)
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


def engine_url(url: str) -> str:
    """`postgres://` and `postgresql://` URLs with the PostgreSQL driver that is installed
    (SQLAlchemy's default, psycopg2, or else psycopg 3)."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if (
        url.startswith("postgresql://")
        and importlib.util.find_spec("psycopg2") is None
        and importlib.util.find_spec("psycopg") is not None
    ):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def quota_from_env() -> int | None:
    """$CAPTIONING_FEEDBACK_MAX_BYTES as a number of bytes, or None when unset (no cap)."""
    raw = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{MAX_BYTES_ENV}={raw!r} is not a whole number of bytes") from None
    if value <= 0:
        raise ValueError(f"{MAX_BYTES_ENV} must be above 0, not {value}")
    return value


class FeedbackStore:
    """Corrections in a SQL database (SQLite file by default, PostgreSQL by URL)."""

    def __init__(self, url: str | None = None, root: str | Path | None = None, max_bytes: int | None = None):
        self.root = Path(root) if root else default_root()
        self.image_dir = self.root / "images"
        self.url = engine_url(url or default_url(self.root))
        self.max_bytes = max_bytes if max_bytes is not None else quota_from_env()
        connect_args = {}
        if self.url.startswith("sqlite"):
            # Several server workers may write at once: wait for the file lock.
            connect_args = {"timeout": 30}
            database = self.url.split("///", 1)[-1]
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(self.url, connect_args=connect_args, pool_pre_ping=True)
        _create_tables(self.engine)
        _remove_stale_parts(self.image_dir)

    def add(
        self,
        image: bytes | Image.Image,
        caption: str,
        model_version: str | None = None,
        predicted_caption: str | None = None,
    ) -> Feedback:
        """Store the image file and one row. Every input is checked before anything is
        written; a bad one raises FeedbackError saying which and why."""
        caption = clean_caption(caption, "caption")
        predicted = clean_caption(predicted_caption, "predicted caption") if predicted_caption else None
        version = clean_version(model_version)
        data = stored_jpeg(image)  # an upload's bytes, or the image the service decoded
        digest = hashlib.sha256(data).hexdigest()
        filename = f"{digest}.jpg"
        self._keep_image(self.image_dir / filename, data, digest)
        row = FeedbackRow(
            image_sha256=digest,
            image_file=filename,
            caption=caption,
            predicted_caption=predicted,
            model_version=version,
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

    def used_bytes(self) -> int:
        """Bytes of every file under the store's folder (images, temporary files, a SQLite database)."""
        total = 0
        for folder, _, names in os.walk(self.root):
            for name in names:
                try:
                    total += os.stat(os.path.join(folder, name)).st_size
                except FileNotFoundError:  # renamed or removed by another writer meanwhile
                    pass
        return total

    def _keep_image(self, path: Path, data: bytes, digest: str) -> None:
        """Leave an intact copy at `path`: an existing one whose bytes match its name is kept,
        anything else (absent, truncated, damaged) is written anew."""
        if _intact(path, digest):
            return
        if self.max_bytes is not None:
            used = self.used_bytes()
            if used + len(data) > self.max_bytes:
                raise FeedbackQuotaError(
                    f"the feedback store is full: {used} bytes used of {self.max_bytes} ({MAX_BYTES_ENV}); "
                    f"this image needs {len(data)} more"
                )
        write_atomically(path, data)

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


def _create_tables(engine, attempts: int = 5) -> None:
    """Create the table once. Pods starting together race to create it: the loser's
    CREATE fails ("already exists"), and its next attempt finds the table."""
    for attempt in range(attempts):
        try:
            _Base.metadata.create_all(engine)
            return
        except DBAPIError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.1 * (attempt + 1))


# ---------------------------------------------------------------- checks


def clean_caption(caption: str | None, what: str = "caption") -> str:
    """The caption with whitespace runs made one space; refuses empty, over-long and
    control characters (NUL, escapes: PostgreSQL refuses NUL, and none belongs in a caption)."""
    if not isinstance(caption, str):
        raise FeedbackError(f"the {what} must be text")
    caption = " ".join(caption.split())
    if not caption:
        raise FeedbackError(f"the {what} is empty")
    if len(caption) > MAX_CAPTION_CHARS:
        raise FeedbackError(f"the {what} has {len(caption)} characters, more than {MAX_CAPTION_CHARS}")
    _refuse_control(caption, what)
    return caption


def clean_version(version: str | None) -> str | None:
    """The model version as sent (None when absent or blank); refuses anything but a short tag."""
    if version is None:
        return None
    if not isinstance(version, str):
        raise FeedbackError("the model version must be text")
    version = version.strip()
    if not version:
        return None
    if len(version) > MAX_VERSION_CHARS:
        raise FeedbackError(f"the model version has {len(version)} characters, more than {MAX_VERSION_CHARS}")
    if not VERSION_PATTERN.fullmatch(version):
        raise FeedbackError(f"the model version {version[:40]!r} may hold only letters, digits and . _ : @ / + -")
    return version


def _refuse_control(text: str, what: str) -> None:
    for position, char in enumerate(text):
        # Cc: control characters (NUL among them); Cs: lone surrogates, which UTF-8 cannot encode.
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise FeedbackError(f"the {what} holds a control character (U+{ord(char):04X}) at position {position}")


# ---------------------------------------------------------------- images


def stored_jpeg(image: bytes | Image.Image) -> bytes:
    """The bytes kept for an upload: decoded no larger than DECODE_SIDE (refused when not an
    image), turned upright, re-encoded as JPEG with no metadata at all.

    An upload's bytes are decoded here; the service passes the image it decoded already
    (bounded and upright: `open_image(data, max_side=DECODE_SIDE, upright=True)`), so an
    upload is never decoded at full size for its stored copy.
    """
    from captioning.images import DECODE_SIDE, ImageError, open_image

    try:
        image = open_image(image, max_side=DECODE_SIDE, upright=not isinstance(image, Image.Image))
    except ImageError as error:
        raise FeedbackError(str(error)) from None
    image.info.clear()  # Pillow writes a JPEG comment kept in info: drop every kind of metadata
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


# ---------------------------------------------------------------- files


def _intact(path: Path, digest: str) -> bool:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == digest
    except FileNotFoundError:
        return False


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never part:
    a uniquely named temporary file in the same folder (safe across threads, processes and
    hosts sharing the folder), flushed to disk, renamed over `path`, and the rename flushed too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PART_SUFFIX)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` survive a crash (the folder's entry is data too)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_stale_parts(folder: Path) -> None:
    """Temporary files of writers that died before renaming (live writers' files are young)."""
    if not folder.is_dir():
        return
    cutoff = time.time() - STALE_PART_SECONDS
    for path in folder.glob(f".*{PART_SUFFIX}"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except FileNotFoundError:
            pass


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
