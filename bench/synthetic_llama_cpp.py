"""Measure llama.cpp's real artifact sizes and GPU memory on a random-weight model of a registry shape.

Builds a bf16 safetensors checkpoint of a real DeepSeek shape (R1-Distill-Qwen-1.5B by default; also
DeepSeek-V2-Lite) with random weights, converts it with llama.cpp's convert_hf_to_gguf.py, quantizes it
to every type with llama-quantize, reads each GGUF's tensor table with gguf-py, and loads a few of
them on the GPU (-ngl 99) with llama-server and llama-completion, recording llama.cpp's own buffer
sizes and the process's peak GPU memory (NVML, every 100 ms). Measurements only; the values of the
weights are meaningless, the sizes and buffers are real.

    python bench/synthetic_llama_cpp.py build --src /tmp/llama.cpp --cuda-arch 90
    python bench/synthetic_llama_cpp.py measure --shape config/models/deepseek-r1-distill-qwen-1.5b.yaml \
        --llama-cpp /tmp/llama.cpp --tokenizer-from .carry/synth --calibration .carry/synth/calibration.txt \
        --work /tmp/synth --out bench/results/synthetic-r1-distill-qwen-1.5b.json

`measure` is resumable: each step skips what its outputs show is done, and the JSON is rewritten after
every step, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import yaml

# The project's cmake flags (workflow/deepcast/tools.py), plus the CUDA ones.
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
]
TARGETS = ["llama-quantize", "llama-imatrix", "llama-server", "llama-completion", "llama-gguf-split"]

TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0", "IQ4_NL", "IQ4_XS"]
TYPES += ["Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K"]
IMATRIX_TYPES = ["IQ3_M", "IQ3_XXS", "IQ2_M", "IQ2_XXS", "IQ1_M"]
# deepcast's dynamic low-bit defaults (workflow/deepcast/stages/gguf.py: LOW_BIT, default_tensor_types).
LOW_BIT = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS"}
BUFFER_LINE = re.compile(r"(\w+):\s+(\S+)\s+([\w ]*?)\s*buffer size =\s+([\d.]+) MiB")
CONTEXT_LINE = re.compile(r"llama_context: (\w+)\s+= (\S+)$", re.MULTILINE)


def sh(cmd: list, log: Path, **kwargs) -> str:
    """Run a command, append its command line and output to `log`, return the output."""
    started = time.time()
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, errors="replace", **kwargs)
    output = result.stdout + result.stderr
    with log.open("a") as f:
        seconds = time.time() - started
        f.write(f"\n$ {shlex.join(str(c) for c in cmd)}\n{output}\n# exit {result.returncode}, {seconds:.1f} s\n")
    if result.returncode != 0:
        raise click.ClickException(f"{Path(str(cmd[0])).name} failed (exit {result.returncode}); see {log}")
    return output


@click.group()
def cli() -> None:
    pass


@cli.command()
@click.option("--src", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--cuda-arch", default="90", show_default=True, help="CMAKE_CUDA_ARCHITECTURES; 'off' for a CPU build.")
@click.option("--jobs", default=os.cpu_count() or 2, show_default=True)
def build(src: Path, cuda_arch: str, jobs: int) -> None:
    """Build llama.cpp's tools in SRC/build with the project's flags; write SRC/build/build.json."""
    cuda = cuda_arch.lower() != "off"
    flags = [*CMAKE_FLAGS, f"-DGGML_CUDA={'ON' if cuda else 'OFF'}"]
    flags += [f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}"] if cuda else []
    log = src / "build.log"
    started = time.time()
    sh(["cmake", "-S", src, "-B", src / "build", *flags], log)
    sh(["cmake", "--build", src / "build", "-j", jobs, "--target", *TARGETS], log)
    info = {"cmake_flags": flags, "targets": TARGETS, "build_seconds": round(time.time() - started, 1)}
    (src / "build" / "build.json").write_text(json.dumps(info, indent=2))
    click.echo(json.dumps(info))


# --------------------------------------------------------------------------------------------------
# The random checkpoint, tensor by tensor in the original Hugging Face layout.


def qwen2_layout(s: dict, intermediate: int) -> tuple[dict, list[tuple[str, list[int]]]]:
    h, heads, kv, hd, vocab = s["hidden"], s["heads"], s["kv_heads"], s["head_dim"], s["vocab"]
    tied = s.get("tied_embeddings", False)
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": h,
        "intermediate_size": intermediate, "num_hidden_layers": s["layers"], "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": s.get("max_context", 32768),
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": tied,
        "use_sliding_window": False, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
    }  # fmt: skip
    tensors = [("model.embed_tokens.weight", [vocab, h])]
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        tensors += [
            (p + "input_layernorm.weight", [h]),
            (p + "self_attn.q_proj.weight", [heads * hd, h]),
            (p + "self_attn.q_proj.bias", [heads * hd]),
            (p + "self_attn.k_proj.weight", [kv * hd, h]),
            (p + "self_attn.k_proj.bias", [kv * hd]),
            (p + "self_attn.v_proj.weight", [kv * hd, h]),
            (p + "self_attn.v_proj.bias", [kv * hd]),
            (p + "self_attn.o_proj.weight", [h, heads * hd]),
            (p + "post_attention_layernorm.weight", [h]),
            (p + "mlp.gate_proj.weight", [intermediate, h]),
            (p + "mlp.up_proj.weight", [intermediate, h]),
            (p + "mlp.down_proj.weight", [h, intermediate]),
        ]
    tensors.append(("model.norm.weight", [h]))
    if not tied:
        tensors.append(("lm_head.weight", [vocab, h]))
    return config, tensors


def deepseek_v2_layout(s: dict, intermediate: int, moe_intermediate: int) -> tuple[dict, list[tuple[str, list[int]]]]:
    """DeepSeek-V2(-Lite): MLA without query compression, MoE after `first_dense_layers` dense layers."""
    h, heads, vocab = s["hidden"], s["heads"], s["vocab"]
    rank, rope, v_dim = s["kv_lora_rank"], s["qk_rope_head_dim"], s["head_dim"]
    nope = s.get("qk_nope_head_dim", 128)
    experts, shared, dense = s["routed_experts"], s["shared_experts"], s["first_dense_layers"]
    config = {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": vocab, "hidden_size": h,
        "intermediate_size": intermediate, "moe_intermediate_size": moe_intermediate,
        "num_hidden_layers": s["layers"], "num_attention_heads": heads, "num_key_value_heads": s["kv_heads"],
        "n_shared_experts": shared, "n_routed_experts": experts, "routed_scaling_factor": 1.0,
        "kv_lora_rank": rank, "q_lora_rank": None, "qk_rope_head_dim": rope, "v_head_dim": v_dim,
        "qk_nope_head_dim": nope, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
        "num_experts_per_tok": s["experts_per_token"], "moe_layer_freq": 1, "first_k_dense_replace": dense,
        "norm_topk_prob": False, "scoring_func": "softmax", "hidden_act": "silu",
        "max_position_embeddings": s.get("max_context", 32768), "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "attention_bias": False, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
        "torch_dtype": "bfloat16",
    }  # fmt: skip
    tensors = [("model.embed_tokens.weight", [vocab, h])]
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        tensors += [
            (p + "input_layernorm.weight", [h]),
            (p + "self_attn.q_proj.weight", [heads * (nope + rope), h]),
            (p + "self_attn.kv_a_proj_with_mqa.weight", [rank + rope, h]),
            (p + "self_attn.kv_a_layernorm.weight", [rank]),
            (p + "self_attn.kv_b_proj.weight", [heads * (nope + v_dim), rank]),
            (p + "self_attn.o_proj.weight", [h, heads * v_dim]),
            (p + "post_attention_layernorm.weight", [h]),
        ]
        if i < dense:
            mlps = [(p + "mlp.", intermediate)]
        else:
            tensors.append((p + "mlp.gate.weight", [experts, h]))
            mlps = [(p + f"mlp.experts.{e}.", moe_intermediate) for e in range(experts)]
            mlps.append((p + "mlp.shared_experts.", moe_intermediate * shared))
        for prefix, width in mlps:
            tensors += [
                (prefix + "gate_proj.weight", [width, h]),
                (prefix + "up_proj.weight", [width, h]),
                (prefix + "down_proj.weight", [h, width]),
            ]
    tensors += [("model.norm.weight", [h]), ("lm_head.weight", [vocab, h])]
    return config, tensors


def write_checkpoint(out: Path, config: dict, tensors: list, tokenizer_from: Path, shard_bytes: int = 4 << 30) -> int:
    """Random bf16 weights (N(0, 0.02); norms 1, biases 0) in safetensors shards; returns the parameter count."""
    import torch
    from safetensors.torch import save_file

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(0)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: list[list[tuple[str, list[int]]]] = [[]]
    size = 0
    for name, shape in tensors:
        n = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {}
        for name, shape in shard:
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            elif name.endswith(".bias"):
                t = torch.zeros(shape, dtype=torch.bfloat16)
            else:
                t = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
                t = (t * 0.02).to(torch.bfloat16)
            data[name] = t.cpu().contiguous()
            weight_map[name] = file
            total += t.numel()
        save_file(data, str(tmp / file), metadata={"format": "pt"})
        del data
    index = {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    # The DeepSeek-V3 tokenizer on another architecture: transformers 5 picks the tokenizer class from
    # config.json's model_type (Qwen2Tokenizer) or tokenizer_class (LlamaTokenizer) and rebuilds its
    # pre-tokenizer, which convert_hf_to_gguf.py then no longer recognises. So no model_type (AutoConfig
    # fails, the converter reads config.json as it is) and the plain tokenizers backend.
    (tmp / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "model_type"}, indent=2))
    shutil.copy(tokenizer_from / "tokenizer.json", tmp / "tokenizer.json")
    tokenizer_config = json.loads((tokenizer_from / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "TokenizersBackend"
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return total


# --------------------------------------------------------------------------------------------------
# GGUF facts and GPU loads.


def gguf_table(path: Path, llama_cpp: Path) -> dict:
    """File size, header size and the per-tensor table (name, ggml type, shape, bytes) read with gguf-py."""
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    from gguf import GGUFReader

    reader = GGUFReader(path)
    names = [t.name for t in reader.tensors]
    shapes = [[int(x) for x in t.shape] for t in reader.tensors]
    types = [t.tensor_type.name for t in reader.tensors]
    nbytes = [int(t.n_bytes) for t in reader.tensors]
    file_type = reader.fields.get("general.file_type")
    summary: dict[str, dict] = {}
    for shape, ggml_type, n in zip(shapes, types, nbytes, strict=True):
        entry = summary.setdefault(ggml_type, {"tensors": 0, "elements": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["elements"] += int(np_prod(shape))
        entry["bytes"] += n
    return {
        "size_bytes": path.stat().st_size,
        "data_offset": int(reader.data_offset),
        "alignment": int(reader.alignment),
        "file_type": int(file_type.parts[file_type.data[0]][0]) if file_type else None,
        "tensor_count": len(names),
        "tensor_bytes": sum(nbytes),
        "by_type": summary,
        "tensor_names": names,
        "tensor_shapes": shapes,
        "tensor_types": types,
        "tensor_nbytes": nbytes,
    }


def np_prod(shape: list[int]) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def compact(results: dict) -> dict:
    """Names and shapes once (`tensors`), per GGUF only the types and bytes when its tensors are the same."""
    out = {**results, "gguf": {}}
    for name, entry in results["gguf"].items():
        entry = dict(entry)
        table = [[n, s] for n, s in zip(entry["tensor_names"], entry["tensor_shapes"], strict=True)]
        out.setdefault("tensors", table)
        if table == out["tensors"]:
            del entry["tensor_names"], entry["tensor_shapes"]
        out["gguf"][name] = entry
    return out


class GpuSampler:
    """Peak GPU memory of one process and of the whole device, read through NVML every `period` s."""

    def __init__(self, pid: int, period: float = 0.1):
        import pynvml

        self.nvml, self.pid, self.period = pynvml, pid, period
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:
            self.thread = None
            return
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.baseline = pynvml.nvmlDeviceGetMemoryInfo(self.handle).used
        self.process_peak = 0
        self.device_peak = self.baseline
        self.samples = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                    if p.pid == self.pid and p.usedGpuMemory:
                        self.process_peak = max(self.process_peak, p.usedGpuMemory)
                self.device_peak = max(self.device_peak, self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
                self.samples += 1
            except self.nvml.NVMLError:
                pass
            time.sleep(self.period)

    def finish(self) -> dict | None:
        if self.thread is None:
            return None
        self.stop.set()
        self.thread.join()
        mib = 1 << 20
        return {
            "process_peak_mib": round(self.process_peak / mib, 1),
            "device_used_peak_mib": round(self.device_peak / mib, 1),
            "device_used_baseline_mib": round(self.baseline / mib, 1),
            "device_used_delta_peak_mib": round((self.device_peak - self.baseline) / mib, 1),
            "samples": self.samples,
        }


def context_params(output: str) -> dict:
    return dict(CONTEXT_LINE.findall(output))


def buffers(output: str) -> list[dict]:
    return [{"function": m[0], "buffer": m[1], "kind": m[2], "mib": float(m[3])} for m in BUFFER_LINE.findall(output)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_server(bin_dir: Path, model: Path, ctx: int, threads: int, log: Path) -> dict:
    """llama-server as deepcast's launch.sh starts it (-ngl, -c, -t), one 8-token completion, then SIGTERM."""
    port = free_port()
    cmd = [bin_dir / "llama-server", "-m", model, "-ngl", "99", "-c", ctx, "-t", threads]
    cmd += ["--host", "127.0.0.1", "--port", port, "-lv", "4"]
    out_file = log.with_suffix(f".{os.getpid()}.tmp")
    started = time.time()
    with out_file.open("w") as f:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT)
    sampler = GpuSampler(proc.pid)
    ready = None
    try:
        while time.time() - started < 300 and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        ready = time.time() - started
                        break
            except OSError:
                pass
            time.sleep(0.2)
        answer = None
        if ready is not None:
            body = json.dumps({"prompt": "The quick brown fox", "n_predict": 8}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=body)
            with urllib.request.urlopen(request, timeout=120) as r:
                answer = json.loads(r.read())
            time.sleep(0.5)
    finally:
        memory = sampler.finish()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    output = out_file.read_text(errors="replace")
    out_file.unlink()
    with log.open("a") as f:
        f.write(f"\n$ {shlex.join(str(c) for c in cmd)}\n{output}\n# exit {proc.returncode}\n")
    return {
        "tool": "llama-server",
        "command": shlex.join(str(c) for c in cmd),
        "exit_code": proc.returncode,
        "ready_seconds": round(ready, 2) if ready else None,
        "completion_tokens": (answer or {}).get("tokens_predicted"),
        "context_params": context_params(output),
        "buffers": buffers(output),
        "memory": memory,
        "breakdown": [line for line in output.splitlines() if "memory_breakdown" in line],
    }


