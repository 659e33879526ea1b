"""The llama.cpp teacher signal: llama-perplexity's dense KL base reduced to top-k, checked against transformers."""

from __future__ import annotations

import tempfile
import tracemalloc

import pytest
import torch
from deepcast import kld_topk
from deepcast.errors import DeepcastError
from deepcast.kd import Signal, top_k_of
from deepcast.perplexity import chunk_tokens
from deepcast.stages import gguf

CONTEXT, CHUNKS, K = 128, 4, 32
N_VOCAB = 129280  # the embedded model's (padded) vocabulary
POSITIONS = CONTEXT - 1 - CONTEXT // 2  # llama-perplexity saves the second half but the last position
# Measured on the embedded model, bf16 GGUF on llama.cpp's CPU backend vs float32 transformers, 4 chunks of
# 128: 99.2 % same top-1, mean |top-1 log-prob difference| 0.0069 nats, mean |tail mass difference| 0.0008
# (16 chunks: 99.4 %, 0.0049, 0.0006). llama.cpp rounds activations to bf16 for bf16 weights.
MIN_TOP1_AGREEMENT = 0.95
MAX_TOP1_LOGPROB_DIFFERENCE = 0.02
MAX_TAIL_MASS_DIFFERENCE = 0.005


@pytest.fixture(scope="session")
def teacher(base):
    return base


@pytest.fixture(scope="session")
def evaluation_text(corpus_dir):
    return corpus_dir / "evaluation.txt"


@pytest.fixture(scope="session")
def dense_file(teacher, evaluation_text, llama, tmp_path_factory):
    """A KL base kept on disk (produce() deletes its own), made as the validation stage makes it."""
    out = tmp_path_factory.mktemp("kld-topk") / "kld-base"
    gguf.kld_base(teacher, evaluation_text, out, CONTEXT, CHUNKS, 2, llama)
    return out / gguf.KLD_BASE


@pytest.fixture(scope="session")
def signal(teacher, evaluation_text, llama):
    return kld_topk.produce(teacher, evaluation_text, CONTEXT, CHUNKS, K, 2, llama)


