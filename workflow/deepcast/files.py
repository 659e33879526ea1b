"""Checksums and all-or-nothing writes: an artifact is either complete or absent."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from deepcast.errors import DeepcastError

CHUNK = 1 << 20


def cache_root() -> Path:
    """Downloads and builds shared by every checkout on the machine, outside the repository."""
    return Path(os.environ.get("DEEPCAST_CACHE", Path.home() / ".cache" / "deepcast"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


GB = 1e9


def free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def disk_full(error: BaseException) -> bool:
    """An OSError for a full disk, or a tool that failed saying so."""
    if isinstance(error, OSError):
        return error.errno == errno.ENOSPC
    return "No space left on device" in str(error)


def short_of_space(what: str, where: Path, needed_bytes: int | None, left: str, figure: str = "the planner's") -> str:
    """One message for a disk too small: what needs how much, what is free, what was left, the fix."""
    needs = f"needs {needed_bytes / GB:,.2f} GB ({figure} figure), and " if needed_bytes else ""
    return (
        f"{what} {needs}{free_bytes(where) / GB:,.2f} GB are free in {where}. {left} "
        "Fix: free disk there (or run from a results directory on a bigger disk) and rerun."
    )


def require_space(final: Path, needed_bytes: int | None) -> None:
    """Refuse before any work when the planner's figure for `final` exceeds the free space where it goes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if needed_bytes and free_bytes(final.parent) < needed_bytes:
        raise DeepcastError(short_of_space(final.name, final.parent, needed_bytes, f"Nothing was written at {final}."))


@contextlib.contextmanager
def atomic_path(final: Path, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; rename it into place only on success.

    Works for files and directories alike. A failure leaves nothing at `final`
    and removes the temporary, so no later run can trust a half-written artifact.
    `needed_bytes` (the planner's figure for what is written) is checked against the free space first; a
    disk that fills up anyway ends in one message with the space needed and free, not a traceback.
    """
    final = Path(final)
    require_space(final, needed_bytes)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    remove(tmp)
    left = f"Nothing was written at {final}."
    try:
        yield tmp
        remove(final)
        os.replace(tmp, final)
    except (OSError, DeepcastError) as error:
        if not disk_full(error):
            raise
        remove(tmp)
        message = short_of_space(final.name, final.parent, needed_bytes, left)
        raise DeepcastError(f"the disk filled up: {message}") from None
    finally:
        remove(tmp)


CHECKSUMS = "SHA256SUMS"


def write_checksums(directory: Path) -> dict[str, str]:
    """SHA256SUMS for every file of a bundle, in the format `sha256sum -c` reads."""
    sums = {
        path.relative_to(directory).as_posix(): sha256_file(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != CHECKSUMS
    }
    (directory / CHECKSUMS).write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    return sums


def link_or_copy(source: Path, dest: Path) -> None:
    """A hard link where the filesystem allows one (no second copy of the weights), else a copy."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def verify_checksums(directory: Path) -> None:
    """Check a bundle against its SHA256SUMS, as its launch script does before starting."""
    import subprocess

    from deepcast.errors import DeepcastError

    check = subprocess.run(["sha256sum", "--quiet", "--strict", "-c", CHECKSUMS], cwd=directory,
                           capture_output=True, text=True)  # fmt: skip
    if check.returncode != 0:
        raise DeepcastError(
            f"bundle {directory} does not match its {CHECKSUMS}:\n{(check.stdout + check.stderr).strip()}\n"
            "Fix: delete the bundle and rerun its rule."
        )


def write_launch_script(directory: Path, comment: str, command: str, preflight: str = "") -> None:
    """launch.sh for a bundle: check every file against SHA256SUMS, run `preflight` (shell lines that exit
    non-zero when the machine cannot run the bundle), then exec `command` with the caller's args."""
    script = (
        "#!/usr/bin/env bash\n"
        f"{comment}\n"
        "set -euo pipefail\n"
        'cd "$(dirname "$0")"\n'
        f"if ! sha256sum --quiet --strict -c {CHECKSUMS}; then\n"
        f'    echo "bundle files do not match {CHECKSUMS}; refusing to start" >&2\n'
        "    exit 3\n"
        "fi\n"
        f"{preflight}"
        f'exec {command} "$@"\n'
    )
    (directory / "launch.sh").write_text(script)
    (directory / "launch.sh").chmod(0o755)
