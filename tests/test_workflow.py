"""The Snakemake workflow end to end on the embedded model, its dry runs and its refusals."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ENV, QUICK, REPO, SNAKEMAKE, snakemake
from deepcast import manifest

MODEL_DIR = "results/models/tiny-deepseek-v3/v1"
def test_default_run_leaves_every_artifact_with_its_manifest(default_run):
    for artifact in ("checkpoint", "calibration", "reference", "gguf/bf16", "gguf/Q4_K_M", "compressed/gptq-w4a16"):
        record = manifest.read(default_run / MODEL_DIR / artifact)
        assert record["files"] and record["tools"]["torch"]
    target = default_run / "results/targets/cpu/tiny-deepseek-v3/v1"
    for validation in ("llama.cpp/Q4_K_M/validation", "vllm/gptq-w4a16/validation"):
        assert manifest.read(target / validation)["results"]["perplexity"] > 0
    perplexity = json.loads((default_run / MODEL_DIR / "reference" / "perplexity.json").read_text())
    assert perplexity["perplexity"] <= 200
    assert (default_run / "logs/tiny-deepseek-v3/v1/download.log").exists()


def test_summary_and_report_show_every_artifact_with_real_figures(default_run):
    summary = default_run / "results/targets/cpu/tiny-deepseek-v3/v1/summary"
    rows = {row["artifact"]: row for row in json.loads((summary / "rows.json").read_text())}
    assert set(rows) == {"llama.cpp/Q4_K_M", "vllm/gptq-w4a16"}
    for row in rows.values():
        assert row["gate"] == "passed" and row["perplexity"] > 0 and row["smoke"].startswith("passed")
    assert rows["llama.cpp/Q4_K_M"]["kl_divergence"] > 0 and rows["vllm/gptq-w4a16"]["kl_divergence"] > 0
    assert "<svg" in (summary / "quality-vs-size.svg").read_text()
    assert "Refused" in (summary / "plan.html").read_text()
    page = default_run / "report.html"
    built = snakemake(default_run, "--report", str(page), "--config", *QUICK)
    assert built.returncode == 0, built.stderr[-2000:]
    assert page.stat().st_size > 10_000
    shown = subprocess.run([str(SNAKEMAKE.with_name("deepcast")), "report", "--config-dir", str(REPO / "config")],
                           capture_output=True, text=True, cwd=default_run, env=ENV)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "llama.cpp/Q4_K_M" in shown.stdout and "passed" in shown.stdout


def test_second_run_does_nothing_and_says_so(default_run):
    started = time.monotonic()
    result = snakemake(default_run, "--config", *QUICK)
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr
    assert time.monotonic() - started < 30


def test_dry_run_for_a_hub_model_needs_no_network():
    offline = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = subprocess.run(
        [str(SNAKEMAKE), "-n", "--config", "target=4x2080ti", "model=deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**ENV, **offline},
    )
    assert result.returncode == 0, result.stderr
    assert "results/models/deepseek-r1-distill-qwen-7b/main/checkpoint" in result.stdout
    assert "--source hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --revision main" in result.stdout
    for rule in ("download", "calibrate", "reference"):
        assert f"rule {rule}:" in result.stdout


def dry_run(*config: str) -> str:
    offline = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = subprocess.run(
        [str(SNAKEMAKE), "-n", "--config", *config],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**ENV, **offline},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_dry_run_of_the_gguf_branch_on_four_turing_gpus():
    out = dry_run("target=4x2080ti", "model=deepseek-ai/DeepSeek-R1-Distill-Qwen-32B")
    for rule in ("gguf_convert", "gguf_imatrix", "gguf_quantize", "gguf_kld_base", "gguf_bundle", "gguf_validate"):
        assert f"rule {rule}:" in out
    assert "--expect-flags '-ngl 65 -c 131072 -t 16 --tensor-split 1,1,1,1'" in out
    assert "results/targets/4x2080ti/deepseek-r1-distill-qwen-32b/main/llama.cpp/Q4_K_M/bundle" in out


def test_sixteen_bit_deploys_as_f16_on_turing_and_bf16_elsewhere():
    turing = dry_run("target=4x2080ti", "gguf={types: [BF16]}")
    assert "gguf/f16" in turing and "llama.cpp/F16/bundle" in turing and "rule gguf_quantize:" not in turing
    hopper = dry_run("target=h100", "gguf={types: [BF16]}")
    assert "llama.cpp/BF16/bundle" in hopper and "gguf/f16" not in hopper


def test_fp8_is_planned_on_hopper_and_refused_on_turing_with_its_reason():
    hopper = dry_run("target=h100", "model=deepseek-ai/DeepSeek-R1-Distill-Qwen-32B")
    assert "--scheme fp8" in hopper
    # 70B at FP8 is 71 GB with its 16-bit embeddings: more than one H100 leaves after vLLM's reserve.
    assert "--scheme fp8" not in dry_run("target=h100", "model=deepseek-ai/DeepSeek-R1-Distill-Llama-70B")
    turing = subprocess.run(
        [str(SNAKEMAKE), "-n", "--config", "target=4x2080ti", "model=deepseek-ai/DeepSeek-R1-Distill-Llama-70B"],
        capture_output=True, text=True, cwd=REPO, env=ENV,
    )  # fmt: skip
    assert "--scheme fp8" not in turing.stdout
    said = turing.stdout + turing.stderr
    assert "fp8 refused for target 4x2080ti: FP8 W8A8 kernels need compute capability 8.9" in said
    # 70 GB of int8 weights leave no room for a KV cache on 4 x 22 GB: the plan drops it, the DAG follows.
    assert "int8-w8a8 refused for target 4x2080ti: 72.7 GB of weights do not fit" in said
    assert "--scheme int8-w8a8" not in turing.stdout and "--scheme gptq-w4a16" in turing.stdout


def shell_commands(*config: str) -> list[str]:
    offline = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = subprocess.run(
        [str(SNAKEMAKE), "-n", "-p", "--forceall", "--config", *config],
        capture_output=True, text=True, cwd=REPO, env={**ENV, **offline},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    prefix = "Shell command: "
    return [line.removeprefix(prefix) for line in result.stdout.splitlines() if line.startswith(prefix + "deepcast ")]


def test_three_targets_get_the_dags_their_plans_say():
    menu = "gguf={types: [BF16, Q4_K_M]}"
    bundles = {}
    for target in ("cpu", "4x2080ti", "h100"):
        commands = shell_commands(f"target={target}", menu)
        bundles[target] = sorted(c.split(" --out ")[0] for c in commands if " bundle " in c)
    # CPU: the MLA teacher's latent head (144) is not the 576 vLLM's CPU MLA kernel takes: transformers serves it.
    assert any("--scheme fp8" in c and "--engine transformers" in c for c in bundles["cpu"])
    assert any("--scheme gptq-w4a16" in c and "--engine transformers" in c for c in bundles["cpu"])
    assert not any("--engine vllm-cpu" in c for c in bundles["cpu"])
    # Turing: no fp8, the 16-bit GGUF as F16, four GPUs split by llama.cpp.
    assert not any("--scheme fp8" in c for c in bundles["4x2080ti"])
    turing = bundles["4x2080ti"]
    assert any("--type F16" in c for c in turing) and not any("--type BF16" in c for c in turing)
    assert any("--tensor-split 1,1,1,1" in c for c in bundles["4x2080ti"])
    # Hopper: fp8 on vLLM, BF16 GGUF, one GPU.
    assert any("--scheme fp8" in c and "--engine vllm " in c + " " for c in bundles["h100"])
    assert any("--type BF16" in c for c in bundles["h100"])
    assert len({tuple(b) for b in bundles.values()}) == 3


def test_the_engine_branches_follow_the_plan_per_target():
    dense = "model=tiny-llama-student"
    hopper = " ".join(shell_commands("target=h100", dense))
    for step in ("trtllm quantize", "trtllm bundle", "trtllm validate", "onnx build", "onnx bundle", "onnx validate"):
        assert f"deepcast {step} " in hopper, step
    assert "--format trtllm-fp8" in hopper and "--provider cuda" in hopper and "deepcast edgellm" not in hopper
    turing = " ".join(shell_commands("target=4x2080ti", dense))
    assert "deepcast trtllm" not in turing and "deepcast onnx build" in turing  # TensorRT-LLM left Turing
    jetson = " ".join(shell_commands("target=jetson-agx-orin-64g", dense))
    assert "deepcast edgellm export" in jetson and "--format edgellm-int4" in jetson
    assert "deepcast trtllm" not in jetson and "deepcast onnx" not in jetson
    teacher = " ".join(shell_commands("target=h100"))  # MLA: no ONNX; MoE: ModelOpt FP8 only
    assert "--format trtllm-fp8" in teacher and "--format trtllm-int4-awq" not in teacher
    assert "deepcast onnx" not in teacher


def test_formats_narrow_the_plan_and_cannot_force_a_refused_one(tmp_path):
    narrowed = shell_commands("target=h100", "formats=[Q8_0]")
    assert any("--type Q8_0" in c for c in narrowed)
    assert not any("compress run" in c for c in narrowed) and not any("--type Q4_K_M" in c for c in narrowed)
    result = snakemake(tmp_path, "-n", "--config", "target=4x2080ti", "formats=[fp8]")
    assert result.returncode != 0
    said = result.stdout + result.stderr
    assert "format fp8 is refused for target 4x2080ti: FP8 W8A8 kernels need compute capability 8.9" in said


def test_a_model_that_fits_nowhere_stops_and_names_the_nearest_plan(tmp_path):
    result = snakemake(tmp_path, "-n", "--config", "target=1x4090", "model=deepseek-r1")
    assert result.returncode != 0
    said = result.stdout + result.stderr
    assert "deepseek-r1 fits nowhere on target 1x4090" in said and "Nearest:" in said
    assert "smaller model: " in said and "bigger target: " in said
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (["target=nope"], "unknown target 'nope'. Valid targets:"),
        (["model=nosuch"], "unknown model 'nosuch'. Registry models:"),
        (["model=deepseek ai/R1"], "malformed model id"),
        (["model=deepseek-ai/DeepSeek-R1@bad..rev"], "malformed revision"),
        (["calibration={source: /nonexistent.txt}"], "calibration source /nonexistent.txt does not exist"),
        (["calibration={samples: 0}"], "calibration.samples: Input should be greater than or equal to 1"),
    ],
)
def test_bad_input_stops_before_any_work(tmp_path, config, message):
    result = snakemake(tmp_path, "--config", *config)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "results").exists()


def test_empty_calibration_source_stops_before_any_work(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    result = snakemake(tmp_path, "--config", f"calibration={{source: {empty}}}")
    assert result.returncode != 0
    assert f"calibration source {empty} is empty" in result.stderr
    assert not (tmp_path / "results").exists()


def planned_jobs(workdir: Path, *config: str) -> set[str]:
    """The rules a dry run would run after a change of config, from Snakemake's job table."""
    result = snakemake(workdir, "-n", "--config", *QUICK, *config)
    assert result.returncode == 0, result.stderr[-2000:]
    return set(re.findall(r"^rule (\w+):", result.stdout, re.MULTILINE)) - {"all"}


