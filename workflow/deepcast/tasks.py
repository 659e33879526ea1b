"""lm-evaluation-harness tasks from local files, run as users evaluate deployments: `local-completions` against a
bundle's own server (llama-server, vLLM), `hf` for a checkpoint in transformers.

The hub is out of reach, and no package ships the benchmark data, so each task's items come from a jsonl file in
that task's upstream format (validate.task_data). deepcast writes a task YAML per task that `include:`s the
installed upstream definition (its prompts, choices, metrics and filters) and replaces only the dataset with the
local file, for every split (few-shot examples are drawn from the same file, never the item itself).
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
from pathlib import Path

import yaml

from deepcast.config import ValidateSettings
from deepcast.errors import DeepcastError

LOG_LIKELIHOOD = {"loglikelihood", "loglikelihood_rolling", "multiple_choice"}
# What each backend can score: log-likelihood tasks need the log-probs of the prompt's own tokens.
BACKEND_TYPES = {
    "hf": LOG_LIKELIHOOD | {"generate_until"},
    "vllm": LOG_LIKELIHOOD | {"generate_until"},  # /v1/completions with echo and logprobs
    "llama-server": {"generate_until"},
}
WHY_NOT = {
    "llama-server": "llama-server's /v1/completions returns no log-probs of the prompt (it refuses echo: 'Only no "
    "echo is supported'), which {output_type} tasks need; its generate_until tasks run"
}
NO_DATA = "no task data (validate.task_data)"
SPLITS = ("train", "validation", "test")
FIELDS = {"tasks", "task_data", "task_limit"}  # what the 16-bit scores depend on
REFERENCE_FILE = "tasks.json"  # the 16-bit model's scores, in the reference directory


@functools.cache
def _upstream_index() -> dict:
    """lm-eval's index of its installed tasks: building it reads every task YAML (seconds), so once a process."""
    from lm_eval.tasks import TaskManager

    return TaskManager().task_index


def upstream(name: str) -> tuple[Path, str]:
    """The installed upstream YAML of task `name` and its output type."""
    entry = _upstream_index().get(name)
    if entry is None or entry.yaml_path is None:
        raise DeepcastError(f"lm-eval has no task {name!r}. Fix: name a task `lm_eval ls tasks` lists, or drop it "
                            "from validate.tasks.")  # fmt: skip
    config = entry.cfg or {}
    if "output_type" not in config and "include" in config:
        included = (Path(entry.yaml_path).parent / config["include"]).read_text()
        config = {**yaml.load(included, Loader=_Tolerant), **config}
    if "output_type" not in config:
        raise DeepcastError(f"lm-eval's {name!r} is a group or has no output_type. Fix: name its tasks one by one.")
    return Path(entry.yaml_path), config["output_type"]


class _Tolerant(yaml.SafeLoader):
    """Reads upstream task YAMLs, whose `!function` tags only the harness resolves."""


_Tolerant.add_multi_constructor("!", lambda loader, suffix, node: None)


