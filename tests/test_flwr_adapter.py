"""Flower internals sit behind one version check."""

from __future__ import annotations

import flwr
import pytest

from fedsilo.errors import ConfigError
from fedsilo.flwr_adapter import check_flower_version


def test_the_installed_flower_is_supported() -> None:
    check_flower_version()
    assert flwr.__version__.startswith("1.39.")


@pytest.mark.parametrize("version", ["1.40.0", "1.38.2", "2.0.0"])
def test_another_flower_fails_in_one_place_with_a_clear_message(version: str) -> None:
    with pytest.raises(ConfigError, match=f"found flwr {version}") as err:
        check_flower_version(version)
    assert "flwr_adapter.py" in str(err.value) and "<1.40" in str(err.value)
