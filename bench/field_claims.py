"""Field claims about DeepSeek on common boxes, answered with the planner's arithmetic.

    python bench/field_claims.py > docs/field-claims.md

Every figure in docs/field-claims.md comes from this script (tests/test_plan.py checks the file is
what it prints), so the page changes when the planner, a target profile or the registry changes.
"""

from __future__ import annotations

from pathlib import Path

from deepcast.stages import plan

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "config"


def candidates(model: str, target: str) -> dict[tuple[str, str], plan.Candidate]:
    result = plan.make_plan(CONFIG, model, target, REPO, ["Q4_K_M"], False)
    return {(c.format, c.engine): c for c in result.candidates}


def describe(c: plan.Candidate) -> str:
    if not c.viable:
        return f"{c.format} ({c.engine}, {c.weights_gb:,.1f} GB): refused, {c.reason.rstrip('.')}"
    return (
        f"{c.format} ({c.engine}, {c.weights_gb:,.1f} GB of weights): {c.placement}, {c.context:,} tokens of context, "
        f"{c.gpu_memory_gb:,.1f} GB per GPU, at most {c.decode_tokens_per_s:,.0f} tokens/s"
    )


def best_fully_on_gpu(model: str, target: str) -> str:
    fits = [c for c in plan.make_plan(CONFIG, model, target, REPO, ["Q4_K_M"], False).viable
            if "system RAM" not in (c.placement or "")]  # fmt: skip
    return describe(fits[0]) if fits else "nothing fits in GPU memory alone"


def render() -> str:
    r1 = candidates("deepseek-r1", "4x2080ti")
    llama70 = candidates("deepseek-r1-distill-llama-70b", "4x2080ti")
    qwen32 = candidates("deepseek-r1-distill-qwen-32b", "4x2080ti")
    on4090 = {m: candidates(m, "1x4090") for m in ("deepseek-r1-distill-qwen-7b", "deepseek-r1-distill-qwen-14b")}
    llm67 = candidates("deepseek-llm-67b", "8xh100")
    qwen14 = candidates("deepseek-r1-distill-qwen-14b", "1x3090")
    parameters_67b = plan.plan_model(plan.resolve_model(CONFIG, "deepseek-llm-67b", REPO)).parameters
    rows = [
        (
            '"DeepSeek 671B Q4 runs fully on 4x 2080 Ti 22 GB" (88 GB of VRAM)',
            f"False. {describe(r1['Q4_K_M', 'llama.cpp'])}. The smallest types run only with most routed "
            f"experts in system RAM: {describe(r1['IQ1_S', 'llama.cpp'])}, built on the "
            f"{r1['IQ1_S', 'llama.cpp'].route} route ({r1['IQ1_S', 'llama.cpp'].disk_gb:,.0f} GB of disk at the peak).",
            "A 671B model does not fit in 88 GB of VRAM at any llama.cpp type. All on the GPUs on this box: "
            "DeepSeek-V2.5 (236B), "
            f"{describe(candidates('deepseek-v2.5', '4x2080ti')['IQ1_S', 'llama.cpp'])}; or the 70B distill, "
            f"{describe(llama70['Q4_K_M', 'llama.cpp'])}.",
        ),
        (
            '"70B at W4A16 needs 19.2 GB"',
            f"False for 70B: {describe(llama70['gptq-w4a16', 'vllm'])}. 19.2 GB is the 32B distill at W4A16: "
            f"{qwen32['gptq-w4a16', 'vllm'].weights_gb:,.2f} GB of weights.",
            "On 4x 2080 Ti 22 GB the 70B W4A16 checkpoint runs with pipeline parallelism (no peer-to-peer "
            "link), as above.",
        ),
        (
            '"70B at W8A8 needs 35.5 GB"',
            f"False: {describe(llama70['int8-w8a8', 'vllm'])}. 8-bit weights are one byte per parameter plus "
            f"a scale per output channel and 16-bit embeddings: {llama70['int8-w8a8', 'vllm'].weights_gb:,.1f} GB, "
            "twice the claim.",
            f"On this box: {describe(llama70['Q8_0', 'llama.cpp'])}.",
        ),
        (
            '"One 4090 holds about 65B parameters at BF16"',
            "False: 24 GB at 2 bytes per parameter is 12B before any KV cache. "
            f"7B: {describe(on4090['deepseek-r1-distill-qwen-7b']['bf16', 'vllm'])}. "
            f"14B: {describe(on4090['deepseek-r1-distill-qwen-14b']['bf16', 'vllm'])}.",
            f"14B at 8 bits: {describe(on4090['deepseek-r1-distill-qwen-14b']['Q8_0', 'llama.cpp'])}. Best "
            f"fully on the GPU for the 32B distill: {best_fully_on_gpu('deepseek-r1-distill-qwen-32b', '1x4090')}.",
        ),
        (
            '"67B at FP16 needs 134 GB; 8-way ZeRO sharding brings it to 16.75 GB per card"',
            f"Right for the weights ({llm67['bf16', 'vllm'].weights_gb:,.1f} GB), but ZeRO shards training state, "
            "not inference. For serving, tensor parallelism splits the weights the same way and adds the KV cache: "
            f"{describe(llm67['bf16', 'vllm'])}.",
            "Training with ZeRO-3 and Adam in mixed precision holds about 16 bytes per parameter "
            f"(weights, gradients, fp32 master weights and two moments): {16 * parameters_67b / 1e9:,.0f} GB, "
            f"{2 * parameters_67b / 1e9:,.0f} GB per card on 8.",
        ),
        (
            '"A 13B model needs 26 GB at FP16 and 6.5 to 13 GB at 4 or 8 bits"',
            "Right for the weights alone, short for a running model: it leaves out the KV cache, the runtime and "
            "the 16-bit embeddings. The 14B distill on one 3090: "
            f"{describe(qwen14['bf16', 'vllm'])}; {describe(qwen14['int8-w8a8', 'vllm'])}; "
            f"{describe(qwen14['gptq-w4a16', 'vllm'])}.",
            f"{describe(qwen14['Q4_K_M', 'llama.cpp'])}.",
        ),
    ]
    lines = [
        "# Field claims, answered with the planner's arithmetic",
        "",
        "Generated by `python bench/field_claims.py > docs/field-claims.md` from the target profiles in",
        "`config/targets/`, the registry in `config/models/` and the planner (`deepcast plan --model M --target T`",
        "prints any of these in full). Weights are predicted per tensor as llama-quantize and llm-compressor",
        "write them; context is what memory leaves after weights and runtime; tokens/s is a memory-bandwidth",
        "upper bound. Host RAM, cores and disk of every profile are assumptions marked in the profile.",
        "",
        "| claim | what the plan says | what really works on that box |",
        "|---|---|---|",
    ]
    lines += [f"| {claim} | {says} | {works} |" for claim, says, works in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
