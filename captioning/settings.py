"""The pipeline's settings as one typed model, built by `load_settings` from params.yaml.

params.yaml holds every default, once: the models below declare names, types and allowed
ranges, not values, so code and file cannot disagree. `load_settings` lays an optional partial
YAML file (`--params FILE`) and `section.key=value` items (`--set`) over params.yaml, in that
order, and refuses unknown keys and bad values with one line (`SettingsError`) before any work
starts. The CLI, the flows, the DVC stages (through the CLI) and the service all call it; the
rest of the library takes a `Settings` (or one of its sections) as an argument.
"""

from __future__ import annotations

import copy
import difflib
import re
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENCODERS = ("lite0", "lite2", "lite2_260", "lite2_320")
DECODERS = ("show_tell", "attention", "transformer", "updown")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
RERANKS = ("none", "consensus")
DECODE_PRECISIONS = ("float32", "bfloat16", "int8")
EARLY_STOPS = ("exact", "heuristic")

NonNegInt = Field(ge=0)


class SettingsError(ValueError):
    """A setting that does not exist or a value it cannot take; the message is one line."""


class Section(BaseModel):
    # Unknown keys are refused (a typo must not fall back silently); no value is coerced from
    # a string it does not spell (pydantic's lax mode still reads 3 as 3.0).
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True, allow_inf_nan=False)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="python")

    @classmethod
    def model_validate(cls, data: Any, **kwargs: Any):
        try:
            return super().model_validate(data, **kwargs)
        except ValidationError as error:
            raise SettingsError(_reason(error, _section_name(cls))) from None

    def replace(self, **changes: Any):
        """A copy with `changes`, checked like the original."""
        return type(self).model_validate({**self.to_dict(), **changes})


class DataSettings(Section):
    dataset: str
    train_query: str
    val_query: str
    test_query: str


class SyntheticSettings(Section):
    seed: int
    train: int = Field(ge=1)
    val: int = Field(ge=1)
    test: int = Field(ge=1)
    image_size: int = Field(ge=16)


class FeatureSettings(Section):
    encoder: Literal[ENCODERS]
    batch_size: int = Field(ge=1)
    workers: Optional[int] = Field(ge=0)
    dir: Optional[str]


class VocabSettings(Section):
    min_freq: int = Field(ge=1)
    max_length: int = Field(ge=1)


class ModelSettings(Section):
    decoder: Literal[DECODERS]
    embed_dim: int = Field(ge=1)
    hidden_dim: int = Field(ge=1)
    attention_dim: int = Field(ge=1)
    dropout: float = Field(ge=0.0, lt=1.0)
    layers: int = Field(ge=1)
    heads: int = Field(ge=1)
    ff_dim: int = Field(ge=1)
    ensemble: list[Union[Literal[DECODERS], "MemberSettings"]]


class TrainSettings(Section):
    epochs: int = Field(ge=0)
    batch_size: int = Field(ge=1)
    captions_per_image: int = Field(ge=0)
    lr: float = Field(gt=0.0)
    weight_decay: float = Field(ge=0.0)
    warmup_steps: int = Field(ge=0)
    label_smoothing: float = Field(ge=0.0, lt=1.0)
    grad_clip: float = Field(ge=0.0)
    alpha_c: float = Field(ge=0.0)
    patience: int = Field(ge=1)
    seed: int
    val_images: int = Field(ge=0)
    val_beam_size: int = Field(ge=1)
    schedule: Literal[SCHEDULES]
    checkpoint_every: int = Field(ge=0)
    progress: bool
    threads: int = Field(ge=0)
    precision: Literal[PRECISIONS]
    finetune_blocks: int = Field(ge=0)
    encoder_lr: float = Field(gt=0.0)
    augment: bool
    scst_epochs: int = Field(ge=0)
    scst_lr: float = Field(gt=0.0)
    scst_samples: int = Field(ge=2)
    scst_top_k: int = Field(ge=0)


