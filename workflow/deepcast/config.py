"""Typed settings: the one source of truth for config/config.yaml and its JSON schema.

`deepcast config schema` regenerates workflow/schemas/config.schema.json from
these models; a test fails when the committed schema drifts from them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deepcast.errors import DeepcastError

SCHEMA_PATH = Path(__file__).parent.parent / "schemas" / "config.schema.json"

WEIGHT_AND_CONFIG_FILES = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DownloadSettings(Strict):
    allow_patterns: list[str] = Field(
        default=WEIGHT_AND_CONFIG_FILES,
        description="Files taken from a source: weights as safetensors, configs and tokenizer files.",
    )
    allow_pickle: bool = Field(
        default=False,
        description="Opt in to pickle weights (.bin/.pt) when a checkpoint has no safetensors; "
        "they are loaded with torch's weights_only loader and rewritten as safetensors.",
    )
    retries: int = Field(default=3, ge=0, description="Resumed attempts per file after a dropped connection.")


class CalibrationSettings(Strict):
    source: str = Field(
        default="corpus",
        description="'corpus' (the pinned offline corpus), a local .txt or .jsonl file, "
        "or hf-dataset://org/name@revision for a hub dataset.",
    )
    text_field: str = Field(default="text", description="Field holding the text in .jsonl records.")
    samples: int = Field(default=64, ge=1, description="Number of calibration samples.")
    sequence_length: int = Field(default=512, ge=16, description="Tokens per sample.")
    seed: int = Field(default=0, description="Seed for choosing the samples.")
    chat_template: bool = Field(
        default=False, description="Wrap each sample as a user turn with the model's chat template."
    )


class EvaluationSettings(Strict):
    context: int = Field(default=512, ge=16, description="Tokens per perplexity chunk (llama-perplexity's -c).")
    max_chunks: int = Field(default=48, ge=1, description="Upper bound on evaluated chunks.")
    batch_size: int = Field(default=4, ge=1)
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Where the reference runs.")


class GGUFSettings(Strict):
    types: list[str] = Field(
        default=["Q4_K_M"],
        description="llama.cpp quant types to build for the target (Q4_K_M, Q8_0, Q5_K_M, Q6_K, IQ4_XS, "
        "IQ2_XXS, IQ1_S, IQ1_M, ...). The imatrix-only low-bit types need imatrix: true.",
    )
    imatrix: bool = Field(default=True, description="Quantize with an importance matrix from the calibration set.")
    controls: list[str] = Field(
        default=[],
        description="Types also quantized WITHOUT the imatrix, as a measured control (for example Q4_K_M).",
    )
    tensor_types: dict[str, list[str]] = Field(
        default={},
        description="Per quant type, llama-quantize --tensor-type overrides (regex=TYPE), for example "
        "{IQ1_S: ['attn=Q6_K']}. Low-bit types get DeepSeek's dynamic-quant defaults when unset.",
    )
    split_max_size: str = Field(
        default="48G",
        pattern=r"^[0-9]+[MG]$",
        description="Bundles split the GGUF with llama-gguf-split above this size (llama-gguf-split's N M or N G).",
    )
    route: Literal["auto", "plain", "drop-download", "q8-base"] = Field(
        default="auto",
        description="How the GGUF types are made (docs/planner.md, routes): plain (16-bit base, download kept), "
        "drop-download (16-bit base, download deleted once converted), q8-base (Q8_0 base, download deleted, "
        "types requantized from it). auto: the first of these whose disk peak fits the target's free disk.",
    )


class CompressSettings(Strict):
    schemes: list[str] = Field(
        default=["gptq-w4a16", "awq-w4a16", "int8-w8a8", "fp8"],
        description="llm-compressor schemes built for the target (gptq-w4a16, awq-w4a16, int8-w8a8, fp8); "
        "the plan drops the ones the target cannot run and says why.",
    )
    controls: list[str] = Field(
        default=[], description="Schemes built as measured controls, e.g. rtn-w4a16 (round to nearest)."
    )
    recipes: dict[str, str] = Field(
        default={}, description="Per scheme, a recipe YAML replacing config/recipes/<scheme>.yaml."
    )


class TrtllmSettings(Strict):
    formats: list[str] = Field(
        default=["trtllm-fp8", "trtllm-int4-awq"],
        description="TensorRT-LLM formats built for the target (trtllm-bf16, trtllm-fp8, trtllm-int4-awq, "
        "trtllm-w4a8-awq, trtllm-nvfp4): ModelOpt checkpoints served by trtllm-serve's PyTorch backend; the plan "
        "drops the ones the target cannot run and says why.",
    )
    awq_block_size: int = Field(
        default=128, description="INT4-AWQ group size (TensorRT-LLM's kernels take 64 or 128).", ge=16, le=256
    )
    max_batch_size: int = Field(default=64, ge=1, description="trtllm-serve's max_batch_size.")
    kv_cache_memory_fraction: float = Field(
        default=0.85, gt=0, le=1, description="Share of the GPU memory left after the weights given to the KV cache."
    )
    cuda_graphs: bool = Field(default=True, description="Capture CUDA graphs up to max_batch_size at server start.")


class OnnxSettings(Strict):
    formats: list[str] = Field(
        default=["onnx-int4"],
        description="onnxruntime-genai builds (onnx-fp32, onnx-fp16, onnx-int4) for the target's execution "
        "provider (CPU, or CUDA on GPU targets); dense Qwen2/Llama models only.",
    )
    int4_algorithm: Literal["k_quant", "rtn"] = Field(
        default="k_quant", description="The builder's weight-only INT4 algorithm (no calibration data)."
    )
    int4_block_size: Literal[16, 32, 64, 128, 256] = Field(default=32, description="INT4 block (group) size.")


class EdgeLlmSettings(Strict):
    formats: list[str] = Field(
        default=["edgellm-int4", "edgellm-fp16"],
        description="TensorRT Edge-LLM formats for Jetson targets (edgellm-fp16, edgellm-int8, edgellm-int4); "
        "the engine is built on the device.",
    )


class Gate(Strict):
    max_perplexity_increase_percent: float = Field(gt=0, description="Over the reference (16-bit) perplexity.")
    max_kl_divergence: float | None = Field(default=None, gt=0, description="Mean KLD to the 16-bit model.")


def _gates(formats: list[str], increase: float, kld: float) -> dict[str, Gate]:
    return {fmt: Gate(max_perplexity_increase_percent=increase, max_kl_divergence=kld) for fmt in formats}


# [D] Loose enough for every format's published quality (hardware.md F), tight enough to catch a broken one.
DEFAULT_GATES = {
    **_gates(["BF16", "F16", "trtllm-bf16", "onnx-fp32", "onnx-fp16", "edgellm-fp16"], 0.5, 0.005),
    **_gates(["Q8_0", "int8-w8a8", "fp8", "trtllm-fp8", "edgellm-int8"], 2.0, 0.02),
    **_gates(["Q6_K", "Q5_K_M", "Q5_K_S"], 4.0, 0.06),
    **_gates(["Q4_K_M", "Q4_K_S", "Q4_0", "IQ4_XS", "IQ4_NL", "gptq-w4a16", "awq-w4a16", "rtn-w4a16",
              "trtllm-int4-awq", "trtllm-w4a8-awq", "trtllm-nvfp4", "onnx-int4", "edgellm-int4"], 10.0, 0.2),
    "*": Gate(max_perplexity_increase_percent=60.0, max_kl_divergence=1.5),  # 3 bits and fewer
}


class ValidateSettings(Strict):
    gates: Literal["fail", "warn"] = Field(
        default="fail", description="fail: a failing gate fails its rule; warn: it is recorded as a warning."
    )
    tasks: list[str] = Field(
        default=["hellaswag", "piqa", "winogrande"],
        description="lm-evaluation-harness tasks (any task `lm_eval ls tasks` lists), run on the 16-bit model "
        "and every artifact where validate.task_data gives their items; skipped with the reason otherwise.",
    )
    task_data: dict[str, Path] = Field(
        default={},
        description="Task name -> a jsonl file of its items in the upstream task's format: the hub is not "
        "read, deepcast writes a task YAML that includes the upstream definition with this file as every split.",
    )
    task_limit: int = Field(default=200, ge=1, description="Items per task.")
    max_task_drop_points: float = Field(
        default=5.0,
        ge=0,
        description="The task gate: the largest drop of a task's accuracy below the 16-bit model's, in points, "
        "when it also exceeds twice the combined standard error.",
    )
    thresholds: dict[str, Gate] = Field(
        default=DEFAULT_GATES,
        description="Per format (GGUF type or compress scheme; '*' for the rest): the largest perplexity "
        "increase over the reference and the largest KL divergence a validation accepts.",
    )


class ToolsSettings(Strict):
    llama_cpp: str | None = Field(
        default=None,
        description="A llama.cpp directory with bin/ and the source tree; default: the pinned build in the cache.",
    )


STUDENT_NAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"


class StudentShape(Strict):
    """An inline student shape, initialised at random: a dense Llama or a DeepseekV3 like the teacher."""

    architecture: Literal["llama", "deepseek_v3"] = Field(description="llama (dense) or deepseek_v3 (MLA and MoE).")
    hidden: int = Field(ge=8, description="hidden_size; a multiple of heads.")
    layers: int = Field(ge=1, description="num_hidden_layers.")
    heads: int = Field(ge=1, description="num_attention_heads.")
    kv_heads: int | None = Field(default=None, ge=1, description="num_key_value_heads (llama); default: heads.")
    intermediate: int = Field(ge=8, description="intermediate_size of the dense FFN.")
    copy_embeddings: bool = Field(
        default=True,
        description="Start from the teacher's token embeddings (projected onto their leading principal directions "
        "when the student's hidden size is smaller).",
    )


class StudentSpec(Strict):
    name: str = Field(pattern=STUDENT_NAME, description="Names the student's results folder (lower case).")
    kind: Literal["prune", "hf"] = Field(
        description="prune: the teacher with only keep_layers (same architecture and tokenizer, teacher-initialised); "
        "hf: an existing checkpoint (source) or an inline shape (shape) initialised at random."
    )
    keep_layers: list[int] | None = Field(
        default=None, description="prune: the teacher layers kept, in order (default: the first and the last)."
    )
    source: str | None = Field(
        default=None, description="hf: a registry name, a hub id org/name[@revision] or a local directory."
    )
    shape: StudentShape | None = Field(default=None, description="hf: an inline shape instead of a source.")
    method: Literal["logits", "sequences"] | None = Field(
        default=None, description="Overrides distill.method for this student."
    )

    @model_validator(mode="after")
    def _one_origin(self):
        if self.kind == "prune" and (self.source or self.shape):
            raise ValueError("a prune student takes keep_layers, not source or shape")
        if self.kind == "hf" and (self.source is None) == (self.shape is None):
            raise ValueError("an hf student takes exactly one of source or shape")
        if self.shape is not None and self.shape.hidden % self.shape.heads:
            raise ValueError(
                f"shape.hidden ({self.shape.hidden}) must be a multiple of shape.heads ({self.shape.heads})"
            )
        if self.shape is not None and self.shape.kv_heads and self.shape.heads % self.shape.kv_heads:
            raise ValueError(
                f"shape.heads ({self.shape.heads}) must be a multiple of shape.kv_heads ({self.shape.kv_heads})"
            )
        return self


class DistillLoss(Strict):
    kind: Literal["forward_kl"] = Field(default="forward_kl", description="KL(teacher || student), with temperature.")
    temperature: float = Field(default=1.0, gt=0, description="Applied to both distributions; the loss is x T^2.")
    alpha: float = Field(
        default=0.5, ge=0, le=1, description="Weight of the KD term; 1 - alpha weighs cross-entropy. 0 is the control."
    )
    top_k: int = Field(default=32, ge=1, description="Teacher tokens kept per position, plus one tail bucket.")


class SequenceSettings(Strict):
    producer: Literal["auto", "bundle", "transformers"] = Field(
        default="auto",
        description="auto: the teacher's own llama.cpp bundle when the plan builds one for the target, "
        "else transformers.",
    )
    prompts: int = Field(default=64, ge=1, description="Prompts cut from the data source.")
    prompt_tokens: int = Field(default=64, ge=4, description="Tokens per prompt.")
    max_new_tokens: int = Field(default=128, ge=1, description="Teacher tokens generated per prompt (greedy).")


class DistillSettings(Strict):
    students: list[StudentSpec] = Field(
        default=[], description="The students to distil; empty: no distillation (the default)."
    )
    method: Literal["logits", "sequences"] = Field(
        default="logits",
        description="logits: KD from the teacher's cached top-k signal (same tokenizer); sequences: fine-tune on "
        "teacher completions (any tokenizer; DeepSeek's R1-Distill recipe).",
    )
    loss: DistillLoss = DistillLoss()
    control: bool = Field(
        default=True,
        description="Also train each student with cross-entropy only (alpha 0): same init, data order and steps.",
    )
    source: str = Field(
        default="corpus",
        description="'corpus' (the corpus train split), a .txt or .jsonl file, or hf-dataset://org/name@revision.",
    )
    text_field: str = Field(default="text", description="Field holding the text in .jsonl records.")
    steps: int = Field(default=100, ge=1, description="Optimizer steps (the budget); tokens = steps x batch x window.")
    batch_size: int = Field(default=4, ge=1, description="Windows per step.")
    window: int = Field(
        default=512,
        ge=16,
        description="Tokens per training window; at least evaluation.context for a student started at random, "
        "which otherwise never learns the positions it is scored on.",
    )
    loss_positions: int = Field(
        default=511, ge=1, description="The loss covers the last N positions of each window (the teacher signal's)."
    )
    learning_rate: float = Field(default=2e-3, gt=0)
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    weight_decay: float = Field(default=0.1, ge=0)
    seed: int = Field(default=0, description="Seeds the window order, the initialisation and the trainer.")
    save_steps: int = Field(default=20, ge=1, description="A resumable checkpoint every N steps.")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Where training runs (bf16 on a GPU).")
    signal_producer: Literal["auto", "transformers", "llama.cpp"] = Field(
        default="auto",
        description="Who computes the teacher signal. auto: transformers when the 16-bit teacher fits in half of this "
        "machine's memory (GPU memory when one is visible), else the teacher's GGUF on its own llama.cpp build.",
    )
    sequences: SequenceSettings = SequenceSettings()

    @model_validator(mode="after")
    def _fits(self):
        if self.loss_positions >= self.window:
            raise ValueError(
                f"distill.loss_positions ({self.loss_positions}) must be smaller than distill.window ({self.window})"
            )
        names = [s.name for s in self.students]
        if len(set(names)) != len(names):
            raise ValueError(f"student names must be unique: {names}")
        return self


class Settings(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    target: str = Field(default="cpu", description="Hardware target: a file name under config/targets/.")
    model: str = Field(
        default="tiny-deepseek-v3",
        description="A registry name (config/models/), a hub id org/name[@revision], or a local directory.",
    )
    formats: list[str] | None = Field(
        default=None,
        description="Narrow the plan to these formats (GGUF types, compress schemes, trtllm-*, onnx-*, "
        "edgellm-*). Default: gguf.types, compress.schemes, trtllm.formats, onnx.formats and edgellm.formats, minus "
        "what the target cannot run. A refused format named here is an error.",
    )
    prefer: Literal["quality", "speed"] = Field(
        default="quality",
        description="How the plan ranks what fits: quality (lowest expected loss among plans decoding 10 tokens/s "
        "or more) or speed (fastest among plans losing under 10 % perplexity).",
    )
    download: DownloadSettings = DownloadSettings()
    calibration: CalibrationSettings = CalibrationSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    gguf: GGUFSettings = GGUFSettings()
    compress: CompressSettings = CompressSettings()
    # `validate` in config.yaml; the Python name avoids pydantic's BaseModel.validate.
    validation: ValidateSettings = Field(default=ValidateSettings(), alias="validate")
    trtllm: TrtllmSettings = TrtllmSettings()
    onnx: OnnxSettings = OnnxSettings()
    edgellm: EdgeLlmSettings = EdgeLlmSettings()
    tools: ToolsSettings = ToolsSettings()
    distill: DistillSettings = DistillSettings()

    def preferences(self) -> dict:
        """The plan's ranking and GGUF route, as plan_for takes them."""
        return {"prefer": self.prefer, "route": self.gguf.route}

    def menu(self) -> tuple[list[str], bool]:
        """The formats the plan may choose from, and whether the user named them (then a refusal is an error)."""
        if self.formats is not None:
            return list(self.formats), True
        types = [t.upper() for t in self.gguf.types]
        engines = self.compress.schemes + self.trtllm.formats + self.onnx.formats + self.edgellm.formats
        return list(dict.fromkeys(types + engines)), False


