"""Engine x format x hardware rules, read from config/compatibility.yaml (data, each rule with its source)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from deepcast.registry import ModelShape, Strict, Target, _load_yaml


class Requirement(Strict):
    gpu: bool | None = None
    min_compute_capability: float | None = None
    below_compute_capability: float | None = None
    bf16: bool | None = None
    architectures: list[str] | None = None
    interconnect: str | None = None
    not_interconnect: str | None = None
    unsupported: bool = False
    # Shape requirements, checked where the model's shape is known (the planner):
    mla_latent_heads: list[int] | None = None  # an MLA model's kv_lora_rank + qk_rope_head_dim is one of these
    attention_head_sizes: list[int] | None = None  # a non-MLA model's head_dim is one of these
    no_routed_experts: bool = False  # a dense model (MoE experts have no kernel)
    linear_multiple: int | None = None  # every dense linear's input and output size is a multiple of this
    cpu_features: list[str] | None = None  # a CPU-only target's CPU has these instruction-set flags


def _shape_satisfies(need: Requirement, shape: ModelShape) -> bool:
    mla = shape.kv_lora_rank is not None
    latent = (shape.kv_lora_rank or 0) + (shape.qk_rope_head_dim or 0)
    widths = [shape.hidden, shape.intermediate, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim]
    return not (
        (need.mla_latent_heads and mla and latent not in need.mla_latent_heads)
        or (need.attention_head_sizes and not mla and shape.head_dim not in need.attention_head_sizes)
        or (need.no_routed_experts and shape.routed_experts > 0)
        or (need.linear_multiple and not mla and any(w % need.linear_multiple for w in widths))
    )


class Rule(Strict):
    engine: str
    formats: list[str] = Field(min_length=1)
    requires: Requirement
    reason: str
    source: str
    note: bool = False  # refuses nothing; the reason is added to the plan

    def applies(self, engine: str, fmt: str) -> bool:
        return engine == self.engine and ("*" in self.formats or fmt in self.formats)

    def satisfied(self, target: Target, architecture: str, shape: ModelShape | None = None) -> bool:
        need, gpu = self.requires, target.gpu
        capability = gpu.compute_capability if gpu else None
        return not (
            need.unsupported
            or (shape is not None and not _shape_satisfies(need, shape))
            or (need.gpu and gpu is None)
            or (need.min_compute_capability and capability is not None and capability < need.min_compute_capability)
            or (
                need.below_compute_capability and capability is not None and capability >= need.below_compute_capability
            )
            or (need.bf16 and gpu is not None and not gpu.bf16)
            or (need.architectures and architecture not in need.architectures)
            or (need.interconnect and (gpu is None or gpu.interconnect != need.interconnect))
            or (need.not_interconnect and gpu is not None and gpu.interconnect == need.not_interconnect)
            or (need.cpu_features and gpu is None and not set(need.cpu_features) <= set(target.cpu_features))
        )


class Rules(Strict):
    rules: list[Rule]

    def check(
        self, engine: str, fmt: str, target: Target, architecture: str, shape: ModelShape | None = None
    ) -> tuple[str | None, list[str]]:
        """(the first refusal with its source, or None; notes that apply) for one candidate; the shape rules only
        where `shape` is given."""
        notes = []
        for rule in self.rules:
            if rule.applies(engine, fmt) and not rule.satisfied(target, architecture, shape):
                cpu = f"no GPU, {' '.join(target.cpu_features)}"
                hardware = f"compute capability {target.gpu.compute_capability}" if target.gpu else cpu
                text = f"{rule.reason} (target: {hardware}; "
                text += f"source: {rule.source})"
                if not rule.note:
                    return text, notes
                notes.append(text)
        return None, notes

    def architecture_refusal(self, engine: str, fmt: str, architecture: str) -> str | None:
        """The first rule for this engine and format that refuses the architecture, whatever the target."""
        for rule in self.rules:
            wanted = rule.requires.architectures
            if rule.applies(engine, fmt) and not rule.note and wanted and architecture not in wanted:
                return f"{rule.reason} (source: {rule.source})"
        return None


# The repository's config/ (the package lives in workflow/deepcast/).
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"


def load(config_dir: Path = DEFAULT_CONFIG_DIR) -> Rules:
    return _load_yaml(config_dir / "compatibility.yaml", Rules)
