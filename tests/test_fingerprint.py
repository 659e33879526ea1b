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


def imports_by_ast(path) -> frozenset:
    """What `fingerprint._imports` reads with a scan, read by Python's own parser."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {p for p in map(fingerprint._module_path, names) if p is not None}
    return frozenset(found)


def test_the_import_scan_agrees_with_the_parser_on_every_module():
    modules = sorted(fingerprint.PACKAGE.rglob("*.py"))
    assert len(modules) > 30
    for path in modules:
        assert fingerprint._imports(path) == imports_by_ast(path), path


def test_the_import_scan_reads_every_form(tmp_path):
    module = tmp_path / "sample.py"
    module.write_text(
        "import os, deepcast.files as files\n"
        "from deepcast import (\n    config,  # why\n    registry as reg,\n)\n"
        "def later():\n    from deepcast.stages import plan\n"
    )
    assert fingerprint._imports(module) == imports_by_ast(module)
    found = {p.relative_to(fingerprint.PACKAGE).as_posix() for p in fingerprint._imports(module)}
    assert found == {"__init__.py", "files.py", "config.py", "registry.py", "stages/__init__.py", "stages/plan.py"}
