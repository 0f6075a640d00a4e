"""ServiceConfig: the service's settings read from the environment once, bad values refused with one line."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from captioning.serving.config import (
    DEFAULT_MODEL,
    MULTIPART_OVERHEAD,
    ServiceConfig,
    StartupRefused,
    config_from_env,
    refuse_bad_settings,
)

MB = 1024 * 1024


def test_defaults_are_those_of_a_service_on_one_machine():
    config = ServiceConfig.from_env({})
    assert config.source == DEFAULT_MODEL
    assert config.max_upload_bytes == 10 * MB
    assert config.inflight_upload_bytes == 200 * MB
    assert (config.max_concurrency, config.decode_concurrency, config.max_batch_images) == (32, 2, 16)
    assert (config.adaptive_batching, config.max_batch_size, config.max_latency_ms) == (True, 16, 30_000)
    assert config.feedback_per_minute == 30 and not config.trust_proxy and not config.production
    assert config.feedback_db is None and config.feedback_max_bytes is None


def test_values_are_parsed_from_their_variables():
    config = ServiceConfig.from_env(
        {
            "CAPTIONING_MODEL": " /models/tiny ",
            "CAPTIONING_MAX_UPLOAD_MB": "0.5",
            "CAPTIONING_ADAPTIVE_BATCHING": "off",
            "CAPTIONING_TRUST_PROXY": "Yes",
            "CAPTIONING_FEEDBACK_PER_MINUTE": "0",
            "CAPTIONING_FEEDBACK_MAX_BYTES": "9663676416",
            "CAPTIONING_ENV": "Production",
            "CAPTIONING_GPU": "1",
            "CAPTIONING_MAX_CONCURRENCY": "",  # blank is unset
            "UNRELATED": "x",
        }
    )
    assert config.source == "/models/tiny"
    assert config.max_upload_bytes == MB // 2
    assert not config.adaptive_batching and config.trust_proxy and config.gpu and config.production
    assert config.feedback_per_minute == 0 and config.feedback_max_bytes == 9663676416
    assert config.max_concurrency == 32


def test_from_env_reads_the_process_environment(monkeypatch):
    monkeypatch.setenv("CAPTIONING_MAX_BATCH_IMAGES", "4")
    assert ServiceConfig.from_env().max_batch_images == 4


@pytest.mark.parametrize(
    "name, value, words",
    [
        ("CAPTIONING_MAX_UPLOAD_MB", "abc", "valid number"),
        ("CAPTIONING_MAX_UPLOAD_MB", "nan", "finite number"),
        ("CAPTIONING_MAX_UPLOAD_MB", "0", "greater than 0"),
        ("CAPTIONING_MAX_CONCURRENCY", "0", "greater than or equal to 1"),
        ("CAPTIONING_MAX_BATCH_SIZE", "1.5", "valid integer"),
        ("CAPTIONING_TRUST_PROXY", "maybe", "valid boolean"),
        ("CAPTIONING_FEEDBACK_MAX_BYTES", "-1", "greater than 0"),
        ("CAPTIONING_POLL_SECONDS", "-5", "greater than or equal to 0"),
    ],
)
def test_a_bad_value_is_refused_with_one_line_naming_its_variable(name, value, words):
    with pytest.raises(StartupRefused) as refused:
        ServiceConfig.from_env({name: value})
    message = str(refused.value)
    assert message.startswith(f"{name}={value!r}: ") and words in message
    assert "\n" not in message


def test_the_upload_budget_never_falls_below_one_full_batch():
    config = ServiceConfig.from_env({"CAPTIONING_INFLIGHT_UPLOAD_MB": "1", "CAPTIONING_MAX_UPLOAD_MB": "2"})
    assert config.inflight_upload_bytes == 2 * MB * 16 + MULTIPART_OVERHEAD
    assert ServiceConfig.from_env({"CAPTIONING_INFLIGHT_UPLOAD_MB": "500"}).inflight_upload_bytes == 500 * MB


@pytest.mark.parametrize(
    "environ, seconds",
    [
        ({}, 60),  # the default source is a registry alias: followed
        ({"CAPTIONING_MODEL": "/models/tiny"}, 0),  # a folder changes only on reload
        ({"CAPTIONING_MODEL": "/models/tiny", "CAPTIONING_POLL_SECONDS": "5"}, 5),
        ({"CAPTIONING_POLL_SECONDS": "0"}, 0),
    ],
)
def test_registry_polling_follows_the_source_unless_set(environ, seconds):
    assert ServiceConfig.from_env(environ).poll_interval == seconds


def test_production_refuses_to_start_without_its_keys():
    config = ServiceConfig.from_env({"CAPTIONING_ENV": "production"})
    with pytest.raises(StartupRefused, match="CAPTIONING_API_KEY is not set: refusing to start") as public:
        config.public_auth_mode()
    with pytest.raises(StartupRefused, match="CAPTIONING_INTERNAL_TOKEN is not set: refusing to start") as internal:
        config.internal_auth_mode()
    for refusal in (public, internal):
        assert "CAPTIONING_ALLOW_NO_KEY=1" in str(refusal.value)  # says how to run open on purpose


@pytest.mark.parametrize(
    "environ, public, internal",
    [
        ({}, "open", "open"),
        ({"CAPTIONING_ENV": "production", "CAPTIONING_ALLOW_NO_KEY": "1"}, "open", "open"),
        ({"CAPTIONING_API_KEY": "k", "CAPTIONING_INTERNAL_TOKEN": "t"}, "key required", "token required"),
        (
            {"CAPTIONING_ENV": "production", "CAPTIONING_API_KEY": "k", "CAPTIONING_INTERNAL_TOKEN": "t"},
            "key required",
            "token required",
        ),
    ],
)
def test_auth_modes(environ, public, internal):
    config = ServiceConfig.from_env(environ)
    assert (config.public_auth_mode(), config.internal_auth_mode()) == (public, internal)


def test_secrets_stay_out_of_the_repr():
    config = ServiceConfig.from_env(
        {
            "CAPTIONING_API_KEY": "key-secret",
            "CAPTIONING_INTERNAL_TOKEN": "token-secret",
            "CAPTIONING_RELOAD_TOKEN": "reload-secret",
            "CAPTIONING_FEEDBACK_DB": "postgresql://user:db-secret@host/feedback",
        }
    )
    assert config.api_key == "key-secret" and config.feedback_db.endswith("@host/feedback")
    assert "secret" not in repr(config)


def test_the_config_cannot_change_once_built():
    config = ServiceConfig.from_env({})
    with pytest.raises(ValidationError):
        config.max_upload_mb = 100.0


def test_a_refusal_exits_with_its_line_and_no_traceback(monkeypatch):
    config = ServiceConfig.from_env({"CAPTIONING_ENV": "production"})
    assert refuse_bad_settings(lambda: "checked") == "checked"
    with pytest.raises(SystemExit) as stopped:
        refuse_bad_settings(config.internal_auth_mode)
    assert str(stopped.value.code).startswith("error: CAPTIONING_ENV=production and CAPTIONING_INTERNAL_TOKEN")
    monkeypatch.setenv("CAPTIONING_MAX_LATENCY_MS", "soon")
    with pytest.raises(SystemExit) as stopped:
        config_from_env()
    assert str(stopped.value.code).startswith("error: CAPTIONING_MAX_LATENCY_MS='soon': ")


def test_secrets_lose_the_trailing_newline_a_secret_file_leaves():
    # `kubectl create secret --from-file` and `echo secret > file` keep the newline.
    config = ServiceConfig.from_env(
        {
            "CAPTIONING_API_KEY": "the-key\n",
            "CAPTIONING_INTERNAL_TOKEN": "the-token\r\n",
            "CAPTIONING_RELOAD_TOKEN": " reload\n",
            "CAPTIONING_FEEDBACK_DB": "sqlite:////data/feedback.db\n",
        }
    )
    assert (config.api_key, config.internal_token, config.reload_token) == ("the-key", "the-token", "reload")
    assert config.feedback_db == "sqlite:////data/feedback.db"


def test_trusted_proxy_hops_and_the_older_flag():
    assert ServiceConfig.from_env({}).proxy_hops == 0
    assert ServiceConfig.from_env({"CAPTIONING_TRUST_PROXY": "1"}).proxy_hops == 1
    assert ServiceConfig.from_env({"CAPTIONING_TRUSTED_PROXIES": "2"}).proxy_hops == 2
    both = {"CAPTIONING_TRUST_PROXY": "1", "CAPTIONING_TRUSTED_PROXIES": "2"}
    assert ServiceConfig.from_env(both).proxy_hops == 2
    with pytest.raises(StartupRefused, match=r"^CAPTIONING_TRUSTED_PROXIES='-1': "):
        ServiceConfig.from_env({"CAPTIONING_TRUSTED_PROXIES": "-1"})


def test_captions_per_minute_is_generous_by_default():
    assert ServiceConfig.from_env({}).captions_per_minute == 3000
    assert ServiceConfig.from_env({"CAPTIONING_CAPTIONS_PER_MINUTE": "0"}).captions_per_minute == 0


@pytest.mark.parametrize(
    "url", ["not a url", "mysql://user@host/db", "http://example.com/feedback", "postgresql://user@host:notaport/db"]
)
def test_a_bad_feedback_database_url_is_refused_with_one_line_that_hides_it(url):
    with pytest.raises(StartupRefused) as refused:
        ServiceConfig.from_env({"CAPTIONING_FEEDBACK_DB": url})
    message = str(refused.value)
    assert message.startswith("CAPTIONING_FEEDBACK_DB: ") and "\n" not in message
    assert url not in message  # it may hold a password


@pytest.mark.parametrize("url", ["sqlite:////data/feedback.db", "postgresql://u:p@db:5432/f", "postgres://u@db/f"])
def test_feedback_database_urls_that_are_accepted(url):
    assert ServiceConfig.from_env({"CAPTIONING_FEEDBACK_DB": url}).feedback_db == url