def load(raw: dict) -> Settings:
    try:
        return Settings.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        raise DeepcastError(f"invalid configuration: {problems}. Fix config/config.yaml or --config.") from None


def load_file(path: Path) -> Settings:
    import yaml

    return load(yaml.safe_load(path.read_text()) or {})


def json_schema() -> str:
    schema = Settings.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def calibration_source_file(settings: CalibrationSettings) -> str | None:
    """The local calibration file, checked before any work; None for the corpus or a hub dataset."""
    return source_file(settings.source, "calibration")


def source_file(source: str, section: str) -> str | None:
    """A local text source (`<section>.source`), checked before any work; None for the corpus or a hub dataset."""
    key = f"{section}.source"
    if source.startswith("hf-dataset://"):
        from deepcast.registry import REPO_ID, REVISION

        repo_id, at, revision = source.removeprefix("hf-dataset://").partition("@")
        if not REPO_ID.match(repo_id) or (at and not REVISION.match(revision)):
            raise DeepcastError(
                f"{key} {source!r} is not a hub dataset: expected hf-dataset://org/name[@revision]. Fix {key}."
            )
        return None
    if source == "corpus":
        return None
    path = Path(source).expanduser()
    if not path.is_file():
        raise DeepcastError(
            f"{section} source {path} does not exist. Fix: set {key} to a .txt or .jsonl file, or to corpus."
        )
    with open(path, "rb") as handle:
        if not handle.read(1 << 20).strip():
            raise DeepcastError(f"{section} source {path} is empty. Fix: give it text, or set {key} to corpus.")
    return str(path)
