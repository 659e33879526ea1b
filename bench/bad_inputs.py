"""The bad-input catalogue: each bad input, the one message deepcast gives for it and where.

    python bench/bad_inputs.py > /tmp/catalogue.md   # the table in docs/reliability.md

Config cases go through `deepcast.subjects.prepare`, what the Snakefile runs before any job (`snakemake`
exits 1 with "deepcast: <message>"; tests/test_reliability.py runs some through snakemake to show that nothing
is written). Command cases run the `deepcast` command (exit 2, one line on stderr). tests/test_reliability.py
checks every case and that docs/reliability.md carries this table.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = REPO / "workflow" / "deepcast" / "embedded" / "tiny-deepseek-v3"
STUDENT = [{"name": "s", "kind": "prune"}]

# (area, the bad input, the config it is, a fragment of the message)
CONFIG_CASES = [
    ("config key", "a misspelt key", {"taget": "cpu"}, "taget: Extra inputs are not permitted"),
    ("config value", "a count of zero", {"calibration": {"samples": 0}}, "calibration.samples: Input should be"),
    ("config value", "a sequence shorter than 16", {"calibration": {"sequence_length": 8}}, "sequence_length"),
    ("config value", "a word for a boolean", {"download": {"allow_pickle": "yes please"}}, "valid boolean"),
    ("config value", "an unknown evaluation device", {"evaluation": {"device": "tpu"}}, "evaluation.device"),
    ("config value", "zero evaluation chunks", {"evaluation": {"max_chunks": 0}}, "evaluation.max_chunks"),
    ("config value", "an unknown ranking", {"prefer": "fast"}, "prefer: Input should be 'quality' or 'speed'"),
    ("config value", "a gate that is neither fail nor warn", {"validate": {"gates": "maybe"}}, "validate.gates"),
    ("config value", "a negative quality gate",
     {"validate": {"thresholds": {"Q4_K_M": {"max_perplexity_increase_percent": -1}}}},
     "max_perplexity_increase_percent: Input should be greater than 0"),
    ("target", "an unknown target", {"target": "nope"}, "unknown target 'nope'. Valid targets:"),
    ("model", "an unknown registry name", {"model": "nosuch"}, "unknown model 'nosuch'. Registry models:"),
    ("model", "a malformed hub id", {"model": "/nonexistent/model"}, "malformed model id"),
    ("model", "an empty revision after @", {"model": "deepseek-ai/DeepSeek-R1@"}, "malformed revision ''"),
    ("model", "a model that fits nowhere on the target", {"model": "deepseek-r1", "target": "cpu"},
     "fits nowhere on target cpu"),
    ("source", "a calibration file that is not there", {"calibration": {"source": "/nonexistent.txt"}},
     "calibration source /nonexistent.txt does not exist"),
    ("source", "a malformed hub dataset", {"calibration": {"source": "hf-dataset://nobody"}},
     "is not a hub dataset: expected hf-dataset://org/name[@revision]"),
    ("source", "a distillation file that is not there",
     {"distill": {"students": STUDENT, "source": "/nonexistent.txt"}},
     "distill source /nonexistent.txt does not exist"),
    ("format", "an unknown format", {"formats": ["nope"]}, "unknown format 'nope'. Fix: use one of"),
    ("format", "an unknown GGUF type", {"gguf": {"types": ["Q4_K_X"]}}, "unknown format 'Q4_K_X'"),
    ("format", "an unknown compress scheme", {"compress": {"schemes": ["w3a16"]}}, "unknown format 'w3a16'"),
    ("format", "an unknown ONNX precision", {"onnx": {"formats": ["onnx-int3"]}}, "unknown format 'onnx-int3'"),
    ("format", "a format the target cannot run", {"formats": ["fp8"], "target": "4x2080ti"},
     "format fp8 is refused for target 4x2080ti: FP8 W8A8 kernels need compute capability 8.9"),
    ("format", "an engine the target has no GPU for", {"formats": ["trtllm-fp8"]},
     "TensorRT-LLM runs on NVIDIA GPUs only"),
    ("format", "a type the chosen route cannot make", {"gguf": {"route": "q8-base"}, "formats": ["Q8_0"]},
     "gguf.route q8-base cannot make Q8_0"),
    ("format", "an unknown GGUF route", {"gguf": {"route": "lean"}}, "gguf.route: Input should be"),
    ("format", "an importance-matrix type without the imatrix", {"gguf": {"types": ["IQ1_S"], "imatrix": False}},
     "IQ1_S needs an importance matrix"),
    ("format", "a split size llama-gguf-split cannot read", {"gguf": {"split_max_size": "lots"}},
     "gguf.split_max_size: String should match pattern"),
    ("tensor-type override", "a type ggml does not have", {"gguf": {"tensor_types": {"Q4_K_M": ["attn=Q9_K"]}}},
     "'Q9_K' is not a ggml type"),
    ("tensor-type override", "no pattern before =", {"gguf": {"tensor_types": {"Q4_K_M": ["=Q6_K"]}}},
     "there is no pattern before '='"),
    ("tensor-type override", "a pattern that does not compile", {"gguf": {"tensor_types": {"Q4_K_M": ["attn_[=Q6_K"]}}},
     "its pattern does not compile"),
    ("recipe", "a recipe file that is not there", {"compress": {"recipes": {"gptq-w4a16": "/nonexistent.yaml"}}},
     "compress.recipes.gptq-w4a16: /nonexistent.yaml does not exist"),
    ("engine", "an AWQ block below 16", {"trtllm": {"awq_block_size": 0}}, "trtllm.awq_block_size"),
    ("engine", "a KV-cache fraction over 1", {"trtllm": {"kv_cache_memory_fraction": 2}}, "kv_cache_memory_fraction"),
    ("engine", "a llama.cpp build that is not there", {"tools": {"llama_cpp": "/nonexistent"}},
     "tools.llama_cpp: /nonexistent is not a directory"),
    ("distill", "a student name with a space", {"distill": {"students": [{"name": "Bad Name", "kind": "prune"}]}},
     "distill.students.0.name"),
    ("distill", "an hf student with neither source nor shape", {"distill": {"students": [{"name": "s", "kind": "hf"}]}},
     "an hf student takes exactly one of source or shape"),
    ("distill", "a kept layer the teacher does not have",
     {"distill": {"students": [{"name": "s", "kind": "prune", "keep_layers": [99]}]}}, "keep_layers [99] must be"),
    ("distill", "top_k over the vocabulary", {"distill": {"students": STUDENT, "loss": {"top_k": 200000}}},
     "is larger than the teacher's vocabulary"),
    ("distill", "a signal bigger than the disk", {"distill": {"students": STUDENT, "steps": 10**12}},
     "the teacher signal needs"),
]  # fmt: skip

# (area, the bad input, the command's arguments, a fragment of the message, its environment)
COMMAND_CASES = [
    ("command", "plan for an unknown model", ["plan", "--model", "nosuch", "--target", "cpu"],
     "unknown model 'nosuch'", {}),
    ("command", "a download source that is not there",
     ["download", "--source", "/nonexistent", "--revision", "v1", "--out", "{tmp}/c"], "does not exist", {}),
    # In an empty cache: where llama.cpp is built already, install has nothing to do and reads no source.
    ("command", "a llama.cpp source that is not a deepcast pack",
     ["tools", "install", "llama.cpp", "--source", "{tmp}/not-a-pack.tar.xz"],
     "is not a llama.cpp source packed by deepcast",
     {"DEEPCAST_CACHE": "{tmp}/cache"}),
    ("command", "a quant type llama-quantize does not know",
     ["gguf", "quantize", "--base", "{tmp}", "--type", "Q4_K_X", "--out", "{tmp}/q"],
     "unknown quant type 'Q4_K_X'", {}),
]  # fmt: skip


def config_message(config: dict) -> str | None:
    """The message `prepare` gives for `config`, or None when it plans a run (a gap in the catalogue)."""
    from deepcast import subjects
    from deepcast.errors import DeepcastError

    try:
        subjects.prepare(config, REPO / "config", REPO)
    except DeepcastError as error:
        return str(error)
    return None


def command_result(args: list[str], env: dict[str, str], tmp: Path) -> subprocess.CompletedProcess:
    (tmp / "not-a-pack.tar.xz").write_bytes(b"not a tarball")
    exe = Path(sys.executable).with_name("deepcast")
    argv = [str(exe), *(a.replace("{tmp}", str(tmp)) for a in args)]
    extra = {key: value.replace("{tmp}", str(tmp)) for key, value in env.items()}
    return subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **extra})


def render() -> str:
    """The markdown table of every case: the input, where it is refused, and the message's key fragment."""
    rows = ["| # | area | bad input | refused by | exit | message (fragment) |", "|---|---|---|---|---|---|"]
    for i, (area, what, config, fragment) in enumerate(CONFIG_CASES, 1):
        shown = str(config).replace("|", "\\|")
        rows.append(f"| {i} | {area} | {what}: `{shown}` | the Snakefile, before any job | 1 | {fragment} |")
    for i, (area, what, args, fragment, _) in enumerate(COMMAND_CASES, len(CONFIG_CASES) + 1):
        rows.append(f"| {i} | {area} | {what}: `deepcast {' '.join(args)}` | the command | 2 | {fragment} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(render(), end="")
