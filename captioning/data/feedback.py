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
over the final name, so any number of writers (threads, processes) leave one
intact file. Texts are checked before anything is written: bad ones
raise FeedbackError (the service answers 422), never a database error.

With SQLite (one process) images are files under the store's folder. With PostgreSQL (several
API replicas) they are rows of the `feedback_images` table (bytea): every replica writes them
safely with no shared volume, and readers (`load_feedback`, training) copy them to files
under their own folder when they need them.

`CAPTIONING_FEEDBACK_MAX_BYTES` (or `max_bytes=`) caps the bytes kept (the store's folder, plus
the image rows on PostgreSQL). Every write is counted, a re-sent image too: past the cap it is
refused with FeedbackQuotaError. Each client (`add(client=...)`: the sender's address as the
service sees it) may send at most `CAPTIONING_FEEDBACK_CLIENT_SHARE` (or `client_share=`, default 0.05)
of the cap, counted over every image it sent, so one client cannot fill the store for everyone.
Calls with no client (the command line, scripts) are held to the cap only. The checks run
before each write, so writers racing at a limit may pass it by one image each.

Corrections enter training only once admitted by the review rule (params.yaml
`retrain.feedback_review`): `agreement` (the default) admits a correction once
`retrain.feedback_min_clients` different clients sent the same caption for the same image (case,
spacing and a final full stop aside), or an operator approved it; `operator` admits only what an
operator approved (`captioning feedback approve ID`); `none` admits everything stored.
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
from sqlalchemy import (
    DateTime,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from captioning.config import data_dir
from captioning.data.records import Dataset, Record

MAX_CAPTION_CHARS = 500
MAX_VERSION_CHARS = 100  # the model_version column is VARCHAR(100)
# Registry versions ("7"), package checksums ("local-1a2b3c4d5e6f"), bento tags ("captioning:v3").
VERSION_PATTERN = re.compile(r"[A-Za-z0-9._:@/+-]+")
JPEG_QUALITY = 95
MAX_BYTES_ENV = "CAPTIONING_FEEDBACK_MAX_BYTES"
CLIENT_SHARE_ENV = "CAPTIONING_FEEDBACK_CLIENT_SHARE"
DEFAULT_CLIENT_SHARE = 0.05
MAX_CLIENT_CHARS = 100
# The database used when CAPTIONING_FEEDBACK_DB is unset: the Kubernetes manifests point it at the
# cluster's PostgreSQL, so an external URL put in CAPTIONING_FEEDBACK_DB (from a secret) wins.
DEFAULT_DB_ENV = "CAPTIONING_FEEDBACK_DB_DEFAULT"
REVIEW_RULES = ("agreement", "operator", "none")
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
    # Added after the first version: stores made before get them at open (_add_missing_columns).
    client: Mapped[str | None] = mapped_column(String(MAX_CLIENT_CHARS), nullable=True)
    image_bytes: Mapped[int | None] = mapped_column(Integer, nullable=True)  # counted against the quotas
    approved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


ADDED_COLUMNS = ("client", "image_bytes", "approved_at")


class ImageRow(_Base):
    """An image kept in the database (PostgreSQL stores), once per SHA-256."""

    __tablename__ = "feedback_images"

    image_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class Review:
    """The rule that admits corrections into training (params.yaml retrain.feedback_review)."""

    rule: str = "agreement"
    min_clients: int = 2

    def __post_init__(self):
        if self.rule not in REVIEW_RULES:
            raise ValueError(f"feedback review {self.rule!r} is not one of {', '.join(REVIEW_RULES)}")
        if self.min_clients < 1:
            raise ValueError(f"feedback_min_clients must be 1 or more, not {self.min_clients}")

    @classmethod
    def from_params(cls) -> "Review":
        """The rule in the project's params.yaml."""
        from captioning.config import PARAMS_FILE
        from captioning.settings import load_settings

        retrain = load_settings(PARAMS_FILE).retrain
        return cls(retrain.feedback_review, retrain.feedback_min_clients)


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
    client: str | None = None
    approved_at: datetime | None = None

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
    """$CAPTIONING_FEEDBACK_DB, else $CAPTIONING_FEEDBACK_DB_DEFAULT, else a SQLite file in the
    feedback folder."""
    for name in ("CAPTIONING_FEEDBACK_DB", DEFAULT_DB_ENV):
        env = os.environ.get(name, "").strip()
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


def client_share_from_env() -> float:
    """$CAPTIONING_FEEDBACK_CLIENT_SHARE as a fraction of the cap (default 0.05)."""
    raw = os.environ.get(CLIENT_SHARE_ENV, "").strip()
    if not raw:
        return DEFAULT_CLIENT_SHARE
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{CLIENT_SHARE_ENV}={raw!r} is not a number") from None
    return check_share(value)


def check_share(value: float) -> float:
    if not 0 < value <= 1:
        raise ValueError(f"{CLIENT_SHARE_ENV} must be above 0 and at most 1, not {value}")
    return value


class FeedbackStore:
    """Corrections in a SQL database (SQLite file by default, PostgreSQL by URL)."""

    def __init__(
        self,
        url: str | None = None,
        root: str | Path | None = None,
        max_bytes: int | None = None,
        client_share: float | None = None,
    ):
        self.root = Path(root) if root else default_root()
        self.image_dir = self.root / "images"
        self.url = engine_url(url or default_url(self.root))
        self.max_bytes = max_bytes if max_bytes is not None else quota_from_env()
        self.client_share = check_share(client_share) if client_share is not None else client_share_from_env()
        connect_args = {}
        if self.url.startswith("sqlite"):
            # Several server workers may write at once: wait for the file lock.
            connect_args = {"timeout": 30}
            database = self.url.split("///", 1)[-1]
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
        # One process writes a SQLite store: images are files. Several replicas share a PostgreSQL
        # store and no volume: images are rows.
        self.images_in_database = not self.url.startswith("sqlite")
        self.engine = create_engine(self.url, connect_args=connect_args, pool_pre_ping=True)
        _create_tables(self.engine)
        _add_missing_columns(self.engine)
        _remove_stale_parts(self.image_dir)

    def add(
        self,
        image: bytes | Image.Image,
        caption: str,
        model_version: str | None = None,
        predicted_caption: str | None = None,
        client: str | None = None,
    ) -> Feedback:
        """Store the image and one row. Every input is checked before anything is written; a bad
        one raises FeedbackError saying which and why. `client` (the sender's address) is held
        to its share of the quota and tells senders apart for the agreement rule."""
        caption = clean_caption(caption, "caption")
        predicted = clean_caption(predicted_caption, "predicted caption") if predicted_caption else None
        version = clean_version(model_version)
        client = clean_client(client)
        data = stored_jpeg(image)  # an upload's bytes, or the image the service decoded
        digest = hashlib.sha256(data).hexdigest()
        filename = f"{digest}.jpg"
        self._check_quota(len(data), client)  # every write counts, a re-sent image too
        if self.images_in_database:
            self._keep_image_row(digest, data)
        else:
            self._keep_image(self.image_dir / filename, data, digest)
        row = FeedbackRow(
            image_sha256=digest,
            image_file=filename,
            caption=caption,
            predicted_caption=predicted,
            model_version=version,
            created_at=datetime.now(timezone.utc),
            client=client,
            image_bytes=len(data),
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
            query = query.where(FeedbackRow.created_at > _aware(timestamp))
        with Session(self.engine) as session:
            return [self._to_feedback(row) for row in session.scalars(query)]

    def admitted(self, review: Review | None = None) -> list[tuple[Feedback, datetime]]:
        """The corrections the review rule admits into training, each with when it was admitted
        (its approval, the correction that made the agreement, or its own storing), oldest first."""
        review = review or Review.from_params()
        items = self.since(None)
        if review.rule == "none":
            return [(item, item.created_at) for item in items]
        agreed = _agreement_times(items, review.min_clients) if review.rule == "agreement" else {}
        result = []
        for item in items:
            times = [t for t in (item.approved_at, agreed.get(_agreement_key(item))) if t is not None]
            if times:
                result.append((item, max(item.created_at, min(times))))
        return result

    def pending(self, review: Review | None = None) -> list[Feedback]:
        """The corrections the review rule does not admit (yet)."""
        admitted = {item.id for item, _ in self.admitted(review)}
        return [item for item in self.since(None) if item.id not in admitted]

    def approve(self, ids: list[int]) -> list[int]:
        """Mark corrections approved by an operator; returns the ids that do not exist."""
        now = datetime.now(timezone.utc)
        with Session(self.engine) as session:
            found = set(session.scalars(select(FeedbackRow.id).where(FeedbackRow.id.in_(ids))))
            session.execute(
                update(FeedbackRow)
                .where(FeedbackRow.id.in_(found), FeedbackRow.approved_at.is_(None))
                .values(approved_at=now)
            )
            session.commit()
        return [number for number in ids if number not in found]

    def used_bytes(self) -> int:
        """Bytes of every file under the store's folder (images, temporary files, a SQLite database),
        plus the images kept in the database."""
        total = 0
        for folder, _, names in os.walk(self.root):
            for name in names:
                try:
                    total += os.stat(os.path.join(folder, name)).st_size
                except FileNotFoundError:  # renamed or removed by another writer meanwhile
                    pass
        if self.images_in_database:
            with Session(self.engine) as session:
                total += session.scalar(select(func.coalesce(func.sum(ImageRow.size), 0))) or 0
        return total

    def client_bytes(self, client: str) -> int:
        """Image bytes of every write `client` made (a re-sent image counted each time)."""
        query = select(func.coalesce(func.sum(FeedbackRow.image_bytes), 0)).where(FeedbackRow.client == client)
        with Session(self.engine) as session:
            return session.scalar(query) or 0

    def local_copy(self, item: Feedback) -> Path:
        """The image of `item` as a file under the store's folder (copied from the database when
        images are kept there, and again when the copy is damaged)."""
        path = Path(item.image_path)
        if self.images_in_database and not _intact(path, item.image_sha256):
            with Session(self.engine) as session:
                data = session.scalar(select(ImageRow.data).where(ImageRow.image_sha256 == item.image_sha256))
            if data is not None:
                write_atomically(path, bytes(data))
        return path

    def _check_quota(self, size: int, client: str | None) -> None:
        if self.max_bytes is None:
            return
        used = self.used_bytes()
        if used + size > self.max_bytes:
            raise FeedbackQuotaError(
                f"the feedback store is full: {used} bytes used of {self.max_bytes} ({MAX_BYTES_ENV}); "
                f"this image needs {size} more"
            )
        if client is None:
            return
        share, sent = int(self.max_bytes * self.client_share), self.client_bytes(client)
        if sent + size > share:
            raise FeedbackQuotaError(
                f"this client's share of the feedback store is used: {sent} bytes sent of {share} "
                f"({CLIENT_SHARE_ENV} of {MAX_BYTES_ENV}); this image needs {size} more"
            )

    def _keep_image(self, path: Path, data: bytes, digest: str) -> None:
        """Leave an intact copy at `path`: an existing one whose bytes match its name is kept,
        anything else (absent, truncated, damaged) is written anew."""
        if not _intact(path, digest):
            write_atomically(path, data)

    def _keep_image_row(self, digest: str, data: bytes) -> None:
        """One row per image: a writer that loses the race to insert it finds it there."""
        with Session(self.engine) as session:
            if session.scalar(select(ImageRow.image_sha256).where(ImageRow.image_sha256 == digest)) is not None:
                return
            session.add(ImageRow(image_sha256=digest, data=data, size=len(data), created_at=datetime.now(timezone.utc)))
            try:
                session.commit()
            except IntegrityError:
                session.rollback()

    def _to_feedback(self, row: FeedbackRow) -> Feedback:
        return Feedback(
            id=row.id,
            image_sha256=row.image_sha256,
            image_path=str(self.image_dir / row.image_file),
            caption=row.caption,
            predicted_caption=row.predicted_caption,
            model_version=row.model_version,
            created_at=_aware(row.created_at),
            client=row.client,
            approved_at=_aware(row.approved_at) if row.approved_at is not None else None,
        )


def _aware(moment: datetime) -> datetime:
    """SQLite returns naive datetimes (stored as UTC)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _agreement_key(item: Feedback) -> tuple[str, str]:
    """The same caption for the same image, whatever the case, spacing or final full stop."""
    return item.image_sha256, " ".join(item.caption.casefold().split()).rstrip(" .")


def _agreement_times(items: list[Feedback], min_clients: int) -> dict[tuple[str, str], datetime]:
    """When each (image, caption) was first sent by `min_clients` different clients (items
    oldest first). Corrections sent with no client count as one client."""
    senders: dict[tuple[str, str], set[str]] = {}
    reached: dict[tuple[str, str], datetime] = {}
    for item in items:
        key = _agreement_key(item)
        senders.setdefault(key, set()).add(item.client or "")
        if key not in reached and len(senders[key]) >= min_clients:
            reached[key] = item.created_at
    return reached


def _create_tables(engine, attempts: int = 5) -> None:
    """Create the tables once. Pods starting together race to create them: the loser's
    CREATE fails ("already exists"), and its next attempt finds them."""
    for attempt in range(attempts):
        try:
            _Base.metadata.create_all(engine)
            return
        except DBAPIError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.1 * (attempt + 1))


def _add_missing_columns(engine) -> None:
    """Stores made by the first version lack the columns added since: add them (NULL in old
    rows). A writer that loses the race to add one finds it added."""
    table = FeedbackRow.__table__
    for name in ADDED_COLUMNS:
        if name in _columns(engine):
            continue
        kind = table.c[name].type.compile(dialect=engine.dialect)
        try:
            with engine.begin() as connection:
                connection.execute(text(f"ALTER TABLE feedback ADD COLUMN {name} {kind}"))
        except DBAPIError:
            if name not in _columns(engine):
                raise


def _columns(engine) -> set[str]:
    return {column["name"] for column in inspect(engine).get_columns("feedback")}


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


def clean_client(client: str | None) -> str | None:
    """The sender's identity as given (an address), None when absent; cut to the column's size."""
    if client is None:
        return None
    client = str(client).strip()[:MAX_CLIENT_CHARS]
    _refuse_control(client, "client")
    return client or None


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


def load_feedback(
    root: str | Path | None = None, url: str | None = None, review: Review | None = None
) -> Dataset:
    """The admitted corrections (`review`, default params.yaml's rule) as a dataset: one record
    per image (split "train"), its captions the admitted corrections sent for it, oldest first.
    """
    root = Path(root) if root else default_root()
    store = FeedbackStore(url=url, root=root)
    by_image: dict[str, list[Feedback]] = {}
    for item, _ in store.admitted(review):
        by_image.setdefault(item.image_sha256, []).append(item)
    records = [
        Record(
            image_id=digest,
            path=str(store.local_copy(items[0])),
            split="train",
            captions=tuple(item.caption for item in items),
        )
        for digest, items in by_image.items()
    ]
    return Dataset(name="feedback", records=records, dropped=[])
