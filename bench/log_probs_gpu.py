"""The reference's stored log-probabilities on a GPU: the embedded model in bf16 on CUDA, 48 chunks of random tokens.

    # on the lent H200, with pydantic, pydantic-core, annotated-types, typing-inspection and dill unpacked into
    # SITE (requirements.lock's pins; the image has the rest):
    PYTHONPATH=SITE:workflow python3 bench/log_probs_gpu.py      # about 20 s; bench/results/log-probs-gpu.json

The reference's pass writes the float16 log-probabilities; a noisy copy of the model is then compared with them
and with the model itself, run (already in GPU memory: the load a validation saves is not timed here). The KL
divergence must agree to 1e-3 relative and the model against its own stored values must read under 1e-4.
"""

import argparse
import contextlib
import copy
import hashlib
import json
import tempfile
import time
from pathlib import Path

import torch
from deepcast.perplexity import LOG_PROBS, LogProbWriter, StoredLogProbs, compare, evaluate
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = REPO / "workflow" / "deepcast" / "embedded" / "tiny-deepseek-v3"
CHUNKS = 48


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "log-probs-gpu.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED, dtype=torch.bfloat16).cuda().eval()
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for weight in noisy.parameters():
            weight.add_(0.02 * weight.float().std().to(weight.dtype) * torch.randn_like(weight))
    chunks = torch.randint(100, 120000, (CHUNKS, 512)).tolist()
    out = {"device": torch.cuda.get_device_name()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / LOG_PROBS
        started = time.perf_counter()
        with LogProbWriter(path, CHUNKS, 255) as keep:
            out["reference_perplexity"] = evaluate(model, chunks, 4, keep=keep).perplexity
        out["reference_s"] = seconds_since(started)
        out["file_bytes"] = path.stat().st_size
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        for label, reference in (
            ("stored", lambda: StoredLogProbs(path, digest, CHUNKS, 255)),
            ("model", lambda: contextlib.nullcontext(model)),
        ):
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            with reference() as base:
                out[label] = compare(noisy, base, chunks, 4).as_dict()
            out[label + "_s"] = seconds_since(started)
            out[label + "_gpu_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        with StoredLogProbs(path, digest, CHUNKS, 255) as stored:
            out["itself"] = compare(model, stored, chunks, 4).as_dict()
    stored, run = out["stored"], out["model"]
    out["kl_relative_difference"] = abs(stored["kl_divergence"] - run["kl_divergence"]) / run["kl_divergence"]
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    assert out["kl_relative_difference"] < 1e-3 and abs(stored["perplexity"] / run["perplexity"] - 1) < 1e-6, out
    assert out["itself"]["kl_divergence"] < 1e-4 and out["itself"]["same_top_token_percent"] > 99.9, out


def seconds_since(started: float) -> float:
    torch.cuda.synchronize()
    return round(time.perf_counter() - started, 2)


if __name__ == "__main__":
    main()
