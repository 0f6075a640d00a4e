"""Bad usage of `captioning train / features / caption` exits 2 with one line, before any work."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from captioning.cli import app


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--set", "train.lrr=1", "--no-tracking"], "train.lrr is not a setting; did you mean train.lr?"),
        (["train", "--set", "nosection.x=1", "--no-tracking"], "nosection is not a setting"),
        (["train", "--set", "train.lr", "--no-tracking"], "section.key=value"),
        (["train", "--data", "synthetic[trian]", "--no-tracking"], "no split 'trian'"),
        (["train", "--data", "nodata[train]", "--no-tracking"], "unknown dataset 'nodata'"),
        (["features", "synthetic[train"], "bad query"),
        (["features", "synthetic[train]", "--encoder", "resnet"], "features.encoder='resnet': Input should be"),
        (["features", "synthetic[train]", "--batch-size", "0"], "features.batch_size=0: Input should be"),
        (["features", "synthetic[train]+"], "expected a query after '+'"),
        (["features", "synthetic[train]+nodata"], "unknown dataset 'nodata'"),
    ],
)
def test_bad_usage_exits_2_with_one_line(args, message, tmp_path):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "artifacts" / "train").exists()  # nothing was started


def test_caption_refuses_missing_inputs(tmp_path):
    image = tmp_path / "a.png"
    missing_image = CliRunner().invoke(app, ["caption", str(image), "--model", str(tmp_path)])
    assert missing_image.exit_code == 2 and "no such image file" in missing_image.stderr
    image.write_bytes(b"\x89PNG")
    not_package = CliRunner().invoke(app, ["caption", str(image), "--model", str(tmp_path)])
    assert not_package.exit_code == 2 and "not a model package" in not_package.stderr
