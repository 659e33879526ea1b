"""What each job asks a cluster scheduler for (deepcast.resources), against hand-computed cases."""

from __future__ import annotations

import math
from pathlib import Path

from conftest import REPO
from deepcast import registry, resources
from deepcast.stages import plan as planning

CONFIG = REPO / "config"


def target(name: str) -> registry.Target:
    return registry.load_target(CONFIG, name)


def registry_model(name: str) -> planning.PlanModel:
    return planning.plan_model(registry.resolve_model(CONFIG, name, REPO), Path("/nonexistent"))


def test_one_gpu_on_a_gpu_target_and_none_on_the_cpu():
    assert resources.one_gpu(target("h200")) == 1
    assert resources.one_gpu(target("8xh100")) == 1
    assert resources.one_gpu(target("cpu")) == 0


def test_llama_cpp_jobs_ask_for_the_gpus_that_hold_the_weights():
    # 24 GB x 0.92 - 0.8 GB runtime = 21.28 GB per RTX 4090: 30 GB needs two, 20 GB one, 500 GB all the box has.
    two_4090 = target("2x4090")
    assert resources.gpus_holding(two_4090, 30.0) == 2
    assert resources.gpus_holding(two_4090, 20.0) == 1
    assert resources.gpus_holding(two_4090, 500.0) == 2
    assert resources.gpus_holding(target("cpu"), 30.0) == 0


def test_validations_ask_for_the_gpus_the_plan_places_the_artifact_on():
    model = registry_model("deepseek-r1-distill-llama-70b")
    plan = planning.plan_for(model, target("8xh100"), CONFIG, ["Q4_K_M", "fp8"], True)
    chosen = {c.format: c for c in plan.require_chosen()}
    # llama.cpp splits every layer over the eight GPUs; vLLM's tensor parallel size is the plan's.
    assert resources.placed_gpus(target("8xh100"), chosen["Q4_K_M"]) == 8
    assert chosen["fp8"].flags[chosen["fp8"].flags.index("--tensor-parallel-size") + 1] == str(chosen["fp8"].gpus)
    small = registry_model("deepseek-r1-distill-qwen-1.5b")
    cpu_plan = planning.plan_for(small, target("cpu"), CONFIG, ["Q4_K_M"], True)
    assert resources.placed_gpus(target("cpu"), cpu_plan.require_chosen()[0]) == 0


def test_host_memory_counts_copies_of_the_sixteen_bit_weights():
    model = registry_model("deepseek-r1-distill-llama-70b")
    sixteen = model.checkpoint_parameters * 2 / 1e9  # GB
    assert math.isclose(resources.sixteen_bit_gb(model), sixteen)
    assert resources.host_memory_mb(model, 2) == math.ceil((2 * sixteen + resources.TORCH_OVERHEAD_GB) * 1024)
