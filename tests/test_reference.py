"""Reference evaluation: the baseline perplexity, measured on the real embedded model."""

from __future__ import annotations

import json

import pytest
from deepcast import manifest
from deepcast.config import EvaluationSettings
from deepcast.errors import DeepcastError
from deepcast.stages import reference


def test_embedded_model_is_trained(reference_dir):
    figures = json.loads((reference_dir / "perplexity.json").read_text())
    assert figures["perplexity"] <= 200  # random init gives about 129000
    assert figures["chunks"] == 16 and figures["n_ctx"] == 512
    assert figures["tokens_scored"] == 16 * 255


def test_chunks_are_saved_for_later_validations(reference_dir):
    chunks = json.loads((reference_dir / "chunks.json").read_text())
    assert len(chunks) == 16 and all(len(c) == 512 and c[0] == 0 for c in chunks)  # BOS first
    record = manifest.read(reference_dir)
    assert record["results"]["perplexity"] == json.loads((reference_dir / "perplexity.json").read_text())["perplexity"]
    assert set(record["files"]) == {"chunks.json", "perplexity.json"}


def test_text_shorter_than_one_chunk_is_refused(checkpoint, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("Friends, Romans, countrymen.\n")
    with pytest.raises(DeepcastError, match="fewer than one 512-token chunk"):
        reference.run(checkpoint, text, tmp_path / "r", EvaluationSettings())
    assert not (tmp_path / "r").exists()
