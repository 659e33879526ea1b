"""Sequence-KD data on the real tools: prompts from the train split, completions from a bf16 GGUF bundle
of the embedded model and from its transformers checkpoint, the artifact, refusals."""

from __future__ import annotations

import json
import shutil
import time

import psutil
import pytest
from conftest import REPO
from deepcast import registry, sequences, tools
from deepcast.errors import DeepcastError
from deepcast.manifest import read
from deepcast.stages import gguf
from deepcast.tools import LlamaCpp
from transformers import AutoTokenizer

PROMPTS, PROMPT_TOKENS, NEW_TOKENS, TOP_K, SEED = 4, 32, 16, 8, 1234


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def train_text(corpus_dir):
    return (corpus_dir / "train.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def prompts(train_text, tokenizer):
    return sequences.prompts_from_text(train_text, tokenizer, PROMPTS, PROMPT_TOKENS, SEED)


@pytest.fixture(scope="module")
def bundle(base, llama, tmp_path_factory):
    """bf16, not Q8_0: the GGUF closest to the bf16 checkpoint, and no quantize step to wait for."""
    root = tmp_path_factory.mktemp("sequences")
    cpu = registry.load_target(REPO / "config", "cpu")
    gguf.bundle(base, base, cpu, root / "bundle", "BF16", "48G", "auto", llama)
    return root / "bundle"


@pytest.fixture(scope="module")
def bundle_runs(bundle, prompts, llama):
    """The same request twice, each on a freshly started server, with the wall time of each."""
    runs = []
    for _ in range(2):
        started = time.monotonic()
        records = sequences.generate_with_bundle(bundle, prompts, NEW_TOKENS, SEED, TOP_K, llama)
        runs.append((records, time.monotonic() - started))
    return runs


@pytest.fixture(scope="module")
def hf_records(checkpoint, prompts):
    return sequences.generate_with_transformers(checkpoint, prompts, NEW_TOKENS, SEED)


def servers_in(directory) -> list[psutil.Process]:
    """Processes running from a bundle directory: launch.sh cds there and execs llama-server."""
    found = []
    for process in psutil.process_iter(["cwd"]):
        if process.info["cwd"] == str(directory):
            found.append(process)
    return found


def test_prompts_are_deterministic_for_a_seed_and_start_at_lines(train_text, tokenizer, prompts):
    assert sequences.prompts_from_text(train_text, tokenizer, PROMPTS, PROMPT_TOKENS, SEED) == prompts
    other = sequences.prompts_from_text(train_text, tokenizer, PROMPTS, PROMPT_TOKENS, SEED + 1)
    assert other != prompts and len(set(prompts)) == PROMPTS
    for prompt in prompts:
        assert prompt.strip() and ("\n" + prompt in train_text or train_text.startswith(prompt))
        assert abs(len(tokenizer(prompt, add_special_tokens=False).input_ids) - PROMPT_TOKENS) <= 1


def test_too_little_text_names_the_fix(tokenizer):
    with pytest.raises(DeepcastError, match="only 0 distinct prompts .* Fix: use a longer text"):
        sequences.prompts_from_text("", tokenizer, 4, 32, SEED)
    with pytest.raises(DeepcastError, match="only 1 distinct prompts"):  # a repeated line is one prompt
        sequences.prompts_from_text("ROMEO.\n" * 50, tokenizer, 2, 2, SEED)


def test_bundle_completions_are_greedy_deterministic_and_carry_top_k(bundle, bundle_runs, prompts):
    (first, seconds), (second, _) = bundle_runs
    print(f"bundle: {len(prompts)} prompts x {NEW_TOKENS} tokens in {seconds:.1f} s, server start included")
    assert first == second
    assert [r["prompt"] for r in first] == prompts
    for record in first:
        assert record["completion"].strip()
        assert 0 < record["completion_tokens"] == len(record["completion_ids"]) == len(record["top_probs"])
        assert record["completion_tokens"] <= NEW_TOKENS
        for token, step in zip(record["completion_ids"], record["top_probs"], strict=True):
            assert len(step["ids"]) == TOP_K and step["ids"][0] == token  # greedy: the top token
            assert step["logprobs"] == sorted(step["logprobs"], reverse=True) and step["logprobs"][0] <= 0
    assert not servers_in(bundle)


def test_bundle_artifact_lists_its_files(bundle, bundle_runs, llama, tmp_path):
    records, seconds = bundle_runs[0]
    settings = {"max_new_tokens": NEW_TOKENS, "seed": SEED, "top_k_probs": TOP_K, "decoding": "greedy"}
    producer = sequences.bundle_producer(bundle, llama)
    results = sequences.write(records, settings, producer, tmp_path / "sequences", seconds)
    assert results["count"] == PROMPTS and results["producer"] == "llama.cpp bundle"
    assert results["mean_completion_tokens"] == sum(r["completion_tokens"] for r in records) / PROMPTS
    lines = (tmp_path / "sequences" / sequences.SEQUENCES).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records
    manifest = read(tmp_path / "sequences")
    assert sorted(manifest["files"]) == [sequences.GENERATION, sequences.SEQUENCES]
    assert manifest["inputs"]["SHA256SUMS"] and manifest["seed"] == SEED
    generation = json.loads((tmp_path / "sequences" / sequences.GENERATION).read_text())
    assert generation["producer"]["llama.cpp"]["version"] == tools.VERSION
    assert "version" in generation["producer"]["llama_server_version"]


def test_transformers_completions_have_the_requested_length(hf_records, prompts, checkpoint, tmp_path):
    assert [r["prompt"] for r in hf_records] == prompts
    for record in hf_records:
        assert record["completion_tokens"] == len(record["completion_ids"]) == NEW_TOKENS
        assert record["completion"].strip()
    results = sequences.write(hf_records, {"seed": SEED}, sequences.transformers_producer(checkpoint), tmp_path / "s")
    assert results["producer"] == "transformers" and "checkpoint_manifest" in read(tmp_path / "s")["inputs"]


def test_bundle_and_transformers_agree_on_the_first_greedy_token(bundle_runs, hf_records):
    gguf_ids = [r["completion_ids"] for r in bundle_runs[0][0]]
    hf_ids = [r["completion_ids"] for r in hf_records]
    first = sum(g[0] == h[0] for g, h in zip(gguf_ids, hf_ids, strict=True))
    same = sum(g == h for g, h in zip(gguf_ids, hf_ids, strict=True))
    print(f"first token agrees on {first}/{len(hf_ids)} prompts; whole completion on {same}/{len(hf_ids)}")
    assert first >= len(hf_ids) / 2


def test_empty_prompt_set_is_refused_before_starting_anything(bundle, llama, tmp_path):
    with pytest.raises(DeepcastError, match="prompt set is empty. Fix:"):
        sequences.generate_with_bundle(bundle, [], NEW_TOKENS, SEED, 0, llama)
    with pytest.raises(DeepcastError, match="no sequences to write"):
        sequences.write([], {}, {"name": "transformers"}, tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


def test_tampered_bundle_fails_with_the_log_tail(bundle, prompts, llama, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    (copy / "server.json").write_text("{}\n")
    with pytest.raises(DeepcastError, match=r"exited with 3 before it was ready:\n(.|\n)*refusing to start"):
        sequences.generate_with_bundle(copy, prompts, NEW_TOKENS, SEED, 0, llama)


def test_server_that_never_comes_up_times_out_and_is_stopped(bundle, prompts, tmp_path):
    fake = tmp_path / "fake-llama"
    (fake / "bin").mkdir(parents=True)
    server = fake / "bin" / "llama-server"
    server.write_text('#!/usr/bin/env bash\necho "loading a very large model"\nexec sleep 300\n')
    server.chmod(0o755)
    with pytest.raises(DeepcastError, match=r"not ready within 2 s:\n(.|\n)*loading a very large model"):
        sequences.generate_with_bundle(bundle, prompts, NEW_TOKENS, SEED, 0, LlamaCpp(fake, {}), timeout=2)
    assert not servers_in(bundle)
