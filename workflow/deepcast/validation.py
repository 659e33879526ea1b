"""What every validation shares: fixed smoke prompts, whether the target's hardware is on this machine,
speed figures next to the plan's roofline, and the optional lm-evaluation-harness tasks.

A figure that cannot be taken here is recorded as "not measured here" (or "not run here") with the
reason; it is never reported as passed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from deepcast.errors import DeepcastError
from deepcast.registry import Target
from deepcast.tools import visible_gpus

PROMPTS = ["ROMEO.\n", "To be, or not to be,", "The king is dead; long live"]
SMOKE_TOKENS = 16


def pick_device(requested: str) -> str:
    """evaluation.device resolved: auto is the GPU where one is visible."""
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise DeepcastError("evaluation.device is cuda but no GPU is visible. Fix: set it to auto or cpu.")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def hardware_here(target: Target) -> str | None:
    """None when this machine is the target's kind of machine; else why figures taken here would not hold."""
    if target.gpu is None:  # a CPU target: this machine's CPU runs it where it has the target's instruction sets
        missing = sorted(set(target.cpu_features) - cpu_flags())
        if missing:
            return f"target {target.name} assumes a CPU with {', '.join(missing)}; this machine's CPU lacks them"
        return None
    visible = visible_gpus("name")
    wanted = target.gpu.name.split()[:2]  # e.g. "H100 SXM", "RTX 4090"
    matching = [name for name in visible if all(word.lower() in name.lower() for word in wanted)]
    if len(matching) < target.gpu.count:
        have = ", ".join(visible) or "no GPU"
        return f"target {target.name} needs {target.gpu.count} x {target.gpu.name}; this machine has {have}"
    return None


def cpu_flags() -> set[str]:
    """This machine's CPU instruction-set flags, as /proc/cpuinfo names them (none known elsewhere than Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def roofline(plan_file: Path | None, fmt: str) -> float | None:
    """The plan's decode upper bound for this format on the target (tokens/s)."""
    if plan_file is None or not plan_file.is_file():
        return None
    plan = json.loads(plan_file.read_text())
    for candidate in plan["candidates"]:
        if candidate["format"] == fmt and candidate["viable"]:
            return candidate["decode_tokens_per_s"]
    return None


def against_reference(model, reference_dir: Path, batch_size: int, teacher: Path | None = None) -> dict:
    """Perplexity, KL divergence and top-1 agreement against the 16-bit checkpoint on the reference tokens (its
    log-probabilities, which the reference stage kept), with the reference perplexity and the ratio to it; for a
    distilled student, the same against its teacher, which is loaded and run."""
    import torch
    from transformers import AutoModelForCausalLM

    from deepcast.perplexity import compare, model_device

    chunks = json.loads((reference_dir / "chunks.json").read_text())
    reference = json.loads((reference_dir / "perplexity.json").read_text())["perplexity"]
    with stored_log_probs(reference_dir, chunks) as stored:
        base = compare(model, stored, chunks, batch_size).as_dict()
    ratio = round(base["perplexity"] / reference, 6)
    results = {**base, "perplexity_reference": reference, "perplexity_ratio_to_reference": ratio}
    if teacher is not None:
        dtype = getattr(model, "dtype", torch.float32)  # the model's own: bf16 on a GPU, float32 on the CPU
        other = AutoModelForCausalLM.from_pretrained(teacher, dtype=dtype, trust_remote_code=False)
        results["teacher"] = compare(model, other.to(model_device(model)).eval(), chunks, batch_size).as_dict()
    return results


def stored_log_probs(reference_dir: Path, chunks: list[list[int]]):
    """The reference's log-probabilities on `chunks`, checked against its manifest as they are read."""
    from deepcast.manifest import read
    from deepcast.perplexity import LOG_PROBS, StoredLogProbs, scored_positions

    listed = read(reference_dir)["files"].get(LOG_PROBS)
    if listed is None or not (reference_dir / LOG_PROBS).is_file():
        raise DeepcastError(
            f"{reference_dir} has no {LOG_PROBS}: an earlier deepcast made it, before validations read the "
            "16-bit model's log-probabilities from it. Fix: rerun the reference rule (snakemake --forcerun reference)."
        )
    return StoredLogProbs(reference_dir / LOG_PROBS, listed["sha256"], len(chunks), scored_positions(len(chunks[0])))


def dequantized_model(artifact: Path, dense: dict):
    """A float32 transformers model of `artifact`'s config (its quantization_config dropped) holding `dense`,
    the checkpoint's weights dequantized by the caller, with MoE experts as per-expert Linears again:
    transformers fuses them on load, and a quantized checkpoint carries its scales per expert Linear."""
    import tempfile

    import torch
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config = json.loads((artifact / "config.json").read_text())
    config.pop("quantization_config", None)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        tensors = {name: tensor.contiguous() for name, tensor in dense.items()}
        save_file(tensors, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, trust_remote_code=False)
    linearize_moe(model)
    return model


def not_measured(reason: str, estimate: float | None) -> dict:
    return {"status": "not measured here", "reason": reason, "roofline_decode_tokens_per_s": estimate}


def transformers_smoke(model, tokenizer) -> dict:
    """Greedy completions of the fixed prompts, twice: non-empty, finite, identical."""
    import torch

    from deepcast.perplexity import model_device

    runs = []
    for _ in range(2):
        texts = []
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model_device(model))
            with torch.no_grad():
                logits = model(input_ids=ids).logits
                if not torch.isfinite(logits).all():
                    raise DeepcastError(f"the model returned NaN or infinite logits for prompt {prompt!r}.")
                out = model.generate(ids, max_new_tokens=SMOKE_TOKENS, do_sample=False)
            texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
        runs.append(texts)
    if any(not text.strip() for text in runs[0]):
        raise DeepcastError(f"greedy generation gave an empty completion: {runs[0]}")
    if runs[0] != runs[1]:
        raise DeepcastError(f"greedy generation is not deterministic: {runs[0]} then {runs[1]}")
    return {"status": "passed", "engine": "transformers", "deterministic": True, "completions": runs[0]}


def transformers_speed(
    model, tokenizer, estimate: float | None, prompt_tokens: int = 256, new_tokens: int = 32
) -> dict:
    """Prompt and decode tokens per second through transformers on this machine, and the peak RSS."""
    import resource

    import torch

    from deepcast.perplexity import model_device

    ids = torch.randint(100, tokenizer.vocab_size - 1, (1, prompt_tokens)).to(model_device(model))
    with torch.no_grad():
        started = time.perf_counter()
        model(input_ids=ids)
        prompt_s = time.perf_counter() - started
        started = time.perf_counter()
        model.generate(ids[:, :8], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        decode_s = time.perf_counter() - started
    return {
        "status": "measured",
        "engine": "transformers",
        "prompt_tokens_per_s": round(prompt_tokens / prompt_s, 1),
        "decode_tokens_per_s": round(new_tokens / decode_s, 1),
        "peak_memory_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
        "roofline_decode_tokens_per_s": estimate,
    }
