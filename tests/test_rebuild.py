"""Scheduled rebuilds: the upstream revision is resolved to its commit first; a moved upstream builds
the new commit's artifacts, an unmoved one (or an unchanged local source) runs nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import EMBEDDED, REPO
from hubserver import create_repo

DEEPCAST = Path(sys.executable).with_name("deepcast")
ENV_PATH = {"PATH": f"{DEEPCAST.parent}:/usr/bin:/bin"}


def rebuild(workdir: Path, model: str) -> subprocess.CompletedProcess:
    """Rebuild up to the download for the cpu target (the rest of the DAG hangs off the checkpoint)."""
    return subprocess.run(
        [str(DEEPCAST), "rebuild", "--target", "cpu", "--model", model, "--cores", "2", "--config-dir",
         str(REPO / "config"), "--scope", "download", "-s", str(REPO / "Snakefile"), "-d", str(workdir)],
        capture_output=True, text=True, env={**os.environ, **ENV_PATH},
    )  # fmt: skip


def downloads(result: subprocess.CompletedProcess) -> list[str]:
    said = result.stdout + result.stderr
    return [line for line in said.splitlines() if line.startswith("Shell command: deepcast download")]


def test_a_moved_upstream_builds_the_new_commit_and_an_unmoved_one_nothing(hub, tmp_path):
    first = rebuild(tmp_path, "deepseek-test/tiny")
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"deepseek-test/tiny -> deepseek-test/tiny@{hub.shas[-1]}" in first.stderr
    assert (tmp_path / f"results/models/deepseek-test--tiny/{hub.shas[-1]}/checkpoint/config.json").is_file()

    again = rebuild(tmp_path, "deepseek-test/tiny")
    assert again.returncode == 0 and "Shell command:" not in again.stdout + again.stderr

    files = {p.name: p.read_bytes() for p in EMBEDDED.iterdir() if p.is_file()}
    moved = dict(files, **{"config.json": json.dumps({**json.loads(files["config.json"]), "note": "moved"}).encode()})
    old = {**files, "config.json": json.dumps({**json.loads(files["config.json"]), "deepcast_test_revision": "first"},
                                              indent=2).encode()}  # fmt: skip
    shas = create_repo(hub.root_dir, "deepseek-test/tiny", [old, files, moved])
    assert shas[:2] == hub.shas
    pushed = rebuild(tmp_path, "deepseek-test/tiny")
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    assert len(downloads(pushed)) == 1 and f"--revision {shas[-1]}" in downloads(pushed)[0]
    config = tmp_path / f"results/models/deepseek-test--tiny/{shas[-1]}/checkpoint/config.json"
    assert json.loads(config.read_text())["note"] == "moved"
    assert (tmp_path / f"results/models/deepseek-test--tiny/{hub.shas[-1]}/checkpoint").is_dir()  # kept


def test_a_changed_local_source_reruns_its_download(tmp_path):
    source = tmp_path / "my-model"
    shutil.copytree(EMBEDDED, source)
    workdir = tmp_path / "run"
    assert rebuild(workdir, str(source)).returncode == 0
    unchanged = rebuild(workdir, str(source))
    assert unchanged.returncode == 0 and "Shell command:" not in unchanged.stdout + unchanged.stderr
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "note": "edited"}, indent=2))
    edited = rebuild(workdir, str(source))
    assert edited.returncode == 0 and len(downloads(edited)) == 1


def test_two_targets_rebuilt_at_once_compute_the_shared_work_once(tmp_path):
    env = {**os.environ, **ENV_PATH, "SNAKEMAKE_OUTPUT_CACHE": str(tmp_path / "cache")}
    (tmp_path / "cache").mkdir()
    few_chunks = tmp_path / "few-chunks.yaml"  # a 0.5 GB KL-divergence base instead of 3.2 GB
    few_chunks.write_text("evaluation: {max_chunks: 8}\n")
    runs = {}
    for target in ("cpu", "4x2080ti"):
        log = open(tmp_path / f"{target}.log", "w")  # noqa: SIM115
        command = [str(DEEPCAST), "rebuild", "--target", target, "--model", "tiny-deepseek-v3", "--cores", "1",
                   "--formats", "Q8_0", "--scope", "shared", "--config-dir", str(REPO / "config"),
                   "-s", str(REPO / "Snakefile"), "-d", str(tmp_path / target),
                   "--configfile", str(few_chunks)]  # fmt: skip
        runs[target] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log)
    for process, log in runs.values():
        assert process.wait(timeout=1200) == 0
        log.close()
    logs = {target: (tmp_path / f"{target}.log").read_text() for target in runs}
    for artifact in ("checkpoint", "calibration", "reference", "gguf/bf16", "gguf/imatrix", "gguf/Q8_0",
                     "gguf/kld-base"):  # fmt: skip
        computed = [
            t
            for t, text in logs.items()
            if f"Moving output file results/models/tiny-deepseek-v3/v1/{artifact} to cache" in text
        ]
        assert len(computed) == 1, (artifact, computed)
        for target in runs:
            assert (tmp_path / target / "results/models/tiny-deepseek-v3/v1" / artifact / "manifest.json").is_file()



def rebuild_command(workdir: Path, record: Path) -> list[str]:
    return [str(DEEPCAST), "rebuild", "--target", "cpu", "--model", "tiny-deepseek-v3", "--cores", "1", "--config-dir",
            str(REPO / "config"), "--scope", "download", "--record", str(record), "-s", str(REPO / "Snakefile"),
            "-d", str(workdir)]  # fmt: skip


def run_env() -> dict:
    return {**os.environ, **ENV_PATH}


def snakemake_in(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    command = [str(DEEPCAST.with_name("snakemake")), "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args]
    return subprocess.run(command, capture_output=True, text=True, env=run_env())


def killed_mid_download(workdir: Path, record: Path) -> None:
    """A rebuild killed with SIGKILL (its whole process group) while Snakemake holds its lock."""
    started = workdir / "logs/tiny-deepseek-v3/v1/download.log"  # written when the download job starts
    started.unlink(missing_ok=True)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    process = subprocess.Popen(rebuild_command(workdir, record), env=run_env(), start_new_session=True, **quiet)
    deadline = time.time() + 120
    while not started.exists() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert any((workdir / ".snakemake" / "locks").glob("*")), "the rebuild never took Snakemake's lock"


def test_after_a_kill_9_the_printed_unlock_works_and_the_rebuild_recovers_by_itself(tmp_path):
    workdir, record = tmp_path / "run", tmp_path / "record.json"
    killed_mid_download(workdir, record)
    plain = snakemake_in(workdir, "--cores", "1", "results/models/tiny-deepseek-v3/v1/checkpoint")
    assert plain.returncode != 0 and "Directory cannot be locked" in plain.stderr and "--unlock" in plain.stderr
    # The command Snakemake's message names, as printed: it used to fail in this workflow ("Workflow requires a
    # total number of cores to be defined") because rules took workflow.cores.
    unlock = snakemake_in(workdir, "--unlock")
    assert unlock.returncode == 0 and "Unlocked working directory" in unlock.stdout + unlock.stderr

    killed_mid_download(workdir, record)
    recovered = subprocess.run(rebuild_command(workdir, record), capture_output=True, text=True, env=run_env())
    assert recovered.returncode == 0, recovered.stderr[-3000:]
    assert "stale Snakemake lock, no process holds it" in recovered.stderr
    facts = {"model": "tiny-deepseek-v3", "target": "cpu", "status": 0, "stale_lock_recovered": True}
    assert json.loads(record.read_text()) == facts
    assert (workdir / "results/models/tiny-deepseek-v3/v1/checkpoint/manifest.json").is_file()


def test_two_rebuilds_of_one_directory_at_once_run_one_after_the_other(tmp_path):
    workdir = tmp_path / "run"
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "env": run_env()}
    runs = [subprocess.Popen(rebuild_command(workdir, tmp_path / f"record{i}.json"), **pipes) for i in range(2)]
    outputs = [process.communicate(timeout=600) for process in runs]
    assert [process.returncode for process in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    waited = [err for _, err in outputs if "another rebuild is running" in err]
    assert len(waited) == 1 and "Shell command:" not in waited[0]  # the second found the download done
    assert (workdir / "results/models/tiny-deepseek-v3/v1/checkpoint/manifest.json").is_file()
