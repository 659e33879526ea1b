"""Rule fingerprints follow each stage's own imports, so an edit reruns only what depends on it."""

from __future__ import annotations

from deepcast import fingerprint


def names(stage: str) -> set[str]:
    return {path.relative_to(fingerprint.PACKAGE).as_posix() for path in fingerprint.modules_of(stage)}


def test_each_stage_covers_exactly_the_modules_it_imports():
    assert {"stages/download.py", "hub.py", "manifest.py", "files.py", "config.py"} <= names("download")
    assert "perplexity.py" not in names("download") and "stages/gguf.py" not in names("download")
    assert {"stages/reference.py", "perplexity.py"} <= names("reference")
    assert {"stages/gguf.py", "tools.py", "planner.py", "registry.py", "sdist.py"} <= names("gguf")
    assert "stages/download.py" not in names("gguf")


def test_fingerprints_differ_between_stages_and_are_stable():
    stages = ("corpus", "download", "calibrate", "reference", "gguf")
    prints = {stage: fingerprint.of_stage(stage) for stage in stages}
    assert len(set(prints.values())) == len(stages)
    fingerprint.of_stage.cache_clear()
    assert prints == {stage: fingerprint.of_stage(stage) for stage in stages}
