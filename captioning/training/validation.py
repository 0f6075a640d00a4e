"""Scoring a model on the validation images after an epoch: captions (greedy or beam search),
CIDEr-D and BLEU-4 against the references, and the plain validation loss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from captioning.settings import DecodingSettings
from captioning.training.data import CaptionData


def quick_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """CIDEr-D and BLEU-4 in percent with the vocabulary's tokenizer (no Java start-up)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    from captioning.vocab import tokenize

    gts = {key: [" ".join(tokenize(ref)) for ref in references[key]] for key in predictions}
    res = {key: [" ".join(tokenize(caption))] for key, caption in predictions.items()}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"CIDEr": 100.0 * float(cider), "BLEU-4": 100.0 * float(bleu[3])}


def caption_batch(model, vocab, features: torch.Tensor, decoding: DecodingSettings) -> list[str]:
    """Best caption per image (the highest beam score) as `decoding` says: greedy when its beam
    size is 1, else beam search."""
    from captioning.inference.decoding import generate

    hypotheses = generate(model, features, decoding)
    return [vocab.decode(list(map(int, options[0].tokens))) for options in hypotheses]


@torch.inference_mode()
def validate(
    model, vocab, data: CaptionData, references: dict[str, list[str]], decoding: DecodingSettings, device
) -> dict[str, Any]:
    """Captions of the validation images scored against their references, plus the plain val loss."""
    model.eval()
    predictions: dict[str, str] = {}
    ids = data.image_ids
    for start in range(0, len(ids), 64):
        chunk = list(range(start, min(start + 64, len(ids))))
        features = data.image_features(chunk, device)
        captions = caption_batch(model, vocab, features, decoding)
        predictions.update(zip(ids[start : start + len(chunk)], captions))
    scores = quick_scores(predictions, {key: references[key] for key in predictions})
    return {
        "val_CIDEr": scores["CIDEr"],
        "val_BLEU-4": scores["BLEU-4"],
        "val_loss": validation_loss(model, data, device),
        "samples": dict(list(predictions.items())[:5]),
    }


def validation_loss(model, data: CaptionData, device) -> float:
    """Mean cross-entropy per caption token of every validation pair (no label smoothing)."""
    total, count = 0.0, 0
    for start in range(0, len(data), 256):
        feats, tokens = data.batch(range(start, min(start + 256, len(data))), device)
        logits, _ = model(feats, tokens[:, :-1])
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1), ignore_index=0, reduction="sum"
        )
        total += float(loss)
        count += int((tokens[:, 1:] != 0).sum())
    return total / max(1, count)
