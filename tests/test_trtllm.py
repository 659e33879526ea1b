"""TensorRT-LLM: ModelOpt quantization and export on CPU of the embedded teacher and the dense student,
the exported checkpoints read back and validated, bundles that follow the plan, refusals."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml
from click.testing import CliRunner
from conftest import REPO, damaged_copy
from deepcast import cli, planner, registry
from deepcast.config import TrtllmSettings
from deepcast.errors import DeepcastError
from deepcast.registry import shape_from_hf_config
from deepcast.stages import trtllm

CONFIG = REPO / "config"
STUDENT_SETTINGS = TrtllmSettings(awq_block_size=64)  # the student's 64-wide layers


def target(name: str):
    return registry.load_target(CONFIG, name)


@pytest.fixture(scope="session")
def quantized(checkpoint, calibration, reference_dir, student, tmp_path_factory):
    """trtllm-fp8 of the teacher (MLA, MoE); trtllm-fp8 and trtllm-int4-awq of the student."""
    root = tmp_path_factory.mktemp("trtllm")
    made = {"teacher-fp8": root / "teacher-fp8"}
    trtllm.quantize(checkpoint, calibration, reference_dir, made["teacher-fp8"], "trtllm-fp8", TrtllmSettings())
    for fmt in ("trtllm-fp8", "trtllm-int4-awq"):
        made[fmt] = root / fmt
        trtllm.quantize(
            student["checkpoint"], student["calibration"], student["reference"], made[fmt], fmt, STUDENT_SETTINGS
        )
    return made


@pytest.fixture(scope="session")
def validated(quantized, student, tmp_path_factory):
    """trtllm-fp8 validated through the stage function, trtllm-int4-awq through `deepcast trtllm validate`."""
    root = tmp_path_factory.mktemp("trtllm-validated")
    results = {}
    for fmt in ("trtllm-fp8", "trtllm-int4-awq"):
        bundle, out = root / fmt / "bundle", root / fmt / "validation"
        trtllm.bundle(quantized[fmt], target("h100"), bundle, fmt, STUDENT_SETTINGS)
        if fmt == "trtllm-fp8":
            results[fmt] = trtllm.validate(bundle, student["checkpoint"], student["reference"], out, fmt, 4)
            continue
        command = ["trtllm", "validate", "--bundle", str(bundle), "--checkpoint", str(student["checkpoint"]),
                   "--reference", str(student["reference"]), "--format", fmt, "--out", str(out)]  # fmt: skip
        ran = CliRunner().invoke(cli.main, command, catch_exceptions=False)
        assert ran.exit_code == 0, ran.output
        results[fmt] = json.loads((out / "validation.json").read_text())
    return results


@pytest.fixture(scope="session")
def validated_teacher(quantized, checkpoint, reference_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("trtllm-teacher")
    trtllm.bundle(quantized["teacher-fp8"], target("h200"), root / "bundle", "trtllm-fp8", TrtllmSettings())
    return trtllm.validate(root / "bundle", checkpoint, reference_dir, root / "validation", "trtllm-fp8", 4)


def test_the_moe_teachers_export_reads_back_with_its_experts_quantized(validated_teacher, quantized):
    # ModelOpt writes a scale per expert Linear; transformers fuses the experts on load, so the reader must
    # split them again to apply those scales (found by the first run on the H200).
    fake = manifest(quantized["teacher-fp8"])["results"]["fake_quant"]
    assert validated_teacher["fake_quant"] == fake
    assert validated_teacher["layout"]["quantized_linears"] > 28, validated_teacher["layout"]
    assert validated_teacher["perplexity_ratio_to_reference"] < 1.1, validated_teacher
    assert 0.5 < validated_teacher["kl_divergence"] / fake["kl_divergence"] < 2
    assert validated_teacher["gate"]["status"] == "passed"


def manifest(directory):
    return json.loads((directory / "manifest.json").read_text())


def test_modelopt_exports_the_unified_checkpoint(quantized):
    for name, directory in quantized.items():
        quant = json.loads((directory / "hf_quant_config.json").read_text())
        assert quant["producer"] == {"name": "modelopt", "version": trtllm.MODELOPT_VERSION}
        assert json.loads((directory / "config.json").read_text())["quantization_config"]["quant_method"] == "modelopt"
        assert "lm_head" in quant["quantization"]["exclude_modules"], name
    assert (
        json.loads((quantized["trtllm-int4-awq"] / "hf_quant_config.json").read_text())["quantization"]["group_size"]
        == 64
    )
    for directory in quantized.values():  # what stays unquantized keeps the checkpoint's dtype
        tensors = trtllm._tensor_table(directory)
        assert tensors["model.embed_tokens.weight"][0] == "BF16" and tensors["model.norm.weight"][0] == "BF16"
        assert json.loads((directory / "config.json").read_text())["dtype"] == "bfloat16"
    teacher = manifest(quantized["teacher-fp8"])["results"]
    assert teacher["quant_algo"] == "FP8" and any("mlp.gate" in m for m in teacher["exclude_modules"])  # routers stay


def test_fake_quant_figures_are_measured(quantized):
    figures = {name: manifest(d)["results"]["fake_quant"] for name, d in quantized.items()}
    for name, fq in figures.items():
        assert fq["tokens_scored"] > 1000 and 0 < fq["kl_divergence"] < 0.5, (name, fq)
    # Four bits lose more than eight, on the same tokens.
    assert figures["trtllm-int4-awq"]["kl_divergence"] > figures["trtllm-fp8"]["kl_divergence"]


def test_the_exported_checkpoint_reads_back_as_modelopt_computed_it(validated, quantized):
    for fmt, result in validated.items():
        fake = manifest(quantized[fmt])["results"]["fake_quant"]
        assert result["fake_quant"] == fake  # carried from the quantize step through the bundle
        assert result["layout"]["quantized_linears"] == 28  # 4 layers x 7 projections
        assert result["perplexity_ratio_to_reference"] < 1.1, result
        # Export shares scales across fused projections, so the artifact is close to, not equal to, the fake-quant.
        assert 0.5 < result["kl_divergence"] / fake["kl_divergence"] < 2, (fmt, result["kl_divergence"], fake)
        assert result["smoke"]["deterministic"] and result["gate"]["status"] == "passed"
        assert result["serving"] == {
            "status": "not run here",
            "reason": "TensorRT-LLM is not installed on this machine",
        }
        assert result["speed"]["status"] == "not measured here"


@pytest.mark.parametrize(
    "target_name,fmt",
    [("h100", "trtllm-fp8"), ("h200", "trtllm-fp8"), ("a100-80g", "trtllm-int4-awq"), ("8xh100", "trtllm-fp8")],
)
def test_bundles_follow_the_plan(quantized, tmp_path, target_name, fmt):
    where = target(target_name)
    bundle = tmp_path / "bundle"
    trtllm.bundle(quantized[fmt], where, bundle, fmt, STUDENT_SETTINGS)
    shape = shape_from_hf_config(json.loads((quantized[fmt] / "config.json").read_text()))
    weights_gb = sum(p.stat().st_size for p in quantized[fmt].glob("*.safetensors")) / planner.GB
    placed = planner.plan_vllm(shape, where, weights_gb, engine="tensorrt-llm")
    config = yaml.safe_load((bundle / "config.yml").read_text())
    assert (config["tensor_parallel_size"], config["pipeline_parallel_size"]) == (
        placed.tensor_parallel,
        placed.pipeline_parallel,
    )
    pool_gb = (where.gpu.count * (where.gpu.memory_gb - planner.VLLM_RESERVE_GB) - weights_gb) * 0.85
    assert config["max_seq_len"] == min(shape.max_context, int(pool_gb * planner.GB / placed.kv_bytes_per_token))
    assert config["kv_cache_config"]["free_gpu_memory_fraction"] == 0.85
    assert config["cuda_graph_config"]["max_batch_size"] == config["max_batch_size"] == 64
    launch = (bundle / "launch.sh").read_text()
    assert "trtllm-serve checkpoint --backend pytorch" in launch and "trtllm-build" not in launch
    assert f"--tp_size {placed.tensor_parallel} --pp_size {placed.pipeline_parallel}" in launch
    capability = trtllm.FORMATS[fmt].min_compute_capability
    assert (
        f"awk '$1 >= {capability}'" in launch and f"-lt {placed.tensor_parallel * placed.pipeline_parallel} ]" in launch
    )
    assert (bundle / "checkpoint" / "hf_quant_config.json").stat().st_ino == (
        quantized[fmt] / "hf_quant_config.json"
    ).stat().st_ino  # hard links, not copies
    assert where.description in (bundle / "README.md").read_text()


def test_the_launch_script_refuses_a_machine_without_tensorrt_llm(quantized, tmp_path):
    bundle = tmp_path / "bundle"
    trtllm.bundle(quantized["trtllm-fp8"], target("h100"), bundle, "trtllm-fp8", STUDENT_SETTINGS)
    started = subprocess.run([str(bundle / "launch.sh")], capture_output=True, text=True)
    assert started.returncode == 4 and "TensorRT-LLM is not installed" in started.stderr


@pytest.mark.parametrize(
    "target_name,fmt,reason",
    [
        ("4x2080ti", "trtllm-int4-awq", "Ampere"),
        ("jetson-agx-orin-64g", "trtllm-int4-awq", "Jetson"),
        ("a100-80g", "trtllm-fp8", "8.9"),
        ("h100", "trtllm-nvfp4", "Blackwell"),
        ("cpu", "trtllm-fp8", "GPUs only"),
    ],
)
def test_refused_for_the_target_before_any_work(student, tmp_path, target_name, fmt, reason):
    with pytest.raises(DeepcastError, match=reason):
        trtllm.quantize(
            student["checkpoint"],
            student["calibration"],
            student["reference"],
            tmp_path / "q",
            fmt,
            STUDENT_SETTINGS,
            target=target(target_name),
        )
    assert not (tmp_path / "q").exists()


def test_refusals_that_name_the_fix(checkpoint, calibration, reference_dir, student, tmp_path, monkeypatch):
    with pytest.raises(DeepcastError, match="NVFP4 only"):  # MoE experts: ModelOpt's INT4 export fails on them
        trtllm.quantize(checkpoint, calibration, reference_dir, tmp_path / "q", "trtllm-int4-awq", TrtllmSettings())
    with pytest.raises(DeepcastError, match="trtllm.awq_block_size"):  # 128 does not divide 64
        trtllm.quantize(
            student["checkpoint"],
            student["calibration"],
            student["reference"],
            tmp_path / "q",
            "trtllm-int4-awq",
            TrtllmSettings(),
        )
    with pytest.raises(DeepcastError, match="needs CUDA"):
        trtllm.quantize(
            student["checkpoint"],
            student["calibration"],
            student["reference"],
            tmp_path / "q",
            "trtllm-nvfp4",
            STUDENT_SETTINGS,
            device="cpu",
        )
    monkeypatch.setattr(trtllm, "MODELOPT_VERSION", "0.46.0")
    with pytest.raises(DeepcastError, match="pip install nvidia-modelopt==0.46.0"):
        trtllm.quantize(
            student["checkpoint"],
            student["calibration"],
            student["reference"],
            tmp_path / "q",
            "trtllm-fp8",
            STUDENT_SETTINGS,
        )
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_checkpoint_is_refused_before_quantization(student, tmp_path, damage):
    copy, refusal = damaged_copy(student["checkpoint"], tmp_path, damage)
    with pytest.raises(DeepcastError, match=refusal):
        trtllm.quantize(copy, student["calibration"], student["reference"], tmp_path / "q", "trtllm-fp8",
                        STUDENT_SETTINGS)  # fmt: skip
    assert not (tmp_path / "q").exists()


def test_a_corrupted_bundle_or_checkpoint_is_refused(quantized, student, tmp_path):
    bundle = tmp_path / "bundle"
    trtllm.bundle(quantized["trtllm-fp8"], target("h100"), bundle, "trtllm-fp8", STUDENT_SETTINGS)
    config = bundle / "checkpoint" / "config.json"
    text = config.read_text()
    config.unlink()  # break the hard link before editing
    config.write_text(text.replace('"modelopt"', '"fp8"'))
    with pytest.raises(DeepcastError, match="does not match its SHA256SUMS"):
        trtllm.validate(bundle, student["checkpoint"], student["reference"], tmp_path / "v", "trtllm-fp8", 4)
    broken = tmp_path / "broken"
    shutil.copytree(quantized["trtllm-fp8"], broken)
    (broken / "hf_quant_config.json").write_text(
        json.dumps({"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "W4A16_AWQ"}})
    )
    with pytest.raises(DeepcastError, match="quant_algo is 'W4A16_AWQ'"):
        trtllm.check_layout(broken, student["checkpoint"], trtllm.FORMATS["trtllm-fp8"])
    assert not (tmp_path / "v").exists()


def test_int4_unpacking_inverts_modelopt_packing():
    import torch
    from modelopt.torch.export.quant_utils import pack_int4_in_uint8

    values = torch.randint(-8, 8, (6, 32)).float()
    packed = pack_int4_in_uint8(values, torch.ones(6, 1), 32)
    assert torch.equal(trtllm.unpack_int4(packed).float(), values)