class MemberSettings(Section):
    """An entry of `model.ensemble` written as a mapping: its decoder and the `model` and `train`
    settings that apply to that member alone, e.g. {decoder: transformer, train: {scst_epochs: 0}}."""

    decoder: Literal[DECODERS]
    model: dict[str, Any] = {}
    train: dict[str, Any] = {}

    @model_validator(mode="after")
    def _known_keys(self):
        allowed = {
            "model": set(ModelSettings.model_fields) - {"decoder", "ensemble"},
            "train": set(TrainSettings.model_fields),
        }
        for name, section in (("model", self.model), ("train", self.train)):
            unknown = sorted(set(section) - allowed[name])
            if unknown:
                raise ValueError(f"{name}.{unknown[0]} is not a setting a member can take")
        return self


class DecodingSettings(Section):
    beam_size: int = Field(ge=1)
    max_length: int = Field(ge=1)
    length_penalty: float = Field(ge=0.0)
    early_stop: Literal[EARLY_STOPS]
    rerank: Literal[RERANKS]
    rerank_neighbours: int = Field(ge=0)
    rerank_neighbour_weight: float = Field(ge=0.0, le=1.0)
    rerank_score_weight: float = Field(ge=0.0)
    flip: bool
    precision: Literal[DECODE_PRECISIONS]


# Packages written before a decoding setting existed read it as this value: the setting off.
DECODING_OFF = {
    "length_penalty": 0.0,
    "early_stop": "exact",
    "rerank": "none",
    "rerank_neighbours": 0,
    "rerank_neighbour_weight": 0.0,
    "rerank_score_weight": 0.0,
    "flip": False,
    "precision": "float32",
}


class DriftSettings(Section):
    enabled: bool
    window: int = Field(ge=2)


class EvaluateSettings(Section):
    beam_sizes: list[int] = Field(min_length=1)


class GateSettings(Section):
    min: dict[str, float]
    margin: dict[str, float]


class RegisterSettings(Section):
    model_name: str = Field(min_length=1)
    gates: GateSettings


class TrackingSettings(Section):
    uri: str = Field(min_length=1)
    experiment: str = Field(min_length=1)


class RetrainSettings(Section):
    cron: str
    include_feedback: bool
    # Which corrections enter training: agreed on by feedback_min_clients different clients (or
    # approved), approved by an operator only, or all of them (captioning/data/feedback.py).
    feedback_review: Literal["agreement", "operator", "none"]
    feedback_min_clients: int = Field(ge=1)
    # Where the retrain decision reads the live photos' drift (captioning/release/live_drift.py):
    # "" (the local stack's Prometheus when one runs), a Prometheus base URL, or a model server's
    # /metrics page (a URL whose path ends in /metrics).
    drift_source: str

    @field_validator("drift_source")
    @classmethod
    def _drift_source_is_a_url(cls, source: str) -> str:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(source)
            url = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:  # a malformed address, e.g. an unclosed [IPv6
            url = False
        if source and not url:
            raise ValueError("a drift source is an http(s) URL (Prometheus, or a model server's /metrics) or ''")
        return source


class SmokeSettings(Section):
    enabled: bool
    photos: int = Field(ge=1)
    tolerance: float = Field(ge=0.0, le=1.0)
    max_drop: float = Field(ge=0.0, le=1.0)
    max_repeats: int = Field(ge=1)
    max_latency_seconds: float = Field(gt=0.0)


class ShadowSettings(Section):
    enabled: bool
    share: float = Field(gt=0.0, le=100.0)
    min_requests: int = Field(ge=1)
    window_seconds: float = Field(gt=0.0)
    min_agreement: float = Field(ge=0.0)


class CanarySettings(Section):
    enabled: bool
    steps: list[int] = Field(min_length=1)
    window_seconds: float = Field(gt=0.0)
    min_requests: int = Field(ge=1)
    max_error_rate: float = Field(ge=0.0, le=1.0)
    max_latency_ratio: float = Field(gt=0.0)
    max_p95_seconds: float = Field(gt=0.0)

    @field_validator("steps")
    @classmethod
    def _steps_climb_to_all(cls, steps: list[int]) -> list[int]:
        # Each step a larger share of the traffic, the last one all of it: a canary that never
        # reaches 100 % would leave the old version serving after its promotion.
        if any(not 0 < share <= 100 for share in steps):
            raise ValueError("steps are shares of the traffic in percent, each in 1..100")
        if any(later <= earlier for earlier, later in zip(steps, steps[1:])):
            raise ValueError("steps must grow, e.g. [10, 50, 100]")
        if steps[-1] != 100:
            raise ValueError("the last step must be 100 (all the traffic)")
        return steps


