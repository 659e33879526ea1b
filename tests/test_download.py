"""Download stage: local sources, and the hub path against a loopback hub server."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from conftest import EMBEDDED, deepcast_cli, error_of
from deepcast import manifest
from deepcast.config import DownloadSettings
from deepcast.errors import DeepcastError
from deepcast.files import sha256_file
from deepcast.stages import download
from hubserver import create_repo

WEIGHTS = "model.safetensors"


def test_local_source_copies_weights_config_and_tokenizer(checkpoint):
    names = {p.name for p in checkpoint.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "manifest.json"} <= names
    assert "README.md" not in names and "training.json" not in names  # only the allowed patterns
    record = manifest.read(checkpoint)
    assert record["files"][WEIGHTS]["sha256"] == sha256_file(EMBEDDED / WEIGHTS)
    assert record["results"]["resolved_revision"] == "v1"
    assert record["tools"]["transformers"]


def test_hub_branch_resolves_to_commit_sha(hub, tmp_path):
    out = tmp_path / "checkpoint"
    results = download.run("hf://deepseek-test/tiny", "main", out, DownloadSettings())
    assert results["resolved_revision"] == hub.shas[-1]
    assert "deepcast_test_revision" not in json.loads((out / "config.json").read_text())
    assert manifest.read(out)["files"][WEIGHTS]["sha256"] == sha256_file(EMBEDDED / WEIGHTS)
    # Every file was fetched at the resolved sha, never at the moving branch name.
    resolves = [path for (_method, path, _auth) in hub.log if "/resolve/" in path]
    assert resolves and all(f"/resolve/{hub.shas[-1]}/" in path for path in resolves)


def test_hub_pinned_revision_is_honoured(hub, tmp_path):
    out = tmp_path / "checkpoint"
    results = download.run("hf://deepseek-test/tiny", hub.shas[0], out, DownloadSettings())
    assert results["resolved_revision"] == hub.shas[0]
    assert json.loads((out / "config.json").read_text())["deepcast_test_revision"] == "first"


def test_dropped_connection_resumes_with_range_request(hub, tmp_path):
    hub.cut(WEIGHTS, 5_000_000)
    out = tmp_path / "checkpoint"
    download.run("hf://deepseek-test/tiny", "main", out, DownloadSettings())
    assert (f"/deepseek-test/tiny/resolve/{hub.shas[-1]}/{WEIGHTS}", "bytes=5000000-") in hub.ranges
    assert sha256_file(out / WEIGHTS) == sha256_file(EMBEDDED / WEIGHTS)


def test_interrupted_download_resumes_on_the_next_run(hub, tmp_path):
    out = tmp_path / "checkpoint"
    hub.cut(WEIGHTS, 3_000_000, 0)  # the first attempt stops at 3 MB, the retry gets nothing
    with pytest.raises(DeepcastError, match="interrupted.*rerun the same command to resume"):
        download.run("hf://deepseek-test/tiny", "main", out, DownloadSettings(retries=1))
    assert not out.exists(), "an interrupted download must not look complete"
    partial = tmp_path / ".checkpoint.partial" / f"{WEIGHTS}.part"
    assert partial.stat().st_size == 3_000_000
    hub.reset_stats()
    download.run("hf://deepseek-test/tiny", "main", out, DownloadSettings())
    assert hub.ranges == [(f"/deepseek-test/tiny/resolve/{hub.shas[-1]}/{WEIGHTS}", "bytes=3000000-")]
    assert hub.counts[f"GET /deepseek-test/tiny/resolve/{hub.shas[-1]}/config.json"] == 0, "kept files re-fetched"
    assert sha256_file(out / WEIGHTS) == sha256_file(EMBEDDED / WEIGHTS)


def test_corrupted_file_is_detected_and_deleted(hub, tmp_path):
    good = (EMBEDDED / WEIGHTS).read_bytes()
    hub.override[WEIGHTS] = good[:1000] + bytes([good[1000] ^ 0xFF]) + good[1001:]
    out = tmp_path / "checkpoint"
    with pytest.raises(DeepcastError, match=r"model.safetensors is corrupt: its sha256 is .* rerun"):
        download.run("hf://deepseek-test/tiny", "main", out, DownloadSettings())
    assert not out.exists()
    assert not (tmp_path / ".checkpoint.partial" / WEIGHTS).exists()
    assert not (tmp_path / ".checkpoint.partial" / f"{WEIGHTS}.part").exists()


def test_token_is_sent_but_never_written(hub, tmp_path, monkeypatch):
    secret = "hf_deepcastTESTtoken0123456789"
    hub.token = secret
    monkeypatch.setenv("HF_TOKEN", secret)
    out = tmp_path / "checkpoint"
    result = deepcast_cli(
        "download",
        "--source",
        "hf://deepseek-test/tiny",
        "--revision",
        "main",
        "--out",
        str(out),
        env={"HF_TOKEN": secret, "HF_ENDPOINT": hub.url},
    )
    assert result.returncode == 0, result.stderr
    assert f"Bearer {secret}" in hub.auth_headers
    assert secret not in result.stdout + result.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_private_repo_without_token_names_the_fix(hub, tmp_path):
    hub.token = "hf_required"
    with pytest.raises(DeepcastError, match="export HF_TOKEN"):
        download.run("hf://deepseek-test/tiny", "main", tmp_path / "c", DownloadSettings())


def test_unknown_revision_is_refused(hub, tmp_path):
    with pytest.raises(DeepcastError, match="revision 'nope' does not exist"):
        download.run("hf://deepseek-test/tiny", "nope", tmp_path / "c", DownloadSettings())


def _repo_with(hub, files: dict) -> str:
    create_repo(hub.root_dir, "deepseek-test/other", [files])
    return "hf://deepseek-test/other"


def test_pickle_only_checkpoint_is_refused_before_download(hub, tmp_path):
    config = (EMBEDDED / "config.json").read_bytes()
    source = _repo_with(hub, {"config.json": config, "tokenizer.json": "{}", "pytorch_model.bin": b"\0" * 100})
    with pytest.raises(DeepcastError, match=r"only pickle weights \(pytorch_model.bin\).*allow_pickle: true"):
        download.run(source, "main", tmp_path / "c", DownloadSettings())
    assert not [path for (method, path, _a) in hub.log if method == "GET" and "/resolve/" in path]


def test_pickle_weights_are_converted_when_the_user_opts_in(hub, tmp_path):
    import torch
    from safetensors.torch import load_file

    tensors = load_file(EMBEDDED / WEIGHTS)
    pickle_path = tmp_path / "pytorch_model.bin"
    torch.save(tensors, pickle_path)
    files = {p.name: p.read_bytes() for p in EMBEDDED.iterdir() if p.is_file() and p.name != WEIGHTS}
    source = _repo_with(hub, {**files, "pytorch_model.bin": pickle_path.read_bytes()})
    out = tmp_path / "checkpoint"
    results = download.run(source, "main", out, DownloadSettings(allow_pickle=True))
    assert results["converted_from_pickle"] == ["pytorch_model.bin"]
    assert not (out / "pytorch_model.bin").exists()
    converted = load_file(out / "pytorch_model.safetensors")
    assert all(torch.equal(converted[k], tensors[k]) for k in tensors)


def test_remote_code_is_refused_before_weights(hub, tmp_path):
    config = json.loads((EMBEDDED / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    files = {p.name: p.read_bytes() for p in EMBEDDED.iterdir() if p.is_file()}
    source = _repo_with(hub, {**files, "config.json": json.dumps(config)})
    with pytest.raises(DeepcastError, match="needs remote code"):
        download.run(source, "main", tmp_path / "c", DownloadSettings())
    assert not [p for (m, p, _a) in hub.log if m == "GET" and p.endswith(WEIGHTS)]


def test_architecture_unknown_to_transformers_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        (model / name).write_bytes((EMBEDDED / name).read_bytes())
    (model / "config.json").write_text(json.dumps({"architectures": ["MysteryForCausalLM"]}))
    with pytest.raises(DeepcastError, match="no built-in causal-LM class"):
        download.run(str(model), "local", tmp_path / "c", DownloadSettings())


def test_missing_tokenizer_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("model.safetensors", "config.json"):
        (model / name).write_bytes((EMBEDDED / name).read_bytes())
    with pytest.raises(DeepcastError, match="has no tokenizer"):
        download.run(str(model), "local", tmp_path / "c", DownloadSettings())
    assert not (tmp_path / "c").exists()


def test_cli_reports_bad_input_in_one_line(tmp_path: Path):
    result = deepcast_cli("download", "--source", str(tmp_path / "absent"), "--revision", "x", "--out", "o")
    assert "local model directory" in error_of(result)


def test_a_disk_too_small_for_the_download_is_refused_first_and_a_rerun_with_room_resumes(small_disk):
    out = small_disk / "checkpoint"
    result = deepcast_cli("download", "--source", str(EMBEDDED), "--revision", "v1", "--out", str(out))
    message = error_of(result)
    assert re.search(r"the download of .* needs 0\.04 GB \(the source's figure\), and 0\.03 GB are free", message)
    assert "stays in" in message and not out.exists()
    subprocess.run(["mount", "-o", "remount,size=100m", str(small_disk)], check=True)
    again = deepcast_cli("download", "--source", str(EMBEDDED), "--revision", "v1", "--out", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "config.json").is_file() and (out / "manifest.json").is_file()
