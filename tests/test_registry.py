"""Targets and models: resolution, and the messages for every bad name."""

from __future__ import annotations

import shutil

import pytest
from conftest import REPO
from deepcast import registry
from deepcast.errors import DeepcastError

CONFIG = REPO / "config"


def test_registry_model_by_name_and_by_hub_id():
    by_name = registry.resolve_model(CONFIG, "deepseek-r1-distill-qwen-7b", REPO)
    by_id = registry.resolve_model(CONFIG, "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", REPO)
    assert by_name == by_id
    assert by_id.location == "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-7B" and by_id.revision == "main"


def test_embedded_model_is_a_local_source():
    ref = registry.resolve_model(CONFIG, "tiny-deepseek-v3", REPO)
    assert ref.location == str(REPO / "workflow/deepcast/embedded/tiny-deepseek-v3")
    assert ref.revision == "v1"


def test_hub_id_outside_the_registry_with_revision():
    ref = registry.resolve_model(CONFIG, "someone/My-Model.v2@refs/pr/3", REPO)
    assert (ref.name, ref.revision, ref.path_revision) == ("someone--my-model.v2", "refs/pr/3", "refs_pr_3")


def test_unknown_model_lists_the_registry():
    with pytest.raises(DeepcastError, match="unknown model 'nosuch'. Registry models: .*tiny-deepseek-v3"):
        registry.resolve_model(CONFIG, "nosuch", REPO)


@pytest.mark.parametrize("spec", ["org//name", "org/na me", "-org/name", "org/name--x", "a/b/c"])
def test_malformed_model_id(spec):
    with pytest.raises(DeepcastError, match="malformed model id"):
        registry.resolve_model(CONFIG, spec, REPO)


@pytest.mark.parametrize("revision", ["bad rev", "a..b", "-x", "x:y"])
def test_malformed_revision(revision):
    with pytest.raises(DeepcastError, match="malformed revision"):
        registry.resolve_model(CONFIG, f"deepseek-ai/DeepSeek-R1@{revision}", REPO)


def test_unknown_target_lists_the_valid_ones():
    with pytest.raises(DeepcastError, match=r"unknown target 'nope'. Valid targets: .*4x2080ti.*cpu"):
        registry.load_target(CONFIG, "nope")


def test_every_target_file_is_valid():
    for path in (CONFIG / "targets").glob("*.yaml"):
        assert registry.load_target(CONFIG, path.stem).name == path.stem


def test_target_missing_a_field_names_the_file(tmp_path):
    shutil.copytree(CONFIG, tmp_path / "config")
    path = tmp_path / "config" / "targets" / "4x2080ti.yaml"
    path.write_text(path.read_text().replace("  bandwidth_gbps: 616", ""))
    with pytest.raises(DeepcastError, match=r"4x2080ti.yaml: gpu.bandwidth_gbps: Field required. Fix that file"):
        registry.load_target(tmp_path / "config", "4x2080ti")
