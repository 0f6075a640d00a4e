"""Settings for tests and benchmarks: the project's params.yaml with partial sections laid over it.

test_settings(train={"epochs": 1}, model={"decoder": "show_tell"}) -> Settings
"""

from __future__ import annotations

from typing import Any

from captioning.config import PARAMS_FILE


def test_settings(**sections: dict[str, Any]):
    """params.yaml with each given section's keys replaced (other keys kept), checked."""
    from captioning.settings import Settings, deep_merge, read_yaml

    return Settings.model_validate(deep_merge(read_yaml(PARAMS_FILE), sections))


test_settings.__test__ = False  # a helper, not a test pytest should collect