def write_task_yaml(name: str, data: Path, directory: Path) -> tuple[str, str]:
    """A task YAML reusing upstream `name` with the local `data`; (its task name, the output type)."""
    source, output_type = upstream(name)
    if not Path(data).is_file():
        raise DeepcastError(f"validate.task_data[{name}] is {data}, which is not a file. Fix: point it at a jsonl "
                            f"file of {name} items in the task's upstream format.")  # fmt: skip
    local = f"deepcast_{name}"
    files = {split: str(Path(data).resolve()) for split in SPLITS}
    task = {"include": str(source), "task": local, "tag": [], "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": files}}  # fmt: skip
    (directory / f"{local}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return local, output_type


def run(settings: ValidateSettings, backend: str, model=None, tokenizer=None, base_url: str | None = None,
        model_name: str | None = None, tokenizer_dir: Path | None = None) -> dict:  # fmt: skip
    """The configured tasks through `backend` (hf with a loaded model, or a server at base_url); a task without
    data or whose type the backend cannot score is skipped with the reason."""
    names, task_data, limit = settings.tasks, settings.task_data, settings.task_limit
    if not names:
        return {"status": "skipped", "reason": "no tasks configured (validate.tasks)"}
    skipped = {name: NO_DATA for name in names if name not in task_data}
    if len(skipped) == len(names):
        return {"status": "skipped", "reason": NO_DATA, "tasks": names}
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        local = {}
        for name in names:
            if name in skipped:
                continue
            task, output_type = write_task_yaml(name, task_data[name], Path(tmp))
            if output_type in BACKEND_TYPES[backend]:
                local[task] = name
            else:
                skipped[name] = WHY_NOT[backend].format(output_type=output_type)
        if not local:
            return {"status": "skipped", "reason": "; ".join(sorted(set(skipped.values()))), "skipped": skipped}
        out = lm_eval.simple_evaluate(
            model=_model(backend, model, tokenizer, base_url, model_name, tokenizer_dir),
            tasks=sorted(local), limit=limit, task_manager=TaskManager(include_path=tmp, include_defaults=False),
            log_samples=False, bootstrap_iters=1000, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
            fewshot_random_seed=0,
        )  # fmt: skip
    scores = {local[task]: _score(out, task) for task in sorted(local)}
    return {"status": "measured", "backend": backend, "limit": limit, "scores": scores, "skipped": skipped}


def _model(backend, model, tokenizer, base_url, model_name, tokenizer_dir):
    if backend == "hf":
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    # Requests go as token ids for vLLM (the bundle's tokenizer counts the context), as text for llama-server,
    # whose tokenizer lives in the GGUF.
    tokenized = backend == "vllm"
    return LocalCompletionsAPI(
        base_url=f"{base_url}/v1/completions", model=model_name, tokenizer_backend="huggingface" if tokenized else None,
        tokenizer=str(tokenizer_dir) if tokenized else None, tokenized_requests=tokenized, max_length=2048,
        num_concurrent=1, max_retries=1, seed=0,
    )  # fmt: skip


def _score(out: dict, task: str) -> dict:
    """The task's first metric (its upstream metric_list order) with its standard error and the items scored."""
    figures = out["results"][task]
    better = out["higher_is_better"][task]
    key = next(k for k in figures if "," in k and "_stderr" not in k)
    metric, filter_name = key.split(",", 1)
    stderr = figures.get(f"{metric}_stderr,{filter_name}")
    return {
        "metric": metric, "filter": filter_name, "value": float(figures[key]),
        "stderr": float(stderr) if isinstance(stderr, float) and math.isfinite(stderr) else None,
        "higher_is_better": better.get(metric, True), "samples": out["n-samples"][task]["effective"],
    }  # fmt: skip


def gate(results: dict, reference: dict | None, max_drop_points: float) -> list[str]:
    """Tasks whose score fell below the 16-bit model's on the same items by more than `max_drop_points` and more
    than twice the combined standard error (a few items cannot fail a gate by chance alone)."""
    if results.get("status") != "measured" or not reference or reference.get("status") != "measured":
        return []
    failures = []
    for name, score in results["scores"].items():
        base = reference["scores"].get(name)
        if base is None or not 0 <= score["value"] <= 1:  # accuracies only: perplexities have no points
            continue
        drop = 100 * (base["value"] - score["value"]) * (1 if score["higher_is_better"] else -1)
        noise = 200 * math.hypot(score["stderr"] or 0, base["stderr"] or 0)
        allowed = max(max_drop_points, noise)
        if drop > allowed:
            failures.append(f"{name} {score['metric']} {score['value']:.3f} is {drop:.1f} points below the 16-bit "
                            f"model's {base['value']:.3f}; the gate allows {allowed:.1f}")  # fmt: skip
    return failures


def reference_scores(reference_dir: Path) -> dict | None:
    path = reference_dir / REFERENCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None
