"""Typed settings: the one source of truth for config/config.yaml and its JSON schema.

`deepcast config schema` regenerates workflow/schemas/config.schema.json from
these models; a test fails when the committed schema drifts from them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
        default="48G", description="Bundles split the GGUF with llama-gguf-split above this size."
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


class Gate(Strict):
    max_perplexity_increase_percent: float = Field(gt=0, description="Over the reference (16-bit) perplexity.")
    max_kl_divergence: float | None = Field(default=None, gt=0, description="Mean KLD to the 16-bit model.")


def _gates(formats: list[str], increase: float, kld: float) -> dict[str, Gate]:
    return {fmt: Gate(max_perplexity_increase_percent=increase, max_kl_divergence=kld) for fmt in formats}


# [D] Loose enough for every format's published quality (hardware.md F), tight enough to catch a broken one.
DEFAULT_GATES = {
    **_gates(["BF16", "F16"], 0.5, 0.005),
    **_gates(["Q8_0", "int8-w8a8", "fp8"], 2.0, 0.02),
    **_gates(["Q6_K", "Q5_K_M", "Q5_K_S"], 4.0, 0.06),
    **_gates(["Q4_K_M", "Q4_K_S", "Q4_0", "IQ4_XS", "IQ4_NL", "gptq-w4a16", "awq-w4a16", "rtn-w4a16"], 10.0, 0.2),
    "*": Gate(max_perplexity_increase_percent=60.0, max_kl_divergence=1.5),  # 3 bits and fewer
}


class ValidateSettings(Strict):
    gates: Literal["fail", "warn"] = Field(
        default="fail", description="fail: a failing gate fails its rule; warn: it is recorded as a warning."
    )
    tasks: list[str] = Field(
        default=["hellaswag", "piqa", "winogrande"],
        description="lm-evaluation-harness tasks, run where the harness and their data are available "
        "(skipped with the reason otherwise).",
    )
    task_limit: int = Field(default=200, ge=1, description="Examples per task.")
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


class Settings(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    target: str = Field(default="cpu", description="Hardware target: a file name under config/targets/.")
    model: str = Field(
        default="tiny-deepseek-v3",
        description="A registry name (config/models/), a hub id org/name[@revision], or a local directory.",
    )
    formats: list[str] | None = Field(
        default=None,
        description="Narrow the plan to these formats (GGUF types and compress schemes). Default: gguf.types "
        "and compress.schemes, minus what the target cannot run. A refused format named here is an error.",
    )
    download: DownloadSettings = DownloadSettings()
    calibration: CalibrationSettings = CalibrationSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    gguf: GGUFSettings = GGUFSettings()
    compress: CompressSettings = CompressSettings()
    # `validate` in config.yaml; the Python name avoids pydantic's BaseModel.validate.
    validation: ValidateSettings = Field(default=ValidateSettings(), alias="validate")
    tools: ToolsSettings = ToolsSettings()

    def menu(self) -> tuple[list[str], bool]:
        """The formats the plan may choose from, and whether the user named them (then a refusal is an error)."""
        if self.formats is not None:
            return list(self.formats), True
        types = [t.upper() for t in self.gguf.types]
        return list(dict.fromkeys(types + self.compress.schemes)), False


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


def calibration_source_file(settings: CalibrationSettings) -> Path | None:
    """The local calibration file, checked before any work; None for the corpus or a hub dataset."""
    if settings.source == "corpus" or settings.source.startswith("hf-dataset://"):
        return None
    path = Path(settings.source).expanduser()
    if not path.is_file():
        raise DeepcastError(
            f"calibration source {path} does not exist. Fix: set calibration.source to a .txt or .jsonl file, "
            "or to corpus."
        )
    with open(path, "rb") as handle:
        if not handle.read(1 << 20).strip():
            raise DeepcastError(
                f"calibration source {path} is empty. Fix: give it text, or set calibration.source to corpus."
            )
    return str(path)
