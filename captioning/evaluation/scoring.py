"""Caption metrics (pycocoevalcap), model and predictions evaluation, comparison tables.

Scores are reported in percent (0-100) everywhere. Captions are tokenised with
pycocoevalcap's PTB tokenizer, then scored by its BLEU, METEOR, ROUGE-L and CIDEr
scorers called one by one: `COCOEvalCap.evaluate()` would also construct SPICE,
which downloads Stanford CoreNLP and fails offline. SPICE runs only when its
models are already on disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

if TYPE_CHECKING:
    from captioning.inference.predict import Captioner
    from captioning.settings import DecodingSettings

logger = logging.getLogger(__name__)

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
TABLE_COLUMNS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
PER_IMAGE_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
SPICE_MODELS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


class PredictionError(ValueError):
    """A predictions file or mapping that cannot be scored as it is."""


@dataclass
class EvaluationResult:
    """What one evaluation produced.

    metrics: corpus scores in percent. per_image: image id -> {metric: percent}.
    attention: image id -> {"words", "maps", "grid"} for the few images whose maps were kept.
    paths: image id -> image file (for the report). info: what was evaluated and how.
    """

    metrics: dict[str, float]
    predictions: dict[str, str]
    references: dict[str, list[str]]
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)
    attention: dict[str, dict] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, per_image: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = {"metrics": self.metrics, **self.info}
        if per_image:
            result["per_image"] = self.per_image
            result["predictions"] = self.predictions
        return result

    def ranked(self, metric: str = "CIDEr") -> list[str]:
        """Image ids from the best to the worst scored on `metric`."""
        return sorted(self.per_image, key=lambda i: self.per_image[i].get(metric, 0.0), reverse=True)


# --------------------------------------------------------------------------- checks


def check_predictions(predictions: dict[str, str], references: dict[str, list[str]], allow_empty: bool = False) -> None:
    """Refuse predictions that do not cover exactly the reference images, or have empty captions.

    allow_empty: a model's own output may be empty (it then scores 0 on that image); a
    predictions file with empty captions is refused as malformed.
    """
    if not references:
        raise PredictionError("no reference images to score against (the data query selected nothing)")
    if not predictions:
        raise PredictionError("no predictions to score (empty predictions)")
    missing = sorted(set(references) - set(predictions))
    extra = sorted(set(predictions) - set(references))
    problems = []
    if missing:
        problems.append(f"{len(missing)} image ids missing from the predictions (e.g. {_sample(missing)})")
    if extra:
        problems.append(f"{len(extra)} image ids not in the data (e.g. {_sample(extra)})")
    empty = [] if allow_empty else sorted(i for i, c in predictions.items() if not str(c).strip())
    if empty:
        problems.append(f"{len(empty)} empty captions (e.g. {_sample(empty)})")
    no_refs = sorted(i for i, refs in references.items() if not refs)
    if no_refs:
        problems.append(f"{len(no_refs)} images without reference captions (e.g. {_sample(no_refs)})")
    if problems:
        raise PredictionError("; ".join(problems))


def _sample(ids: list[str], count: int = 3) -> str:
    shown = ", ".join(ids[:count])
    return shown + (", ..." if len(ids) > count else "")


def load_predictions(path: str | Path) -> dict[str, str]:
    """Read captions in the COCO results format: a JSON list of {"image_id", "caption"}.

    Image ids are kept as text (Flickr: the file name; COCO: the number as text) so
    they match `Record.image_id`. Duplicates and malformed entries are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise PredictionError(f"{path}: no such predictions file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise PredictionError(f"{path}: the predictions file is empty")
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as error:
        raise PredictionError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(entries, list):
        raise PredictionError(
            f'{path}: expected a JSON list of {{"image_id", "caption"}}, got {type(entries).__name__}'
        )
    if not entries:
        raise PredictionError(f"{path}: the predictions list is empty")
    predictions: dict[str, str] = {}
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image_id" not in entry or "caption" not in entry:
            raise PredictionError(f"{path}: entry {number} is not an object with image_id and caption")
        if not isinstance(entry["caption"], str):
            raise PredictionError(f"{path}: entry {number}: caption is not a string")
        image_id = str(entry["image_id"])
        if image_id in predictions:
            raise PredictionError(f"{path}: image id {image_id} appears more than once")
        predictions[image_id] = entry["caption"]
    return predictions


def save_predictions(predictions: dict[str, str], path: str | Path) -> Path:
    """Write captions in the COCO results format (the inverse of `load_predictions`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [{"image_id": image_id, "caption": caption} for image_id, caption in predictions.items()]
    path.write_text(json.dumps(entries, indent=1, ensure_ascii=False), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- scoring


def spice_available() -> bool:
    """SPICE needs Stanford CoreNLP jars in pycocoevalcap's spice/lib (it cannot download them offline)."""
    import pycocoevalcap

    lib = Path(next(iter(pycocoevalcap.__path__))) / "spice" / "lib"
    return all((lib / name).is_file() for name in SPICE_MODELS)


_spice_notice_given = False


def _spice_notice() -> None:
    global _spice_notice_given
    if not _spice_notice_given:
        logger.warning("SPICE skipped: Stanford CoreNLP models are not in pycocoevalcap/spice/lib")
        _spice_notice_given = True


def tokenize(predictions: dict[str, str], references: dict[str, list[str]]):
    """PTB-tokenise predictions and references in one Java call (as COCOEvalCap does, in two)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = {("res", i): [{"caption": c}] for i, c in predictions.items()}
    captions.update({("gts", i): [{"caption": c} for c in refs] for i, refs in references.items()})
    tokens = PTBTokenizer().tokenize(captions)
    ids = list(references)
    gts = {i: tokens[("gts", i)] for i in ids}
    res = {i: tokens[("res", i)] for i in ids}
    return gts, res


def score_details(
    predictions: dict[str, str], references: dict[str, list[str]], meteor=None, allow_empty: bool = False
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Corpus scores and per-image scores (both in percent) for checked predictions.

    `meteor`: a running pycocoevalcap Meteor to reuse (the caller closes it, see
    `meteor_process`); by default one is started for this evaluation and stopped after.
    """
    check_predictions(predictions, references, allow_empty)
    with contextlib.ExitStack() as stack:
        if meteor is None:
            # Started first: Java loads METEOR's paraphrase table while the others score.
            meteor = stack.enter_context(meteor_process())
        return _score_tokenized(*tokenize(predictions, references), meteor)


def _score_tokenized(gts, res, meteor) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    ids = list(gts)
    metrics: dict[str, float] = {}
    per_image: dict[str, dict[str, float]] = {i: {} for i in ids}

    def keep(name: str, corpus: float, images: Iterable[float]) -> None:
        metrics[name] = 100.0 * float(corpus)
        for image_id, value in zip(ids, images):
            per_image[image_id][name] = 100.0 * float(value)

    bleu, bleu_images = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        keep(f"BLEU-{n + 1}", bleu[n], bleu_images[n] if n == 3 else ())
    keep("ROUGE-L", *_rouge(gts, res))
    keep("CIDEr", *Cider().compute_score(gts, res))
    keep("METEOR", *meteor.compute_score(gts, res))
    if spice_available():
        from pycocoevalcap.spice.spice import Spice

        spice, spice_images = Spice().compute_score(gts, res)
        keep("SPICE", spice, [s["All"]["f"] for s in spice_images])
    else:
        _spice_notice()
    ordered = [m for m in METRICS if m in metrics] + [m for m in metrics if m not in METRICS]
    per_image = {i: {m: v[m] for m in ordered if m in v} for i, v in per_image.items()}
    return {m: metrics[m] for m in ordered}, per_image


def _rouge(gts, res):
    """Rouge().compute_score, except that an empty caption scores 0 instead of dividing by zero.

    (A caption can be empty after tokenisation, e.g. "..." or a model that stops at once.)
    """
    import numpy as np
    from pycocoevalcap.rouge.rouge import Rouge

    rouge = Rouge()
    scores = []
    for image_id in gts:
        refs = [r for r in gts[image_id] if r.split()]
        scores.append(rouge.calc_score(res[image_id], refs) if res[image_id][0].split() and refs else 0.0)
    return np.mean(np.array(scores)), np.array(scores)


@contextlib.contextmanager
def meteor_process() -> Iterator[Any]:
    """A pycocoevalcap Meteor scorer, stopped on exit rather than whenever it is collected.

    METEOR's scores are computed from per-sentence statistics, so one process can score
    several evaluations (a comparison table) with the same results as fresh ones.
    """
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        yield meteor
    finally:
        process = meteor.meteor_p
        if process.poll() is None:
            process.stdin.close()
            process.kill()
            process.wait()


def score(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE when available), in percent."""
    return score_details(predictions, references)[0]


def score_quick(
    predictions: dict[str, str], references: dict[str, list[str]], allow_empty: bool = False
) -> dict[str, float]:
    """BLEU-1..4 and CIDEr in percent, as `score` computes them, without starting METEOR's JVM:
    for checks that need only these, such as a release's smoke test."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    check_predictions(predictions, references, allow_empty)
    gts, res = tokenize(predictions, references)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    metrics = {f"BLEU-{n + 1}": 100.0 * float(bleu[n]) for n in range(4)}
    metrics["CIDEr"] = 100.0 * float(Cider().compute_score(gts, res)[0])
    return metrics


def references_of(records) -> dict[str, list[str]]:
    return {r.image_id: list(r.captions) for r in records}


def _select(query):
    from captioning.data.query import select

    records = select(query)
    if not records:
        raise PredictionError(f"the data query {query!r} selected no images")
    return records


def evaluate_predictions(path: str | Path, query, meteor=None) -> EvaluationResult:
    """Score a COCO-results predictions file against the references of a data query."""
    started = time.perf_counter()
    predictions = load_predictions(path)
    records = _select(query)
    references = references_of(records)
    check_predictions(predictions, references)
    metrics, per_image = score_details(predictions, references, meteor)
    info = {
        "predictions_file": str(path),
        "data": str(query),
        "images": len(references),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return EvaluationResult(
        metrics, predictions, references, per_image, paths={r.image_id: r.path for r in records}, info=info
    )


# --------------------------------------------------------------------------- models


def _feature_store(
    records,
    query,
    encoder: str,
    batch_size: int,
    feature_dir: str | Path | None,
    weights: str | Path | None = None,
    key: str | None = None,
    flip: bool = False,
):
    """The cached features of the query's images (encoding only those not yet stored).

    Stores live in <feature_dir>/<key>/<dataset> (entry points pass params features.dir);
    without one, artifacts_dir()/features (where training caches them too). The key
    is the encoder name, or `<encoder>-<fingerprint>` for a package's fine-tuned `weights`,
    so a fine-tuned decoder is never given the pretrained encoder's features; `flip`: the
    mirrored images' features, under `<key>-flip`.
    """
    from captioning.data.query import parse_query
    from captioning.features.store import build_features, default_store_dir

    key = (key or encoder) + ("-flip" if flip else "")
    dataset = parse_query(query).dataset if isinstance(query, str) else query.dataset
    store_dir = Path(feature_dir) / key / dataset if feature_dir else default_store_dir(key, dataset)
    return build_features(records, encoder, store_dir, batch_size, progress=False, weights=weights, flip=flip)


def caption_records(
    captioner,
    store,
    records,
    decoding: DecodingSettings,
    batch_size: int,
    return_attention: bool = False,
    flipped=None,
) -> list[dict]:
    """Caption records from cached features, batch by batch, as `decoding` says.

    `flipped`: the store of the mirrored images' features, given when `decoding.flip` reads
    each image both ways.
    """
    import numpy as np
    import torch

    outputs: list[dict] = []
    for start in range(0, len(records), batch_size):
        ids = [r.image_id for r in records[start : start + batch_size]]
        views = [store] if flipped is None else [store, flipped]
        features = torch.from_numpy(np.concatenate([view.get(ids) for view in views], axis=1).astype("float32"))
        outputs.extend(captioner.caption_features(features, decoding, return_attention=return_attention))
    return outputs


def evaluate_model(
    model,
    query,
    decoding: DecodingSettings | None = None,
    batch_size: int = 64,
    attention_images: int = 4,
    encoder: str | None = None,
    meteor=None,
    feature_dir: str | Path | None = None,
    tracking: str | None = None,
) -> EvaluationResult:
    """Caption a data query with a model and score it.

    `model`: a package folder or models:/ URI, or a `Captioner` already loaded from one
    (`load_captioner(uri, with_encoder=False)` is enough: features come from the cache).
    `decoding`: how to decode (None: the package's own settings; `Captioner.settings_for`
    makes others from it). `feature_dir`: params features.dir (None: artifacts_dir()/features);
    `tracking`: the registry a models:/ URI is read from (None: $MLFLOW_TRACKING_URI).

    Features come from the feature cache (computed once per image and encoder; a package
    with a fine-tuned encoder gets a store of its own encoder's features).
    Attention maps are kept for the best and worst captioned images (when the decoder has attention).
    `meteor`: a running Meteor to reuse (see `score_details`); otherwise one is started
    before decoding so its start-up overlaps with the captioning.
    """
    with contextlib.ExitStack() as stack:
        if meteor is None:
            meteor = stack.enter_context(meteor_process())
        started = time.perf_counter()
        records = _select(query)
        captioner = _captioner(model, tracking)
        decoding = decoding or captioner.decoding
        key, store, flipped = _stores(captioner, records, query, encoder, batch_size, feature_dir, decoding.flip)
        feature_seconds = time.perf_counter() - started
        outputs = caption_records(captioner, store, records, decoding, batch_size, flipped=flipped)
        caption_seconds = time.perf_counter() - started - feature_seconds
        predictions = {r.image_id: out["caption"] for r, out in zip(records, outputs)}
        references = references_of(records)
        metrics, per_image = score_details(predictions, references, meteor, allow_empty=True)
        paths = {r.image_id: r.path for r in records}
        result = EvaluationResult(metrics, predictions, references, per_image, paths=paths)
        result.attention = _attention_for(result, captioner, (store, flipped), records, decoding, attention_images)
        result.info = {
            "model": str(model) if isinstance(model, (str, Path)) else captioner.source,
            "model_version": str(getattr(captioner, "version", "")),
            "data": str(query),
            "images": len(records),
            **decoding_info(decoding),
            "encoder": key,
            "seconds": round(time.perf_counter() - started, 2),
            "feature_seconds": round(feature_seconds, 2),
            "caption_seconds": round(caption_seconds, 2),
        }
        return result


def _captioner(model, tracking: str | None):
    """`model` when it is a loaded Captioner, else the Captioner of the folder or URI it names."""
    if not isinstance(model, (str, Path)):
        return model
    from captioning.registry.locate import load_captioner

    return load_captioner(model, tracking, with_encoder=False)  # features come from the cache


def decoding_info(decoding: DecodingSettings) -> dict[str, Any]:
    """The decoding settings an evaluation reports: those that shaped its captions (a setting
    of a consensus rerank is reported as off when nothing is reranked)."""
    consensus = decoding.rerank == "consensus" and decoding.beam_size > 1
    neighbours = decoding.rerank_neighbours if consensus else 0
    return {
        "beam_size": decoding.beam_size,
        "max_length": decoding.max_length,
        "length_penalty": decoding.length_penalty,
        "early_stop": decoding.early_stop,
        "rerank": decoding.rerank,
        "flip": decoding.flip,
        "rerank_neighbours": neighbours,
        "rerank_neighbour_weight": decoding.rerank_neighbour_weight if neighbours else 0.0,
        "rerank_score_weight": decoding.rerank_score_weight if consensus else 0.0,
    }


def _stores(captioner, records, query, encoder, batch_size, feature_dir, flip: bool):
    """The key of the features the captioner reads (the encoder, and its weights when fine-tuned)
    and their stores: the images', and their mirrors' when `flip` (else None)."""
    if captioner.encoder_weights is not None and encoder not in (None, captioner.encoder_name):
        raise PredictionError(
            f"{captioner.source} carries its own fine-tuned {captioner.encoder_name} encoder; "
            f"it cannot be evaluated on {encoder} features"
        )
    encoder = encoder or captioner.encoder_name
    key = captioner.feature_key if encoder == captioner.encoder_name else encoder
    weights = captioner.encoder_weights
    store = _feature_store(records, query, encoder, batch_size, feature_dir, weights, key)
    flipped = (
        _feature_store(records, query, encoder, batch_size, feature_dir, weights, key, flip=True) if flip else None
    )
    return key, store, flipped


def _attention_for(result, captioner, stores, records, decoding, count: int) -> dict[str, dict]:
    """Attention maps of the best and worst images (re-decoded: cheap for a handful)."""
    if count <= 0:
        return {}
    ranked = result.ranked()
    chosen = list(dict.fromkeys(ranked[: (count + 1) // 2] + ranked[::-1][: count // 2]))
    by_id = {r.image_id: r for r in records}
    store, flipped = stores
    outputs = caption_records(
        captioner,
        store,
        [by_id[i] for i in chosen],
        decoding,
        batch_size=len(chosen),
        return_attention=True,
        flipped=flipped,
    )
    return {i: out["attention"] for i, out in zip(chosen, outputs) if out.get("attention")}


# --------------------------------------------------------------------------- comparison


# Published results on the Flickr8k test split (1000 images, 5 references), percent, to set
# beside measured rows (`captioning compare --published flickr8k`). Missing cells were not reported.
PUBLISHED = {
    "flickr8k": [
        {"model": "published: Show and Tell (Vinyals et al. 2015)", "decoding": "", "BLEU-1": 63.0},
        {
            "model": "published: Show, Attend and Tell, soft (Xu et al. 2015)",
            "decoding": "",
            "BLEU-1": 67.0,
            "BLEU-4": 19.5,
            "METEOR": 18.93,
        },
        {
            "model": "published: Show, Attend and Tell, hard (Xu et al. 2015)",
            "decoding": "",
            "BLEU-1": 67.0,
            "BLEU-4": 21.3,
            "METEOR": 20.30,
        },
        {
            "model": "reimplementation: spatial attention, ResNet-152 fine-tuned",
            "decoding": "beam 5",
            "BLEU-1": 66.9,
            "BLEU-4": 23.2,
            "METEOR": 20.9,
            "ROUGE-L": 48.3,
            "CIDEr": 56.5,
        },
        {
            "model": "reimplementation: adaptive attention, ResNet-152 fine-tuned",
            "decoding": "beam 5",
            "BLEU-1": 65.9,
            "BLEU-4": 23.5,
            "METEOR": 20.7,
            "ROUGE-L": 47.6,
            "CIDEr": 58.9,
        },
    ],
}


def row_key(row: dict) -> str:
    return f"{row['model']} {row['decoding']}".strip()


def comparison_table(rows: list[dict]) -> tuple[str, dict]:
    """Markdown table and JSON object (model+decoding -> {metric: value}) for `dvc metrics show`."""
    header = "| Model | Decoding | " + " | ".join(TABLE_COLUMNS) + " |"
    rule = "|---|---|" + "---:|" * len(TABLE_COLUMNS)
    lines = [header, rule]
    table: dict[str, dict[str, float]] = {}
    for row in rows:
        values = [row.get(name) for name in TABLE_COLUMNS]
        cells = ["" if v is None else f"{v:.2f}" for v in values]
        lines.append(f"| {row['model']} | {row['decoding']} | " + " | ".join(cells) + " |")
        table[row_key(row)] = {name: round(float(v), 4) for name, v in zip(TABLE_COLUMNS, values) if v is not None}
    return "\n".join(lines) + "\n", table


def decoding_name(decoding: DecodingSettings) -> str:
    """A table's name for decoding settings, e.g. "beam 10, length penalty 0.7, consensus, flip"
    or "beam 10, consensus with 20 neighbours and 0.7 of the beam score, heuristic stop"."""
    if decoding.beam_size <= 1:
        parts = ["greedy"]
    else:
        parts = [f"beam {decoding.beam_size}"]
        if decoding.length_penalty:
            parts.append(f"length penalty {decoding.length_penalty:g}")
        if decoding.rerank != "none":
            neighbours, score_weight = decoding.rerank_neighbours, decoding.rerank_score_weight
            name = f"{decoding.rerank} with {neighbours} neighbours" if neighbours else decoding.rerank
            parts.append(f"{name} and {score_weight:g} of the beam score" if score_weight else name)
        if decoding.early_stop != "exact":
            parts.append(f"{decoding.early_stop} stop")
    if decoding.flip:
        parts.append("flip")
    return ", ".join(parts)


def decoding_setting(info: dict) -> str:
    """`decoding_name` of an evaluation's settings (`EvaluationResult.info`, or its `to_dict()`);
    a setting the info does not give (an older evaluation's) is taken as off."""
    from captioning.settings import DECODING_OFF, DecodingSettings

    given = {key: info[key] for key in DecodingSettings.model_fields if key in info}
    return decoding_name(DecodingSettings.model_validate({**DECODING_OFF, "beam_size": 1, "max_length": 1, **given}))


def write_comparison(rows: list[dict], out_dir: str | Path, stem: str = "comparison") -> tuple[Path, Path]:
    """Write `<stem>.md` and `<stem>.json` into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown, table = comparison_table(rows)
    md_path, json_path = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    md_path.write_text(markdown, encoding="utf-8")
    json_path.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    return md_path, json_path


def compare_models(
    models: dict[str, tuple[str | Captioner, Iterable[DecodingSettings]]],
    query,
    batch_size: int = 64,
    feature_dir: str | Path | None = None,
    tracking: str | None = None,
) -> list[dict]:
    """One comparison row per model and decoding setting: `models` maps a row's model name to
    the model (as `evaluate_model` takes it) and the settings to decode it with."""
    rows = []
    with meteor_process() as meteor:  # one METEOR start-up for the whole table
        for name, (model, decodings) in models.items():
            for decoding in decodings:
                result = evaluate_model(
                    model,
                    query,
                    decoding,
                    batch_size=batch_size,
                    attention_images=0,
                    meteor=meteor,
                    feature_dir=feature_dir,
                    tracking=tracking,
                )
                rows.append({"model": name, "decoding": decoding_setting(result.info), **result.metrics})
    return rows
