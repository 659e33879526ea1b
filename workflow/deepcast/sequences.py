"""Sequence-level KD data: a prompt set, the teacher's greedy completions of it, and the artifact.

The teacher is either a llama.cpp bundle, served by its own launch.sh on loopback (any GGUF teacher,
offline, on CPU), or a transformers checkpoint. Decoding is greedy in both, so the same prompts and
the same teacher give the same records on every run. With `top_k_probs`, every generated token of
the bundle also carries the teacher's top-k pre-sampling log-probabilities (softmax of the raw
logits, best first), the soft labels of sequence KD on the teacher's own outputs.
"""

from __future__ import annotations

import json
import random
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from deepcast.errors import DeepcastError
from deepcast.files import CHECKSUMS, atomic_path, sha256_file
from deepcast.manifest import Recorder, read
from deepcast.serving import serving
from deepcast.tools import LlamaCpp

SEQUENCES = "sequences.jsonl"
GENERATION = "generation.json"
REQUEST_TIMEOUT_S = 3600  # one completion of a large teacher on CPU offload can take many minutes
# A window of characters surely longer than the prompt; the slack covers long tokens and whitespace runs.
CHARS_PER_TOKEN = 16


def prompts_from_text(text: str, tokenizer, count: int, prompt_tokens: int, seed: int) -> list[str]:
    """`count` distinct prompts of `prompt_tokens` tokens, each from a line start that is not whitespace.

    No prompt opens with a blank line or an indent. Each is an exact substring of `text` ending at a
    token boundary; the starts are a seeded shuffle of the line starts, so the set depends only on
    the text, the tokenizer and the seed.
    """
    if count < 1 or prompt_tokens < 1:
        raise DeepcastError(f"asked for {count} prompts of {prompt_tokens} tokens. Fix: ask for at least one of one.")
    starts = [0] + [i + 1 for i, char in enumerate(text) if char == "\n"]
    starts = [s for s in starts if text[s : s + 1].strip()]
    random.Random(seed).shuffle(starts)
    prompts: dict[str, None] = {}  # insertion-ordered set: a repeated passage gives one prompt
    for start in starts:
        window = text[start : start + CHARS_PER_TOKEN * prompt_tokens]
        offsets = tokenizer(window, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        # One token more than needed: the window's last token may be cut in the middle of a word.
        if len(offsets) > prompt_tokens:
            prompts[window[: offsets[prompt_tokens - 1][1]]] = None
        if len(prompts) == count:
            return list(prompts)
    raise DeepcastError(
        f"the text gives only {len(prompts)} distinct prompts of {prompt_tokens} tokens starting at a line, "
        f"not {count}. Fix: use a longer text (e.g. the corpus train split), fewer prompts or shorter ones."
    )


def generate_with_bundle(
    bundle_dir: Path,
    prompts: list[str],
    max_new_tokens: int,
    seed: int,
    top_k_probs: int,
    llama: LlamaCpp,
    timeout: float = 120,
) -> list[dict]:
    """Greedy completions from the bundle's own launch.sh (checksums checked, the target's flags).

    Records carry the generated token ids and, with `top_k_probs` > 0, per generated token the
    ids and log-probabilities of the teacher's top k before sampling.
    """
    _check_request(prompts, max_new_tokens)
    if top_k_probs < 0:
        raise DeepcastError(f"top_k_probs is {top_k_probs}. Fix: use 0 (no soft labels) or a positive k.")
    with serving(bundle_dir, {"LLAMA_SERVER": str(llama.tool("llama-server"))}, timeout, "llama.cpp") as server:
        return [_completion_record(server.url, prompt, max_new_tokens, seed, top_k_probs) for prompt in prompts]


def generate_with_transformers(checkpoint: Path, prompts: list[str], max_new_tokens: int, seed: int) -> list[dict]:
    """Greedy completions from the checkpoint, one prompt at a time (no padding to change the logits)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_request(prompts, max_new_tokens)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=False)
    model = (
        AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, trust_remote_code=False, use_safetensors=True)
        .to(device)
        .eval()
    )
    records = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[0, ids.shape[1] :].tolist()
        records.append(
            {
                "prompt": prompt,
                "completion": tokenizer.decode(new, skip_special_tokens=True),
                "completion_tokens": len(new),
                "completion_ids": new,
            }
        )
    return records


def bundle_producer(bundle_dir: Path, llama: LlamaCpp) -> dict:
    """What generated the records: the bundle (by its checksums) and the llama-server that served it."""
    version = subprocess.run([llama.tool("llama-server"), "--version"], capture_output=True, text=True)
    server = json.loads((bundle_dir / "server.json").read_text())
    return {
        "name": "llama.cpp bundle",
        "bundle": bundle_dir.name,
        "model": server["model"],
        "server_flags": server["server_flags"],
        "target": read(bundle_dir)["params"]["target"],
        "llama.cpp": llama.versions(),
        "llama_server_version": (version.stdout + version.stderr).strip(),
        "inputs": {CHECKSUMS: sha256_file(bundle_dir / CHECKSUMS)},
    }


def transformers_producer(checkpoint: Path) -> dict:
    """What generated the records: the checkpoint (by its manifest) and the libraries that ran it."""
    import torch
    import transformers

    return {
        "name": "transformers",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "inputs": {"checkpoint_manifest": sha256_file(checkpoint / "manifest.json")},
    }


def write(records: list[dict], settings: dict, producer: dict, out: Path, wall_time_s: float | None = None) -> dict:
    """The artifact: sequences.jsonl, generation.json (settings and producer) and the manifest, all or nothing.

    `wall_time_s` is the generation's wall time as the caller measured it (writing is negligible).
    """
    if not records:
        raise DeepcastError("there are no sequences to write. Fix: generate completions for a non-empty prompt set.")
    recorder = Recorder("sequences", {"settings": settings, "producer": producer}, seed=settings.get("seed"))
    recorder.inputs.update(producer.get("inputs", {}))
    with atomic_path(out) as tmp:
        tmp.mkdir()
        with open(tmp / SEQUENCES, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        (tmp / GENERATION).write_text(json.dumps({"settings": settings, "producer": producer}, indent=2) + "\n")
        tokens = [record["completion_tokens"] for record in records]
        recorder.results = {
            "count": len(records),
            "mean_completion_tokens": round(sum(tokens) / len(tokens), 2),
            "producer": producer["name"],
            "wall_time_s": wall_time_s,
        }
        recorder.write(tmp)
    return recorder.results


def _check_request(prompts: list[str], max_new_tokens: int) -> None:
    if not prompts:
        raise DeepcastError(
            "the prompt set is empty. Fix: give prompts (e.g. from prompts_from_text on the train split)."
        )
    if max_new_tokens < 1:
        raise DeepcastError(f"max_new_tokens is {max_new_tokens}. Fix: ask for at least one new token.")


def _completion_record(url: str, prompt: str, max_new_tokens: int, seed: int, top_k_probs: int) -> dict:
    body = {
        "prompt": prompt,
        "n_predict": max_new_tokens,
        "temperature": 0,
        # Only the final `dist` sampler draws from the seed; after temperature 0 it has one candidate.
        "seed": seed,
        # No prompt cache: a reused KV prefix changes the batch shapes, and with them near-tied greedy picks.
        "cache_prompt": False,
        "return_tokens": True,
    }
    if top_k_probs:
        body |= {"n_probs": top_k_probs, "post_sampling_probs": False}
    request = urllib.request.Request(
        f"{url}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        answer = json.loads(response.read())
    record = {
        "prompt": prompt,
        "completion": answer["content"],
        "completion_tokens": answer["tokens_predicted"],
        "completion_ids": answer["tokens"],
    }
    if top_k_probs:
        record["top_probs"] = [
            {"ids": [t["id"] for t in step["top_logprobs"]], "logprobs": [t["logprob"] for t in step["top_logprobs"]]}
            for step in answer["completion_probabilities"]
        ]
    return record
