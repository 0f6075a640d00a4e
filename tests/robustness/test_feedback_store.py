"""The feedback store under concurrent writers and bad input, on SQLite and on a real PostgreSQL.

One photo carrying EXIF (GPS position, camera, orientation) and a JPEG comment is posted by 8
writers at once, as threads sharing a store and as processes each opening their own (the way API
pods share a database): every writer's row is stored, one intact copy holds the image, upright and
without metadata (a file on SQLite; on PostgreSQL one row, copied to one file by a reader), and
no temporary file is left behind. On PostgreSQL also: each client's share of the quota, re-sent
images counted, the review rules, and a store made by the first version of the schema.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import ExifTags, Image
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from captioning.config import PROJECT_ROOT
from captioning.data.feedback import MAX_BYTES_ENV, FeedbackError, FeedbackQuotaError, FeedbackStore
from tests.robustness.conftest import record_figures

WRITERS = 8
WIDTH, HEIGHT = 60, 40  # stored upright: orientation 6 (rotated 90 degrees) makes it 40 x 60

# A writer process: opens its own store, waits for the start file (so all 8 write at once),
# adds the image and prints what happened as one JSON line.
WRITER = """
import json, sys, time, traceback
from pathlib import Path
from captioning.data.feedback import FeedbackError, FeedbackStore

url, root, image, go, number = sys.argv[1:6]
store = FeedbackStore(url=url, root=root)
while not Path(go).exists():
    time.sleep(0.005)
try:
    item = store.add(Path(image).read_bytes(), f"a red picture, writer {number}", model_version="7")
    print(json.dumps({"stored": item.id}))
except FeedbackError as error:
    print(json.dumps({"refused": str(error)}))
except Exception:
    print(json.dumps({"crashed": traceback.format_exc()}))
"""


def photo(colour=(200, 30, 30)) -> bytes:
    """A JPEG as a phone writes it: EXIF with GPS, camera make, orientation 6, plus a comment."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    exif[ExifTags.Base.Make] = "PhoneMaker"
    exif[ExifTags.IFD.GPSInfo] = {
        ExifTags.GPS.GPSLatitudeRef: "N",
        ExifTags.GPS.GPSLatitude: (48.0, 51.0, 24.0),
        ExifTags.GPS.GPSLongitudeRef: "E",
        ExifTags.GPS.GPSLongitude: (2.0, 21.0, 7.0),
    }
    image = Image.new("RGB", (WIDTH, HEIGHT), colour)
    image.paste((20, 20, 220), (0, 0, 10, 10))  # a blue corner, to see where the top left went
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, exif=exif, comment=b"taken at home")
    return buffer.getvalue()


def _sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'feedback' / 'feedback.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> str:
    if request.param == "sqlite":
        return _sqlite(tmp_path)
    return request.getfixturevalue("postgres_url")


def _with_threads(url: str, root: Path, image: bytes) -> list[dict]:
    store = FeedbackStore(url=url, root=root)
    barrier, outcomes = threading.Barrier(WRITERS), []

    def write(number: int) -> None:
        barrier.wait()
        try:
            outcomes.append({"stored": store.add(image, f"a red picture, writer {number}", model_version="7").id})
        except FeedbackError as error:
            outcomes.append({"refused": str(error)})
        except Exception as error:  # noqa: BLE001 (any other exception is the failure counted)
            outcomes.append({"crashed": repr(error)})

    threads = [threading.Thread(target=write, args=(n,)) for n in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes


def _with_processes(url: str, root: Path, image: bytes, tmp_path: Path) -> list[dict]:
    image_file, go = tmp_path / "upload.jpg", tmp_path / "go"
    image_file.write_bytes(image)
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, url, str(root), str(image_file), str(go), str(n)],
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(WRITERS)
    ]
    time.sleep(3)  # every writer imports and opens its store (creating the tables races here)
    go.touch()
    outcomes = []
    for writer in writers:
        out, err = writer.communicate(timeout=120)
        outcomes.append(json.loads(out.strip().splitlines()[-1]) if out.strip() else {"crashed": err[-2000:]})
    return outcomes


