"""The service's settings: one typed `ServiceConfig`, read from the environment once at start-up.

Environment (an empty variable counts as unset):
  CAPTIONING_MODEL            package folder, models:/NAME@ALIAS, or bento:NAME:VERSION (a model in
                              BentoML's store, as a release's image carries it; default
                              models:/captioner@champion)
  MLFLOW_TRACKING_URI         the registry of a models:/ source (default: params.yaml tracking.uri)
  CAPTIONING_POLL_SECONDS     how often the model service asks the registry for a new champion
                              (default 60 for models:/ URIs, 0 = never)
  CAPTIONING_RELOAD_TOKEN     enables POST /reload (header X-Reload-Token or Authorization: Bearer)
  CAPTIONING_API_KEY          when set, every route but the health checks and the page needs X-API-Key
  CAPTIONING_ENV              "production" (the deploy configmap sets it): the API refuses to start without
                              CAPTIONING_API_KEY, and both services without CAPTIONING_INTERNAL_TOKEN
  CAPTIONING_ALLOW_NO_KEY     1 = in production, run without those keys on purpose (logged at start-up)
  CAPTIONING_INTERNAL_TOKEN   shared secret of the two services: when set, the model service answers only
                              calls that carry it (the API sends it on every call); unset, the model service
                              is open, as with `bentoml serve` on one machine, where it listens on a Unix
                              socket in a private (0700) folder
  CAPTIONING_FEEDBACK_PER_MINUTE  POST /feedback per client address and minute, per API worker (default 30,
                              0 = no limit); answered 429 with Retry-After past it
  CAPTIONING_CAPTIONS_PER_MINUTE  POST /caption and /caption_batch per client address and minute, per API
                              worker (default 3000, 0 = no limit): a token bucket that holds a minute's
                              worth, so a client may send that many at once and then 50 a second (far
                              above the benchmark and rollout loops); answered 429 with Retry-After past it
  CAPTIONING_TRUSTED_PROXIES  how many proxies in front of the API append to X-Forwarded-For (default 0:
                              the client is the peer address). With N, the client is the Nth entry from
                              the right, the one the outermost trusted proxy wrote; entries to its left
                              were written by the client and are ignored (the ingress alone: 1)
  CAPTIONING_TRUST_PROXY      1 = CAPTIONING_TRUSTED_PROXIES=1 (kept for existing configurations)
  CAPTIONING_MAX_CONCURRENCY  requests in flight per API worker before it answers 429 (default 32)
  CAPTIONING_DECODE_CONCURRENCY  uploads decoded at once per API worker (default 2)
  CAPTIONING_INFLIGHT_UPLOAD_MB  request bodies held at once per API worker before it answers 429 (default 200,
                              never less than one full /caption_batch)
  CAPTIONING_MAX_UPLOAD_MB    largest accepted image file (default 10)
  CAPTIONING_MAX_BATCH_IMAGES most images in one /caption_batch request (default 16)
  CAPTIONING_ADAPTIVE_BATCHING  0 turns adaptive batching off (benchmarks compare both)
  CAPTIONING_MAX_BATCH_SIZE / CAPTIONING_MAX_LATENCY_MS  adaptive batching bounds
  CAPTIONING_FEEDBACK_DB      feedback database URL, sqlite:/// or postgresql:// (default SQLite under the
                              data folder); the store is opened at start-up, each connection attempt
                              given CAPTIONING_FEEDBACK_CONNECT_SECONDS (default 5)
  CAPTIONING_FEEDBACK_MAX_BYTES  bytes of feedback images kept at most (default: no cap)
  CAPTIONING_TORCH_THREADS    torch threads of the model service (default: torch's choice)
  CAPTIONING_GPU              1 = the model service asks for a GPU
  CAPTIONING_FAULT_DELAY_MS   drills only: the model service waits this long before each batch (a slow candidate)
  CAPTIONING_FAULT_FAIL_CAPTIONS  drills only: 1 = every caption answers an error (a broken candidate);
                              `captioning stack drill` starts a rollout's candidate with them
  CAPTIONING_REPLICA_VERSION / CAPTIONING_REPLICA_NONCE  what the local stack started this replica as;
                              POST /replica answers with them, so the stack can tell its replica from
                              another process on the same port
  CAPTIONING_SHADOW_URL       where a candidate model server answers (http://HOST:PORT of its model service):
                              the API copies caption requests to it and discards its answers (default: none)
  CAPTIONING_SHADOW_SHARE     percent of /caption and /caption_batch requests copied (0-100, default 100)
  CAPTIONING_SHADOW_TIMEOUT_SECONDS  a copy unanswered this long counts as an error (default 5)
  CAPTIONING_SHADOW_MAX_IN_FLIGHT  copies pending at once per API worker; more are dropped (default 8; the
                              images they hold are bounded too, by CAPTIONING_INFLIGHT_UPLOAD_MB)

A value that does not parse, or lies outside its range, refuses start-up with one line naming
the variable (`StartupRefused`), as does production without its keys.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_MODEL = "models:/captioner@champion"
# Room for the multipart headers and text fields around the files of one request.
MULTIPART_OVERHEAD = 64 * 1024
MB = 1024 * 1024

# The variable each setting is read from.
ENVIRONMENT = {
    "source": "CAPTIONING_MODEL",
    "tracking_uri": "MLFLOW_TRACKING_URI",
    "poll_seconds": "CAPTIONING_POLL_SECONDS",
    "reload_token": "CAPTIONING_RELOAD_TOKEN",
    "api_key": "CAPTIONING_API_KEY",
    "environment": "CAPTIONING_ENV",
    "allow_no_key": "CAPTIONING_ALLOW_NO_KEY",
    "internal_token": "CAPTIONING_INTERNAL_TOKEN",
    "feedback_per_minute": "CAPTIONING_FEEDBACK_PER_MINUTE",
    "trust_proxy": "CAPTIONING_TRUST_PROXY",
    "trusted_proxies": "CAPTIONING_TRUSTED_PROXIES",
    "captions_per_minute": "CAPTIONING_CAPTIONS_PER_MINUTE",
    "feedback_connect_seconds": "CAPTIONING_FEEDBACK_CONNECT_SECONDS",
    "max_concurrency": "CAPTIONING_MAX_CONCURRENCY",
    "decode_concurrency": "CAPTIONING_DECODE_CONCURRENCY",
    "inflight_upload_mb": "CAPTIONING_INFLIGHT_UPLOAD_MB",
    "max_upload_mb": "CAPTIONING_MAX_UPLOAD_MB",
    "max_batch_images": "CAPTIONING_MAX_BATCH_IMAGES",
    "adaptive_batching": "CAPTIONING_ADAPTIVE_BATCHING",
    "max_batch_size": "CAPTIONING_MAX_BATCH_SIZE",
    "max_latency_ms": "CAPTIONING_MAX_LATENCY_MS",
    "feedback_db": "CAPTIONING_FEEDBACK_DB",
    "feedback_max_bytes": "CAPTIONING_FEEDBACK_MAX_BYTES",
    "torch_threads": "CAPTIONING_TORCH_THREADS",
    "gpu": "CAPTIONING_GPU",
    "fault_delay_ms": "CAPTIONING_FAULT_DELAY_MS",
    "fault_fail_captions": "CAPTIONING_FAULT_FAIL_CAPTIONS",
    "replica_version": "CAPTIONING_REPLICA_VERSION",
    "replica_nonce": "CAPTIONING_REPLICA_NONCE",
    "shadow_url": "CAPTIONING_SHADOW_URL",
    "shadow_share": "CAPTIONING_SHADOW_SHARE",
    "shadow_timeout_seconds": "CAPTIONING_SHADOW_TIMEOUT_SECONDS",
    "shadow_max_in_flight": "CAPTIONING_SHADOW_MAX_IN_FLIGHT",
}
SHADOW_SCHEMES = ("http://", "https://", "tcp://")
FEEDBACK_SCHEMES = ("sqlite", "postgresql", "postgres")


class StartupRefused(RuntimeError):
    """A configuration the service must not run with (it says what to set)."""


class ServiceConfig(BaseModel):
    """Every setting of the two services; the defaults are those of a service on one machine."""

    # Values arrive as text: numbers and flags (1/0, true/false, yes/no, on/off) are parsed from it.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    source: str = DEFAULT_MODEL
    tracking_uri: str | None = Field(None, repr=False)
    poll_seconds: int | None = Field(None, ge=0)  # None: 60 for a models:/ source, else 0
    # Secrets (URLs may hold a password) stay out of the repr and the logs.
    reload_token: str = Field("", repr=False)
    api_key: str = Field("", repr=False)
    environment: str = ""
    allow_no_key: bool = False
    internal_token: str = Field("", repr=False)
    feedback_per_minute: int = Field(30, ge=0)
    trust_proxy: bool = False
    trusted_proxies: int = Field(0, ge=0, le=10)
    captions_per_minute: int = Field(3000, ge=0)
    feedback_connect_seconds: float = Field(5.0, gt=0, le=120)
    max_concurrency: int = Field(32, ge=1)
    decode_concurrency: int = Field(2, ge=1)
    inflight_upload_mb: int = Field(200, ge=1)
    max_upload_mb: float = Field(10.0, gt=0)
    max_batch_images: int = Field(16, ge=1)
    adaptive_batching: bool = True
    max_batch_size: int = Field(16, ge=1)
    max_latency_ms: int = Field(30_000, ge=1)
    feedback_db: str | None = Field(None, repr=False)
    feedback_max_bytes: int | None = Field(None, gt=0)
    torch_threads: int = Field(0, ge=0)
    gpu: bool = False
    fault_delay_ms: int = Field(0, ge=0, le=600_000)
    fault_fail_captions: bool = False
    replica_version: str = ""
    replica_nonce: str = Field("", repr=False)

    def replica(self, role: str) -> dict[str, str]:
        """Who this replica is, as the stack that started it knows it (POST /replica)."""
        return {"role": role, "version": self.replica_version, "nonce": self.replica_nonce}

    shadow_url: str = Field("", repr=False)
    shadow_share: float = Field(100.0, ge=0, le=100)
    shadow_timeout_seconds: float = Field(5.0, gt=0, le=120)
    shadow_max_in_flight: int = Field(8, ge=1)

    @field_validator("shadow_url")
    @classmethod
    def _shadow_url_is_an_address(cls, url: str) -> str:
        if url and not url.startswith(SHADOW_SCHEMES):
            raise ValueError(f"a shadow model server's address starts with {' or '.join(SHADOW_SCHEMES)}")
        return url.rstrip("/")

    @field_validator("feedback_db")
    @classmethod
    def _feedback_db_is_a_database(cls, url: str | None) -> str | None:
        if url is None:
            return None
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            scheme = make_url(url).drivername.split("+")[0]
        except (ArgumentError, ValueError):
            raise ValueError("not a database URL (sqlite:///PATH or postgresql://USER@HOST/NAME)") from None
        if scheme not in FEEDBACK_SCHEMES:
            raise ValueError(f"a feedback database is {' or '.join(FEEDBACK_SCHEMES)}, not {scheme!r}")
        return url

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ServiceConfig":
        """The settings from `environ` (default os.environ); a bad value raises StartupRefused."""
        environ = os.environ if environ is None else environ
        values = {key: environ[name].strip() for key, name in ENVIRONMENT.items() if environ.get(name, "").strip()}
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            raise StartupRefused(_reason(error, values)) from None

    @property
    def production(self) -> bool:
        return self.environment.strip().lower() == "production"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)

    @property
    def inflight_upload_bytes(self) -> int:
        """Request bodies held at once per API worker; never less than the largest request (one
        /caption_batch at its limits), which must always be able to go through alone."""
        largest = self.max_upload_bytes * self.max_batch_images + MULTIPART_OVERHEAD
        return max(self.inflight_upload_mb * MB, largest)

    @property
    def proxy_hops(self) -> int:
        """Proxies trusted to append to X-Forwarded-For (CAPTIONING_TRUST_PROXY=1 counts as one)."""
        return self.trusted_proxies or int(self.trust_proxy)

    @property
    def poll_interval(self) -> int:
        """Seconds between the model service's registry polls (0: never)."""
        if self.poll_seconds is not None:
            return self.poll_seconds
        return 60 if self.source.startswith("models:/") else 0

    def public_auth_mode(self) -> str:
        """How the public API authenticates: "key required" or "open"; refuses production without a key."""
        if self.api_key:
            return "key required"
        if self.production and not self.allow_no_key:
            raise StartupRefused(
                "CAPTIONING_ENV=production and CAPTIONING_API_KEY is not set: refusing to start the API. "
                "Set the key (secret captioning-secrets, key api-key), or CAPTIONING_ALLOW_NO_KEY=1 to run open on purpose."
            )
        return "open"

    def internal_auth_mode(self) -> str:
        """How the model service authenticates its callers: "token required" or "open"."""
        if self.internal_token:
            return "token required"
        if self.production and not self.allow_no_key:
            raise StartupRefused(
                "CAPTIONING_ENV=production and CAPTIONING_INTERNAL_TOKEN is not set: refusing to start. Give both "
                "services the same token (secret captioning-secrets, key internal-token), or CAPTIONING_ALLOW_NO_KEY=1."
            )
        return "open"