def test_a_second_target_reuses_all_shared_work(default_run):
    jobs = planned_jobs(default_run, "target=4x2080ti")
    assert jobs == {"plan", "gguf_bundle", "vllm_bundle", "gguf_validate", "vllm_validate", "report"}


def test_an_unrelated_key_reruns_nothing(default_run):
    assert planned_jobs(default_run, "compress={schemes: [gptq-w4a16], recipes: {awq-w4a16: /elsewhere.yaml}}") == set()


def test_calibration_settings_rerun_exactly_the_quantizers_that_read_them(default_run):
    jobs = planned_jobs(default_run, "calibration={samples: 8}")
    assert jobs == {"calibrate", "gguf_imatrix", "gguf_quantize", "compress", "gguf_bundle", "vllm_bundle",
                    "gguf_validate", "vllm_validate", "report"}  # fmt: skip
    # Not the download, the corpus, the reference, the 16-bit GGUF or its logits: they do not read them.


def test_a_bundle_setting_reruns_only_the_bundle_and_what_follows(default_run):
    assert planned_jobs(default_run, "gguf={split_max_size: 40G}") == {"gguf_bundle", "gguf_validate", "report"}


@pytest.fixture(scope="module")
def own_copy(tmp_path_factory) -> tuple[Path, dict]:
    """The project copied, its package first on PYTHONPATH, run once: code and profiles to edit."""
    import shutil

    root = tmp_path_factory.mktemp("copy") / "deepcast"
    skip = shutil.ignore_patterns(".venv", ".git", "results", "logs", "benchmarks", ".snakemake", "__pycache__",
                                  ".llamacpp-src", ".carry", ".whl", "bench", "docs")  # fmt: skip
    shutil.copytree(REPO, root, ignore=skip)
    env = {"PYTHONPATH": str(root / "workflow")}
    result = subprocess.run([str(SNAKEMAKE), "-s", str(root / "Snakefile"), "-d", str(root), "--cores", "2",
                             "--config", *QUICK], capture_output=True, text=True, env={**ENV, **env})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return root, env


