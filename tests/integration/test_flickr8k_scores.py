"""On the real Flickr8k test split, our scores are pycocoevalcap's own numbers (to 0.01).

Needs the dataset mirror ($CAPTIONING_MIRROR with flickr8k/ inside); skipped otherwise.
The references are read here straight from the official token and split files, so the
check also covers the dataset loader and the query.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from captioning.evaluation.scoring import METRICS, evaluate_predictions, meteor_process, save_predictions, score_details
from tests.fixtures.scoring import direct_scores

MIRROR = os.environ.get("CAPTIONING_MIRROR")
FLICKR = Path(MIRROR) / "flickr8k" if MIRROR else None

pytestmark = [
    pytest.mark.skipif(
        FLICKR is None or not (FLICKR / "Flickr8k.token.txt").is_file(),
        reason="needs the Flickr8k mirror: set CAPTIONING_MIRROR to a folder holding flickr8k/",
    ),
    pytest.mark.slow,  # METEOR on 1000 images, four times (one Java start-up for the module)
]


def official_test_references() -> dict[str, list[str]]:
    names = (FLICKR / "splits" / "Flickr_8k.testImages.txt").read_text().split()
    captions: dict[str, dict[int, str]] = {name: {} for name in names}
    for line in (FLICKR / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
        key, _, caption = line.partition("\t")
        name, _, number = key.rpartition("#")
        if name in captions:
            captions[name][int(number)] = caption
    return {name: [c[n] for n in sorted(c)] for name, c in captions.items()}


@pytest.fixture(scope="module")
def meteor():
    """One METEOR process shared by our scoring and the direct one (its scores are stateless)."""
    with meteor_process() as process:
        yield process


@pytest.fixture(scope="module")
def references():
    refs = official_test_references()
    assert len(refs) == 1000 and all(len(r) == 5 for r in refs.values())
    return refs


def test_evaluate_predictions_reproduces_pycocoevalcap(tmp_path, monkeypatch, meteor, references):
    # The mirror has the official layout: read it in place as the data folder.
    monkeypatch.setenv("CAPTIONING_DATA_DIR", str(FLICKR.parent))
    predictions = {name: refs[0] for name, refs in references.items()}
    path = save_predictions(predictions, tmp_path / "first_caption.json")

    result = evaluate_predictions(path, "flickr8k[test]", meteor=meteor)

    assert result.references == references  # the loader read exactly the official test captions
    expected, _ = direct_scores(predictions, references, meteor)
    for name in METRICS:
        assert result.metrics[name] == pytest.approx(expected[name], abs=0.01), name
    assert len(result.per_image) == 1000


def test_held_out_human_caption_scores_match(meteor, references):
    """One human caption per image against the other four: realistic, non-trivial scores."""
    predictions = {name: refs[0] for name, refs in references.items()}
    others = {name: refs[1:] for name, refs in references.items()}

    ours, _ = score_details(predictions, others, meteor=meteor)
    expected, _ = direct_scores(predictions, others, meteor)
    for name in METRICS:
        assert ours[name] == pytest.approx(expected[name], abs=0.01), name
    # Human agreement on Flickr8k: far from both 0 and 100.
    assert 20 < ours["CIDEr"] < 150 and 5 < ours["BLEU-4"] < 60
