"""The retrain record: what the last training saw, and whether data, feedback or settings changed since."""

from __future__ import annotations

import io
import json

from PIL import Image

from captioning.config import PARAMS_FILE, data_dir
from captioning.data.feedback import FeedbackStore
from captioning.registry.retrain_record import check_for_new_data, read_record, record_training, write_record
from captioning.settings import apply_overrides, load_settings

SETTINGS = load_settings(PARAMS_FILE)
STARTED = "2030-01-01T00:00:00+00:00"  # later than anything stored in a test


def dataset(name: str = "photos", files: int = 2) -> str:
    """A dataset folder in this test's data folder (conftest points $CAPTIONING_DATA_DIR at tmp_path);
    files it has already are left as they are (rewriting one changes the fingerprint)."""
    folder = data_dir() / name
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(files):
        if not (folder / f"{index}.txt").exists():
            (folder / f"{index}.txt").write_text(f"caption {index}\n", encoding="utf-8")
    return name


def trained(check: dict, record_file, started_at: str = STARTED) -> None:
    record_training(check, {"model_version": "1"}, started_at, record_file)


def test_before_any_training_everything_is_new(tmp_path):
    check = check_for_new_data(dataset(), SETTINGS, path=tmp_path / "state.json")
    assert check["new"] and check["reasons"] == ["no model has been trained by this pipeline yet"]
    assert check["last"] is None and check["data"].startswith("files:")


def test_nothing_is_new_after_a_training_on_the_same_data_and_settings(tmp_path):
    record_file = tmp_path / "state.json"
    trained(check_for_new_data(dataset(), SETTINGS, path=record_file), record_file)
    again = check_for_new_data(dataset(), SETTINGS, path=record_file)
    assert not again["new"] and again["reasons"] == [] and again["feedback_rows"] == 0
    assert again["last"]["model_version"] == "1" and again["last"]["trained_at"] == STARTED


def test_changed_data_files_are_new_data(tmp_path):
    record_file = tmp_path / "state.json"
    first = check_for_new_data(dataset(files=2), SETTINGS, path=record_file)
    trained(first, record_file)
    later = check_for_new_data(dataset(files=3), SETTINGS, path=record_file)
    assert later["new"] and later["reasons"] == [f"data changed: {first['data']} -> {later['data']}"]


def test_another_dataset_is_named_as_such(tmp_path):
    record_file = tmp_path / "state.json"
    trained(check_for_new_data(dataset("photos"), SETTINGS, path=record_file), record_file)
    other = check_for_new_data(dataset("drawings"), SETTINGS, path=record_file)
    assert other["reasons"] == ["dataset changed: photos -> drawings"]


def test_training_settings_count_and_neutral_ones_do_not(tmp_path):
    record_file = tmp_path / "state.json"
    trained(check_for_new_data(dataset(), SETTINGS, path=record_file), record_file)
    renamed = apply_overrides(SETTINGS, ["register.model_name=another"])
    assert not check_for_new_data(dataset(), renamed, path=record_file)["new"]
    longer = apply_overrides(SETTINGS, [f"train.epochs={SETTINGS.train.epochs + 1}"])
    reasons = check_for_new_data(dataset(), longer, path=record_file)["reasons"]
    assert len(reasons) == 1 and reasons[0].startswith("training settings changed: ")


def test_feedback_stored_after_the_training_started_is_new(tmp_path):
    record_file = tmp_path / "state.json"
    check = check_for_new_data(dataset(), SETTINGS, path=record_file)
    trained(check, record_file, started_at="2000-01-01T00:00:00+00:00")
    image = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 40, 40)).save(image, format="JPEG")
    store = FeedbackStore()  # the service's store in this test's data folder
    stored = store.add(image.getvalue(), "a red picture")
    assert check_for_new_data(dataset(), SETTINGS, path=record_file)["feedback_rows"] == 0  # not reviewed
    store.approve([stored.id])
    after = check_for_new_data(dataset(), SETTINGS, path=record_file)
    assert after["feedback_rows"] == 1 and after["feedback_total"] == 1
    assert after["reasons"] == ["1 feedback row(s) stored since 2000-01-01T00:00:00+00:00"]
    assert not check_for_new_data(dataset(), SETTINGS, use_feedback=False, path=record_file)["new"]


def test_the_record_is_written_whole_and_an_unreadable_one_counts_as_none(tmp_path):
    record_file = tmp_path / "retrain" / "state.json"
    assert read_record(record_file) is None
    write_record({"dataset": "photos", "data": "files:1"}, record_file)
    assert json.loads(record_file.read_text(encoding="utf-8")) == {"data": "files:1", "dataset": "photos"}
    assert [path.name for path in record_file.parent.iterdir()] == ["state.json"]  # no partial file left
    record_file.write_text("{not json", encoding="utf-8")
    assert read_record(record_file) is None
    assert check_for_new_data(dataset(), SETTINGS, path=record_file)["last"] is None
