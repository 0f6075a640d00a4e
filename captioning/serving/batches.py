"""Captioning a batch of jobs on the model service.

Jobs with the same decoding options share one model call; when that call fails, its images are
captioned one by one, so only the image at fault gets an error. A drill's faults
(CAPTIONING_FAULT_DELAY_MS, CAPTIONING_FAULT_FAIL_CAPTIONS: a slow or a broken candidate, to see a
rollout stop it) apply here.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

from captioning.serving.answers import jsonable
from captioning.serving.metrics import count_captions
from captioning.serving.model_source import version_of

logger = logging.getLogger("captioning.service")
FAULT_MESSAGE = "fault injected by a drill (CAPTIONING_FAULT_FAIL_CAPTIONS)"


def caption_jobs(
    captioner, jobs: Sequence[Any], metrics, delay_ms: int = 0, fail: bool = False, on_features=None
) -> list[dict]:
    """One result per job (caption, alternatives, attention when asked, or an error), in order.
    `on_features`: called with the encoder features of the images captioned (the drift monitor's
    `add`), once per image that got a caption."""
    if delay_ms:
        time.sleep(delay_ms / 1000)
    results: list[dict | None] = [None] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault((job.beam_size, job.max_length, job.return_attention), []).append(index)
    for (beam_size, max_length, return_attention), indices in groups.items():
        decoding = captioner.settings_for(beam_size=beam_size, max_length=max_length)
        options = dict(decoding=decoding, return_attention=return_attention, on_features=on_features)
        started = time.perf_counter()
        if fail:
            outputs = [{"error": FAULT_MESSAGE} for _ in indices]
        else:
            outputs = _caption_group(captioner, [jobs[i].image for i in indices], options)
        metrics.inference.observe(time.perf_counter() - started)
        metrics.batch_size.observe(len(indices))
        for i, output in zip(indices, outputs):
            results[i] = jsonable({**output, "model_version": version_of(captioner)})
    count_captions(metrics.captions, results)
    return results


def _caption_group(captioner, images: list[bytes], options: dict) -> list[dict]:
    try:
        return captioner.caption(images, **options)
    except Exception:
        # Other users' images share this batch: caption one by one so only the culprit fails.
        logger.exception("batch of %d failed; captioning its images one by one", len(images))
        return [_caption_one(captioner, image, options) for image in images]


def _caption_one(captioner, image: bytes, options: dict) -> dict:
    try:
        return captioner.caption([image], **options)[0]
    except Exception as error:
        logger.exception("captioning one image failed")
        return {"error": f"{type(error).__name__}: {error}"}
