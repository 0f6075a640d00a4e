"""Captioning images with a trained package: the one prediction path of the CLI, the
evaluation and the service.

A `Captioner` is loaded from a package folder; which folder a registry URI names is the
registry's business (`captioning.registry.locate.locate`). The package's decoding settings are checked
once, as a `DecodingSettings`, and so is each call's override of them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from captioning.images import DECODE_SIDE, ImageError, ImageSource, open_image, preprocess, views
from captioning.settings import DECODING_OFF, DecodingSettings

log = logging.getLogger(__name__)

# Images encoded per forward pass: bounds memory for long request lists.
CHUNK = 16
# Images decoded together from features: beam search amortises its per-step work over the batch.
DECODE_CHUNK = 64
# A config written by hand may give no beam settings: these, as before there were settings.
BEAM_DEFAULTS = {"beam_size": 3, "max_length": 20}


def package_decoding(config: dict[str, Any]) -> DecodingSettings:
    """The decoding settings a package's config records, checked (SettingsError, a ValueError)."""
    return DecodingSettings.model_validate({**BEAM_DEFAULTS, **DECODING_OFF, **(config.get("decoding") or {})})


class Captioner:
    """A trained decoder plus its image encoder, ready to caption.

    `version` is the registry version the package came from, or "local"; `decoding` its
    checked `DecodingSettings`.
    `encoder_weights`: the package's fine-tuned encoder file (None: the pretrained encoder);
    `feature_key` names the encoder whose features this decoder must be given.
    `frequencies`: the package's training n-gram frequencies (NgramFrequencies), needed when
    the beam is reranked by consensus (`decoding.rerank`); `memory`: its training images'
    CaptionMemory, whose captions of the `decoding.rerank_neighbours` images nearest to each
    image join the beam as evidence (weight `decoding.rerank_neighbour_weight`).
    `flip` (`decoding.flip`): each image is also read mirrored left to right, and the word
    probabilities are averaged over both views; features then hold the image's positions
    followed by the mirror's (B, 2N, C).
    """

    def __init__(
        self,
        model,
        vocab,
        config: dict[str, Any],
        encoder=None,
        device=None,
        version: str = "local",
        source: str = "",
        encoder_weights: str | Path | None = None,
        frequencies=None,
        memory=None,
    ):
        from captioning.config import decoding_precision, get_device
        from captioning.inference.model_package import feature_key

        self.device = torch.device(device) if device is not None else get_device()
        self.model = model.to(self.device).eval()
        self.vocab = vocab
        self.config = config
        self.encoder_name = config["encoder"]
        self.encoder_weights = Path(encoder_weights) if encoder_weights is not None else None
        self.feature_key = feature_key(config)
        self._encoder = encoder.to(self.device).eval() if encoder is not None else None
        self.version = version
        self.source = source
        self.decoding = package_decoding(config)
        self.precision = decoding_precision(self.device, self.decoding.precision)
        if self.precision != self.decoding.precision:
            log.info(
                "decoding.precision %s does not run on %s: decoding in float32", self.decoding.precision, self.device
            )
        if self.precision == "int8":
            from captioning.models import quantize_int8

            self.model = quantize_int8(self.model)
        elif self.precision == "bfloat16":
            from captioning.models import bfloat16_products

            self.model = bfloat16_products(self.model)
        self.frequencies = frequencies
        self.memory = memory
        if frequencies is not None and memory is not None and self.decoding.rerank == "consensus":
            frequencies.pin([caption for captions in memory.captions for caption in captions])
        self._flipped = None

    @classmethod
    def load(
        cls,
        folder: str | Path,
        device=None,
        with_encoder: bool = True,
        version: str | None = None,
        source: str | None = None,
    ) -> "Captioner":
        """From a package folder; `version`: the registry version it is (None: "local"),
        `source`: what it was loaded from (default: the folder)."""
        from captioning.inference.model_package import (
            PackageError,
            encoder_weights,
            load_frequencies,
            load_memory,
            load_package,
        )

        if "://" in str(folder) or str(folder).startswith(("models:", "runs:")):
            raise PackageError(
                f"{folder}: Captioner.load takes a package folder; a registry URI is loaded with "
                "captioning.registry.locate.load_captioner"
            )
        folder = Path(folder)
        model, vocab, config = load_package(folder)
        weights = encoder_weights(folder, config)
        encoder = _build_encoder(config["encoder"], weights) if with_encoder else None
        return cls(
            model,
            vocab,
            config,
            encoder,
            device,
            version or "local",
            source or str(folder),
            encoder_weights=weights,
            frequencies=load_frequencies(folder, config),
            memory=load_memory(folder, config),
        )

    @property
    def encoder(self):
        """The image encoder, built on first use (captioning cached features does not need it)."""
        if self._encoder is None:
            if self.config.get("encoder_weights") and self.encoder_weights is None:
                from captioning.inference.model_package import PackageError

                raise PackageError(
                    "this model was trained with a fine-tuned encoder: load it with "
                    "Captioner.load(package) so its encoder.pt is used"
                )
            self._encoder = _build_encoder(self.encoder_name, self.encoder_weights).to(self.device)
        return self._encoder

    @property
    def image_size(self) -> int:
        from captioning.features.encoder import ENCODERS

        return ENCODERS[self.encoder_name].image_size

    def encode(self, images: Sequence[ImageSource], flip: bool | None = None) -> torch.Tensor:
        """Spatial features (B, N, C) of images (bytes, paths or PIL images); with `flip`
        (default: the package's), those of each image and of its mirror side by side (B, 2N, C)."""
        flip = self.settings_for(flip=flip).flip
        outputs = []
        with torch.inference_mode():
            # Decode one chunk at a time, each image no larger than DECODE_SIDE: a batch of
            # 40 MP uploads never exists at full size in memory.
            for start in range(0, len(images), CHUNK):
                pil = [
                    _decode(item, number, len(images))
                    for number, item in enumerate(images[start : start + CHUNK], start)
                ]
                outputs.append(
                    torch.cat(
                        [self.encoder(preprocess(view, self.image_size).to(self.device)) for view in views(pil, flip)],
                        dim=1,
                    )
                )
        if not outputs:
            return torch.empty(0, 0, 0)
        return torch.cat(outputs)

    def settings_for(self, **overrides: Any) -> DecodingSettings:
        """The package's decoding settings with the `overrides` that are not None, checked."""
        return self.decoding.replace(**{key: value for key, value in overrides.items() if value is not None})

    def decoder(self, flip: bool):
        """The model that decodes features of one view, or of the image and its mirror (`flip`)."""
        if not flip:
            return self.model
        if self._flipped is None:
            from captioning.models.ensemble import with_flip

            self._flipped = with_flip(self.model)
        return self._flipped

    def caption(
        self,
        images: Sequence[ImageSource],
        decoding: DecodingSettings | None = None,
        return_attention: bool = False,
        on_features: Callable[[torch.Tensor], Any] | None = None,
    ) -> list[dict[str, Any]]:
        """One result per image: caption, alternatives (best first) and optionally attention maps.

        `decoding`: how to decode (None: the package's own settings; `settings_for` makes a
        call's own). An unreadable image raises ImageError naming its position; nothing is
        captioned then. `on_features`: called with the images' encoder features (B, N, C), of
        the images as they are (never their mirrors), once they are captioned.
        """
        images = list(images)
        if not images:
            return []
        decoding = decoding or self.decoding
        features = self.encode(images, decoding.flip)
        results = self.caption_features(features, decoding, return_attention)
        if on_features is not None:
            # After captioning: images of a batch that failed are captioned again one by one,
            # and each must be handed on once.
            on_features(features[:, : features.size(1) // 2] if decoding.flip else features)
        return results

    def caption_features(
        self,
        features: np.ndarray | torch.Tensor,
        decoding: DecodingSettings | None = None,
        return_attention: bool = False,
    ) -> list[dict[str, Any]]:
        """Like `caption`, from encoder features (B, N, C) or (N, C), e.g. from the feature cache.

        `decoding.rerank` "consensus" orders each image's beam by agreement with the rest of it
        (`decoding.rerank_by_consensus`), "none" by score; with `decoding.rerank_neighbours`,
        consensus also weighs agreement with the captions of that many nearest training images.
        With `decoding.flip` the features hold the image's positions and then its mirror's
        (B, 2N, C), as `encode` gives them. `decoding.precision` is the package's, set at load.
        """
        from captioning.inference.decoding import generate

        decoding = decoding or self.decoding
        consensus = self._consensus(decoding)
        model = self.decoder(decoding.flip)
        features = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
        if features.dim() == 2:
            features = features.unsqueeze(0)
        positions = features.size(1) // 2 if decoding.flip else features.size(1)  # attention maps cover one view
        results: list[dict[str, Any]] = []
        with torch.inference_mode():
            for start in range(0, features.size(0), DECODE_CHUNK):
                chunk = features[start : start + DECODE_CHUNK].to(self.device).float()
                hypotheses = generate(model, chunk, decoding, with_attention=return_attention)
                if consensus:
                    # Neighbours are found by the image as it is, never by its mirror.
                    hypotheses = self._reranked(hypotheses, chunk[:, :positions], decoding)
                results.extend(self._result(options, return_attention, positions) for options in hypotheses)
        return results

    def _consensus(self, decoding: DecodingSettings) -> bool:
        """Whether `decoding` reranks by consensus (a beam of 2 or more); PackageError when the
        package lacks what that needs."""
        from captioning.inference.model_package import PackageError

        consensus = decoding.rerank == "consensus" and decoding.beam_size > 1
        if consensus and self.frequencies is None:
            raise PackageError(
                f"reranking by consensus needs the training n-gram frequencies "
                f"(ngrams.json), which the package from {self.source or 'memory'} does not carry"
            )
        if consensus and decoding.rerank_neighbours and self.memory is None:
            raise PackageError(
                f"reranking with the captions of the nearest training images needs the package's "
                f"caption memory (neighbours.npz), which the package from "
                f"{self.source or 'memory'} does not carry: a model trained with "
                f"decoding.rerank_neighbours above 0 packages it"
            )
        return consensus

    def _reranked(self, hypotheses, features: torch.Tensor, decoding: DecodingSettings):
        """Each image's beam ordered by consensus, with its nearest training images' captions
        (found from `features`, one view) as evidence when `decoding.rerank_neighbours` asks."""
        from captioning.inference.decoding import rerank_by_consensus

        neighbours = decoding.rerank_neighbours
        evidence = self.memory.evidence(features, neighbours) if neighbours else [()] * len(hypotheses)
        return [
            rerank_by_consensus(
                options,
                self.frequencies,
                captions,
                decoding.rerank_neighbour_weight,
                decoding.rerank_score_weight,
            )
            for options, captions in zip(hypotheses, evidence)
        ]

    def _result(self, options, return_attention: bool, positions: int) -> dict[str, Any]:
        alternatives, seen = [], set()
        for hypothesis in options:
            text = self.vocab.decode(hypothesis.tokens)
            if text in seen:
                continue
            seen.add(text)
            alternatives.append({"caption": text, "log_prob": float(hypothesis.log_prob)})
        best = options[0]
        result: dict[str, Any] = {"caption": self.vocab.decode(best.tokens), "alternatives": alternatives}
        if return_attention:
            result["attention"] = attention_payload(self.vocab, best, positions)
        return result


def _decode(item: ImageSource, number: int, total: int):
    try:
        return open_image(item, max_side=DECODE_SIDE)
    except ImageError as error:
        raise ImageError(f"image {number + 1} of {total}: {error}") from None


def _build_encoder(name: str, weights: Path | None):
    """The encoder for inference: pretrained, or with a package's fine-tuned weights (strict load)."""
    from captioning.features.encoder import EncoderError, build_encoder
    from captioning.inference.model_package import PackageError

    try:
        encoder = build_encoder(name, weights)
    except EncoderError as error:
        raise PackageError(f"the package's encoder cannot be built: {error}") from None
    return encoder.optimize_for_inference()


def attention_payload(vocab, hypothesis, positions: int) -> dict[str, Any] | None:
    """{"words", "maps" (one list of N weights per word), "grid"} or None for models without attention."""
    if hypothesis.attention is None:
        return None
    words = [vocab.tokens[int(token)] for token in hypothesis.tokens]
    maps = np.asarray(hypothesis.attention, dtype=np.float32)[: len(words)]
    side = int(round(math.sqrt(positions)))
    grid = [side, side] if side * side == positions else [1, positions]
    return {"words": words, "maps": [[round(float(v), 5) for v in row] for row in maps], "grid": grid}


def render_attention(image: ImageSource, attention: dict[str, Any], size: int = 224, columns: int = 5):
    """A PIL image: the picture once plain, then once per word with its attention as a heat overlay."""
    from PIL import Image, ImageDraw

    base = open_image(image, max_side=DECODE_SIDE).resize((size, size), Image.Resampling.BICUBIC)
    tiles = [(base, "")]
    rows_, cols_ = attention["grid"]
    for word, weights in zip(attention["words"], attention["maps"]):
        heat = np.asarray(weights, dtype=np.float32).reshape(rows_, cols_)
        heat = (heat - heat.min()) / max(1e-8, float(heat.max() - heat.min()))
        mask = Image.fromarray((heat * 255).astype(np.uint8), mode="L").resize((size, size), Image.Resampling.BILINEAR)
        colour = Image.merge("RGB", (mask, Image.new("L", (size, size), 40), mask.point(lambda v: 255 - v)))
        tiles.append((Image.blend(base, colour, 0.5), word))
    label = 18
    rows = math.ceil(len(tiles) / columns)
    sheet = Image.new("RGB", (columns * size, rows * (size + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (tile, word) in enumerate(tiles):
        x, y = (n % columns) * size, (n // columns) * (size + label)
        sheet.paste(tile, (x, y + label))
        draw.text((x + 4, y + 3), word, fill="black")
    return sheet
