"""The planner: memory, size and speed arithmetic against hand-computed cases; every registry model on
every target; a hub model outside the registry; bad input."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
from conftest import REPO, deepcast_cli, error_of
from deepcast import compatibility, planner, quality, registry, sizes, student_shapes, tensors
from deepcast.registry import GPU, ModelShape, Target
from deepcast.stages import plan

CONFIG = REPO / "config"
MODELS = registry.load_models(CONFIG)
TARGETS = sorted(p.stem for p in (CONFIG / "targets").glob("*.yaml"))


def shape(name: str) -> ModelShape:
    return MODELS[name].shape


def candidate(result: plan.Plan, fmt: str, engine: str) -> plan.Candidate:
    return next(c for c in result.candidates if c.format == fmt and c.engine == engine)


def test_kv_cache_per_token_mla_gqa_and_mha():
    # MLA caches the 512-wide latent and the 64-wide rope key per layer: 61 x 576 x 2 bytes.
    assert planner.kv_bytes_per_token(shape("deepseek-r1")) == 61 * (512 + 64) * 2 == 70_272
    # GQA: K and V for 8 KV heads of 128 in 64 layers.
    assert planner.kv_bytes_per_token(shape("deepseek-r1-distill-qwen-32b")) == 2 * 64 * 8 * 128 * 2 == 262_144
    # MHA: 32 KV heads in 30 layers.
    assert planner.kv_bytes_per_token(shape("deepseek-llm-7b")) == 2 * 30 * 32 * 128 * 2 == 491_520


def test_parameter_count_of_qwen_1_5b_by_hand():
    embeddings = 151_936 * 1536 * 2  # untied: embed_tokens and lm_head
    attention = 1536 * 1536 * 2 + 1536 * 256 * 2 + 1536 + 256 * 2  # q, o, k, v and the q/k/v biases
    mlp = 3 * 1536 * 8960
    layer = attention + mlp + 2 * 1536  # two norms
    expected = embeddings + 28 * layer + 1536
    assert tensors.parameter_count("Qwen2ForCausalLM", shape("deepseek-r1-distill-qwen-1.5b")) == expected
    assert expected == 1_777_088_000


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registry_parameter_counts_agree_with_the_shapes(name):
    entry = MODELS[name]
    counted = tensors.parameter_count(entry.architecture, entry.shape) / 1e9
    assert counted == pytest.approx(entry.parameters_b, rel=0.02), counted  # V2-Lite: "16B" is 15.7 B


def test_v3_hub_checkpoint_adds_its_multi_token_prediction_layer():
    v3 = MODELS["deepseek-v3"]
    extra = tensors.mtp_parameter_count(v3.architecture, v3.shape) / 1e9
    assert extra == pytest.approx(14, abs=1)  # "685B ... includes 14B of the MTP module" (V3 README)


def test_q8_0_gguf_size_by_hand():
    tiny = ModelShape(layers=1, hidden=256, heads=4, kv_heads=4, head_dim=64, intermediate=512, vocab=1000,
                      max_context=2048)  # fmt: skip
    two_d = 256 * 1000 * 2 + 4 * 256 * 256 + 3 * 256 * 512  # embeddings, output, q k v o, gate up down
    data = two_d // 32 * 34 + 3 * 256 * 4  # Q8_0 blocks of 32 in 34 bytes; three F32 norms
    expected = data + int(1000 * sizes.METADATA_BYTES_PER_TOKEN) + sizes.GGUF_FIXED_BYTES
    assert sizes.gguf_size("LlamaForCausalLM", tiny, "Q8_0").total == expected


def test_block_sizes_match_gguf_py(llama_cpp_gguf_py):
    for name, block in sizes.GGML_BLOCK.items():
        assert llama_cpp_gguf_py.GGML_QUANT_SIZES[llama_cpp_gguf_py.GGMLQuantizationType[name]] == block


@pytest.fixture(scope="module")
def llama_cpp_gguf_py():
    """gguf-py from the pinned llama.cpp tree (the converter's own copy)."""
    import importlib
    import sys

    from deepcast import tools

    sys.path.insert(0, str(tools.locate().root / "src" / "gguf-py"))
    return importlib.import_module("gguf.constants")


def test_rows_a_block_does_not_divide_fall_back_as_llama_cpp_does():
    types = sizes.gguf_tensor_types("DeepseekV3ForCausalLM", shape("tiny-deepseek-v3"), "Q4_K_M")
    assert types["token_embd.weight"] == "Q8_0"  # tied embeddings follow the output rule; 128 % 256
    assert types["blk.0.ffn_down.weight"] == "Q4_K"  # 256-wide rows take the 256-block type
    assert types["blk.0.ffn_gate.weight"] == "Q5_0"  # 128-wide rows: Q4_K falls back to Q5_0
    assert types["blk.1.attn_output.weight"] == "Q5_1"  # 8 experts: Q5_K, and 128 % 256 -> Q5_1
    assert types["blk.1.ffn_gate_inp.weight"] == "F32" and types["output_norm.weight"] == "F32"


def test_llama_cpp_split_across_four_gpus_by_hand():
    result = plan.make_plan(CONFIG, "deepseek-r1-distill-qwen-32b", "4x2080ti", REPO, ["Q4_K_M"], True)
    q4 = candidate(result, "Q4_K_M", "llama.cpp")
    # Four cards, 92 % usable, each less its CUDA context (0.625 GB) and compute buffer (0.115 GB).
    usable = 4 * (22 * 0.92 - 0.625 - 0.115)
    kv = 262_144
    embedding = 152_064 * 5_120 * 144 / 256 / 1e9  # token_embd in Q4_K (144 bytes per 256): host memory
    assert q4.context == 131_072  # (usable - weights) / kv is over 200k tokens: the model's maximum
    assert (usable - q4.weights_gb) * 1e9 / kv > 131_072
    assert q4.gpu_memory_gb == pytest.approx((q4.weights_gb - embedding + 131_072 * kv / 1e9) / 4)
    assert q4.system_memory_gb == pytest.approx(0.5 + embedding)
    assert q4.flags == ["-ngl", "65", "-c", "131072", "-t", "16", "--tensor-split", "1,1,1,1"]
    # Layers run one GPU after another: the roofline is one card's bandwidth over the weights and, at token
    # 8,192, the KV cache written so far.
    assert q4.decode_tokens_per_s == pytest.approx(616e9 / (q4.weights_gb * 1e9 + 8192 * kv), abs=0.05)


def test_vllm_without_peer_to_peer_uses_pipeline_parallel_and_its_context_is_what_is_left():
    result = plan.make_plan(CONFIG, "deepseek-r1-distill-qwen-32b", "4x2080ti", REPO, ["gptq-w4a16"], True)
    gptq = candidate(result, "gptq-w4a16", "vllm")
    assert gptq.flags[:2] == ["--dtype", "float16"] and "--pipeline-parallel-size" in gptq.flags
    bf16 = candidate(result, "bf16", "vllm")
    budget = 4 * (22 * 0.90 - 2.0) - bf16.weights_gb
    assert bf16.context == int(budget * 1e9 / 262_144)


def test_tensor_parallel_over_nvlink_multiplies_the_roofline():
    result = plan.make_plan(CONFIG, "deepseek-r1-distill-llama-70b", "4xa100-80g", REPO, ["gptq-w4a16"], True)
    gptq = candidate(result, "gptq-w4a16", "vllm")
    assert "--tensor-parallel-size" in gptq.flags
    a100 = registry.load_target(CONFIG, "4xa100-80g").gpu.bandwidth_gbps
    # The weights and, at token 8,192, the KV cache (80 layers x 8 KV heads x 128 x K and V x 2 bytes).
    read = gptq.weights_gb * 1e9 + 8192 * 327_680
    assert gptq.decode_tokens_per_s == pytest.approx(4 * a100 * 1e9 / read, abs=0.05)


def test_moe_experts_go_to_system_ram_and_the_roofline_reads_only_the_active_ones():
    box = Target(
        name="box", description="one 48 GB GPU and 512 GB of RAM", system_ram_gb=512, cpu_cores=32,
        cpu_bandwidth_gbps=100, free_disk_gb=10_000,
        gpu=GPU(name="x", count=1, compute_capability=8.9, memory_gb=48, bandwidth_gbps=1000, bf16=True, fp8=True,
                interconnect="none"),
    )  # fmt: skip
    r1 = plan.plan_model(registry.resolve_model(CONFIG, "deepseek-r1", REPO))
    result = plan.plan_for(r1, box, CONFIG, ["Q4_K_M"], True)
    q4 = candidate(result, "Q4_K_M", "llama.cpp")
    assert "-ot" in q4.flags and "exps=CPU" in q4.flags
    size = sizes.gguf_size(r1.architecture, r1.shape, "Q4_K_M", True, [])
    dense, active_experts = size.total - size.experts, size.experts * 8 / 256
    # The GPU reads the dense weights and the KV cache at token 8,192; the CPU the 8 active experts of 256.
    expected = 1 / ((dense + 8192 * 70_272) / 1000e9 + active_experts / 100e9)
    assert q4.decode_tokens_per_s == pytest.approx(expected, abs=0.05)  # the plan rounds to 0.1 tokens/s
    assert size.token_embd == 129_280 * 7168 * 144 / 256  # token_embd in Q4_K: in host memory, not on the GPU
    on_gpu = q4.weights_gb - (size.experts + size.token_embd) / 1e9
    assert q4.gpu_memory_gb == pytest.approx(on_gpu + q4.context * 70_272 / 1e9)
    assert q4.system_memory_gb == pytest.approx((size.experts + size.token_embd) / 1e9 + 0.5)


def test_unified_memory_is_not_counted_twice():
    # Jetson: 64 GB shared by CPU and GPU. A 32B Q4_K_M (20 GB) fits; the 16-bit GGUF (66 GB) does not,
    # although "GPU memory" + "system RAM" would add up to 128 GB and allow a partial offload.
    result = plan.make_plan(CONFIG, "deepseek-r1-distill-qwen-32b", "jetson-agx-orin-64g", REPO, ["Q4_K_M"], False)
    assert candidate(result, "Q4_K_M", "llama.cpp").viable
    bf16 = candidate(result, "BF16", "llama.cpp")
    assert not bf16.viable and "do not fit" in bf16.reason


def test_fp8_checkpoint_plans_its_bf16_copy_for_calibration_but_not_for_gguf():
    result = plan.make_plan(CONFIG, "deepseek-r1", "8xh100", REPO, ["Q4_K_M"], False)
    gptq = candidate(result, "gptq-w4a16", "vllm")
    names = [name for name, _ in gptq.steps]
    assert names[0] == "download (float8_e4m3fn)" and names[1].startswith("BF16 copy")
    assert dict(gptq.steps)[names[1]] == pytest.approx(684.5 * 2, rel=0.01)  # 685B x 2 bytes
    gguf_steps = [name for name, _ in candidate(result, "Q4_K_M", "llama.cpp").steps]
    assert not any("BF16 copy" in name for name in gguf_steps) and "converted from FP8" in gguf_steps[1]


def test_disk_refusal_lists_the_steps_of_the_leanest_route():
    box = registry.load_target(CONFIG, "4x2080ti").model_copy(update={"free_disk_gb": 1000})
    r1 = plan.plan_model(registry.resolve_model(CONFIG, "deepseek-r1", REPO))
    iq1 = candidate(plan.plan_for(r1, box, CONFIG, ["IQ1_S"], False), "IQ1_S", "llama.cpp")
    assert not iq1.viable and "1,398 GB of disk at its peak on the leanest route (q8-base)" in iq1.reason
    assert "(download (float8_e4m3fn) 684 GB, Q8_0 GGUF base" in iq1.reason and "has 1,000 GB free" in iq1.reason


@pytest.mark.parametrize("target", TARGETS)
def test_every_registry_model_gets_an_answer_on_every_target(target):
    for name in MODELS:
        result = plan.make_plan(CONFIG, name, target, REPO, ["Q4_K_M", "gptq-w4a16"], False)
        assert all(c.reason for c in result.candidates if not c.viable)
        for c in result.viable:
            assert c.context >= min(planner.MIN_CONTEXT, MODELS[name].shape.max_context)
            assert c.decode_tokens_per_s > 0 and c.disk_gb <= result.target.free_disk_gb
        assert result.viable or (result.nearest and "smaller model" in " ".join(result.nearest))
        assert bool(result.students_because) or not result.students
        for s in result.students:  # every proposal is smaller than its teacher and fits well
            assert s["parameters"] < result.model.parameters and s["shape"]["vocab"] == result.model.shape.vocab
            assert s["context"] >= min(plan.GOOD_CONTEXT, MODELS[name].shape.max_context)
            assert s["decode_tokens_per_s"] >= plan.GOOD_TOKENS_PER_S
            assert result.target.gpu is None or "system RAM" not in s["placement"]


def test_compatibility_rules_are_data_with_sources():
    rules = compatibility.load(CONFIG).rules
    assert all(rule.source and rule.reason for rule in rules)
    turing = registry.load_target(CONFIG, "4x2080ti")
    reason, _ = compatibility.load(CONFIG).check("tensorrt-llm", "trtllm-int4-awq", turing, "LlamaForCausalLM")
    assert reason.startswith("current TensorRT-LLM supports Ampere")
    h100 = registry.load_target(CONFIG, "h100")
    reason, _ = compatibility.load(CONFIG).check("onnxruntime-genai", "onnx-int4", h100, "DeepseekV3ForCausalLM")
    assert "not DeepSeek-V2/V3 MLA" in reason


def test_cli_prints_ranked_and_refused_plans():
    result = deepcast_cli("plan", "--model", "deepseek-r1-distill-qwen-32b", "--target", "4x2080ti", cwd=REPO)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Viable plans, best first" in out and "Refused" in out and "The pipeline builds:" in out
    assert "TensorRT-LLM supports Ampere" in out


def test_cli_json_for_a_hub_model_outside_the_registry(hub):
    result = deepcast_cli("plan", "--model", "deepseek-test/tiny", "--target", "cpu", "--json", cwd=REPO)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["model"]["source"].startswith("hub deepseek-test/tiny@main config.json")
    assert data["model"]["parameters"] == 18_412_696
    assert any("/deepseek-test/tiny/resolve/main/config.json" in path for _, path, _ in hub.log)


def test_cli_model_that_fits_nowhere_names_the_nearest_plan():
    result = deepcast_cli("plan", "--model", "deepseek-r1", "--target", "1x4090", cwd=REPO)
    assert result.returncode == 1
    assert "fits nowhere on 1x4090" in result.stdout and "smaller model: " in result.stdout


def test_r1_on_one_4090_gets_student_proposals_whose_arithmetic_holds():
    result = plan.make_plan(CONFIG, "deepseek-r1", "1x4090", REPO, ["Q4_K_M"], False)
    assert result.students_because == "nothing fits"
    proposals = result.students
    assert [(s["student"], s["format"]) for s in proposals] == [
        ("Qwen2.5-14B", "Q4_K_M"), ("Qwen2.5-14B", "gptq-w4a16"), ("Llama-3.1-8B", "Q4_K_M"),
        ("Llama-3.1-8B", "gptq-w4a16"), ("Qwen2.5-7B", "Q4_K_M"), ("Qwen2.5-7B", "gptq-w4a16"),
    ]  # fmt: skip
    q4, w4 = proposals[0], proposals[1]
    # Qwen2.5-14B's shape with R1's 129,280-token vocabulary, untied, Llama-style (no q/k/v biases):
    layer = 2 * 5120 * 5120 + 2 * 5120 * 1024 + 3 * 5120 * 13824 + 2 * 5120  # q o, k v (8 KV heads), MLP, norms
    assert q4["parameters"] == 2 * 129_280 * 5120 + 48 * layer + 5120 == 14_536_381_440
    shape = ModelShape(**q4["shape"])
    assert q4["weights_gb"] == sizes.gguf_size("LlamaForCausalLM", shape, "Q4_K_M").total / 1e9
    assert w4["weights_gb"] == sizes.checkpoint_size("LlamaForCausalLM", shape, "gptq-w4a16").total / 1e9
    assert 4.5 < q4["weights_gb"] * 8e9 / q4["parameters"] < 5.2  # Q4_K_M: 4-bit blocks, some 6-bit tensors
    kv = 2 * 48 * 8 * 128 * 2  # K and V, 8 KV heads of 128, 48 layers, f16
    llama_cpp, vllm = 24 * 0.92 - 0.74, 24 * 0.90 - 2.0  # usable GB on one 4090 for each engine
    embedding = 129_280 * 5120 * 144 / 256 / 1e9  # token_embd in Q4_K stays in host memory
    assert q4["context"] == int((llama_cpp - q4["weights_gb"] + embedding) * 1e9 / kv) > plan.GOOD_CONTEXT
    assert w4["context"] == int((vllm - w4["weights_gb"]) * 1e9 / kv) > plan.GOOD_CONTEXT
    assert q4["gpu_memory_gb"] == pytest.approx(q4["weights_gb"] - embedding + q4["context"] * kv / 1e9)
    assert w4["gpu_memory_gb"] == pytest.approx(w4["weights_gb"] + w4["context"] * kv / 1e9)
    for s in (q4, w4):
        assert s["gpu_memory_gb"] < 24
        read = s["weights_gb"] * 1e9 + 8192 * kv  # the weights and the KV cache at token 8,192
        assert s["decode_tokens_per_s"] == pytest.approx(1008e9 / read, rel=0.01)  # 4090: 1008 GB/s
        assert s["method"] == "logit KD"
    # The 32B rung is not proposed: beside its Q4_K_M weights one 4090 holds under 8,192 tokens of KV cache.
    thirty_two = dict(student_shapes.ladder(result.model.shape))["Qwen2.5-32B"]
    weights = sizes.gguf_size("LlamaForCausalLM", thirty_two, "Q4_K_M").total / 1e9
    assert (llama_cpp - weights + embedding) * 1e9 / (2 * 64 * 8 * 128 * 2) < plan.GOOD_CONTEXT


def test_a_model_that_fits_well_gets_no_student_proposals():
    result = plan.make_plan(CONFIG, "deepseek-r1-distill-qwen-1.5b", "h100", REPO, ["Q4_K_M"], False)
    assert result.students_because is None and result.students == []
    assert result.as_dict()["student_proposals"] == []


def test_fitting_badly_also_means_offloaded_or_slow():
    offloaded = plan.make_plan(CONFIG, "deepseek-r1", "a100-80g", REPO, ["Q4_K_M"], False)
    assert "keeps weights in system RAM: routed experts in system RAM" in offloaded.students_because
    assert offloaded.students[0]["student"] == "Llama-3.3-70B"  # 42.5 GB at Q4_K_M fits one 80 GB card
    slow = plan.make_plan(CONFIG, "deepseek-r1-distill-llama-70b", "jetson-agx-orin-64g", REPO, ["Q4_K_M"], False)
    assert slow.viable and "decodes at most 4.9 tokens/s" in slow.students_because
    # The 32B rung's roofline at token 8,192 is 204.8 GB/s over 20 GB of Q4_K_M and 2.1 GB of KV cache: 9.3 tokens/s.
    assert {s["student"] for s in slow.students} == {"Qwen2.5-14B", "Llama-3.1-8B", "Qwen2.5-7B"}


def test_student_ladder_is_the_shapes_of_deepseeks_own_distills():
    rungs = {name: rung for name, *rung in student_shapes.LADDER}
    for size, base in (("1.5b", "Qwen2.5-1.5B"), ("7b", "Qwen2.5-7B"), ("14b", "Qwen2.5-14B"), ("32b", "Qwen2.5-32B")):
        s = shape(f"deepseek-r1-distill-qwen-{size}")
        assert rungs[base] == [s.layers, s.hidden, s.heads, s.kv_heads, s.intermediate, s.tied_embeddings]
    for size, base in (("8b", "Llama-3.1-8B"), ("70b", "Llama-3.3-70B")):
        s = shape(f"deepseek-r1-distill-llama-{size}")
        assert rungs[base] == [s.layers, s.hidden, s.heads, s.kv_heads, s.intermediate, s.tied_embeddings]


def test_cli_lists_student_proposals_for_r1_on_one_4090():
    args = ("plan", "--model", "deepseek-ai/DeepSeek-R1", "--target", "1x4090")
    printed = deepcast_cli(*args, cwd=REPO)
    assert printed.returncode == 1  # fits nowhere: the nearest plans, then the students
    assert "Student proposals (distillation)" in printed.stdout and "Qwen2.5-14B" in printed.stdout
    data = json.loads(deepcast_cli(*args, "--json", cwd=REPO).stdout)
    assert data["student_proposals_because"] == "nothing fits"
    assert data["student_proposals"][0]["student"] == "Qwen2.5-14B"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "nope"], "unknown target 'nope'. Valid targets: 1x3090, 1x4090"),
        (["--model", "nosuch"], "unknown model 'nosuch'. Registry models: deepseek-llm-67b"),
        (["--formats", "fp8", "--target", "4x2080ti"], "format fp8 is refused for target 4x2080ti"),
        (["--formats", "Q9_X"], "unknown format 'Q9_X'"),
    ],
)
def test_cli_bad_input(args, message):
    assert message in error_of(deepcast_cli("plan", *args, cwd=REPO))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("  memory_gb: 22 #", "  #"), "gpu.memory_gb: Field required"),
        (("compute_capability: 7.5", "compute_capability: 75"), "gpu.compute_capability: Input should be less than"),
        (("  bandwidth_gbps: 616", "  bandwidth_gbps: -616"), "gpu.bandwidth_gbps: Input should be greater than 0"),
        (("interconnect: none", "interconnect: infiniband"), "gpu.interconnect: Input should be 'nvlink'"),
    ],
)
def test_broken_target_file_names_the_file_and_the_field(tmp_path, edit, message):
    shutil.copytree(CONFIG, tmp_path / "config")
    path = tmp_path / "config" / "targets" / "4x2080ti.yaml"
    assert edit[0] in path.read_text()
    path.write_text(path.read_text().replace(*edit))
    said = error_of(deepcast_cli("plan", "--target", "4x2080ti", "--config-dir", str(tmp_path / "config"), cwd=REPO))
    assert "4x2080ti.yaml: " in said and message in said and "Fix that file" in said


