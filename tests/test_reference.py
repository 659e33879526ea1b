"""Reference evaluation: the baseline perplexity, measured on the real embedded model."""

from __future__ import annotations

import json

import pytest
from deepcast import manifest
from deepcast.config import EvaluationSettings
from deepcast.errors import DeepcastError
from deepcast.perplexity import chunk_tokens
from deepcast.stages import reference


def test_embedded_model_is_trained(reference_dir):
    figures = json.loads((reference_dir / "perplexity.json").read_text())
    assert figures["perplexity"] <= 200  # random init gives about 129000
    assert figures["chunks"] == 16 and figures["n_ctx"] == 512
    assert figures["tokens_scored"] == 16 * 255


def test_chunks_are_saved_for_later_validations(reference_dir, checkpoint, corpus_dir):
    from transformers import AutoTokenizer

    chunks = json.loads((reference_dir / "chunks.json").read_text())
    tokens = AutoTokenizer.from_pretrained(checkpoint)((corpus_dir / "evaluation.txt").read_text())["input_ids"]
    # DeepSeek-V3's tokenizer_config does not add BOS, so chunks are plain slices, as in llama-perplexity.
    assert chunks == [tokens[i * 512 : (i + 1) * 512] for i in range(16)]
    record = manifest.read(reference_dir)
    assert record["results"]["perplexity"] == json.loads((reference_dir / "perplexity.json").read_text())["perplexity"]
    assert set(record["files"]) == {"chunks.json", "perplexity.json", "tasks.json"}
    assert json.loads((reference_dir / "tasks.json").read_text())["status"] == "skipped"  # no tasks configured


def test_text_shorter_than_one_chunk_is_refused(checkpoint, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("Friends, Romans, countrymen.\n")
    with pytest.raises(DeepcastError, match="fewer than one 512-token chunk"):
        reference.run(checkpoint, text, tmp_path / "r", EvaluationSettings())
    assert not (tmp_path / "r").exists()


def test_chunks_start_with_bos_when_the_tokenizer_adds_one():
    tokens = [7, 11, 12, 13, 14, 15, 16, 17, 18]
    assert chunk_tokens(tokens, 7, 4, 10) == [[7, 11, 12, 13], [7, 15, 16, 17]]
    assert chunk_tokens(tokens, None, 4, 1) == [[7, 11, 12, 13]]