def jobs_after_edit(own_copy, path: str, edit) -> set[str]:
    root, env = own_copy
    file = root / path
    original = file.read_text()
    file.write_text(edit(original))
    try:
        result = subprocess.run([str(SNAKEMAKE), "-s", str(root / "Snakefile"), "-d", str(root), "--cores", "2", "-n",
                                 "--config", *QUICK], capture_output=True, text=True, env={**ENV, **env})  # fmt: skip
    finally:
        file.write_text(original)
    assert result.returncode == 0, result.stderr[-2000:]
    return set(re.findall(r"^rule (\w+):", result.stdout, re.MULTILINE)) - {"all"}


def test_editing_a_stage_reruns_that_stage_and_its_dependents_only(own_copy):
    jobs = jobs_after_edit(own_copy, "workflow/deepcast/stages/calibrate.py", lambda text: text + "\n# edited\n")
    assert jobs == {"calibrate", "gguf_imatrix", "gguf_quantize", "compress", "gguf_bundle", "vllm_bundle",
                    "gguf_validate", "vllm_validate", "report"}  # fmt: skip


def test_changing_the_target_profile_reruns_only_that_targets_steps(own_copy):
    jobs = jobs_after_edit(own_copy, "config/targets/cpu.yaml",
                           lambda text: text.replace("cpu_bandwidth_gbps: 40", "cpu_bandwidth_gbps: 41"))  # fmt: skip
    assert jobs == {"plan", "gguf_bundle", "vllm_bundle", "gguf_validate", "vllm_validate", "report"}


