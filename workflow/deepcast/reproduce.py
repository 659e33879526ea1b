"""Rebuild an artifact from its manifest in a scratch directory and compare checksums.

The manifest records the exact command that made the artifact and the sha256 of its inputs and of
every file it wrote. `deepcast reproduce ARTIFACT` runs that command again with `--out` pointed at a
scratch directory, from the directory the pipeline ran in, and reports every file that differs. On the
CPU the files must be bit-identical; where the manifest says a GPU made it (GPU kernels are not
bit-exact), the numeric results must agree within RESULT_TOLERANCE instead.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from deepcast.errors import DeepcastError
from deepcast.manifest import MANIFEST, read

RESULT_TOLERANCE = 0.01  # relative, for figures of artifacts made by GPU kernels


def _close(old, new) -> bool:
    if isinstance(old, dict) and isinstance(new, dict):
        return old.keys() == new.keys() and all(_close(old[k], new[k]) for k in old)
    if isinstance(old, bool) or not isinstance(old, int | float):
        return old == new
    return isinstance(new, int | float) and abs(new - old) <= RESULT_TOLERANCE * max(abs(old), 1e-12)


def figures(results: dict) -> dict:
    """A stage's results without what measures the run rather than the artifact: times and peak memory
    (a first GPU run also compiles kernels, so they differ by more than any tolerance)."""
    return {key: value for key, value in results.items()
            if not key.endswith(("seconds", "_time_s", "_s")) and not key.startswith("peak_")}  # fmt: skip


def reproduce(artifact: Path, scratch: Path | None = None) -> dict:
    record = read(artifact)
    argv = shlex.split(record["command"])
    if argv[:1] != ["deepcast"] or "--out" not in argv:
        raise DeepcastError(
            f"{artifact}'s manifest has no deepcast command with --out to replay: {record['command']!r}"
        )
    scratch = scratch or Path(tempfile.mkdtemp(prefix="deepcast-reproduce-"))
    out = scratch / artifact.name
    argv[argv.index("--out") + 1] = str(out)
    executable = Path(sys.executable).with_name("deepcast")
    result = subprocess.run([str(executable), *argv[1:]], capture_output=True, text=True)
    if result.returncode != 0:
        raise DeepcastError(f"the recorded command failed again (exit {result.returncode}):\n{result.stderr[-2000:]}")
    again = read(out)
    inputs_changed = sorted(k for k in record["inputs"] if record["inputs"][k] != again["inputs"].get(k))
    files = {name: entry["sha256"] for name, entry in record["files"].items() if name != MANIFEST}
    rebuilt = {name: entry["sha256"] for name, entry in again["files"].items() if name != MANIFEST}
    differing = sorted(name for name in files.keys() | rebuilt.keys() if files.get(name) != rebuilt.get(name))
    gpu = record["tools"].get("backend") == "cuda"
    same_figures = _close(figures(record["results"]), figures(again["results"]))
    return {
        "artifact": str(artifact),
        "command": shlex.join(argv),
        "rebuilt_in": str(out),
        "inputs_changed": inputs_changed,
        "files_compared": len(files),
        "differing_files": differing,
        "bit_identical": not differing and not inputs_changed,
        "check": "results within 1 % (GPU kernels are not bit-exact)" if gpu else "bit-identical files",
        "reproduced": not inputs_changed and (same_figures if gpu else not differing),
    }
