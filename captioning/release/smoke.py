"""The smoke stage of a rollout: a candidate's own container captions a fixed set of real photos
before it gets any traffic, and its answers are judged against what its package wrote.

    records = smoke_set(settings, 16)                  # validation photos with their references
    write_smoke_set(records, "smoke")                  # smoke/images/*, smoke/references.json
    recorded = record_package_captions(package, "smoke", out="smoke.json")   # at registration
    served = caption_over_http("http://127.0.0.1:3000", "smoke")            # the candidate's answers
    verdict = judge_smoke(served, recorded, stable_score=52.0, margin=0.5,
                          tolerance=0.1, max_repeats=3, max_latency=5.0)
    verdict.passed, verdict.reason

Two checks carry the stage. The served captions must be the package's own (an image that
serves something other than what was scored fails here), and their score must not fall
below the stable version's by more than the registry gate's margin (a version promoted
around the gates fails there). Errors, empty or degenerate captions and slow answers fail
it too. The first failed check is the verdict's reason; every figure measured is in its
details.

`served` maps each image id of the set to what the candidate answered:
{"caption": text or None, "error": text or None, "latency_seconds": float, "model_version": text or None}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from captioning.data.datasets import load_dataset
from captioning.data.query import as_queries, format_query, select
from captioning.release.analysis import FAILED, PASSED, Verdict

STAGE = "smoke"
REFERENCES_FILE = "references.json"
IMAGES_DIR = "images"
SMOKE_DIR = "smoke"  # in a registered package: the photos, their references and the package's captions
RECORD_FILE = "smoke.json"  # the package's captions of the set, logged with the registered version
METRIC = "CIDEr"  # the score the stage compares (the registry gates' main metric)
SCORES = ("CIDEr", "BLEU-4")


@dataclasses.dataclass(frozen=True)
class SmokeImage:
    """One photo of the smoke set: its id in its dataset, its file and its human captions."""

    image_id: str
    path: str
    references: tuple[str, ...]


# --------------------------------------------------------------------------- the set


def smoke_set(settings, size: int, seed: int = 0, query: str | None = None) -> list[SmokeImage]:
    """`size` photos of the validation split `query` (default `settings.data.val_query`), the
    same every time; every photo of the split when it holds fewer. The synthetic dataset is
    generated (`settings.synthetic`) when it is not on disk, as `captioning data acquire` would.

    A single unsampled query gets the query language's sample, `<query>-<size>s<seed>`; a
    selection that is already sampled or joins several queries is sampled by the same rule
    (records in selection order, `random.Random(seed).sample`).
    """
    import random

    if size < 1:
        raise ValueError(f"a smoke set needs at least one photo, not {size}")
    queries = as_queries(query or settings.data.val_query)

    def loader(name: str):
        return load_dataset(name, synthetic=settings.synthetic if name == "synthetic" else None)

    records = select(queries, loader)
    if size < len(records):
        if len(queries) == 1 and queries[0].size is None:
            records = select(format_query(dataclasses.replace(queries[0], size=size, seed=seed)), loader)
        else:
            chosen = sorted(random.Random(seed).sample(range(len(records)), size))
            records = [records[index] for index in chosen]
    return [SmokeImage(record.image_id, record.path, tuple(record.captions)) for record in records]


def write_smoke_set(records: list[SmokeImage], folder: str | Path) -> Path:
    """The set as a folder to ship in an image or mount: images/<file> and references.json.

    Anything the folder held before is replaced. Returns the folder.
    """
    folder = Path(folder)
    names = [Path(record.path).name for record in records]
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise ValueError(f"two photos of the smoke set share the file name {repeated[0]!r}")
    if (folder / IMAGES_DIR).exists():
        shutil.rmtree(folder / IMAGES_DIR)
    (folder / IMAGES_DIR).mkdir(parents=True)
    entries = []
    for record, name in zip(records, names):
        shutil.copyfile(record.path, folder / IMAGES_DIR / name)
        entries.append({"image_id": record.image_id, "file": name, "references": list(record.references)})
    (folder / REFERENCES_FILE).write_text(json.dumps({"images": entries}, indent=1) + "\n", encoding="utf-8")
    return folder


def read_smoke_set(folder: str | Path) -> list[SmokeImage]:
    """The set `write_smoke_set` wrote, in its order, with the photos' paths inside `folder`."""
    folder = Path(folder)
    path = folder / REFERENCES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no smoke set here (no {REFERENCES_FILE})")
    entries = json.loads(path.read_text(encoding="utf-8"))["images"]
    records = [
        SmokeImage(entry["image_id"], str(folder / IMAGES_DIR / entry["file"]), tuple(entry["references"]))
        for entry in entries
    ]
    missing = [record.path for record in records if not Path(record.path).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} photos of the smoke set are missing (e.g. {missing[0]})")
    return records