def _reason(error: ValidationError, values: Mapping[str, str]) -> str:
    """The first problem of a failed validation as one line naming the variable."""
    problem = error.errors()[0]
    key = str(problem["loc"][0]) if problem["loc"] else ""
    name = ENVIRONMENT.get(key, key)
    message = problem["msg"].removeprefix("Value error, ")
    if key in ("reload_token", "api_key", "internal_token", "feedback_db", "shadow_url"):
        return f"{name}: {message}"  # never echo a secret
    return f"{name}={values.get(key)!r}: {message}"


def refuse_bad_settings(*checks: Callable[[], Any]) -> Any:
    """Run the start-up checks and return the last one's result; a refusal exits with its message
    (status 1, no traceback)."""
    result = None
    try:
        for check in checks:
            result = check()
    except StartupRefused as error:
        sys.exit(f"error: {error}")
    return result


def config_from_env() -> ServiceConfig:
    """The service's settings as a starting service reads them: a bad value exits with its line."""
    return refuse_bad_settings(ServiceConfig.from_env)


def show_info_logs() -> None:
    """BentoML's server logging shows its own loggers from INFO, others from WARNING: ours from
    INFO too (start-up modes, model loads, reloads)."""
    logging.getLogger("captioning").setLevel(logging.INFO)