@pytest.mark.parametrize("artifact", ["gguf/Q4_K_M", "compressed/gptq-w4a16"])
def test_reproduce_rebuilds_bit_identical_artifacts_on_the_cpu(default_run, artifact):
    result = subprocess.run([str(SNAKEMAKE.with_name("deepcast")), "reproduce", f"{MODEL_DIR}/{artifact}"],
                            capture_output=True, text=True, cwd=default_run, env=ENV)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["bit_identical"] and report["files_compared"] >= 1 and not report["differing_files"]


def test_a_broken_artifact_fails_validation_and_is_not_reported_as_passed(default_run):
    """Runs last: it breaks the default run's Q4_K_M bundle."""
    target = default_run / "results/targets/cpu/tiny-deepseek-v3/v1/llama.cpp/Q4_K_M"
    gguf_file = target / "bundle" / "model.gguf"
    data = gguf_file.read_bytes()
    gguf_file.unlink()  # a hard link to the shared artifact: replace it, do not write through it
    gguf_file.write_bytes(data[: len(data) // 2])
    result = snakemake(default_run, "--forcerun", "gguf_validate", "--config", *QUICK)
    assert result.returncode != 0
    log = (default_run / "logs/cpu/tiny-deepseek-v3/v1/gguf_validate_Q4_K_M.log").read_text()
    assert "does not match its SHA256SUMS" in log and "model.gguf: FAILED" in log
    assert not (target / "validation").exists()
    shown = subprocess.run([str(SNAKEMAKE.with_name("deepcast")), "report", "--config-dir", str(REPO / "config")],
                           capture_output=True, text=True, cwd=default_run, env=ENV)  # fmt: skip
    assert shown.returncode == 1
    assert "not validated" in shown.stdout


def test_a_token_a_run_uses_is_written_nowhere(hub, tmp_path):
    """A canary HF_TOKEN, required by the loopback hub for the plan's config.json and the download, is sent and
    then found in no file of the run: results, logs, benchmarks, Snakemake's metadata and logs."""
    canary = "hf_deepcastCANARY0123456789abcdef"
    hub.token = canary
    model = "results/models/deepseek-test--tiny/main"
    targets = [f"{model}/calibration", "results/targets/cpu/deepseek-test--tiny/main/plan.json"]
    result = snakemake(tmp_path, *targets, "--config", "model=deepseek-test/tiny", "formats=[Q8_0]",
                       "calibration={samples: 4}", env={"HF_TOKEN": canary, "HF_ENDPOINT": hub.url})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Bearer {canary}" in hub.auth_headers and canary not in result.stdout + result.stderr
    written = [path for path in tmp_path.rglob("*") if path.is_file() and "hub" not in path.relative_to(tmp_path).parts]
    assert {p.relative_to(tmp_path).parts[0] for p in written} >= {"results", "logs", "benchmarks", ".snakemake"}
    assert [p for p in written if canary.encode() in p.read_bytes()] == []
