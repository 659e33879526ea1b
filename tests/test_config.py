"""Typed config: the schema is generated from it, and config.yaml states the real defaults."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import yaml
from conftest import REPO, deepcast_cli
from deepcast import config, subjects
from deepcast.errors import DeepcastError
from hypothesis import event, given, settings
from hypothesis import strategies as st


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


def config_keys() -> list[tuple[str, ...]]:
    """Every key of the typed config, a section's keys by their path."""
    from pydantic import BaseModel

    keys = []
    for name, field in config.Settings.model_fields.items():
        top = field.alias or name
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            keys += [(top, sub.alias or key) for key, sub in section.model_fields.items()]
        else:
            keys.append((top,))
    return keys


ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.one_of(st.text(max_size=8), st.integers(-5, 5)), max_size=3),
    st.dictionaries(st.text(max_size=6), st.one_of(st.integers(-5, 5), st.text(max_size=6)), max_size=2),
    st.sampled_from(["Q4_K_M", "gptq-w4a16", "cpu", "4x2080ti", "deepseek-r1", "q8-base", "speed", "auto", "fp8"]),
)  # fmt: skip


@settings(max_examples=400, deadline=None, database=None, derandomize=True)  # the same examples on every run
@given(key=st.sampled_from(config_keys()), value=ANY_VALUE)
def test_any_value_of_any_key_gives_a_run_plan_or_one_message_naming_the_key(key, value):
    """What the Snakefile does before any job (deepcast.subjects.prepare): a run plan, or one DeepcastError;
    a value the typed config refuses is named by its key. Never another exception. The hub is a closed port."""
    raw = {key[0]: value} if len(key) == 1 else {key[0]: {key[1]: value}}
    with mock.patch.dict(os.environ, {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}):
        try:
            config.load(raw)
        except DeepcastError as error:
            assert ".".join(key) in str(error) and "Traceback" not in str(error), (raw, str(error))
            event("refused by the typed config")
            return
        try:
            run = subjects.prepare(raw, REPO / "config", REPO)
        except DeepcastError as error:
            assert str(error).strip(), raw
            event("refused at planning")
            return
    event("planned")
    assert run.plan.chosen and run.subjects, raw
