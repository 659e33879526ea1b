"""Scheduled rebuilds: pin each model to the commit its upstream revision points at now, then run the
pipeline. Artifacts live under the resolved commit, so when upstream moved the new commit's artifacts
are built (and only they); when nothing moved, Snakemake finds everything up to date.

Two rebuilds for different targets on one machine (separate checkouts or work directories sharing
SNAKEMAKE_OUTPUT_CACHE) build the target-independent work under one lock per model commit: the
first computes it into the cache, the second waits and then takes it from there.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from deepcast import hub, layout
from deepcast.errors import DeepcastError
from deepcast.files import cache_root
from deepcast.registry import ModelRef
from deepcast.tools import visible_gpus

COMMIT = 40  # hex digits of a full commit sha


def resolve_revision(model: ModelRef) -> str:
    """The commit a hub model's revision points at now; local sources keep their label (their files
    are rule inputs, so a changed file reruns what depends on it)."""
    if model.hub_id is None or len(model.revision) == COMMIT:
        return model.revision
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi(endpoint=hub.endpoint(), token=hub.token()).model_info(model.hub_id, revision=model.revision)
    except (RepositoryNotFoundError, RevisionNotFoundError, HfHubHTTPError, OSError) as error:
        raise DeepcastError(
            f"cannot resolve {model.hub_id}@{model.revision} on {hub.endpoint()}: {error}. "
            "Fix: check the id, the revision and HF_TOKEN."
        ) from None
    return info.sha


@contextmanager
def shared_work_lock(key: str):
    """A machine-wide lock per model commit, held while the target-independent work is built."""
    path = cache_root() / "locks" / (key.replace("/", "--") + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def workdir_of(extra: list[str]) -> Path:
    """The directory Snakemake will run in: its -d/--directory among `extra`, else this one."""
    for flag in ("-d", "--directory"):
        if flag in extra[:-1]:
            return Path(extra[extra.index(flag) + 1]).resolve()
    return Path.cwd().resolve()


@contextmanager
def workdir_lock(workdir: Path):
    """One rebuild per work directory at a time: a second one waits for the first (and says so) instead of
    running Snakemake beside it."""
    path = workdir / ".snakemake" / "deepcast-rebuild.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"rebuild: another rebuild is running in {workdir}; waiting for it", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def live_snakemake_in(workdir: Path) -> list[int]:
    """Process ids of Snakemake runs (other than this process's children) working in `workdir`, from /proc."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            cwd = (proc / "cwd").resolve()
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv if a]
        if not any(Path(w).name == "snakemake" for w in words[:2]):
            continue
        given = next((words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-d", "--directory")), None)
        where = (cwd / given).resolve() if given else cwd
        if where == workdir and int(proc.name) != os.getpid():
            pids.append(int(proc.name))
    return pids


def recover_stale_lock(snakemake: list[str], workdir: Path, config: list[str]) -> bool:
    """After a kill -9, Snakemake's lock stays and every later run refuses. Under the work-directory lock no
    other rebuild runs here; when no Snakemake process works here either, the lock is stale: unlock it."""
    locks = workdir / ".snakemake" / "locks"
    if not locks.is_dir() or not any(locks.iterdir()):
        return False
    if live_snakemake_in(workdir):
        return False  # a live run holds it; Snakemake refuses with its own message
    command = [*snakemake, "--unlock", "--config", *config]
    print("rebuild: stale Snakemake lock, no process holds it: $ " + " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, capture_output=True)
    return True


def gpu_limit(extra: list[str]) -> list[str]:
    """`--resources gpu=N` for this machine's N GPUs, so jobs that each take a GPU never share one (a job
    planned for more GPUs than the box has is given all of them); nothing where the caller set --resources."""
    gpus = len(visible_gpus("name"))
    return ["--resources", f"gpu={gpus}"] if gpus and "--resources" not in extra else []


def run(model: ModelRef, model_spec: str, target: str, cores: str, formats: list[str] | None, scope: str,
        extra: list[str], record: Path | None) -> int:  # fmt: skip
    """Build `scope`: "all", "shared" (the target-independent work) or "download" (the checkpoint only)."""
    commit = resolve_revision(model)
    pinned = f"{model.hub_id}@{commit}" if model.hub_id else model_spec
    config = [f"target={target}", f"model={pinned}"] + ([f"formats=[{', '.join(formats)}]"] if formats else [])
    cache = ["--cache"] if os.environ.get("SNAKEMAKE_OUTPUT_CACHE") else []
    executable = str(Path(sys.executable).with_name("snakemake"))
    options = ["--cores", cores, *cache, *gpu_limit(extra), *extra]
    snakemake = [executable, *options]

    def phase(*targets: str) -> int:
        # The targets first: an option that takes several values (--cache [RULE ...], the caller's
        # --configfile A B) would swallow a target written after it.
        command = [executable, *targets, *options, "--config", *config]
        print("$ " + " ".join(command), file=sys.stderr, flush=True)
        return subprocess.run(command).returncode

    workdir = workdir_of(extra)
    with workdir_lock(workdir):
        recovered = recover_stale_lock(snakemake, workdir, config)
        with shared_work_lock(f"{model.name}@{commit}"):
            checkpoint = f"{layout.model_dir(replace(model, revision=commit))}/checkpoint"
            status = phase(checkpoint if scope == "download" else "shared")
        if status == 0 and scope == "all":
            status = phase()
    if record is not None:
        record.parent.mkdir(parents=True, exist_ok=True)
        facts = {"model": pinned, "target": target, "status": status, "stale_lock_recovered": recovered}
        record.write_text(json.dumps(facts) + "\n")
    print(f"rebuild: {model_spec} -> {pinned} for {target}: snakemake exit {status}", file=sys.stderr)
    return status
