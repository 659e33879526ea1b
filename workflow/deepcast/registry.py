"""Hardware targets and the model registry, read from config/targets and config/models.

A user adds a box or a model by writing one YAML file; every file is checked
against the typed models below, so a missing field or an impossible value is
reported with the file's name before any work starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, model_validator

from deepcast.errors import DeepcastError

# Hub repo ids: https://huggingface.co/docs/hub/en/repositories-naming (letters, digits, - _ .; no -- or ..)
REPO_ID = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
# A git ref name or a commit sha: no spaces, no "..", no leading "-", no ":" ("@" only inside refs/pr).
REVISION = re.compile(r"^(?!-)(?!.*\.\.)[\w./-]{1,128}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GPU(Strict):
    name: str
    count: PositiveInt
    compute_capability: float = Field(ge=3.0, le=20.0)
    memory_gb: PositiveFloat
    bandwidth_gbps: PositiveFloat
    bf16: bool
    fp8: bool
    interconnect: Literal["nvlink", "pcie-p2p", "none", "unified"]


class Target(Strict):
    name: str
    description: str
    gpu: GPU | None = None
    system_ram_gb: PositiveFloat
    cpu_cores: PositiveInt
    cpu_bandwidth_gbps: PositiveFloat
    free_disk_gb: PositiveFloat
    # The instruction-set flags (as /proc/cpuinfo names them) the target's CPU is assumed to have: what an
    # engine's CPU kernels need is checked against these, and figures are taken here only on such a CPU.
    cpu_features: list[str] = Field(default_factory=lambda: ["avx2"])


class ModelShape(Strict):
    """What memory arithmetic needs from config.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # hashable: plans cache sizes per shape

    layers: PositiveInt
    hidden: PositiveInt
    heads: PositiveInt
    kv_heads: PositiveInt
    head_dim: PositiveInt
    intermediate: PositiveInt  # the dense FFN's width
    attention_bias: bool = False  # Qwen2's q/k/v biases
    kv_lora_rank: PositiveInt | None = None  # MLA (DeepSeek-V2/V3): the cached latent per token
    q_lora_rank: PositiveInt | None = None  # MLA query compression (None in V2-Lite)
    qk_nope_head_dim: PositiveInt | None = None
    qk_rope_head_dim: PositiveInt | None = None
    routed_experts: int = Field(default=0, ge=0)
    experts_per_token: int = Field(default=0, ge=0)
    shared_experts: int = Field(default=0, ge=0)
    moe_intermediate: int = Field(default=0, ge=0)  # each expert's FFN width
    first_dense_layers: int = Field(default=0, ge=0)
    mtp_layers: int = Field(default=0, ge=0)  # multi-token-prediction layers shipped beside the model
    vocab: PositiveInt
    max_context: PositiveInt
    tied_embeddings: bool = False

    @model_validator(mode="after")
    def _consistent(self):
        if self.is_mla and not (self.qk_nope_head_dim and self.qk_rope_head_dim):
            raise ValueError("an MLA shape (kv_lora_rank) needs qk_nope_head_dim and qk_rope_head_dim")
        if self.is_moe and not (self.moe_intermediate and 0 < self.experts_per_token <= self.routed_experts):
            raise ValueError("a MoE shape needs moe_intermediate and 0 < experts_per_token <= routed_experts")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        return self

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def is_moe(self) -> bool:
        return self.routed_experts > 0