def set_digest(records: list[SmokeImage]) -> str:
    """SHA-256 of the set's ids, photo bytes and references: two records of the same set agree on it."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps([record.image_id, list(record.references)]).encode())
        digest.update(hashlib.sha256(Path(record.path).read_bytes()).digest())
    return digest.hexdigest()


def references_of(records: list[SmokeImage]) -> dict[str, list[str]]:
    return {record.image_id: list(record.references) for record in records}


# --------------------------------------------------------------------------- the package's own captions


def score_captions(captions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """CIDEr and BLEU-4 (percent) of captions against references, as the evaluation scores them.

    An empty caption scores 0 rather than being refused: a broken model's output is still scored.
    """
    from captioning.evaluation.scoring import score_quick

    metrics = score_quick(captions, references, allow_empty=True)
    return {name: round(metrics[name], 4) for name in SCORES}


def record_package_captions(
    package_dir: str | Path, smoke_folder: str | Path, out: str | Path | None = None, device: str | None = None
) -> dict[str, Any]:
    """The package's own captions of the smoke set, with their scores (what the container must serve).

    Each photo is captioned alone from its file's bytes, with the package's decoding settings,
    as the service's /caption does. `out`: also written there as JSON (`RECORD_FILE`).
    Returns {"set_digest", "images", "decoding", "weights_sha256", "captions", "references",
    "scores"}: captions by image id, scores in percent.
    """
    from captioning.inference.predict import Captioner

    records = read_smoke_set(smoke_folder)
    captioner = Captioner.load(package_dir, device=device)
    captions = {
        record.image_id: captioner.caption([Path(record.path).read_bytes()])[0]["caption"] for record in records
    }
    references = references_of(records)
    recorded = {
        "set_digest": set_digest(records),
        "images": len(records),
        "decoding": captioner.decoding.to_dict(),
        "weights_sha256": captioner.config.get("weights_sha256"),
        "captions": captions,
        "references": references,
        "scores": score_captions(captions, references),
    }
    if out is not None:
        Path(out).write_text(json.dumps(recorded, indent=1) + "\n", encoding="utf-8")
    return recorded


class SmokeRecordError(RuntimeError):
    """The smoke photos of a package could not be recorded (the message says why and what to do)."""


def record_smoke(package_dir: str | Path, settings, device: str | None = None) -> dict[str, Any] | None:
    """What registration keeps with a package (None with `release.smoke.enabled` off):
    `release.smoke.photos` validation photos with their references in `package_dir/smoke/`, and
    the package's own captions of them (`smoke.json`), which its rollouts' smoke stage checks."""
    if not settings.release.smoke.enabled:
        return None
    folder = Path(package_dir) / SMOKE_DIR
    query = validation_query(package_dir, settings)
    try:
        write_smoke_set(smoke_set(settings, settings.release.smoke.photos, query=query), folder)
        return record_package_captions(package_dir, folder, out=folder / RECORD_FILE, device=device)
    except (ValueError, KeyError, OSError) as error:
        raise SmokeRecordError(
            f"cannot record the smoke photos of {package_dir} from {query}: {error} "
            "(release.smoke.enabled=false registers without them; its rollouts then have no smoke stage to pass)"
        ) from None


def validation_query(package_dir: str | Path, settings) -> str:
    """The validation split the package was chosen on (its config.json), else the settings' one."""
    from captioning.inference.model_package import CONFIG_FILE

    try:
        config = json.loads((Path(package_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
        query = (config.get("data") or {}).get("val_query")
    except (OSError, ValueError, AttributeError):
        query = None
    return str(query) if query else settings.data.val_query


@contextlib.contextmanager
def registering(package_dir: str | Path, settings) -> Iterator[Path]:
    """The package as registration logs it: its files (hard links where the file system allows)
    and, with `release.smoke.enabled`, the smoke photos and the package's captions of them in
    smoke/, in a folder beside it that is removed afterwards. The package folder itself is left as
    it is: it may be a DVC stage's output, which another stage must not change."""
    package_dir = Path(package_dir)
    if not settings.release.smoke.enabled:
        yield package_dir
        return
    staged = Path(tempfile.mkdtemp(prefix=".registering-", dir=package_dir.parent))
    try:
        for item in package_dir.iterdir():
            if item.is_file():
                try:
                    os.link(item, staged / item.name)
                except OSError:
                    shutil.copy2(item, staged / item.name)
        record_smoke(staged, settings)
        yield staged
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def load_record(path: str | Path) -> dict[str, Any]:
    """A record `record_package_captions` wrote."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def stable_record_score(stable_record: dict[str, Any], recorded: dict[str, Any]) -> float:
    """The stable version's `METRIC` on the candidate's smoke set, from the stable version's own
    record; ValueError when the two records are of different sets (their scores do not compare)."""
    if stable_record.get("set_digest") != recorded.get("set_digest"):
        raise ValueError("the stable version's smoke record is of another photo set: caption this one with it")
    return float(stable_record["scores"][METRIC])


# --------------------------------------------------------------------------- judging the answers

_WORD = re.compile(r"[\w']+")


def degenerate(caption: str | None, max_repeats: int) -> str | None:
    """Why a caption is unusable, or None: empty, or one word said over and over.

    A word repeated more than `max_repeats` times in a row ("left left left left"), or a
    word making up more than half of the caption's words and said more than `max_repeats`
    times ("a dog a dog a dog a dog"), is degenerate; "a dog and a cat" is not.
    """
    words = _WORD.findall((caption or "").lower())
    if not words:
        return "empty caption"
    run_word, run, longest, longest_word = "", 0, 0, ""
    for word in words:
        run = run + 1 if word == run_word else 1
        run_word = word
        if run > longest:
            longest, longest_word = run, word
    if longest > max_repeats:
        return f"{longest_word!r} repeated {longest} times in a row"
    word, count = Counter(words).most_common(1)[0]
    if count > max_repeats and count * 2 > len(words):
        return f"{word!r} is {count} of the caption's {len(words)} words"
    return None


def _failed(check: str, reason: str, figure: float | None, threshold: float | None) -> dict[str, Any]:
    return {"check": check, "reason": reason, "figure": figure, "threshold": threshold}


def _answer_checks(served: dict[str, dict], recorded: dict[str, Any], max_repeats: int, max_latency: float):
    """(failures, details) of the answers themselves: coverage, errors, degenerate captions, latency."""
    expected = set(recorded["captions"])
    missing = sorted(expected - set(served))
    errors = {image: answer["error"] for image, answer in served.items() if answer.get("error")}
    bad = {
        image: why
        for image, answer in served.items()
        if not answer.get("error") and (why := degenerate(answer.get("caption"), max_repeats))
    }
    latencies = [float(answer.get("latency_seconds") or 0.0) for answer in served.values()]
    slowest = max(latencies, default=0.0)
    failures = []
    if missing:
        failures.append(
            _failed(
                "photos asked", f"{len(missing)} photos of the smoke set were not asked (e.g. {missing[0]})", None, None
            )
        )
    if errors:
        image, error = next(iter(errors.items()))
        failures.append(
            _failed("errors", f"{len(errors)} of {len(served)} answers were errors ({image}: {error})", len(errors), 0)
        )
    if bad:
        image, why = next(iter(bad.items()))
        failures.append(_failed("degenerate captions", f"{len(bad)} degenerate captions ({image}: {why})", len(bad), 0))
    if slowest > max_latency:
        failures.append(
            _failed("latency", f"slowest answer took {slowest:.2f}s, above {max_latency:.2f}s", slowest, max_latency)
        )
    details = {
        "answers": len(served),
        "errors": len(errors),
        "degenerate": len(bad),
        "latency_max_seconds": round(slowest, 4),
        "latency_mean_seconds": round(sum(latencies) / len(latencies), 4) if latencies else None,
    }
    return failures, details


def _served_score(captions: dict[str, str], recorded: dict[str, Any], differing: int) -> float:
    """The served captions' score: the recorded one when every caption is the package's own."""
    if differing == 0:
        return float(recorded["scores"][METRIC])
    references = recorded["references"]
    return score_captions({image: captions.get(image) or "" for image in references}, references)[METRIC]


def _caption_checks(served, recorded, stable_score: float | None, margin: float, tolerance: float):
    """(failures, details) of what the captions say: the package's own, and good enough."""
    captions = {image: answer.get("caption") or "" for image, answer in served.items() if not answer.get("error")}
    expected = recorded["captions"]
    differing = sum(1 for image, caption in expected.items() if captions.get(image) != caption)
    share = differing / len(expected)
    score = _served_score(captions, recorded, differing)
    recorded_score = float(recorded["scores"][METRIC])
    drift = abs(score - recorded_score)
    failures = []
    if share > tolerance:
        reason = (
            f"captions differ from the package's on {differing} of {len(expected)} photos (tolerance {tolerance:.0%})"
        )
        failures.append(_failed("captions differ", reason, share, tolerance))
    if drift > tolerance * recorded_score:
        reason = f"{METRIC} {score:.2f} differs from the package's {recorded_score:.2f} by more than {tolerance:.0%}"
        failures.append(_failed("score differs", reason, drift, tolerance * recorded_score))
    floor = None if stable_score is None else float(stable_score) - margin
    if floor is not None and score < floor:
        reason = f"{METRIC} {score:.2f} is below the stable version's {stable_score:.2f} minus the margin {margin:.2f}"
        failures.append(_failed("score below stable", reason, score, floor))
    details = {
        "differing_captions": differing,
        "differing_share": round(share, 4),
        "score": round(score, 4),
        "recorded_score": recorded_score,
        "stable_score": stable_score,
        "score_floor": floor,
    }
    return failures, details, score, floor


def judge_smoke(
    served: dict[str, dict],
    recorded: dict[str, Any],
    stable_score: float | None,
    margin: float,
    tolerance: float,
    max_repeats: int,
    max_latency: float,
) -> Verdict:
    """The smoke stage's verdict on a candidate's answers (`served`, see the module doc).

    recorded: `record_package_captions`' record of the candidate's package. stable_score: the
    stable version's `METRIC` on the same set (None: no stable version, the check is skipped);
    margin: how far below it the candidate may score (the registry gates' margin). tolerance:
    the share of photos whose caption may differ from the recorded one, and the share of the
    recorded score by which the served score may move (0: the container must caption exactly
    as its package did). max_repeats: see `degenerate`. max_latency: seconds, slowest answer.
    """
    answer_failures, answer_details = _answer_checks(served, recorded, max_repeats, max_latency)
    caption_failures, caption_details, score, floor = _caption_checks(served, recorded, stable_score, margin, tolerance)
    details = {**answer_details, **caption_details, "metric": METRIC}
    failures = answer_failures + caption_failures
    if failures:
        first = failures[0]
        reason = f"{STAGE}: {first['reason']}"
        return Verdict(FAILED, STAGE, reason, first["check"], first["figure"], first["threshold"], figures=details)
    reason = f"{STAGE}: {len(served)} photos captioned as the package did, {METRIC} {score:.2f}"
    if floor is not None:
        reason += f" (floor {floor:.2f})"
    return Verdict(PASSED, STAGE, reason, None, score, floor, figures=details)


# --------------------------------------------------------------------------- asking a running service


def caption_over_http(
    url: str, smoke_folder: str | Path, headers: dict[str, str] | None = None, timeout: float = 30.0
) -> dict[str, dict]:
    """Each photo of the set sent to `url`/caption (multipart field `image`), one after the other.

    Returns the `served` mapping (see the module doc). A connection error, a timeout or an
    answer other than 200 is recorded as that image's error, never raised; latency is the
    request's wall time as the client sees it.
    """
    import requests

    served: dict[str, dict] = {}
    with requests.Session() as session:
        for record in read_smoke_set(smoke_folder):
            data = Path(record.path).read_bytes()
            started = time.perf_counter()
            try:
                response = session.post(
                    url.rstrip("/") + "/caption",
                    files={"image": (Path(record.path).name, data, _content_type(record.path))},
                    headers=headers,
                    timeout=timeout,
                )
                answer = _answer(response)
            except requests.RequestException as error:
                answer = {"caption": None, "error": f"{type(error).__name__}: {error}", "model_version": None}
            answer["latency_seconds"] = round(time.perf_counter() - started, 4)
            served[record.image_id] = answer
    return served


def _content_type(path: str) -> str:
    import mimetypes

    return mimetypes.guess_type(path)[0] or "application/octet-stream"


def _answer(response) -> dict[str, Any]:
    """One /caption response as a `served` entry."""
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code != 200:
        message = body.get("error") if isinstance(body, dict) else None
        return {
            "caption": None,
            "error": f"HTTP {response.status_code}: {message or response.text[:200]}",
            "model_version": None,
        }
    if not isinstance(body, dict) or not isinstance(body.get("caption"), str):
        return {"caption": None, "error": "answer without a caption", "model_version": None}
    return {"caption": body["caption"], "error": None, "model_version": body.get("model_version")}