def load_completion(bin_dir: Path, model: Path, ctx: int, threads: int, log: Path) -> dict:
    cmd = [bin_dir / "llama-completion", "-m", model, "-ngl", "99", "-c", ctx, "-t", threads]
    cmd += ["-n", "8", "-p", "The quick brown fox", "-no-cnv", "--temp", "0", "-lv", "4"]
    started = time.time()
    proc = subprocess.Popen(
        [str(c) for c in cmd],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    sampler = GpuSampler(proc.pid)
    output, _ = proc.communicate(timeout=300)
    memory = sampler.finish()
    with log.open("a") as f:
        f.write(f"\n$ {shlex.join(str(c) for c in cmd)}\n{output}\n# exit {proc.returncode}\n")
    return {
        "tool": "llama-completion",
        "command": shlex.join(str(c) for c in cmd),
        "exit_code": proc.returncode,
        "seconds": round(time.time() - started, 2),
        "context_params": context_params(output),
        "buffers": buffers(output),
        "memory": memory,
        "breakdown": [line for line in output.splitlines() if "memory_breakdown" in line],
    }


def machine_facts(llama_cpp: Path) -> dict:
    facts: dict = {"host_cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()}

    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout
        except FileNotFoundError:
            return ""

    q = "name,driver_version,memory.total"
    facts["gpus"] = [x.strip() for x in run("nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader").splitlines()]
    m = re.search(r"CUDA Version:\s*([\d.]+)", run("nvidia-smi"))
    facts["cuda_driver_version"] = m[1] if m else None
    m = re.search(r"release ([\d.]+)", run("nvcc", "--version"))
    facts["nvcc"] = m[1] if m else None
    build_json = llama_cpp / "build" / "build.json"
    facts["llama_cpp"] = {
        "source": "llama-cpp-python 0.3.36 sdist, vendored/llama.cpp (trimmed: docs, models, tests dropped)",
        **(json.loads(build_json.read_text()) if build_json.exists() else {}),
    }
    try:
        import torch
        import transformers

        facts["torch"], facts["transformers"] = torch.__version__, transformers.__version__
    except ImportError:
        pass
    return facts


@cli.command()
@click.option("--shape", type=click.Path(exists=True, path_type=Path), required=True, help="A registry model file.")
@click.option("--llama-cpp", type=click.Path(exists=True, path_type=Path), required=True, help="Source tree, built.")
@click.option("--tokenizer-from", type=click.Path(exists=True, path_type=Path), required=True)
@click.option("--calibration", type=click.Path(exists=True, path_type=Path), required=True)
@click.option("--work", type=click.Path(path_type=Path), required=True, help="Scratch folder (GGUFs, checkpoint).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The results JSON.")
@click.option("--intermediate", default=None, type=int, help="Dense FFN width [Qwen-1.5B 8960, V2-Lite 10944].")
@click.option("--moe-intermediate", default=1408, show_default=True, help="Expert FFN width (V2-Lite).")
@click.option("--vocab", default=None, type=int, help="Override the registry vocab (the tokenizer must fit).")
@click.option("--base-type", type=click.Choice(["bf16", "q8_0"]), default="bf16", show_default=True)
@click.option("--types", default=" ".join(TYPES), show_default=True)
@click.option("--imatrix-types", default=" ".join(IMATRIX_TYPES), show_default=True)
@click.option("--controls/--no-controls", default=True, help="Also quantize --types without the imatrix.")
@click.option("--loads", default="BF16 Q8_0 Q4_K_M", show_default=True)
@click.option("--contexts", default="4096 32768", show_default=True)
@click.option("--imatrix-chunks", default=16, show_default=True)
@click.option("--parallel", default=4, show_default=True, help="llama-quantize processes at once.")
@click.option("--keep-checkpoint/--no-keep-checkpoint", default=False)
@click.option("--stop-after", type=click.Choice(["convert", "quantize", "all"]), default="all", show_default=True)
def measure(
    shape: Path, llama_cpp: Path, tokenizer_from: Path, calibration: Path, work: Path, out: Path,
    intermediate: int | None, moe_intermediate: int, vocab: int | None, base_type: str, types: str,
    imatrix_types: str, controls: bool, loads: str, contexts: str, imatrix_chunks: int, parallel: int,
    keep_checkpoint: bool, stop_after: str,
) -> None:  # fmt: skip
    """Checkpoint -> GGUF -> every quant type -> tensor tables -> GPU loads; results in OUT."""
    entry = yaml.safe_load(shape.read_text())
    s = dict(entry["shape"])
    if vocab:
        s["vocab"] = vocab
    bin_dir = llama_cpp / "build" / "bin"
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".tools.log")
    load_log = out.with_suffix(".load.log")
    threads = os.cpu_count() or 4
    results: dict = json.loads(out.read_text()) if out.exists() else {}
    for done in results.get("gguf", {}).values():  # undo compact()
        if "tensor_names" not in done:
            done["tensor_names"] = [n for n, _ in results["tensors"]]
            done["tensor_shapes"] = [s for _, s in results["tensors"]]
    results.pop("tensors", None)
    results.setdefault("commands", []).append(shlex.join(["python", *sys.argv]))
    results["machine"] = machine_facts(llama_cpp)
    results.setdefault("gguf", {})
    results.setdefault("loads", [])

    def save() -> None:
        out.write_text(json.dumps(compact(results), separators=(",", ":")) + "\n")

    if entry["architecture"] == "Qwen2ForCausalLM":
        config, tensors = qwen2_layout(s, intermediate or 8960)
    elif entry["architecture"] == "DeepseekV2ForCausalLM":
        config, tensors = deepseek_v2_layout(s, intermediate or 10944, moe_intermediate)
    else:
        raise click.ClickException(f"no random-weight layout for {entry['architecture']}")
    results["model"] = {**results.get("model", {}), "registry": entry["name"], "shape": s, "config": config}
    checkpoint = work / "checkpoint"
    base = work / f"{base_type.upper()}.gguf"
    if not base.exists():
        if not checkpoint.exists():
            started = time.time()
            parameters = write_checkpoint(checkpoint, config, tensors, tokenizer_from)
            results["model"]["checkpoint_seconds"] = round(time.time() - started, 1)
            results["model"]["parameters"] = parameters
            results["model"]["safetensors_bytes"] = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
            save()
        started = time.time()
        cmd = [sys.executable, llama_cpp / "convert_hf_to_gguf.py", checkpoint, "--outtype", base_type]
        sh([*cmd, "--outfile", base.with_suffix(".partial")], log)
        base.with_suffix(".partial").rename(base)
        results["model"]["convert_seconds"] = round(time.time() - started, 1)
        results["model"]["convert_command"] = shlex.join(str(c) for c in cmd)
    if not keep_checkpoint:
        shutil.rmtree(checkpoint, ignore_errors=True)
    if base.stem not in results["gguf"]:
        facts = gguf_table(base, llama_cpp)
        results["gguf"][base.stem] = {"type": base.stem, "imatrix": False, "overrides": [], **facts}
        save()
    if stop_after == "convert":
        return

    imatrix = work / "imatrix.gguf"
    if imatrix_types.split() and not imatrix.exists():
        started = time.time()
        cmd = [bin_dir / "llama-imatrix", "-m", base, "-f", calibration, "-o", imatrix.with_suffix(".partial.gguf")]
        cmd += ["-c", "512", "--chunks", imatrix_chunks, "-ngl", "99", "-t", threads, "--no-ppl"]
        sh(cmd, log)
        imatrix.with_suffix(".partial.gguf").rename(imatrix)
        results["imatrix"] = {"command": shlex.join(str(c) for c in cmd), "seconds": round(time.time() - started, 1)}
        save()

    # (name, type, with imatrix, tensor-type overrides)
    jobs = []
    have_imatrix = imatrix.exists()
    for t in types.split():
        if have_imatrix:
            jobs.append((f"{t}+imatrix", t, True, []))
        if controls or not have_imatrix:
            jobs.append((t, t, False, []))
    for t in imatrix_types.split():
        if have_imatrix:
            jobs.append((f"{t}+imatrix", t, True, []))
            if t in LOW_BIT:
                overrides = ["attn_=Q6_K"]
                dense = config.get("first_k_dense_replace") or 0
                if dense:
                    overrides.append(f"blk\\.({'|'.join(str(i) for i in range(dense))})\\.ffn_=Q6_K")
                jobs.append((f"{t}+imatrix+deepcast", t, True, overrides))
    keep = set(loads.split())
    lock = threading.Lock()

    def quantize(job: tuple) -> None:
        name, qtype, with_imatrix, overrides = job
        if name in results["gguf"]:
            return
        target = work / f"{name}.gguf"
        cmd = [bin_dir / "llama-quantize"]
        if base_type != "bf16":
            cmd.append("--allow-requantize")
        if with_imatrix:
            cmd += ["--imatrix", imatrix]
        for o in overrides:
            cmd += ["--tensor-type", o]
        cmd += [base, target, qtype, max(1, threads // parallel)]
        started = time.time()
        job_log = work / f"{name}.log"
        job_log.unlink(missing_ok=True)
        try:
            output = sh(cmd, job_log)
        finally:
            with lock, log.open("a") as f:
                f.write(job_log.read_text(errors="replace"))
            job_log.unlink()
        m = re.search(r"quant size\s*=\s*([\d.]+) MiB", output)
        entry = {
            "type": qtype, "imatrix": with_imatrix, "overrides": overrides, "seconds": round(time.time() - started, 1),
            "command": shlex.join(str(c) for c in cmd), "quant_size_mib_reported": float(m[1]) if m else None,
            **gguf_table(target, llama_cpp),
        }  # fmt: skip
        with lock:
            results["gguf"][name] = entry
            save()
        if not (qtype in keep and (with_imatrix or not have_imatrix) and not overrides):
            target.unlink()

    with ThreadPoolExecutor(parallel) as pool:
        for future in [pool.submit(quantize, job) for job in jobs]:
            try:
                future.result()
            except click.ClickException as e:
                click.echo(f"warning: {e.message}", err=True)

    if stop_after == "quantize":
        return
    # GPU loads: the base and the kept types (with the imatrix when there is one).
    for t in loads.split():
        model = base if t == base.stem else work / (f"{t}+imatrix.gguf" if have_imatrix else f"{t}.gguf")
        if not model.exists():
            click.echo(f"warning: no {model.name} to load", err=True)
            continue
        for ctx in [int(c) for c in contexts.split()]:
            for tool in (load_server, load_completion):
                key = (model.stem, ctx, tool.__name__)
                if any((r["model"], r["context"], r["runner"]) == key for r in results["loads"]):
                    continue
                try:
                    record = tool(bin_dir, model, ctx, threads, load_log)
                except Exception as e:  # a failed load is a result too
                    record = {"error": repr(e)}
                results["loads"].append({"model": model.stem, "context": ctx, "runner": tool.__name__, **record})
                save()
    click.echo(f"wrote {out}")


@cli.command()
@click.option("--shape", type=click.Path(exists=True, path_type=Path), required=True, help="A registry model file.")
@click.option("--tokenizer-from", type=click.Path(exists=True, path_type=Path), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--intermediate", default=8960, show_default=True, help="FFN width (Qwen-1.5B: hardware.md C.4).")
def checkpoint(shape: Path, tokenizer_from: Path, out: Path, intermediate: int) -> None:
    """A random-weight model of a Qwen2 registry shape's sizes that deepcast takes as a local model, as a Llama
    without attention biases (the R1-Distill-Llama architecture). Why not Qwen2: transformers loads any
    qwen2 model's tokenizer as Qwen2Tokenizer and rebuilds the DeepSeek-V3 tokenizer's pre-tokenizer, which
    convert_hf_to_gguf.py then no longer recognises; a Llama reads it as it is (PreTrainedTokenizerFast), as
    the embedded student does."""
    entry = yaml.safe_load(shape.read_text())
    if entry["architecture"] != "Qwen2ForCausalLM":
        raise click.ClickException("checkpoint makes models of Qwen2 shapes only")
    config, tensors = qwen2_layout(dict(entry["shape"]), intermediate)
    config |= {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
               "head_dim": entry["shape"]["head_dim"]}  # fmt: skip
    config.pop("use_sliding_window")
    tensors = [(name, size) for name, size in tensors if not name.endswith(".bias")]
    parameters = write_checkpoint(out, config, tensors, tokenizer_from)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    print(f"{parameters / 1e9:.3f} B parameters in {out}")


if __name__ == "__main__":
    cli()
