"""Reference evaluation: the baseline perplexity, measured on the real embedded model."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from deepcast import manifest, validation
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
    assert set(record["files"]) == {"chunks.json", "perplexity.json", "tasks.json", "log_probs.npy"}
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


@pytest.fixture(scope="module")
def models(checkpoint):
    """The embedded model and a copy with noise on every weight, as a quantization would leave it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    noisy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in noisy.parameters():
            weight.add_(0.02 * weight.std() * torch.randn(weight.shape, generator=generator))
    return model, noisy


def test_the_kept_log_probabilities_are_the_models(reference_dir, models):
    """A validation reads the 16-bit model's log-probabilities from the reference instead of running the model:
    every figure agrees with running it, to float16's rounding."""
    from deepcast.perplexity import compare

    model, noisy = models
    stored = np.load(reference_dir / "log_probs.npy", mmap_mode="r", allow_pickle=False)
    assert stored.shape == (16, 255, model.config.vocab_size) and stored.dtype == np.float16
    chunks = json.loads((reference_dir / "chunks.json").read_text())
    run = compare(noisy, model, chunks).as_dict()
    read = validation.against_reference(noisy, reference_dir, 4)
    assert read["tokens_scored"] == run["tokens_scored"] == 16 * 255
    assert read["perplexity"] == pytest.approx(run["perplexity"], rel=1e-9)  # the quantized side is not stored
    assert read["same_top_token_percent"] == run["same_top_token_percent"] < 100
    assert read["kl_divergence"] == pytest.approx(run["kl_divergence"], rel=1e-3)
    assert read["kl_divergence"] > 1e-3
    itself = validation.against_reference(model, reference_dir, 4)
    assert itself["kl_divergence"] < 1e-5 and itself["same_top_token_percent"] == 100
    assert itself["perplexity_ratio_to_reference"] == pytest.approx(1, abs=1e-6)


def test_damaged_or_missing_log_probabilities_are_refused(reference_dir, models, tmp_path):
    copied = tmp_path / "reference"
    shutil.copytree(reference_dir, copied)
    with (copied / "log_probs.npy").open("r+b") as handle:
        handle.seek(-1000, 2)
        byte = handle.read(1)
        handle.seek(-1000, 2)
        handle.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(DeepcastError, match="differs from the sha256 its manifest lists.*Fix: delete"):
        validation.against_reference(models[1], copied, 4)
    (copied / "log_probs.npy").unlink()
    with pytest.raises(DeepcastError, match="no log_probs.npy.*snakemake --forcerun reference"):
        validation.against_reference(models[1], copied, 4)