def _check_one_clean_file(root: Path, image: bytes) -> None:
    files = sorted((root / "images").iterdir())
    assert len(files) == 1, files  # one file, no temporary file left
    stored = files[0]
    data = stored.read_bytes()
    assert stored.name == hashlib.sha256(data).hexdigest() + ".jpg"  # intact: its bytes match its name
    with Image.open(stored) as picture:
        picture.load()
        assert picture.format == "JPEG" and picture.size == (HEIGHT, WIDTH)  # turned upright
        assert not picture.getexif() and "exif" not in picture.info and "comment" not in picture.info
        assert picture.getpixel((HEIGHT - 5, 5))[2] > 150  # the blue corner is now at the top right
    assert b"Exif" not in data and b"PhoneMaker" not in data and b"taken at home" not in data
    with Image.open(io.BytesIO(image)) as sent:
        assert sent.getexif().get_ifd(ExifTags.IFD.GPSInfo)  # the upload did carry a GPS position


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_eight_writers_post_one_image(request, database, tmp_path, mode):
    root, image = tmp_path / "feedback", photo()
    if mode == "threads":
        outcomes = _with_threads(database, root, image)
    else:
        outcomes = _with_processes(database, root, image, tmp_path)

    crashed = [outcome["crashed"] for outcome in outcomes if "crashed" in outcome]
    assert crashed == [] and len(outcomes) == WRITERS
    accepted = sorted(outcome["stored"] for outcome in outcomes if "stored" in outcome)
    store = FeedbackStore(url=database, root=root)
    rows = store.since(None)
    assert len(accepted) == WRITERS and [row.id for row in rows] == accepted  # 0 rows lost
    assert {row.caption for row in rows} == {f"a red picture, writer {n}" for n in range(WRITERS)}
    backend = "sqlite" if database.startswith("sqlite") else "postgresql"
    if backend == "postgresql":  # the writers share no folder: the image is one row of the database
        assert not (root / "images").exists()
        with create_engine(database).connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM feedback_images")).scalar() == 1
    assert len({row.image_sha256 for row in rows}) == 1 and all(store.local_copy(row).is_file() for row in rows)
    _check_one_clean_file(root, image)
    record_figures(
        f"feedback: {WRITERS} {mode} post one image ({backend})",
        {
            "writers": WRITERS,
            "accepted": len(accepted),
            "rows_stored": len(rows),
            "rows_lost": len(accepted) - len(rows),
            "unexpected_exceptions": len(crashed),
            "image_files": 1,
            "exif_left": False,
        },
    )


def test_a_damaged_stored_file_is_written_again(tmp_path):
    store = FeedbackStore(url=_sqlite(tmp_path), root=tmp_path / "feedback")
    first = store.add(photo(), "a red picture")
    path = Path(first.image_path)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # a torn write, or a disk error

    second = store.add(photo(), "a red picture again")

    assert second.image_path == first.image_path and path.read_bytes() == good
    assert store.count() == 2


BAD_TEXT = {
    "NUL in the caption": ({"caption": "a red\x00 picture"}, "control character \\(U\\+0000\\)"),
    "escape in the caption": ({"caption": "a red \x1b[31mpicture"}, "control character \\(U\\+001B\\)"),
    "lone surrogate": ({"caption": "a red \ud800 picture"}, "control character \\(U\\+D800\\)"),
    "long caption": ({"caption": "word " * 120}, "caption has 599 characters, more than 500"),
    "empty caption": ({"caption": " \t\n "}, "caption is empty"),
    "caption not text": ({"caption": 42}, "caption must be text"),
    "NUL in the predicted caption": ({"predicted_caption": "a cat\x00"}, "predicted caption holds a control"),
    "NUL in the version": ({"model_version": "7\x00"}, "model version .* may hold only"),
    "long version": ({"model_version": "7" * 101}, "model version has 101 characters, more than 100"),
    "version with spaces": ({"model_version": "7; DROP TABLE feedback"}, "may hold only letters"),
}


