"""GGUF branch: the real llama.cpp tools on the embedded model, bundles for several targets, refusals."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import EMBEDDED, REPO, TASK_DATA, damaged_copy
from deepcast import manifest, registry, sizes, tools
from deepcast.config import EvaluationSettings, Gate, ValidateSettings
from deepcast.errors import DeepcastError
from deepcast.gguf_file import read_header
from deepcast.stages import gguf
from deepcast.stages.plan import make_plan

CONFIG = REPO / "config"
EVALUATION = EvaluationSettings(max_chunks=16)  # the reference fixture's chunks


@pytest.fixture(scope="session")
def imatrix(base, calibration, llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "imatrix"
    gguf.imatrix(base, calibration, out, 512, 2, llama)
    return out


@pytest.fixture(scope="session")
def kld_base(base, corpus_dir, llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "kld-base"
    gguf.kld_base(base, corpus_dir / "evaluation.txt", out, EVALUATION.context, EVALUATION.max_chunks, 2, llama)
    return out


@pytest.fixture(scope="session")
def quantized(base, imatrix, llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    made = {}
    for name, qtype, matrix in [
        ("Q8_0", "Q8_0", imatrix),
        ("Q4_K_M", "Q4_K_M", imatrix),
        ("Q4_K_M-noimat", "Q4_K_M", None),
    ]:
        made[name] = root / name
        gguf.quantize(base, made[name], qtype, matrix, [], 2, llama)
    return made


@pytest.fixture(scope="session")
def validated(quantized, base, kld_base, reference_dir, llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("validated")
    cpu = registry.load_target(CONFIG, "cpu")
    results = {}
    for name, artifact in quantized.items():
        bundle = root / name / "bundle"
        gguf.bundle(artifact, base, cpu, bundle, name.split("-")[0], "48G", "auto", llama)
        # lm-eval's fixture tasks through Q4_K_M's own llama-server; the other bundles keep the default (no data).
        with_tasks = ValidateSettings(tasks=sorted(TASK_DATA), task_data=TASK_DATA, task_limit=6)
        settings = with_tasks if name == "Q4_K_M" else None
        results[name] = gguf.validate(
            bundle,
            kld_base,
            reference_dir,
            root / name / "validation",
            EVALUATION.context,
            EVALUATION.max_chunks,
            2,
            llama,
            settings,
        )
    return results


def test_conversion_is_faithful(kld_base, reference_dir):
    hf = json.loads((reference_dir / "perplexity.json").read_text())["perplexity"]
    converted = json.loads((kld_base / "manifest.json").read_text())["results"]["perplexity"]
    assert abs(converted / hf - 1) < 0.02, (converted, hf)


def test_quality_bar(validated):
    assert validated["Q8_0"]["perplexity_ratio_to_16bit"] < 1.01
    assert validated["Q4_K_M"]["perplexity_ratio_to_16bit"] < 1.10
    assert validated["Q4_K_M"]["kl_divergence"] < validated["Q4_K_M-noimat"]["kl_divergence"]


def test_manifest_records_size_bits_and_tools(quantized):
    record = json.loads((quantized["Q4_K_M"] / "manifest.json").read_text())
    assert record["results"]["bits_per_weight"] < record["results"]["size_bytes"]
    assert record["params"]["imatrix"] is True
    assert record["params"]["llama.cpp"]["version"] == tools.VERSION
    q8 = json.loads((quantized["Q8_0"] / "manifest.json").read_text())["results"]
    assert q8["size_bytes"] > record["results"]["size_bytes"]


def test_the_header_reader_agrees_with_gguf_py(base, quantized, llama):
    """deepcast.gguf_file skips the metadata arrays gguf-py's reader takes seconds over; on everything else the
    two agree."""
    sys.path.insert(0, str(llama.root / "src" / "gguf-py"))
    from gguf import GGUFReader, GGUFValueType

    for path in (base, quantized["Q4_K_M"]):
        reader, header = GGUFReader(path / gguf.MODEL), read_header(path / gguf.MODEL, llama)
        assert [(t.name, t.type_name, t.shape, t.n_elements, t.n_bytes) for t in header.tensors] == [
            (t.name, t.tensor_type.name, tuple(int(n) for n in t.shape), int(t.n_elements), int(t.n_bytes))
            for t in reader.tensors
        ]
        assert set(header.metadata) == set(reader.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
        for key, field in reader.fields.items():
            if key in header.metadata and field.types[0] == GGUFValueType.STRING:
                assert header.metadata[key] == bytes(field.parts[-1]).decode(), key
            elif key in header.metadata and field.types[0] == GGUFValueType.ARRAY:
                assert header.metadata[key] == ("array", field.types[-1], len(field.data)), key
            elif key in header.metadata:
                assert header.metadata[key] == pytest.approx(field.parts[-1][0]), key


def test_predicted_sizes_and_tensor_types_match_the_files(base, quantized, llama):
    """The planner's per-tensor port of llama-quantize's type choice, against the real files."""
    entry = registry.load_models(CONFIG)["tiny-deepseek-v3"]
    for name, path in [("BF16", base), *quantized.items()]:
        file = path / gguf.MODEL
        qtype, imatrix = name.removesuffix("-noimat"), not name.endswith("-noimat")
        predicted = sizes.gguf_tensor_types(entry.architecture, entry.shape, qtype, imatrix)
        actual = {t.name: t.type_name for t in read_header(file, llama).tensors}
        assert predicted == actual, name
        size = sizes.gguf_size(entry.architecture, entry.shape, qtype, imatrix).total
        assert size == pytest.approx(file.stat().st_size, rel=0.001), name


def test_gate_set_impossibly_tight_fails_validation_and_writes_nothing(
    quantized, base, kld_base, reference_dir, llama, tmp_path
):
    bundle = tmp_path / "bundle"
    gguf.bundle(
        quantized["Q4_K_M"], base, registry.load_target(CONFIG, "cpu"), bundle, "Q4_K_M", "48G", "auto", llama
    )
    tight = ValidateSettings(thresholds={"*": Gate(max_perplexity_increase_percent=0.001)})
    out = tmp_path / "validation"
    with pytest.raises(DeepcastError, match=r"quality gate failed for .* \(Q4_K_M\): perplexity .* the gate allows"):
        gguf.validate(bundle, kld_base, reference_dir, out, EVALUATION.context, 4, 2, llama, tight)
    assert not out.exists()
    warn = ValidateSettings(gates="warn", thresholds=tight.thresholds)
    warned = gguf.validate(bundle, kld_base, reference_dir, out, EVALUATION.context, 4, 2, llama, warn)
    assert warned["gate"]["status"] == "warned" and out.is_dir()


def test_server_answered_and_stopped_cleanly(validated):
    server = validated["Q4_K_M"]["server"]
    assert all(text.strip() for text in server["completions"]) and server["deterministic"] and server["exit_code"] == 0
    assert validated["Q4_K_M"]["speed"]["status"] == "not measured here"  # no target given


def test_lm_eval_runs_the_generation_task_against_the_bundles_llama_server_and_says_why_not_the_others(validated):
    scores = validated["Q4_K_M"]["tasks"]
    assert scores["status"] == "measured" and scores["backend"] == "llama-server"
    assert list(scores["scores"]) == ["gsm8k"] and scores["scores"]["gsm8k"]["samples"] == 6
    assert scores["scores"]["gsm8k"]["metric"] == "exact_match"
    assert sorted(scores["skipped"]) == sorted(set(TASK_DATA) - {"gsm8k"})
    assert all("refuses echo" in why for why in scores["skipped"].values())
    assert validated["Q8_0"]["tasks"] == {"status": "skipped", "reason": "no task data (validate.task_data)",
                                          "tasks": ["hellaswag", "piqa", "winogrande"]}  # fmt: skip


def test_launch_script_refuses_a_tampered_bundle(validated, tmp_path_factory):
    bundle = next(tmp_path_factory.getbasetemp().glob("validated*/Q8_0/bundle"))
    copy = tmp_path_factory.mktemp("tampered") / "bundle"
    shutil.copytree(bundle, copy)
    data = (copy / "model.gguf").read_bytes()
    (copy / "model.gguf").unlink()
    (copy / "model.gguf").write_bytes(data[:-10])
    result = subprocess.run(
        [copy / "launch.sh"], capture_output=True, text=True, env={**os.environ, "LLAMA_SERVER": "false"}
    )
    assert result.returncode == 3 and "refusing to start" in result.stderr


@pytest.mark.parametrize(
    ("model", "target", "qtype", "expected"),
    [
        ("tiny-deepseek-v3", "cpu", "Q4_K_M", ["-ngl", "0", "-c", "2048", "-t", "2"]),
        (
            "deepseek-r1-distill-qwen-32b",
            "4x2080ti",
            "Q4_K_M",
            ["-ngl", "65", "-c", "131072", "-t", "16", "--tensor-split", "1,1,1,1"],
        ),
        ("deepseek-r1-distill-qwen-7b", "h100", "Q8_0", ["-ngl", "29", "-c", "131072", "-t", "32"]),
    ],
)
def test_bundle_flags_follow_the_target(model, target, qtype, expected):
    plan = make_plan(CONFIG, model, target, REPO, [qtype], True)
    assert plan.chosen[0].flags == expected


def test_tiny_bundle_for_four_gpus_splits_across_them(quantized, base, llama, tmp_path):
    target = registry.load_target(CONFIG, "4x2080ti")
    out = tmp_path / "bundle"
    gguf.bundle(quantized["Q4_K_M"], base, target, out, "Q4_K_M", "48G", "auto", llama)
    launch = (out / "launch.sh").read_text()
    assert "-ngl 5 -c 2048 -t 16 --tensor-split 1,1,1,1" in launch
    assert "sha256sum --quiet --strict -c SHA256SUMS" in launch
    assert "4x2080ti" in (out / "README.md").read_text()


def test_truncated_gguf_is_refused(quantized, base, llama, tmp_path):
    broken = tmp_path / "Q4_K_M"
    shutil.copytree(quantized["Q4_K_M"], broken)
    data = (broken / "model.gguf").read_bytes()
    (broken / "model.gguf").write_bytes(data[: len(data) // 2])
    target = registry.load_target(CONFIG, "cpu")
    with pytest.raises(DeepcastError, match="corrupt or truncated.*Fix: delete"):
        gguf.bundle(broken, base, target, tmp_path / "bundle", "Q4_K_M", "48G", "auto", llama)
    assert not (tmp_path / "bundle").exists()
    with pytest.raises(DeepcastError, match="not a readable GGUF"):
        gguf.gguf_facts(broken / "model.gguf", llama)


def test_unknown_quant_type_is_refused(base, llama, tmp_path):
    with pytest.raises(DeepcastError, match="unknown quant type 'Q4_K_X'.*Fix: use one of .*Q4_K_M"):
        gguf.quantize(base, tmp_path / "q", "Q4_K_X", None, [], 2, llama)
    assert not (tmp_path / "q").exists()


def test_low_bit_type_without_imatrix_is_refused(base, llama, tmp_path):
    with pytest.raises(DeepcastError, match="IQ1_S needs an importance matrix"):
        gguf.quantize(base, tmp_path / "q", "IQ1_S", None, [], 2, llama)


def test_low_bit_types_keep_attention_and_dense_layers():
    assert gguf.default_tensor_types("IQ1_M", 1) == ["attn_=Q6_K", "blk\\.(0)\\.ffn_=Q6_K"]
    assert gguf.default_tensor_types("IQ2_XXS", 3) == ["attn_=Q6_K", "blk\\.(0|1|2)\\.ffn_=Q6_K"]
    assert gguf.default_tensor_types("Q4_K_M", 1) == []


def test_missing_tool_binary_names_the_fix(llama, tmp_path):
    partial = tmp_path / "llama.cpp"
    (partial / "bin").mkdir(parents=True)
    (partial / tools.STAMP).write_text(json.dumps(llama.stamp))
    located = tools.locate(str(partial))
    with pytest.raises(DeepcastError, match="llama-quantize is missing.*tools install llama.cpp --force"):
        located.tool("llama-quantize")


def test_cache_built_for_another_version_or_backend_is_refused(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPCAST_CACHE", str(tmp_path))
    root = tools.install_dir(None)
    root.mkdir(parents=True)
    (root / tools.STAMP).write_text(json.dumps({**llama.stamp, "version": "0.0.1"}))
    monkeypatch.setattr(tools, "cuda_architectures", lambda: None)
    with pytest.raises(DeepcastError, match="built for 0.0.1/cpu, not .*tools install llama.cpp --force"):
        tools.locate()
    (root / tools.STAMP).write_text(json.dumps({**llama.stamp, "backend": "cuda-75"}))
    with pytest.raises(DeepcastError, match="built for .*/cuda-75, not .*/cpu"):
        tools.locate()


def test_no_build_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPCAST_CACHE", str(tmp_path))
    with pytest.raises(DeepcastError, match="is not built for this machine.*deepcast tools install llama.cpp"):
        tools.locate()


def test_conversion_restores_deepseek_v3_sigmoid_routing(llama, tmp_path):
    from deepcast.config import DownloadSettings
    from deepcast.stages import download

    source = tmp_path / "saved-by-transformers"  # transformers leaves scoring_func out of the configs it saves
    shutil.copytree(EMBEDDED, source)
    config = json.loads((source / "config.json").read_text())
    for key in gguf.DEEPSEEK_V3_ROUTING:
        config.pop(key)
    (source / "config.json").write_text(json.dumps(config))
    stripped = tmp_path / "checkpoint"
    download.run(str(source), "v1", stripped, DownloadSettings())
    results = gguf.convert(stripped, tmp_path / "bf16", "bf16", llama)
    assert results["config_keys_added"] == gguf.DEEPSEEK_V3_ROUTING
    written = sorted(p.name for p in (tmp_path / "bf16").iterdir())
    assert written == [gguf.SOURCE_CONFIG, "manifest.json", "model.gguf"]
    sys.path.insert(0, str(llama.root / "src" / "gguf-py"))
    from gguf import ExpertGatingFuncType

    gating = read_header(tmp_path / "bf16" / "model.gguf", llama).metadata["deepseek2.expert_gating_func"]
    assert gating == ExpertGatingFuncType.SIGMOID


@pytest.fixture(scope="module")
def packed_source(tmp_path_factory) -> Path:
    packed = tmp_path_factory.mktemp("pack") / "llama.cpp-src.tar.xz"
    tools.pack(packed, log=lambda line: None)
    return packed


def test_a_packed_source_keeps_what_the_build_and_converter_read_and_configures(packed_source, tmp_path):
    tree = tmp_path / "src"
    assert tools.extract(packed_source, tree)["sdist_sha256"] == tools.SDIST_SHA256
    cuda_instance = "ggml/src/ggml-cuda/template-instances/fattn-vec-instance-f16-f16.cu"  # a long name
    for needed in ("CMakeLists.txt", "convert_hf_to_gguf.py", "gguf-py", "conversion", cuda_instance):
        assert (tree / needed).exists(), needed
    for left_out in ("docs", "models", "tests", "ggml/src/ggml-vulkan", "tools/ui/src", "llama_cpp_python-0.3.36"):
        assert not (tree / left_out).exists(), left_out
    assert packed_source.stat().st_size < 8e6  # what travels where the 77 MB sdist cannot
    configure = subprocess.run(["cmake", "-S", tree, "-B", tmp_path / "build", *tools.cmake_flags(None)],
                               capture_output=True, text=True)  # fmt: skip
    assert configure.returncode == 0, configure.stdout[-2000:] + configure.stderr[-2000:]


def test_a_source_packed_from_another_version_or_not_by_deepcast_is_refused(packed_source, tmp_path):
    other = tmp_path / "other.tar.xz"
    with tarfile.open(other, "w:xz") as archive:
        record = json.dumps({"package": tools.PACKAGE, "version": "0.0.1", "sdist_sha256": "0" * 64}).encode()
        info = tarfile.TarInfo(tools.PACKED)
        info.size = len(record)
        archive.addfile(info, io.BytesIO(record))
    with pytest.raises(DeepcastError, match="packed from llama-cpp-python 0.0.1, not the pinned"):
        tools.extract(other, tmp_path / "a")
    not_packed = tmp_path / "notes.tar.xz"
    not_packed.write_text("not an archive")
    with pytest.raises(DeepcastError, match="is not a llama.cpp source packed by deepcast.*tools pack llama.cpp"):
        tools.extract(not_packed, tmp_path / "b")


def test_the_q8_base_route_end_to_end(tmp_path):
    """The disk-lean route on the embedded model: a Q8_0 base, the download deleted once read, Q4_K_M
    requantized from the base with the imatrix computed on it, bundled and validated."""
    from conftest import snakemake

    config = ["formats=[Q4_K_M]", "gguf={route: q8-base}", "calibration={samples: 16}", "evaluation={max_chunks: 8}"]
    result = snakemake(tmp_path, "--config", *config)
    assert result.returncode == 0, result.stderr[-3000:]
    models = tmp_path / "results/models/tiny-deepseek-v3/v1"
    assert not (models / "checkpoint").exists() and "Removing temporary output" in result.stderr
    assert not (models / "gguf/bf16").exists()
    base = manifest.read(models / "gguf/q8_0")
    assert base["params"]["outtype"] == "q8_0" and (models / "gguf/q8_0" / gguf.SOURCE_CONFIG).is_file()
    quantized = manifest.read(models / "gguf/Q4_K_M")
    assert quantized["params"]["requantize"] and quantized["params"]["imatrix"]
    assert manifest.read(models / "gguf/imatrix")["inputs"][gguf.MODEL] == base["files"][gguf.MODEL]["sha256"]
    validation = json.loads(
        (tmp_path / "results/targets/cpu/tiny-deepseek-v3/v1/llama.cpp/Q4_K_M/validation/validation.json").read_text()
    )
    assert validation["kld_base_type"] == "q8_0" and validation["gate"]["status"] == "passed"
    plan = json.loads((tmp_path / "results/targets/cpu/tiny-deepseek-v3/v1/plan.json").read_text())
    assert plan["gguf_route"]["name"] == "q8-base"
    # A second run does nothing: the deleted download is not a reason to rebuild.
    again = snakemake(tmp_path, "-n", "--config", *config)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_a_disk_too_small_is_refused_before_writing_and_a_rerun_with_room_succeeds(checkpoint, small_disk):
    from conftest import deepcast_cli, error_of

    out = small_disk / "bf16"
    result = deepcast_cli("gguf", "convert", "--checkpoint", str(checkpoint), "--outtype", "bf16", "--out", str(out))
    message = error_of(result)
    assert re.search(r"bf16 needs 0\.04 GB \(the planner's figure\), and 0\.03 GB are free in .*small", message)
    assert "Nothing was written" in message and len(message.strip().splitlines()) == 1
    assert list(small_disk.iterdir()) == []
    subprocess.run(["mount", "-o", "remount,size=100m", str(small_disk)], check=True)  # room made
    again = deepcast_cli("gguf", "convert", "--checkpoint", str(checkpoint), "--outtype", "bf16", "--out", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert manifest.read(out)["files"][gguf.MODEL]["size"] == (out / gguf.MODEL).stat().st_size


def test_a_disk_that_fills_up_while_writing_ends_in_one_message_and_leaves_nothing(small_disk):
    from deepcast import files

    full = r"the disk filled up: big needs 0\.01 GB .*are free in .*Fix: free disk"
    with pytest.raises(DeepcastError, match=full), files.atomic_path(small_disk / "big", 10_000_000) as tmp:
        tmp.write_bytes(bytes(40_000_000))  # more than the planner said, more than the disk holds
    assert list(small_disk.iterdir()) == []


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_download_is_refused_before_conversion(checkpoint, llama, tmp_path, damage):
    copy, refusal = damaged_copy(checkpoint, tmp_path, damage)
    with pytest.raises(DeepcastError, match=refusal):
        gguf.convert(copy, tmp_path / "bf16", "bf16", llama)
    assert not (tmp_path / "bf16").exists()
