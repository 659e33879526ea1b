"""Code fingerprints for rule params.

Snakemake reruns a job when its params change but does not see the package
code a shell command runs. Each rule gets the sha256 of its stage module and of
every deepcast module that module imports (followed transitively), plus the
versions of the tools it calls: editing a stage reruns that stage and its
dependents, and nothing else.
"""

from __future__ import annotations

import hashlib
import re
from functools import cache
from importlib import metadata
from pathlib import Path

PACKAGE = Path(__file__).parent
TOOLS = ("torch", "transformers", "huggingface-hub", "safetensors", "tokenizers")


def _module_path(name: str) -> Path | None:
    """deepcast.x.y -> its file, or None for a module outside the package."""
    parts = name.split(".")
    if parts[0] != "deepcast":
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


# `from deepcast.x import (a, b)` / `import os, deepcast.x`, at any indent (lazy imports count too).
_FROM = re.compile(r"^[ \t]*from[ \t]+(deepcast[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n]*)", re.MULTILINE)
_IMPORT = re.compile(r"^[ \t]*import[ \t]+([^\n]*)", re.MULTILINE)


def _names(clause: str) -> list[str]:
    """`(a as b,  # why\n c)` -> [a, c]"""
    clause = re.sub(r"#[^\n]*", "", clause).strip("()\n ")
    return [item.split()[0] for item in clause.split(",") if item.strip()]


@cache  # every stage reaches config.py and its neighbours: read each module once per workflow parse
def _imports(path: Path) -> frozenset[Path]:
    """The package modules `path` imports. A scan of the import statements, not `ast.parse`: every workflow
    parse reads the whole package, and parsing it took 0.18 s of a 2 s no-op run. The suite checks the scan
    against `ast` on every module of the package."""
    source, names = path.read_text(), []
    for module, clause in _FROM.findall(source):
        names += [module] + [f"{module}.{name}" for name in _names(clause)]
    for clause in _IMPORT.findall(source):
        names += _names(clause)
    return frozenset(p for p in map(_module_path, names) if p is not None)


def modules_of(stage: str) -> list[Path]:
    """The stage module and every package module it reaches through imports."""
    todo, seen = [PACKAGE / "stages" / f"{stage}.py"], set()
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(_imports(path) - seen)
    return sorted(seen)


@cache  # metadata.version scans every installed distribution: once per workflow parse, not once per stage
def _tool_versions() -> bytes:
    versions = []
    for tool in TOOLS:
        try:
            versions.append(f"{tool}={metadata.version(tool)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{tool}=absent")
    return "".join(versions).encode()


@cache
def of_stage(stage: str) -> str:
    digest = hashlib.sha256()
    for path in modules_of(stage):
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes())
    digest.update(_tool_versions())
    return digest.hexdigest()[:16]
