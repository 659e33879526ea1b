"""Typed config: the schema is generated from it, and config.yaml states the real defaults."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO, deepcast_cli
from deepcast import config
from deepcast.errors import DeepcastError


def test_committed_schema_matches_the_typed_config():
    assert config.SCHEMA_PATH.read_text() == config.json_schema(), "run `deepcast config schema`"
    assert deepcast_cli("config", "schema", "--check").returncode == 0


def test_config_yaml_states_the_defaults():
    written = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert config.load(written) == config.Settings()
    assert config.load(written).model_dump(by_alias=True) == written


def test_unknown_key_is_rejected_with_its_path():
    with pytest.raises(DeepcastError, match="calibration.sample: Extra inputs are not permitted"):
        config.load({"calibration": {"sample": 3}})


def test_impossible_value_is_rejected():
    with pytest.raises(DeepcastError, match="calibration.samples: Input should be greater than or equal to 1"):
        config.load({"calibration": {"samples": 0}})
