"""Calibration set: sampled from a configured source, fixed seed, one file for every quantizer."""

from __future__ import annotations

import json

import pytest
from conftest import deepcast_cli, error_of
from deepcast import manifest
from deepcast.config import CalibrationSettings
from deepcast.errors import DeepcastError
from deepcast.stages import calibrate
from hubserver import create_repo


def _samples(directory):
    return [json.loads(line) for line in (directory / "samples.jsonl").read_text().splitlines()]


def test_corpus_calibration_set(calibration):
    samples = _samples(calibration)
    assert len(samples) == 16
    assert all(len(s["input_ids"]) == 512 for s in samples)
    texts = (calibration / "samples.txt").read_text()
    assert all(s["text"] in texts for s in samples)
    assert manifest.read(calibration)["results"] == {"samples": 16, "requested_samples": 16, "tokens": 16 * 512}


def test_seed_fixes_the_samples(checkpoint, corpus_dir, calibration, tmp_path):
    source = corpus_dir / "calibration.txt"
    again = tmp_path / "again"
    calibrate.run(checkpoint, source, again, CalibrationSettings(samples=16))
    assert (again / "samples.jsonl").read_bytes() == (calibration / "samples.jsonl").read_bytes()
    other = tmp_path / "other"
    calibrate.run(checkpoint, source, other, CalibrationSettings(samples=16, seed=1))
    assert (other / "samples.jsonl").read_bytes() != (calibration / "samples.jsonl").read_bytes()


def test_jsonl_source_with_text_field_and_chat_template(checkpoint, tmp_path):
    source = tmp_path / "data.jsonl"
    records = [{"prompt": f"Question {i}: what is the meaning of line {i} of the play?"} for i in range(10)]
    source.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "calibration"
    settings = CalibrationSettings(samples=4, sequence_length=64, text_field="prompt", chat_template=True)
    results = calibrate.run(checkpoint, source, out, settings)
    assert results["samples"] == 4
    samples = _samples(out)
    assert all("<｜User｜>" in s["text"] for s in samples), samples[0]["text"]
    assert all(len(s["input_ids"]) <= 64 for s in samples)


def test_fewer_documents_than_requested_is_recorded(checkpoint, tmp_path):
    source = tmp_path / "short.txt"
    source.write_text("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.\n")
    results = calibrate.run(checkpoint, source, tmp_path / "c", CalibrationSettings(samples=8))
    assert results == {"samples": 1, "requested_samples": 8, "tokens": results["tokens"]}


def test_hub_dataset_source(hub, checkpoint, tmp_path):
    text = "speaks of kings and queens, of ships and sealing wax, and of the deep sea."
    lines = [json.dumps({"text": f"Sample number {i} {text}"}) for i in range(6)]
    create_repo(hub.root_dir, "datasets/deepseek-test/calib", [{"data/train.jsonl": "\n".join(lines) + "\n"}])
    out = tmp_path / "calibration"
    results = calibrate.run(checkpoint, None, out, CalibrationSettings(source="hf-dataset://deepseek-test/calib"))
    assert results["samples"] == 6
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "samples.jsonl", "samples.txt"]


def test_empty_source_is_refused(checkpoint, tmp_path):
    source = tmp_path / "empty.txt"
    source.write_text("\n\n   \n")
    out = tmp_path / "c"
    with pytest.raises(DeepcastError, match="is empty"):
        calibrate.run(checkpoint, source, out, CalibrationSettings())
    assert not out.exists()


def test_missing_source_is_refused_by_the_cli(checkpoint, tmp_path):
    result = deepcast_cli(
        "calibrate",
        "--checkpoint",
        str(checkpoint),
        "--source-file",
        str(tmp_path / "absent.txt"),
        "--out",
        str(tmp_path / "c"),
        "--settings",
        json.dumps({"source": str(tmp_path / "absent.txt")}),
    )
    assert "does not exist" in error_of(result)
    assert not (tmp_path / "c").exists()


def test_jsonl_without_the_field_is_refused(checkpoint, tmp_path):
    source = tmp_path / "data.jsonl"
    source.write_text(json.dumps({"other": "x"}) + "\n")
    with pytest.raises(DeepcastError, match="has no field 'text'. Fix: set calibration.text_field"):
        calibrate.run(checkpoint, source, tmp_path / "c", CalibrationSettings())
