"""The decoding options of a caption request, and the answers the services send."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from captioning.serving.answers import jsonable, public_answer
from captioning.serving.errors import InputError
from captioning.serving.options import OPTION_LIMITS, decoding_options, parse_option


def test_options_default_when_missing_or_blank():
    assert decoding_options({}) == {"beam_size": None, "max_length": None, "return_attention": False}
    assert decoding_options({"beam_size": " ", "return_attention": ""})["beam_size"] is None


def test_options_are_parsed_from_text():
    options = decoding_options({"beam_size": " 3 ", "max_length": "60", "return_attention": "Yes"})
    assert options == {"beam_size": 3, "max_length": 60, "return_attention": True}
    assert parse_option("return_attention", "off", True) is False


@pytest.mark.parametrize(
    "name, raw, words",
    [
        ("beam_size", "three", "whole number"),
        ("beam_size", "2.5", "whole number"),
        ("beam_size", "0", "between 1 and 10"),
        ("max_length", "5000", "between 1 and 60"),
        ("return_attention", "maybe", "true or false"),
    ],
)
def test_bad_options_are_refused_naming_the_option(name, raw, words):
    with pytest.raises(InputError) as refused:
        parse_option(name, raw, None)
    assert (refused.value.status, refused.value.kind) == (400, "bad_option")
    assert name in refused.value.message and words in refused.value.message


def test_the_limits_are_inclusive():
    for name, (low, high) in OPTION_LIMITS.items():
        assert parse_option(name, str(low), None) == low and parse_option(name, str(high), None) == high


def test_the_public_answer_keeps_what_the_api_promises():
    result = {
        "caption": "a dog",
        "alternatives": [{"caption": "a cat", "log_prob": -1.5, "tokens": [4, 5]}],
        "model_version": "7",
        "attention": [[0.5, 0.5]],
        "tokens": [1, 2],
    }
    assert public_answer(result, return_attention=False) == {
        "caption": "a dog",
        "alternatives": [{"caption": "a cat", "log_prob": -1.5}],
        "model_version": "7",
    }
    assert public_answer(result, return_attention=True)["attention"] == [[0.5, 0.5]]
    assert "attention" not in public_answer({**result, "attention": None}, return_attention=True)


def test_model_answers_become_plain_json():
    value = {1: (np.array([0.1234567, 2.0]), torch.tensor([[1, 2]])), "p": 0.123456789, "n": 3}
    assert jsonable(value) == {"1": [[0.1234567, 2.0], [[1, 2]]], "p": 0.123457, "n": 3}