def shape_from_hf_config(config: dict) -> ModelShape:
    """The shape of a transformers config.json (Qwen2/Llama GQA or DeepSeek MLA/MoE)."""
    heads = config["num_attention_heads"]
    return ModelShape(
        layers=config["num_hidden_layers"],
        hidden=config["hidden_size"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("v_head_dim") or config.get("head_dim") or config["hidden_size"] // heads,
        intermediate=config["intermediate_size"],
        attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
        kv_lora_rank=config.get("kv_lora_rank"),
        q_lora_rank=config.get("q_lora_rank"),
        qk_nope_head_dim=config.get("qk_nope_head_dim"),
        qk_rope_head_dim=config.get("qk_rope_head_dim"),
        routed_experts=config.get("n_routed_experts") or 0,
        experts_per_token=config.get("num_experts_per_tok") or 0,
        shared_experts=config.get("n_shared_experts") or 0,
        moe_intermediate=config.get("moe_intermediate_size") or 0,
        first_dense_layers=config.get("first_k_dense_replace") or 0,
        mtp_layers=config.get("num_nextn_predict_layers") or 0,
        vocab=config["vocab_size"],
        max_context=config.get("max_position_embeddings") or 4096,
        tied_embeddings=bool(config.get("tie_word_embeddings")),
    )


class ModelEntry(Strict):
    name: str
    hub_id: str | None = None
    source: str | None = Field(default=None, description="A local directory, relative to the repository root.")
    revision: str = "main"
    architecture: str
    native_dtype: Literal["bfloat16", "float16", "float8_e4m3fn", "float32"]
    parameters_b: PositiveFloat
    active_parameters_b: PositiveFloat
    shape: ModelShape


@dataclass(frozen=True)
class ModelRef:
    """What the pipeline downloads: a registry entry or an ad-hoc hub id or directory."""

    name: str  # path-safe, names the results folder
    revision: str
    hub_id: str | None = None
    local_path: str | None = None
    entry: ModelEntry | None = None  # None for a hub id or directory outside the registry

    @property
    def path_revision(self) -> str:
        return self.revision.replace("/", "_")

    @property
    def location(self) -> str:
        """What `deepcast download --source` takes: hf://org/name or a directory."""
        return f"hf://{self.hub_id}" if self.hub_id else self.local_path


# libyaml's safe loader where PyYAML was built with it: every workflow parse reads the models, targets and rules.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load_yaml(path: Path, model: type[BaseModel]):
    try:
        data = yaml.load(path.read_text(), Loader=_SAFE_LOADER)
        return model.model_validate(data)
    except yaml.YAMLError as error:
        raise DeepcastError(f"{path} is not valid YAML: {error}") from None
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise DeepcastError(f"{path}: {problems}. Fix that file.") from None


def _names(directory: Path) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def load_target(config_dir: Path, name: str) -> Target:
    path = config_dir / "targets" / f"{name}.yaml"
    if not path.is_file():
        raise DeepcastError(
            f"unknown target {name!r}. Valid targets: {', '.join(_names(config_dir / 'targets'))}. "
            f"Fix: pick one of them, or describe your own box in config/targets/{name}.yaml."
        )
    target = _load_yaml(path, Target)
    if target.name != name:
        raise DeepcastError(f"{path} declares name {target.name!r}; make it {name!r} to match the file name.")
    return target


def target_digest(config_dir: Path, name: str) -> str:
    """sha256 of a target's profile file, so editing it reruns only that target's steps."""
    import hashlib

    return hashlib.sha256((config_dir / "targets" / f"{name}.yaml").read_bytes()).hexdigest()[:16]


def local_source_files(directory: str) -> list[str]:
    """The files of a local model directory (hidden ones aside)."""
    root = Path(directory)
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def load_models(config_dir: Path) -> dict[str, ModelEntry]:
    return {p.stem: _load_yaml(p, ModelEntry) for p in sorted((config_dir / "models").glob("*.yaml"))}


def resolve_model(config_dir: Path, spec: str, repo_root: Path) -> ModelRef:
    """Turn `config: model` into a ModelRef, or say exactly why it cannot be one."""
    models = load_models(config_dir)
    hub_id, at, revision = spec.partition("@")
    if at and not revision:
        _check_revision(revision)  # an "@" with nothing after it is a typo, not the default revision
    for entry in models.values():
        if spec == entry.name or (entry.hub_id and hub_id.lower() == entry.hub_id.lower()):
            revision = revision or entry.revision
            _check_revision(revision)
            if entry.source:
                return ModelRef(entry.name, revision, local_path=str(repo_root / entry.source), entry=entry)
            return ModelRef(entry.name, revision, hub_id=entry.hub_id, entry=entry)
    local = Path(spec).expanduser()
    if "/" in spec and local.is_dir():
        return ModelRef(local.resolve().name.lower(), "local", local_path=str(local.resolve()))
    if "/" not in hub_id:
        raise DeepcastError(
            f"unknown model {spec!r}. Registry models: {', '.join(sorted(models))}. "
            "Fix: use one of them, a hub id as org/name[@revision], or a local directory."
        )
    if not REPO_ID.match(hub_id):
        raise DeepcastError(
            f"malformed model id {hub_id!r}: expected org/name with letters, digits, '-', '_' or '.' "
            "(no '--' or '..', at most 96 characters each). Fix: write it as for example deepseek-ai/DeepSeek-R1."
        )
    revision = revision or "main"
    _check_revision(revision)
    return ModelRef(hub_id.replace("/", "--").lower(), revision, hub_id=hub_id)


def _check_revision(revision: str) -> None:
    if not REVISION.match(revision):
        raise DeepcastError(
            f"malformed revision {revision!r}. Fix: use a branch or tag name, or a 40-character commit sha."
        )