def test_field_claims_page_is_what_the_planner_says():
    spec = importlib.util.spec_from_file_location("field_claims", REPO / "bench" / "field_claims.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (REPO / "docs" / "field-claims.md").read_text() == module.render(), "run bench/field_claims.py"


def r1_on(target_name: str, formats: list[str], **preferences) -> plan.Plan:
    return plan.make_plan(CONFIG, "deepseek-r1", target_name, REPO, formats, True, **preferences)


def test_disk_peaks_of_the_routes_by_hand():
    r1 = plan.plan_model(registry.resolve_model(CONFIG, "deepseek-r1", REPO))
    download = 684.489845504  # 685B parameters (MTP layer included) in FP8
    sixteen = sizes.gguf_size(r1.architecture, r1.shape, "BF16").total / 1e9
    q8 = sizes.gguf_size(r1.architecture, r1.shape, "Q8_0", False, []).total / 1e9
    iq1 = plan._weights(r1, "IQ1_S", "gguf").total / 1e9
    assert round(sixteen) == 1342 and round(q8) == 713  # the 1,342 and 713 GB
    peaks = {name: plan.disk_peak_gb(plan.gguf_steps(r1, "IQ1_S", iq1, route)) for name, route in plan.ROUTES.items()}
    assert peaks["plain"] == pytest.approx(download + sixteen + iq1)  # 2,169 GB: over the 2,000 GB free
    assert peaks["drop-download"] == pytest.approx(max(download + sixteen, sixteen + iq1))  # 2,027 GB
    assert peaks["q8-base"] == pytest.approx(max(download + q8, q8 + iq1))  # 1,398 GB
    assert [r.name for r in plan.routes_for("Q8_0", "auto")] == ["plain", "drop-download"]  # never Q8_0 from Q8_0


def test_r1_on_4x2080ti_gets_a_disk_lean_plan():
    result = r1_on("4x2080ti", ["IQ1_S", "IQ1_M"])
    assert [c.format for c in result.chosen] == ["IQ1_S", "IQ1_M"]
    for c in result.chosen:
        assert c.viable and c.route == "q8-base" and c.disk_gb <= result.target.free_disk_gb == 2000
        flags = dict(zip(c.flags[::2], c.flags[1::2], strict=True))
        assert flags["-ngl"] == "62" and len(flags["--tensor-split"].split(",")) == 4
        # 130 GB of IQ1_S experts do not fit the box's 117 GB of usable RAM: the first N layers' experts do.
        assert int(flags["--n-cpu-moe"]) > 3 and c.context >= plan.GOOD_CONTEXT
        assert int(flags["-c"]) == c.context and c.gpu_memory_gb <= 22 * 0.92 - 0.74
        assert c.system_memory_gb <= 128 * 0.92 - 0.5
        split = [int(n) for n in flags["--tensor-split"].split(",")]
        assert sum(split) == 62
    route = result.as_dict()["gguf_route"]
    assert route["name"] == "q8-base" and route["disk_peak_gb"] <= 2000
    cost = quality.load(CONFIG).requantize_from_q8_0  # the measured cost of the route, said in the plan
    assert any(f"{cost.worst_kld_increase_pct:+g} % at worst" in note for note in result.notes)
    assert result.gguf_disk_peak_gb() == pytest.approx(713.3 + 684.5, abs=1)  # the download beside the base


def test_the_dry_run_follows_the_lean_route(tmp_path):
    from conftest import snakemake

    result = snakemake(tmp_path, "-n", "-p", "--config", "target=4x2080ti", "model=deepseek-r1", "formats=[IQ1_S]")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "--outtype q8_0 --out results/models/deepseek-r1/main/gguf/q8_0" in out
    assert "gguf quantize --base results/models/deepseek-r1/main/gguf/q8_0 --type IQ1_S" in out
    assert "Would remove temporary output results/models/deepseek-r1/main/checkpoint" in out
    removal, quantize = out.index("Would remove temporary output"), out.index("rule gguf_quantize:")
    assert removal < quantize  # the download goes before any quantized file is written
    assert "gguf/bf16" not in out and "--n-cpu-moe" in out


def test_ranking_by_expected_quality_above_a_speed_floor():
    result = plan.make_plan(CONFIG, "deepseek-r1-distill-llama-70b", "2x4090", REPO, ["Q4_K_M"], False)
    viable = [(c.format, c.engine) for c in result.viable]
    # Q4_K_M with 4 of 81 layers in RAM (12.5 tokens/s, 8,192 tokens) before IQ1_S all on the GPUs (40 tokens/s).
    assert viable[0] == ("Q4_K_M", "llama.cpp") and viable.index(("IQ1_S", "llama.cpp")) > 5
    first = result.viable[0]
    assert "system RAM" in first.placement and first.decode_tokens_per_s >= plan.GOOD_TOKENS_PER_S
    assert result.why.startswith("Q4_K_M on llama.cpp ranks first (prefer quality): the lowest loss, +2.19 %")
    assert "the fastest, IQ1_S on llama.cpp" in result.why
    losses = [c.expected_loss_pct for c in result.viable if c.decode_tokens_per_s >= 10 and c.context >= 8192]
    assert losses == sorted(losses)
    fast = plan.make_plan(CONFIG, "deepseek-r1-distill-llama-70b", "2x4090", REPO, ["Q4_K_M"], False, prefer="speed")
    top = fast.viable[0]
    assert top.expected_loss_pct <= plan.MAX_GOOD_LOSS_PCT and top.context >= 8192
    pool = [c for c in fast.viable if c.expected_loss_pct <= plan.MAX_GOOD_LOSS_PCT and c.context >= 8192]
    assert top.decode_tokens_per_s == max(c.decode_tokens_per_s for c in pool)
    assert fast.as_dict()["prefer"] == "speed" and "(prefer speed)" in fast.why


def test_every_offered_format_has_an_expected_loss_with_a_source():
    losses = quality.load(CONFIG)
    for fmt, _ in plan._formats():
        loss, source = losses.expected(fmt)
        assert loss >= 0 and (source in losses.sources or source.startswith("[D]"))
    assert losses.expected("Q4_K_M")[0] < losses.expected("Q3_K_M")[0] < losses.expected("IQ1_S")[0]


def gpu_box(**gpu) -> Target:
    return Target(
        name="box", description="hand case", system_ram_gb=64, cpu_cores=8, cpu_bandwidth_gbps=50, free_disk_gb=1000,
        gpu=GPU(**{"name": "x", "count": 1, "compute_capability": 8.9, "memory_gb": 24, "bandwidth_gbps": 1000,
                   "bf16": True, "fp8": True, "interconnect": "none", **gpu}),
    )  # fmt: skip


def test_token_embd_stays_in_host_memory_and_the_runtime_is_what_was_measured():
    qwen = shape("deepseek-r1-distill-qwen-1.5b")
    placed = planner.plan_llama_cpp(qwen, gpu_box(), 3.554, 0.0, token_embd_gb=0.467)
    # 24 GB x 0.92 less the CUDA context (596 MiB measured) and llama-server's compute buffer (<= 108 MiB).
    assert planner.llama_cpp_gpu_gb(gpu_box()) == pytest.approx(24 * 0.92 - 0.625 - 0.115)
    kv = 28 * 2 * 2 * 128 * 2
    assert placed.context == qwen.max_context  # 131,072 tokens of 28,672 bytes fit beside 3.1 GB
    assert placed.gpu_memory_gb == pytest.approx(3.554 - 0.467 + placed.context * kv / 1e9)
    assert placed.system_memory_gb == pytest.approx(0.5 + 0.467)
    # The H200 measurement (docs/benchmarks.md): BF16 at 4,096 tokens peaked at 3.890 GB; predicted now:
    assert 3.554 - 0.467 + 4096 * kv / 1e9 + planner.GPU_RUNTIME_OVERHEAD_GB == pytest.approx(3.94, abs=0.01)


def test_the_roofline_reads_the_kv_cache_at_token_8192():
    llama8 = plan.plan_model(registry.resolve_model(CONFIG, "deepseek-r1-distill-llama-8b", REPO))
    result = plan.plan_for(llama8, gpu_box(), CONFIG, ["Q8_0"], True)
    q8 = candidate(result, "Q8_0", "llama.cpp")
    kv = 2 * 32 * 8 * 128 * 2  # 131,072 bytes per token
    assert q8.decode_tokens_per_s == pytest.approx(1000e9 / (q8.weights_gb * 1e9 + 8192 * kv), abs=0.05)
    cpu = plan.plan_for(llama8, registry.load_target(CONFIG, "cpu"), CONFIG, ["Q8_0"], True)
    q8_cpu = candidate(cpu, "Q8_0", "llama.cpp")
    read = q8_cpu.weights_gb * 1e9 + min(q8_cpu.context, 8192) * kv
    assert q8_cpu.decode_tokens_per_s == pytest.approx(cpu.target.cpu_bandwidth_gbps * 1e9 / read, abs=0.05)


def test_layers_are_split_so_that_the_fullest_gpu_holds_the_least():
    # Four light layers (their experts in RAM) then four heavy ones, on two GPUs: an even --tensor-split 1,1
    # gives 4 and 16; the best contiguous runs give 12 and 8 (or 8 and 12).
    loads = [1.0] * 4 + [4.0] * 4
    split = planner.contiguous_split(loads, 2)
    assert split == [6, 2] and planner._gpu_loads(loads, split) == [12.0, 8.0]
    assert planner.contiguous_split([3.0], 4) == [1, 0, 0, 0]


def test_r1_on_4x2080ti_with_the_ram_for_every_expert_puts_them_all_there():
    box = registry.load_target(CONFIG, "4x2080ti").model_copy(update={"system_ram_gb": 256})
    r1 = plan.plan_model(registry.resolve_model(CONFIG, "deepseek-r1", REPO))
    iq1 = plan.plan_for(r1, box, CONFIG, ["IQ1_S"], True).chosen[0]
    assert iq1.flags == ["-ngl", "62", "-c", "163840", "-t", "16", "--tensor-split", "1,1,1,1", "-ot", "exps=CPU"]
    assert iq1.route == "q8-base" and iq1.gpu_memory_gb <= 22 * 0.92 - 0.74
