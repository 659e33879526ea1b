"""What each job asks a cluster's scheduler for, from the plan: GPUs on a GPU target and host memory from the
model's size. Snakemake hands them to the executor (Slurm: `--gpus`, `--mem`); a local run is limited by them
only where `--resources` names them (`--resources gpu=1` keeps two GPU jobs off one card).
"""

from __future__ import annotations

from math import ceil

from deepcast import planner
from deepcast.registry import Target
from deepcast.stages.plan import Candidate, PlanModel

# Python, torch, transformers and the tools' own buffers: the peak RSS of a stage on the 18 M-parameter
# embedded model, where the weights are nothing, is 1.5 to 3.8 GB (manifests' peak_memory_mb).
TORCH_OVERHEAD_GB = 4.0
LLAMA_CPP_OVERHEAD_GB = 1.0


def sixteen_bit_gb(model: PlanModel) -> float:
    return model.checkpoint_parameters * 2 / planner.GB


def one_gpu(target: Target) -> int:
    """Stages that run the model on one device (transformers, llm-compressor's layer-by-layer pipeline,
    ModelOpt's calibration): one GPU on a GPU target, none on a CPU target."""
    return 1 if target.gpu else 0


def gpus_holding(target: Target, weights_gb: float) -> int:
    """GPUs a llama.cpp tool spreads `weights_gb` over (it splits over every visible GPU and fits the rest
    in host memory): as many as hold the weights, at least one, at most the target's."""
    if target.gpu is None:
        return 0
    return max(1, min(target.gpu.count, ceil(weights_gb / planner.llama_cpp_gpu_gb(target))))


def placed_gpus(target: Target, candidate: Candidate) -> int:
    """The GPUs the plan places an artifact on: a validation runs it as deployed."""
    return candidate.gpus if target.gpu else 0


def host_memory_mb(model: PlanModel, copies: float, overhead_gb: float = TORCH_OVERHEAD_GB) -> int:
    """`copies` of the model's 16-bit weights in host memory at the stage's peak (2 per float32 copy)."""
    return ceil((copies * sixteen_bit_gb(model) + overhead_gb) * 1024)


def served_memory_mb(candidate: Candidate) -> int:
    """A llama.cpp validation: the host memory the plan's placement needs (the layers and experts left in RAM,
    the embedding table), or the whole GGUF on a CPU target, plus the tools' own."""
    host_gb = candidate.system_memory_gb if candidate.system_memory_gb is not None else candidate.weights_gb
    return ceil((host_gb + LLAMA_CPP_OVERHEAD_GB) * 1024)