def test_bad_text_is_a_clear_feedback_error_on_postgresql(postgres_url, tmp_path):
    store = FeedbackStore(url=postgres_url, root=tmp_path / "feedback")
    for case, (fields, message) in BAD_TEXT.items():
        arguments = {"caption": "a red picture", "model_version": "7", **fields}
        with pytest.raises(FeedbackError, match=message):
            store.add(photo(), **arguments)
        assert store.count() == 0 and not (tmp_path / "feedback" / "images").exists(), case  # nothing written
    assert store.add(photo(), "a red picture", model_version="7").id  # the same store still takes good input
    record_figures(
        "feedback: bad texts on PostgreSQL",
        {
            "inputs": len(BAD_TEXT),
            "kinds": sorted(BAD_TEXT),
            "refused_with_feedback_error": len(BAD_TEXT),
            "database_errors": 0,
            "rows_written": 0,
        },
    )


def test_postgresql_itself_refuses_nul_which_is_why_it_is_checked_first(postgres_url, tmp_path):
    FeedbackStore(url=postgres_url, root=tmp_path / "feedback")  # creates the table
    engine = create_engine(postgres_url)
    with pytest.raises((DBAPIError, ValueError)):
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO feedback (image_sha256, image_file, caption, created_at) "
                    "VALUES ('x', 'x.jpg', :caption, now())"
                ),
                {"caption": "a\x00b"},
            )


def test_the_quota_refuses_new_images_and_keeps_what_is_stored(tmp_path, monkeypatch):
    root = tmp_path / "feedback"
    first = FeedbackStore(url=_sqlite(tmp_path), root=root).add(photo(), "a red picture")
    used = FeedbackStore(url=_sqlite(tmp_path), root=root).used_bytes()
    monkeypatch.setenv(MAX_BYTES_ENV, str(used + 100))  # room for rows, not for another image
    store = FeedbackStore(url=_sqlite(tmp_path), root=root)

    with pytest.raises(FeedbackQuotaError, match=f"feedback store is full: .* \\({MAX_BYTES_ENV}\\)"):
        store.add(photo((30, 200, 30)), "a green picture")
    with pytest.raises(FeedbackQuotaError, match="feedback store is full"):
        store.add(photo(), "the red picture once more")  # no new file, but every write counts

    assert store.count() == 1
    assert len(list((root / "images").iterdir())) == 1
    roomy = FeedbackStore(url=_sqlite(tmp_path), root=root, max_bytes=used + 100_000)  # a setting passed in
    again = roomy.add(photo(), "the red picture once more")
    assert again.image_sha256 == first.image_sha256 and roomy.count() == 2
    assert len(list((root / "images").iterdir())) == 1  # stored once
    assert roomy.add(photo((30, 200, 30)), "a green picture").caption == "a green picture"


def test_a_bad_quota_setting_is_refused_at_start(tmp_path, monkeypatch):
    monkeypatch.setenv(MAX_BYTES_ENV, "ten gigabytes")
    with pytest.raises(ValueError, match=f"{MAX_BYTES_ENV}='ten gigabytes' is not a whole number of bytes"):
        FeedbackStore(url=_sqlite(tmp_path), root=tmp_path / "feedback")


# ---------------------------------------------------------------- quotas and review on PostgreSQL

ALICE, BOB = "192.0.2.10", "198.51.100.20"


def test_client_shares_count_every_write_on_postgresql(postgres_url, tmp_path):
    probe = FeedbackStore(url=postgres_url, root=tmp_path / "probe")
    probe.add(photo(), "a red picture")
    size = probe.used_bytes()  # one image row, no file
    assert size > 0 and not (tmp_path / "probe").exists()
    store = FeedbackStore(url=postgres_url, root=tmp_path / "feedback", max_bytes=40 * size, client_share=0.1)
    for number in range(4):  # the image is already stored: each write still counts for Alice
        store.add(photo(), f"a red picture, again {number}", client=ALICE)
    assert store.client_bytes(ALICE) == 4 * size and store.used_bytes() == size
    with pytest.raises(FeedbackQuotaError, match="this client's share of the feedback store is used"):
        store.add(photo((30, 200, 30)), "a green picture", client=ALICE)
    assert store.add(photo((30, 200, 30)), "a green picture", client=BOB).client == BOB
    used = store.used_bytes()
    assert used > size and store.count() == 6  # the green image's row is counted too
    full = FeedbackStore(url=postgres_url, root=tmp_path / "feedback", max_bytes=used + 10)
    with pytest.raises(FeedbackQuotaError, match="the feedback store is full"):
        full.add(photo(), "a red picture, sent once more")


