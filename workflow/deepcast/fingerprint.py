"""Code fingerprints for rule params.

Snakemake reruns a job when its params change but does not see the package
code a shell command runs. Each rule gets the sha256 of its stage module, the
package modules every stage shares, and the versions of the tools it calls, so
editing a stage reruns that stage and its dependents, and nothing else.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import metadata
from pathlib import Path

PACKAGE = Path(__file__).parent
SHARED_MODULES = ("config.py", "corpus.py", "errors.py", "files.py", "manifest.py", "perplexity.py")
TOOLS = ("torch", "transformers", "huggingface-hub", "safetensors", "tokenizers")


@cache
def of_stage(stage: str) -> str:
    digest = hashlib.sha256()
    for path in [PACKAGE / "stages" / f"{stage}.py", *(PACKAGE / name for name in SHARED_MODULES)]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for tool in TOOLS:
        try:
            digest.update(f"{tool}={metadata.version(tool)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{tool}=absent".encode())
    return digest.hexdigest()[:16]
