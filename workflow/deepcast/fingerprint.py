"""Code fingerprints for rule params.

Snakemake reruns a job when its params change but does not see the package
code a shell command runs. Each rule gets the sha256 of its stage module and of
every deepcast module that module imports (followed transitively), plus the
versions of the tools it calls: editing a stage reruns that stage and its
dependents, and nothing else.
"""

from __future__ import annotations

import ast
import hashlib
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


@cache  # every stage reaches config.py and its neighbours: parse each module once per workflow parse
def _imports(path: Path) -> frozenset[Path]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {p for p in map(_module_path, names) if p is not None}
    return frozenset(found)


def modules_of(stage: str) -> list[Path]:
    """The stage module and every package module it reaches through imports."""
    todo, seen = [PACKAGE / "stages" / f"{stage}.py"], set()
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(_imports(path) - seen)
    return sorted(seen)


@cache
def of_stage(stage: str) -> str:
    digest = hashlib.sha256()
    for path in modules_of(stage):
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes())
    for tool in TOOLS:
        try:
            digest.update(f"{tool}={metadata.version(tool)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{tool}=absent".encode())
    return digest.hexdigest()[:16]