class ReleaseSettings(Section):
    poll_seconds: float = Field(gt=0.0)
    scrape_seconds: float = Field(gt=0.0)
    prometheus_timeout_seconds: float = Field(gt=0.0)
    keep_previous_seconds: float = Field(ge=0.0)
    kube_context: str
    smoke: SmokeSettings
    shadow: ShadowSettings
    canary: CanarySettings


with warnings.catch_warnings():
    # `register` is the params.yaml section's name; it hides ABCMeta.register, which nothing here uses.
    warnings.filterwarnings("ignore", message='Field name "register"')

    class Settings(Section):
        data: DataSettings
        synthetic: SyntheticSettings
        features: FeatureSettings
        vocab: VocabSettings
        model: ModelSettings
        train: TrainSettings
        decoding: DecodingSettings
        drift: DriftSettings
        evaluate: EvaluateSettings
        register: RegisterSettings = Field()  # explicit: else pydantic takes ABCMeta.register as its default
        tracking: TrackingSettings
        retrain: RetrainSettings
        release: ReleaseSettings
        profiles: dict[str, dict[str, Any]] = {}

        @model_validator(mode="after")
        def _members_valid(self):
            for number in range(1, len(self.model.ensemble) + 1):
                self.member(number)  # each member's merged settings are checked like the rest
            return self

        def member(self, number: int) -> "Settings":
            """The settings member `number` of the ensemble trains with (0: `model.decoder` itself):
            its own decoder, `model` and `train` settings, seed `train.seed + number`, no ensemble."""
            if number == 0:
                return self.replace(model=self.model.replace(ensemble=[]).to_dict())
            entry = self.model.ensemble[number - 1]
            if isinstance(entry, str):
                entry = MemberSettings(decoder=entry)
            model = {**self.model.to_dict(), **entry.model, "decoder": entry.decoder, "ensemble": []}
            train = {**self.train.to_dict(), "seed": self.train.seed + number, **entry.train}
            try:
                return self.replace(model=model, train=train)
            except SettingsError as error:
                raise SettingsError(f"model.ensemble[{number - 1}]: {error}") from None

        def members(self) -> list["Settings"]:
            """The settings of every model the ensemble trains, `model.decoder` first."""
            return [self.member(number) for number in range(len(self.model.ensemble) + 1)]


def _section_name(cls: type) -> str:
    """`decoding` for DecodingSettings: a section checked alone names its settings as in params.yaml."""
    if cls is Settings:
        return ""
    return next((name for name, field in Settings.model_fields.items() if field.annotation is cls), "")


def _reason(error: ValidationError, section: str = "") -> str:
    """The first problem of a failed validation as one line naming the setting."""
    # Of a union's failed branches, the one for the kind of value given (a mapping is a member).
    problems = sorted(
        error.errors(), key=lambda item: item["type"] == "literal_error" and isinstance(item["input"], dict)
    )
    problem = problems[0]
    location = [
        str(part) for part in problem["loc"] if not re.match(r"^(function-|literal\[|[A-Z]\w*Settings$)", str(part))
    ]
    location = [section, *location] if section else location
    dotted = ".".join(location)
    if problem["type"] == "extra_forbidden":
        return f"{dotted} is not a setting{_suggestion(location)}"
    if problem["type"] == "missing":
        return f"{dotted} is missing (params.yaml declares every setting)"
    message = problem["msg"].removeprefix("Value error, ")
    return f"{dotted}={problem.get('input')!r}: {message}" if dotted else message


