"""The small JSON manifest beside every artifact: what went in, how, and what came out."""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import sys
import time
from importlib import metadata
from pathlib import Path

from deepcast.files import atomic_path, sha256_file

MANIFEST = "manifest.json"
TOOLS = (
    "deepcast",
    "torch",
    "transformers",
    "huggingface-hub",
    "safetensors",
    "tokenizers",
    "llmcompressor",
    "compressed-tensors",
    "gguf",
)


def tool_versions() -> dict[str, str]:
    """Package versions, and the compute backend: "cuda" (with its version and GPU) when the stage used a
    GPU, whose kernels are not bit-exact across runs; "cpu" otherwise."""
    versions = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    torch = sys.modules.get("torch")  # only a stage that imported torch can have used a GPU
    versions["backend"] = "cpu"
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        versions |= {"backend": "cuda", "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name()}
    return versions


def job_environment() -> dict[str, str]:
    """Which scheduler job made the artifact and which GPUs it was given, where a scheduler set them."""
    names = {"slurm_job_id": "SLURM_JOB_ID", "cuda_visible_devices": "CUDA_VISIBLE_DEVICES"}
    return {key: os.environ[name] for key, name in names.items() if name in os.environ}


def file_table(directory: Path) -> dict[str, dict]:
    """sha256 and size of every file under `directory` except the manifest itself."""
    return {
        path.relative_to(directory).as_posix(): {"sha256": sha256_file(path), "size": path.stat().st_size}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def peak_memory_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Recorder:
    """Collects a stage's facts while it runs; `write` puts the manifest into the artifact."""

    def __init__(self, stage: str, params: dict, seed: int | None = None, backend: str | None = None):
        """`backend`: where a stage that runs no torch computed (llama.cpp's tools), for tools.backend."""
        self.stage, self.params, self.seed, self.backend = stage, params, seed, backend
        self.inputs: dict[str, str] = {}
        self.results: dict = {}
        self.started = time.time()

    def input(self, label: str, path: Path, sha256: str | None = None) -> None:
        """`sha256`: the digest the caller has just verified the file against, so it is not read a second time
        (a 700 GB GGUF takes minutes to hash)."""
        self.inputs[label] = sha256 or sha256_file(path)

    def save(self, out: Path, results: dict, texts: dict[str, str]) -> dict:
        """An artifact made of small text files: write them and the manifest into `out`, all or nothing."""
        with atomic_path(out) as tmp:
            tmp.mkdir()
            self.complete(tmp, results, texts)
        return results

    def complete(self, directory: Path, results: dict, texts: dict[str, str]) -> dict:
        """Write the text files and the manifest into `directory`, the temporary of an `atomic_path` that the
        stage has already written its other files into."""
        for name, text in texts.items():
            (directory / name).write_text(text, encoding="utf-8")
        self.results = results
        self.write(directory)
        return results

    def write(self, directory: Path) -> dict:
        manifest = {
            "stage": self.stage,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "params": self.params,
            "seed": self.seed,
            "inputs": self.inputs,
            "results": self.results,
            "tools": tool_versions() | ({"backend": self.backend} if self.backend else {}),
            "job": job_environment(),
            "wall_time_s": round(time.time() - self.started, 3),
            "peak_memory_mb": round(peak_memory_mb(), 1),
            "files": file_table(directory),
        }
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return manifest


def read(directory: Path) -> dict:
    return json.loads((Path(directory) / MANIFEST).read_text())


def verify(directory: Path) -> None:
    """Every file the producer's manifest lists, present with its size and sha256, before a stage reads the
    artifact: a truncated or flipped file is refused here, not silently converted. Files are hashed in parallel
    (hashlib releases the GIL), so the cost is one read of the artifact at the disk's speed."""
    from concurrent.futures import ThreadPoolExecutor

    from deepcast.errors import DeepcastError

    directory = Path(directory)
    try:
        table = read(directory)["files"]
    except (OSError, KeyError, json.JSONDecodeError):
        raise DeepcastError(
            f"{directory} has no readable {MANIFEST}: it was not completed by deepcast. "
            "Fix: delete it and rerun the stage that makes it."
        ) from None

    def problem(name: str) -> str | None:
        path, expected = directory / name, table[name]
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} is {path.stat().st_size:,} bytes, the manifest says {expected['size']:,}"
        return None if sha256_file(path) == expected["sha256"] else f"{name} differs from its sha256 in the manifest"

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = [p for p in pool.map(problem, sorted(table)) if p]
    if problems:
        raise DeepcastError(
            f"{directory} is corrupt: {'; '.join(problems[:3])}. "
            f"Fix: delete {directory} and rerun the rule that made it (snakemake --forcerun it)."
        )