@pytest.fixture(scope="session")
def transformers_top_k(checkpoint, signal):
    """transformers' float32 top-k at the signal's positions of the signal's windows."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=signal.input_ids.long()).logits
    return top_k_of(logits[:, signal.first_position : signal.first_position + signal.positions], K)


def test_signal_has_the_promised_shapes_and_values(signal):
    assert signal.producer == "llama.cpp" and signal.first_position == CONTEXT // 2
    assert signal.input_ids.dtype == torch.int32 and signal.input_ids.shape == (CHUNKS, CONTEXT)
    assert signal.topk_ids.dtype == torch.int32 and signal.topk_ids.shape == (CHUNKS, POSITIONS, K)
    assert signal.topk_logprobs.dtype == torch.float16 and signal.topk_logprobs.shape == (CHUNKS, POSITIONS, K)
    assert signal.tail_mass.dtype == torch.float16 and signal.tail_mass.shape == (CHUNKS, POSITIONS)
    assert signal.topk_ids.min() >= 0 and signal.topk_ids.max() < N_VOCAB
    assert (signal.topk_logprobs <= 0).all()
    assert (signal.topk_logprobs.diff(dim=-1) <= 0).all()
    assert ((signal.tail_mass >= 0) & (signal.tail_mass <= 1)).all()


def test_windows_are_the_tokens_transformers_forms(signal, checkpoint, evaluation_text):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer(evaluation_text.read_text(encoding="utf-8"), add_special_tokens=True)["input_ids"]
    adds_bos = tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]
    chunks = chunk_tokens(ids, tokenizer.bos_token_id if adds_bos else None, CONTEXT, CHUNKS)
    assert signal.input_ids.tolist() == chunks


def test_top_k_agrees_with_transformers(signal, transformers_top_k):
    ids, logprobs, tail = transformers_top_k
    same_top1 = (signal.topk_ids[..., 0] == ids[..., 0]).float().mean().item()
    top1_difference = (signal.topk_logprobs[..., 0].float() - logprobs[..., 0]).abs().mean().item()
    assert same_top1 >= MIN_TOP1_AGREEMENT, same_top1
    assert top1_difference < MAX_TOP1_LOGPROB_DIFFERENCE, top1_difference
    assert (signal.tail_mass.float() - tail).abs().mean().item() < MAX_TAIL_MASS_DIFFERENCE


def test_reduce_reads_the_same_as_produce_and_one_chunk_at_a_time(dense_file, signal):
    chunk_bytes = POSITIONS * kld_topk.record_width(N_VOCAB) * 2
    tracemalloc.start()
    try:
        reduced = kld_topk.reduce(dense_file, K)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert torch.equal(reduced.input_ids, signal.input_ids) and torch.equal(reduced.topk_ids, signal.topk_ids)
    assert torch.equal(reduced.topk_logprobs, signal.topk_logprobs) and torch.equal(reduced.tail_mass, signal.tail_mass)
    # One chunk's uint16 records and their fp32 decoding are 3 chunk_bytes; the whole file holds CHUNKS.
    assert peak < 3.5 * chunk_bytes < CHUNKS * chunk_bytes, (peak, chunk_bytes)


def test_windows_start_with_bos_when_the_teacher_adds_it(dense_file, teacher, llama, tmp_path):
    """llama-perplexity stores the text's tokens but feeds BOS at every chunk's start when the model adds BOS."""
    bos = kld_topk.bos_token(teacher / gguf.MODEL, llama)
    assert bos == 0  # the embedded tokenizer's, which it does not add (tokenizer_config add_bos_token false)
    stored = kld_topk.reduce(dense_file, K, bos).input_ids
    assert (stored[1:, 0] != bos).all()
    data = bytearray(dense_file.read_bytes())
    data[kld_topk.HEADER.size : kld_topk.HEADER.size + 4] = bos.to_bytes(4, "little")  # a text that starts with BOS
    adds_bos = tmp_path / "adds-bos.kld"
    adds_bos.write_bytes(data)
    windows = kld_topk.reduce(adds_bos, K, bos).input_ids
    assert (windows[:, 0] == bos).all() and torch.equal(windows[:, 1:], stored[:, 1:])


def test_saved_signal_is_a_small_fraction_of_the_dense_file(dense_file, signal, tmp_path):
    path = tmp_path / "signal.safetensors"
    signal.save(path)
    loaded = Signal.load(path)
    assert torch.equal(loaded.topk_logprobs, signal.topk_logprobs) and loaded.first_position == signal.first_position
    assert path.stat().st_size * 100 < dense_file.stat().st_size


def test_produce_leaves_no_dense_file_behind_even_when_llama_perplexity_fails(
    teacher, evaluation_text, llama, tmp_path, monkeypatch
):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    kld_topk.produce(teacher, evaluation_text, CONTEXT, 2, K, 2, llama)
    with pytest.raises(DeepcastError, match="llama-perplexity failed"):
        kld_topk.produce(teacher, tmp_path / "missing.txt", CONTEXT, 2, K, 2, llama)
    assert list(tmp_path.iterdir()) == []


def test_truncated_or_foreign_files_are_refused(dense_file, tmp_path):
    truncated = tmp_path / "truncated.kld"
    truncated.write_bytes(dense_file.read_bytes()[:-10])
    with pytest.raises(DeepcastError, match="truncated or not from this llama.cpp"):
        kld_topk.reduce(truncated, K)
    header_only = tmp_path / "header-only.kld"
    header_only.write_bytes(dense_file.read_bytes()[:12])
    with pytest.raises(DeepcastError, match="holds no chunks"):
        kld_topk.reduce(header_only, K)
    foreign = tmp_path / "foreign.kld"
    foreign.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(DeepcastError, match="not a llama-perplexity"):
        kld_topk.reduce(foreign, K)