def _suggestion(location: list[str]) -> str:
    """`; did you mean train.epochs?` for a near-miss of a real key."""
    fields = Settings.model_fields
    section = location[0] if location else ""
    if len(location) == 1:
        names = list(fields)
    elif section in fields and len(location) == 2:
        names = list(fields[section].annotation.model_fields)
    else:
        return ""
    close = difflib.get_close_matches(location[-1], names, n=1)
    prefix = f"{section}." if len(location) == 2 else ""
    return f"; did you mean {prefix}{close[0]}?" if close else ""


class _Loader(yaml.SafeLoader):
    """YAML as PyYAML reads it, except that 3e-4 is a number (as in YAML 1.2), not the text '3e-4'."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` laid over it, section by section."""
    result = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = deep_merge(result[key], value)
        else:
            result[key] = value
    return result


def _assignment(item: str) -> tuple[list[str], Any]:
    """The keys and the value (read as YAML) of one `section.key=value` item."""
    if "=" not in item:
        raise SettingsError(f"{item!r} is not of the form section.key=value")
    dotted, raw = item.split("=", 1)
    keys = [key.strip() for key in dotted.split(".")]
    if not all(keys):
        raise SettingsError(f"{item!r}: {dotted!r} is not a setting name")
    try:
        return keys, yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError:
        raise SettingsError(f"{dotted}={raw!r} is not a YAML value") from None


def _assign(data: dict[str, Any], assignments: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`data` with each item's value put in place: a mapping value replaces the mapping there
    (`--set register.gates.min={CIDEr: 0}` leaves no other minimum), unlike an overlay file."""
    result = copy.deepcopy(data)
    for item in assignments:
        keys, value = _assignment(item)
        node = result
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise SettingsError(f"{item!r}: {key!r} is a value, not a section")
        node[keys[-1]] = value
    return result


def parse_overrides(assignments: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`section.key=value` items (values read as YAML) as a nested mapping."""
    return _assign({}, assignments)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, or SettingsError naming the file and the problem."""
    try:
        with open(path, encoding="utf-8") as handle:
            content = yaml.load(handle, Loader=_Loader)
    except OSError as error:
        raise SettingsError(f"cannot read settings file {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SettingsError(f"settings file {path}{where} is not valid YAML") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise SettingsError(f"settings file {path} must hold a mapping of sections")
    return content


def load_settings(
    base: str | Path,
    overlay: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Settings:
    """The settings in `base` (params.yaml, complete), the partial YAML `overlay` laid over it,
    then the `section.key=value` `overrides`: checked, or SettingsError with one line."""
    raw = read_yaml(base)
    if overlay:
        try:
            raw = deep_merge(raw, read_yaml(overlay))
            return _with_overrides(raw, overrides)
        except SettingsError as error:
            raise SettingsError(f"{error} (with {Path(overlay).name} laid over {Path(base).name})") from None
    return _with_overrides(raw, overrides)


def _with_overrides(raw: dict[str, Any], overrides) -> Settings:
    return Settings.model_validate(_assign(raw, overrides))


def apply_overrides(settings: Settings, overrides: list[str] | tuple[str, ...]) -> Settings:
    """`settings` with `section.key=value` items laid over them, checked."""
    return _with_overrides(settings.to_dict(), overrides)


def profile_overrides(settings: Settings, name: str) -> list[str]:
    """The `section.key=value` overrides of profile `name` (params.yaml `profiles`), in file order.

    A profile is a named set of overrides laid over the defaults, e.g. the `full` configuration
    that `make full` hands to `dvc exp run -S ...`; they are checked like `--set` items.
    """
    if name not in settings.profiles:
        known = ", ".join(sorted(settings.profiles)) or "none"
        raise SettingsError(f"no profile {name!r} in params (profiles: {known})")
    assignments = [
        f"{dotted}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
        for dotted, value in (settings.profiles[name] or {}).items()
    ]
    try:
        apply_overrides(settings, assignments)
    except SettingsError as error:
        raise SettingsError(f"profile {name!r}: {error}") from None
    return assignments


def flatten(settings: Settings | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`section.key` -> value, e.g. for MLflow's run parameters (profiles left out)."""
    data = settings.to_dict() if isinstance(settings, Section) else settings
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if not prefix and key == "profiles":
            continue
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


ModelSettings.model_rebuild()
