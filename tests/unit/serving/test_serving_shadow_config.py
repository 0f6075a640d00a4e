"""The API's shadow settings, read from the environment like every other one."""

from __future__ import annotations

import pytest

from captioning.serving.config import ServiceConfig, StartupRefused


def test_no_shadow_by_default():
    config = ServiceConfig.from_env({})
    assert config.shadow_url == "" and config.shadow_share == 100
    assert (config.shadow_timeout_seconds, config.shadow_max_in_flight) == (5.0, 8)


def test_shadow_settings_are_parsed():
    config = ServiceConfig.from_env(
        {
            "CAPTIONING_SHADOW_URL": " http://model-candidate:3001/ ",
            "CAPTIONING_SHADOW_SHARE": "12.5",
            "CAPTIONING_SHADOW_TIMEOUT_SECONDS": "2",
            "CAPTIONING_SHADOW_MAX_IN_FLIGHT": "3",
        }
    )
    assert config.shadow_url == "http://model-candidate:3001"
    assert (config.shadow_share, config.shadow_timeout_seconds, config.shadow_max_in_flight) == (12.5, 2.0, 3)


@pytest.mark.parametrize(
    "name, value, words",
    [
        ("CAPTIONING_SHADOW_SHARE", "101", "less than or equal to 100"),
        ("CAPTIONING_SHADOW_SHARE", "-1", "greater than or equal to 0"),
        ("CAPTIONING_SHADOW_TIMEOUT_SECONDS", "0", "greater than 0"),
        ("CAPTIONING_SHADOW_MAX_IN_FLIGHT", "0", "greater than or equal to 1"),
    ],
)
def test_bad_shadow_settings_are_refused_with_one_line(name, value, words):
    with pytest.raises(StartupRefused) as refused:
        ServiceConfig.from_env({name: value})
    assert str(refused.value).startswith(f"{name}={value!r}: ") and words in str(refused.value)


def test_a_shadow_address_must_be_a_url_and_is_not_echoed():
    with pytest.raises(StartupRefused) as refused:
        ServiceConfig.from_env({"CAPTIONING_SHADOW_URL": "user:secret@model-candidate:3001"})
    message = str(refused.value)
    assert message.startswith("CAPTIONING_SHADOW_URL: a shadow model server's address starts with http://")
    assert "secret" not in message
    config = ServiceConfig.from_env({"CAPTIONING_SHADOW_URL": "http://user:secret@model-candidate:3001"})
    assert "secret" not in repr(config)