def test_review_rules_and_training_copies_on_postgresql(postgres_url, tmp_path):
    from captioning.data.feedback import Review, load_feedback
    from captioning.registry.lineage import feedback_since

    root = tmp_path / "feedback"
    store = FeedbackStore(url=postgres_url, root=root)
    red = store.add(photo(), "a red picture", client=ALICE)
    green = store.add(photo((30, 200, 30)), "a green picture", client=ALICE)
    agreement, operator = Review("agreement", 2), Review("operator")
    assert load_feedback(root, postgres_url, agreement).records == [] and feedback_since(None, postgres_url) == 0

    store.add(photo(), "A red picture.", client=BOB)
    (record,) = load_feedback(root, postgres_url, agreement).records
    assert record.image_id == red.image_sha256 and record.captions == ("a red picture", "A red picture.")
    copy = Path(record.path)  # the reader's copy of the image row, intact
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == red.image_sha256
    copy.write_bytes(b"torn")
    load_feedback(root, postgres_url, agreement)
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == red.image_sha256  # written again from the row

    assert feedback_since(None, postgres_url, operator) == 0
    assert store.approve([green.id]) == []
    assert [item.id for item, _ in store.admitted(operator)] == [green.id]
    assert feedback_since(None, postgres_url, agreement) == 3 and feedback_since(None, postgres_url) == 3


FIRST_VERSION_TABLE = """
CREATE TABLE feedback (
    id SERIAL PRIMARY KEY,
    image_sha256 VARCHAR(64) NOT NULL,
    image_file VARCHAR(200) NOT NULL,
    caption TEXT NOT NULL,
    predicted_caption TEXT,
    model_version VARCHAR(100),
    created_at TIMESTAMP WITH TIME ZONE NOT NULL
)
"""


def test_a_first_version_store_on_postgresql_is_upgraded_by_racing_pods(postgres_url, tmp_path):
    """The first version's table and one row; 6 stores open it at once, as replicas starting
    together: each adds the missing columns or finds them added, none fails."""
    engine = create_engine(postgres_url)
    with engine.begin() as connection:
        connection.execute(text(FIRST_VERSION_TABLE))
        connection.execute(
            text(
                "INSERT INTO feedback (image_sha256, image_file, caption, created_at) "
                "VALUES ('ab', 'ab.jpg', 'an old correction', now())"
            )
        )
    barrier, errors, stores = threading.Barrier(6), [], []

    def open_store() -> None:
        barrier.wait()
        try:
            stores.append(FeedbackStore(url=postgres_url, root=tmp_path / "feedback"))
        except Exception as error:  # noqa: BLE001 (any exception is the failure counted)
            errors.append(repr(error))

    threads = [threading.Thread(target=open_store) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(stores) == 6
    (old,) = stores[0].since(None)
    assert (old.caption, old.client, old.approved_at) == ("an old correction", None, None)
    new = stores[1].add(photo(), "a red picture", client=ALICE)
    assert [item.id for item in stores[2].since(None)] == [old.id, new.id]
    assert stores[3].approve([old.id]) == [] and stores[4].since(None)[0].approved_at is not None


def test_the_cluster_default_url_form_works_and_the_secret_url_wins(postgres_url, tmp_path, monkeypatch):
    """deploy/base gives the API CAPTIONING_FEEDBACK_DB_DEFAULT (a URL with no password and a
    connect timeout); an external URL in CAPTIONING_FEEDBACK_DB, from the secret, wins over it."""
    from captioning.data.feedback import DEFAULT_DB_ENV

    monkeypatch.delenv("CAPTIONING_FEEDBACK_DB", raising=False)
    monkeypatch.setenv(DEFAULT_DB_ENV, postgres_url + "?connect_timeout=5")
    store = FeedbackStore(root=tmp_path / "feedback")
    assert store.images_in_database and store.add(photo(), "a red picture").id
    assert not (tmp_path / "feedback").exists()  # nothing written beside the API: no volume needed

    monkeypatch.setenv("CAPTIONING_FEEDBACK_DB", _sqlite(tmp_path))
    local = FeedbackStore(root=tmp_path / "feedback")
    assert local.url.startswith("sqlite") and local.count() == 0 and store.count() == 1
