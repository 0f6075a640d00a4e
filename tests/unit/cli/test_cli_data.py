"""`captioning data ...` through the real command: exit codes 0/1/2 and JSON shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from captioning.cli import app
from captioning.config import data_dir
from tests.fixtures.official import make_flickr8k

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["data", *args])


@pytest.fixture
def flickr8k() -> Path:
    """A tiny Flickr8k in data_dir() (the per-test folder), as `acquire` would leave it."""
    return make_flickr8k(data_dir() / "flickr8k", n_per_split=(4, 2, 2))


def test_query_json_lists_records(flickr8k):
    result = run("query", "flickr8k[train+test]-3s5", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 3
    for row in rows:
        assert set(row) == {"image_id", "path", "split", "captions"}
        assert row["split"] in {"train", "test"} and Path(row["path"]).is_file()
        assert len(row["captions"]) == 5 and all(isinstance(c, str) for c in row["captions"])
    again = json.loads(run("query", "flickr8k[train+test]-3s5", "--json").stdout)
    assert again == rows


def test_query_summary(flickr8k):
    result = run("query", "flickr8k[val]")
    assert result.exit_code == 0
    assert "flickr8k[val]: 2 records" in result.stdout


@pytest.mark.parametrize(
    "query, words",
    [
        ("flickr8k[tset]", "no split 'tset'"),
        ("flikr8k[test]", "unknown dataset 'flikr8k'"),
        ("flickr8k[test]-3", "larger than the 2 records"),
        ("flickr8k[test", "expected '+' or ']'"),
    ],
)
def test_bad_queries_exit_2(flickr8k, query, words):
    result = run("query", query, "--json")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: bad query") and words in result.stderr
    assert "^" in result.stderr  # the caret under the offending part


def test_query_union_names_each_records_dataset(flickr8k):
    from captioning.data.feedback import FeedbackStore

    image = next((flickr8k / "Flicker8k_Dataset").glob("*.jpg")).read_bytes()
    store = FeedbackStore()
    store.approve([store.add(image, "a corrected caption").id])  # admitted into training by an operator
    result = run("query", "flickr8k[val]+feedback", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["dataset"] for row in rows] == ["flickr8k", "flickr8k", "feedback"]
    assert rows[-1]["captions"] == ["a corrected caption"] and rows[-1]["split"] == "train"

    summary = run("query", "flickr8k[val]+feedback")
    assert "flickr8k[val]+feedback: 3 records {'flickr8k[val]': 2, 'feedback[train]': 1}" in summary.stdout
    assert "  feedback/" in summary.stdout
    bad = run("query", "flickr8k[val]++feedback")
    assert bad.exit_code == 2 and "empty part" in bad.stderr and "^" in bad.stderr


def test_query_of_a_dataset_not_acquired_exits_1():
    result = run("query", "flickr8k[test]")
    assert result.exit_code == 1
    assert "is the dataset acquired" in result.stderr


def test_validate_good_and_bad(flickr8k, tmp_path):
    # A tiny fixture is not Flickr8k's documented 6000/1000/1000: validation says so and exits 1.
    result = run("validate", "flickr8k", "--report-dir", str(tmp_path / "r1"))
    assert result.exit_code == 1
    assert "split train has 4 images, expected 6000" in result.stderr
    assert (tmp_path / "r1" / "validation.html").is_file()

    small = ["--set", "synthetic.train=12", "--set", "synthetic.val=3", "--set", "synthetic.test=3"]
    assert run("acquire", "synthetic", *small).exit_code == 0
    synthetic = run("validate", "synthetic", "--report-dir", str(tmp_path / "r2"), *small)
    assert synthetic.exit_code == 0, synthetic.output
    assert "synthetic passed validation" in synthetic.stdout
    assert str(tmp_path / "r2" / "validation.html") in synthetic.stdout
    # Validated against the settings: the dataset on disk is not what params.yaml asks for.
    other = run("validate", "synthetic", "--report-dir", str(tmp_path / "r3"))
    assert other.exit_code == 1 and "split train has 12 images, expected" in other.stderr


def test_validate_names_a_corrupt_image(flickr8k, tmp_path):
    victim = sorted((flickr8k / "Flicker8k_Dataset").glob("*.jpg"))[0]
    victim.write_bytes(b"not a jpeg")
    result = run("validate", "flickr8k", "--report-dir", str(tmp_path))
    assert result.exit_code == 1
    assert f"image does not decode: {victim.name}" in result.stderr


def test_unknown_dataset_exits_2():
    for command in (["validate", "nope"], ["acquire", "nope"]):
        result = run(*command)
        assert result.exit_code == 2
        assert "unknown dataset 'nope'" in result.stderr


def test_acquire_from_a_mirror_then_list(tmp_path):
    mirror = tmp_path / "mirror"
    make_flickr8k(mirror / "flickr8k", n_per_split=(2, 1, 1), layout="mirror")
    before = json.loads(run("list", "--json").stdout)
    assert {row["name"]: row["acquired"] for row in before}["flickr8k"] is False

    result = run("acquire", "flickr8k", "--mirror", str(mirror), "--no-progress")
    assert result.exit_code == 0, result.output
    assert (data_dir() / "flickr8k" / "Flickr8k.token.txt").is_file()

    rows = json.loads(run("list", "--json").stdout)
    row = next(row for row in rows if row["name"] == "flickr8k")
    assert row == {
        "name": "flickr8k",
        "splits": ["train", "val", "test"],
        "acquired": True,
        "path": str(data_dir() / "flickr8k"),
    }
    assert "flickr8k" in run("list").stdout


def test_acquire_failure_exits_1(tmp_path):
    # An empty mirror folder for the dataset: copied, but not the official layout.
    (tmp_path / "mirror" / "flickr8k").mkdir(parents=True)
    (tmp_path / "mirror" / "flickr8k" / "junk.txt").write_text("nothing useful")
    result = run("acquire", "flickr8k", "--mirror", str(tmp_path / "mirror"), "--no-progress")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and "Flickr8k.token.txt" in result.stderr


def test_acquire_synthetic_generates_it(monkeypatch):
    result = run("acquire", "synthetic")
    assert result.exit_code == 0, result.output
    assert (data_dir() / "synthetic" / "synthetic.json").is_file()
    rows = json.loads(run("list", "--json").stdout)
    assert next(r for r in rows if r["name"] == "synthetic")["acquired"] is True
