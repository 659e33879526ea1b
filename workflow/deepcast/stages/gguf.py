"""GGUF branch on llama.cpp's own tools: convert, imatrix, quantize, KL base, bundle, validate.

Shared per model revision: the 16-bit GGUF, the importance matrix, every quantized GGUF and the
16-bit model's saved logits. Per target: the llama-server bundle and its validation.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from deepcast import gates, planner, sizes, tasks
from deepcast.config import ValidateSettings
from deepcast.errors import DeepcastError
from deepcast.files import (
    atomic_path,
    link_or_copy,
    sha256_file,
    verify_checksums,
    write_checksums,
    write_launch_script,
)
from deepcast.gguf_file import read_header
from deepcast.manifest import Recorder, read, verify
from deepcast.registry import Target, shape_from_hf_config
from deepcast.serving import serving
from deepcast.tools import LlamaCpp
from deepcast.validation import PROMPTS, SMOKE_TOKENS, hardware_here, not_measured, roofline

MODEL = "model.gguf"
KLD_BASE = "base.kld"
IMATRIX = "imatrix.gguf"
SIXTEEN_BIT = {"BF16": "bf16", "F16": "f16"}
# The converter's output types: the base every quant type is made from (q8_0: the disk-lean route's base).
BASE_TYPES = ("bf16", "f16", "q8_0")
# The checkpoint's config.json, kept beside the base: quantization and bundles read it there, so that the
# download can be deleted once converted (docs/planner.md, routes).
SOURCE_CONFIG = "checkpoint-config.json"
# DeepSeek's dynamic low-bit quants keep attention and the dense layers at higher precision.
LOW_BIT = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS"}


def run_tool(cmd: list, what: str, env: dict | None = None) -> str:
    """Run one llama.cpp tool, echo its output to the log, fail with its last lines."""
    print("$ " + " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, errors="replace", env=env)
    sys.stderr.write(result.stdout + result.stderr)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-5:])
        raise DeepcastError(f"{what} failed (exit {result.returncode}):\n{tail}")
    return result.stdout + result.stderr


def verified_gguf(directory: Path) -> Path:
    """The GGUF of an artifact directory, after checking it against the artifact's manifest."""
    path = directory / MODEL
    try:
        expected = read(directory)["files"][MODEL]["sha256"]
    except (OSError, KeyError, json.JSONDecodeError):
        raise DeepcastError(
            f"{directory} has no manifest entry for {MODEL}: it was not completed by deepcast. "
            "Fix: delete it and rerun the stage that makes it."
        ) from None
    if not path.is_file() or sha256_file(path) != expected:
        raise DeepcastError(
            f"{path} is corrupt or truncated (its sha256 differs from the manifest's). "
            f"Fix: delete {directory} and rerun (snakemake --forcerun the rule that made it)."
        )
    return path


def verified_digest(directory: Path) -> str:
    """The sha256 of the directory's GGUF as its manifest records it: what `verified_gguf` checked."""
    return read(directory)["files"][MODEL]["sha256"]


def gguf_facts(path: Path, llama: LlamaCpp) -> dict:
    """Parameter count, routed-expert share, token-embedding bytes and bits per weight, from the tensor table."""
    tensors = read_header(path, llama).tensors
    elements = sum(t.n_elements for t in tensors)
    expert_bytes = sum(t.n_bytes for t in tensors if "_exps" in t.name)
    embedding_bytes = sum(t.n_bytes for t in tensors if t.name == "token_embd.weight")
    tensor_bytes = sum(t.n_bytes for t in tensors)
    size = path.stat().st_size
    return {
        "size_bytes": size,
        "parameters": elements,
        "bits_per_weight": round(size * 8 / elements, 4),
        "expert_share": round(expert_bytes / tensor_bytes, 4),
        "token_embd_bytes": embedding_bytes,
    }


# DeepSeek-V3 routes with sigmoid scores; transformers hard-codes that and does not keep
# scoring_func in the configs it saves, while llama.cpp's converter falls back to V2's softmax
# without it: a silently unfaithful GGUF. The converter gets the key the original config has.
DEEPSEEK_V3_ROUTING = {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}


def converter_input(checkpoint: Path, staging: Path) -> tuple[Path, dict]:
    """The checkpoint, or a view of it whose config.json states what the converter must know."""
    config = json.loads((checkpoint / "config.json").read_text())
    if "DeepseekV3ForCausalLM" not in config.get("architectures", []):
        return checkpoint, {}
    missing = {k: v for k, v in DEEPSEEK_V3_ROUTING.items() if k not in config}
    if not missing:
        return checkpoint, {}
    staging.mkdir()
    for path in checkpoint.iterdir():
        if path.name != "config.json":
            (staging / path.name).symlink_to(path.resolve())
    (staging / "config.json").write_text(json.dumps({**config, **missing}, indent=2))
    print(f"note: config.json lacks {sorted(missing)}; converting with {missing}", file=sys.stderr)
    return staging, missing


def predicted_bytes(config: dict, ftype: str, imatrix: bool = False, overrides: list[str] | None = None) -> int | None:
    """What the planner predicts a GGUF of this checkpoint config at `ftype` weighs (deepcast.sizes); None for a
    type the size port does not cover."""
    if ftype not in sizes.FTYPE_DEFAULT:
        return None
    architecture = (config.get("architectures") or ["?"])[0]
    return sizes.gguf_size(architecture, shape_from_hf_config(config), ftype, imatrix, overrides).total


def convert(checkpoint: Path, out: Path, outtype: str, llama: LlamaCpp) -> dict:
    """The base GGUF, 16-bit or Q8_0, with the checkpoint's config.json and provenance beside it."""
    recorder = Recorder("gguf_convert", {"outtype": outtype, "llama.cpp": llama.versions()})
    recorder.input("checkpoint_manifest", checkpoint / "manifest.json")
    verify(checkpoint)
    download = read(checkpoint)["results"]
    needed = predicted_bytes(json.loads((checkpoint / "config.json").read_text()), outtype.upper())
    with atomic_path(out, needed) as tmp:
        tmp.mkdir()
        source, added = converter_input(checkpoint, tmp / "checkpoint-view")
        run_tool(
            [sys.executable, llama.converter, source, "--outfile", tmp / MODEL, "--outtype", outtype],
            "convert_hf_to_gguf.py",
            env=llama.converter_env(),
        )
        if source != checkpoint:
            shutil.rmtree(source)
        shutil.copyfile(checkpoint / "config.json", tmp / SOURCE_CONFIG)
        recorder.results = {
            **gguf_facts(tmp / MODEL, llama),
            "config_keys_added": added,
            "source": download["source"],
            "resolved_revision": download["resolved_revision"],
        }
        recorder.write(tmp)
    return recorder.results


def imatrix(base: Path, calibration: Path, out: Path, context: int, threads: int, llama: LlamaCpp) -> dict:
    model = verified_gguf(base)
    params = {"context": context, "llama.cpp": llama.versions()}
    recorder = Recorder("gguf_imatrix", params, backend=llama.compute_backend)
    recorder.input(MODEL, model, sha256=verified_digest(base))
    recorder.input("samples.txt", calibration / "samples.txt")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        output = run_tool(
            [
                llama.tool("llama-imatrix"),
                "-m",
                model,
                "-f",
                calibration / "samples.txt",
                "-o",
                tmp / IMATRIX,
                "-c",
                context,
                "-t",
                threads,
                "--no-ppl",
            ],
            "llama-imatrix",
        )
        recorder.results = {"chunks": _last_int(r"compute_imatrix: computing over (\d+) chunks", output)}
        recorder.write(tmp)
    return recorder.results


def known_types(llama: LlamaCpp) -> set[str]:
    """The quant types this llama-quantize knows, from its own help text."""
    result = subprocess.run([llama.tool("llama-quantize"), "--help"], capture_output=True, text=True)
    return set(re.findall(r"^\s+\d+\s+or\s+([A-Z0-9_]+)\s+:", result.stdout + result.stderr, re.MULTILINE))


def default_tensor_types(qtype: str, dense: int) -> list[str]:
    """Dynamic low-bit DeepSeek quants: attention and the first `dense` (dense-FFN) layers at Q6_K."""
    if qtype not in LOW_BIT:
        return []
    overrides = ["attn_=Q6_K"]
    if dense:
        overrides.append(f"blk\\.({'|'.join(str(i) for i in range(dense))})\\.ffn_=Q6_K")
    return overrides


def check_quant_request(qtype: str, with_imatrix: bool, llama: LlamaCpp) -> None:
    known = known_types(llama)
    if qtype not in known:
        raise DeepcastError(
            f"unknown quant type {qtype!r} for llama.cpp {llama.stamp.get('version')}. "
            f"Fix: use one of {', '.join(sorted(known))}."
        )
    if qtype in planner.NEEDS_IMATRIX and not with_imatrix:
        raise DeepcastError(f"{qtype} needs an importance matrix. Fix: set gguf.imatrix: true or pick another type.")


def source_config(base: Path) -> dict:
    """The checkpoint's config.json as the base GGUF keeps it."""
    return json.loads((base / SOURCE_CONFIG).read_text())


def quantize(
    base: Path,
    out: Path,
    qtype: str,
    imatrix_dir: Path | None,
    tensor_types: list[str],
    threads: int,
    llama: LlamaCpp,
) -> dict:
    """A quant type from the base; from a Q8_0 base with --allow-requantize (llama-quantize refuses a quantized
    input without it)."""
    check_quant_request(qtype, imatrix_dir is not None, llama)
    model = verified_gguf(base)
    dense = source_config(base).get("first_k_dense_replace") or 0
    overrides = tensor_types or default_tensor_types(qtype, dense)
    requantize = read(base)["params"]["outtype"] not in SIXTEEN_BIT.values()
    recorder = Recorder(
        "gguf_quantize",
        {"type": qtype, "imatrix": imatrix_dir is not None, "tensor_types": overrides, "requantize": requantize,
         "llama.cpp": llama.versions()},
    )  # fmt: skip
    recorder.input(MODEL, model, sha256=verified_digest(base))
    cmd = [llama.tool("llama-quantize")] + (["--allow-requantize"] if requantize else [])
    if imatrix_dir is not None:
        recorder.input(IMATRIX, imatrix_dir / IMATRIX)
        cmd += ["--imatrix", imatrix_dir / IMATRIX]
    for override in overrides:
        cmd += ["--tensor-type", override]
    needed = predicted_bytes(source_config(base), qtype, imatrix_dir is not None, overrides)
    with atomic_path(out, needed) as tmp:
        tmp.mkdir()
        run_tool([*cmd, model, tmp / MODEL, qtype, threads], "llama-quantize")
        recorder.results = gguf_facts(tmp / MODEL, llama)
        recorder.write(tmp)
    return recorder.results


def kld_base(
    base: Path, evaluation_text: Path, out: Path, context: int, chunks: int, threads: int, llama: LlamaCpp
) -> dict:
    """The base model's perplexity and its saved logits, the base of every KL divergence (on the disk-lean
    route the base is the Q8_0 GGUF, and `base_type` says so)."""
    model = verified_gguf(base)
    params = {"context": context, "chunks": chunks, "base_type": read(base)["params"]["outtype"],
              "llama.cpp": llama.versions()}  # fmt: skip
    recorder = Recorder("gguf_kld_base", params, backend=llama.compute_backend)
    recorder.input(MODEL, model, sha256=verified_digest(base))
    recorder.input("evaluation_text", evaluation_text)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        output = run_tool(
            [
                llama.tool("llama-perplexity"),
                "-m",
                model,
                "-f",
                evaluation_text,
                "-c",
                context,
                "--chunks",
                chunks,
                "-t",
                threads,
                "--kl-divergence-base",
                tmp / KLD_BASE,
            ],
            "llama-perplexity",
        )
        recorder.results = {"perplexity": _last_float(r"Final estimate: PPL = ([\d.]+)", output)}
        recorder.write(tmp)
    return recorder.results


def plan_for(artifact: Path, base: Path, target: Target, llama: LlamaCpp) -> planner.LlamaCppPlan:
    facts = gguf_facts(artifact / MODEL, llama)
    shape = shape_from_hf_config(source_config(base))
    return planner.plan_llama_cpp(
        shape, target, facts["size_bytes"] / planner.GB, facts["expert_share"], facts["token_embd_bytes"] / planner.GB
    )


README = """# {title}

Start: `./launch.sh` (serves http://127.0.0.1:8080; `./launch.sh --host 0.0.0.0 --port 8080` to expose it).
It checks every file against `SHA256SUMS` first and refuses to start on a mismatch.
Needs llama-server from llama.cpp {version} or later on PATH, or `LLAMA_SERVER=/path/to/llama-server`.

| | |
|---|---|
| model | {model_name} @ {revision} |
| quant | {qtype} ({bpw} bits per weight, {size_gb:.2f} GB) |
| target | {target} |
| flags | `{flags}` |
| placement | {placement} |
| GPU memory | {gpu_gb:.2f} GB per GPU at a {context}-token context |
| system RAM | {ram_gb:.2f} GB |
| KV cache | {kv} bytes per token (f16) |
"""


def bundle(
    artifact: Path,
    base: Path,
    target: Target,
    out: Path,
    qtype: str,
    split_max_size: str,
    planned_flags: str,
    llama: LlamaCpp,
) -> dict:
    """The plan is recomputed from the real GGUF; the registry-based plan is kept for comparison."""
    model = verified_gguf(artifact)
    plan = plan_for(artifact, base, target, llama)
    if planned_flags not in ("auto", " ".join(plan.server_flags())):
        print(
            f"note: the real GGUF changes the planned flags {planned_flags!r} to {plan.server_flags()}", file=sys.stderr
        )
    facts = read(artifact)["results"]
    provenance = read(base)["results"]
    recorder = Recorder(
        "gguf_bundle",
        {
            "target": target.name,
            "type": qtype,
            "split_max_size": split_max_size,
            "plan": plan.as_dict(),
            "planned_flags": planned_flags,
        },
    )
    recorder.input(MODEL, model, sha256=verified_digest(artifact))
    with atomic_path(out) as tmp:
        tmp.mkdir()
        if facts["size_bytes"] > _bytes(split_max_size):
            run_tool(
                [llama.tool("llama-gguf-split"), "--split", "--split-max-size", split_max_size, model, tmp / "model"],
                "llama-gguf-split",
            )
            first = sorted(p.name for p in tmp.glob("model-*.gguf"))[0]
        else:
            link_or_copy(model, tmp / MODEL)
            first = MODEL
        source = provenance["source"]
        # A hub id, or a local directory's name: no path of the building machine goes into the bundle.
        model_name = source if source.startswith("hf://") else Path(source).name
        title = f"{model_name} {qtype} on {target.name}"
        flags = " ".join(plan.server_flags())
        write_launch_script(
            tmp,
            f"# Start llama-server for {title}. Extra arguments go to llama-server (e.g. --host 0.0.0.0).\n"
            "# LLAMA_SERVER may name the llama-server binary; by default the one on PATH.",
            f'"${{LLAMA_SERVER:-llama-server}}" -m {first} {flags}',
        )
        (tmp / "server.json").write_text(json.dumps({"model": first, **plan.as_dict()}, indent=2) + "\n")
        (tmp / "README.md").write_text(
            README.format(
                title=title,
                version=llama.stamp.get("version"),
                model_name=model_name,
                revision=provenance["resolved_revision"],
                qtype=qtype,
                bpw=facts["bits_per_weight"],
                size_gb=facts["size_bytes"] / planner.GB,
                target=target.name,
                flags=flags,
                placement="; ".join(plan.notes),
                gpu_gb=plan.gpu_memory_gb,
                context=plan.context,
                ram_gb=plan.system_memory_gb,
                kv=plan.kv_bytes_per_token,
            )
        )
        sums = write_checksums(tmp)
        recorder.results = {"server_flags": plan.server_flags(), "context": plan.context, "files": sorted(sums)}
        recorder.write(tmp)
    return recorder.results


def validate(
    bundle_dir: Path,
    kld_dir: Path,
    reference_dir: Path,
    out: Path,
    context: int,
    chunks: int,
    threads: int,
    llama: LlamaCpp,
    settings: ValidateSettings | None = None,
    target: Target | None = None,
    plan_file: Path | None = None,
    teacher_kld_dir: Path | None = None,
) -> dict:
    """Perplexity and KL divergence against the 16-bit GGUF, smoke, speed on the target, tasks, the gate; for a
    distilled student, also KL divergence and top-1 agreement against its teacher's 16-bit GGUF."""
    settings = settings or ValidateSettings()
    server = json.loads((bundle_dir / "server.json").read_text())
    model = bundle_dir / server["model"]
    verify_checksums(bundle_dir)
    recorder = Recorder("gguf_validate", {"context": context, "chunks": chunks}, backend=llama.compute_backend)
    recorder.input("SHA256SUMS", bundle_dir / "SHA256SUMS")
    recorder.input(KLD_BASE, kld_dir / KLD_BASE)
    output = kl_divergence(model, kld_dir / KLD_BASE, context, chunks, threads, llama)
    reference = json.loads((reference_dir / "perplexity.json").read_text())["perplexity"]
    base_ppl = read(kld_dir)["results"]["perplexity"]
    ppl = _last_float(r"Mean PPL\(Q\)\s+:\s+(-?[\d.]+)", output)
    facts = read(bundle_dir)["params"]["plan"]
    results = {
        "perplexity": ppl,
        "perplexity_16bit_gguf": base_ppl,
        # The base the KL divergence is taken against: the 16-bit GGUF, or Q8_0 on the disk-lean route.
        "kld_base_type": read(kld_dir)["params"].get("base_type", "bf16"),
        "perplexity_reference": reference,
        "perplexity_ratio_to_16bit": round(ppl / base_ppl, 6),
        "kl_divergence": _last_float(r"Mean\s+KLD:\s+(-?[\d.]+)", output),
        "same_top_token_percent": _last_float(r"Same top p:\s+([\d.]+)", output),
        "size_bytes": sum(p.stat().st_size for p in bundle_dir.glob("*.gguf")),
        "weights_gb_planned": facts["weights_gb"],
    }
    results["server"], results["tasks"] = smoke_test(bundle_dir, llama, settings)
    if teacher_kld_dir is not None:
        recorder.input("teacher_" + KLD_BASE, teacher_kld_dir / KLD_BASE)
        against = kl_divergence(model, teacher_kld_dir / KLD_BASE, context, chunks, threads, llama)
        results["teacher"] = {
            "perplexity_teacher": read(teacher_kld_dir)["results"]["perplexity"],
            "kl_divergence": _last_float(r"Mean\s+KLD:\s+(-?[\d.]+)", against),
            "same_top_token_percent": _last_float(r"Same top p:\s+([\d.]+)", against),
        }
    # Load time: from starting the bundle's server to its first healthy answer.
    results["load_time_s"] = results["server"]["ready_s"]
    qtype = read(bundle_dir)["params"]["type"]
    results["speed"] = speed(bundle_dir, llama, threads, target, roofline(plan_file, qtype))
    reference_tasks = tasks.reference_scores(reference_dir)
    results["gate"] = gates.apply(str(bundle_dir.parent), qtype, results, settings, reference_tasks)
    return recorder.save(out, results, {"validation.json": json.dumps(results, indent=2) + "\n"})


def kl_divergence(model: Path, base: Path, context: int, chunks: int, threads: int, llama: LlamaCpp) -> str:
    """llama-perplexity's KLD mode: the model against the saved logits of `base`, on the tokens saved with them."""
    return run_tool(
        [llama.tool("llama-perplexity"), "-m", model, "--kl-divergence-base", base, "--kl-divergence", "-c", context,
         "--chunks", chunks, "-t", threads],
        "llama-perplexity",
    )  # fmt: skip


def smoke_test(bundle_dir: Path, llama: LlamaCpp, settings: ValidateSettings, timeout: float = 120
               ) -> tuple[dict, dict]:  # fmt: skip
    """Start the bundle's launch script on loopback, ask for the fixed completions twice, run the lm-eval tasks
    against it, stop it cleanly. Returns the server record and the task scores."""
    with serving(bundle_dir, {"LLAMA_SERVER": str(llama.tool("llama-server"))}, timeout, "llama.cpp") as server:
        runs = [[_complete(server.url, prompt) for prompt in PROMPTS] for _ in range(2)]
        if any(not text.strip() for text in runs[0]):
            raise DeepcastError(f"llama-server answered an empty completion: {runs[0]}")
        if runs[0] != runs[1]:
            raise DeepcastError(f"greedy completions are not deterministic: {runs[0]} then {runs[1]}")
        task_scores = tasks.run(settings, "llama-server", base_url=server.url, model_name=bundle_dir.name)
    if server.exit_code != 0:
        raise DeepcastError(f"llama-server did not stop cleanly (exit {server.exit_code}).")
    record = {"ready_s": server.ready_s, "completions": runs[0], "deterministic": True, "exit_code": server.exit_code}
    return record, task_scores


def _complete(url: str, prompt: str) -> str:
    # No prompt cache: a reused KV prefix changes the batch shapes, and with them near-tied greedy picks.
    body = json.dumps({"prompt": prompt, "n_predict": SMOKE_TOKENS, "temperature": 0, "cache_prompt": False}).encode()
    request = urllib.request.Request(f"{url}/completion", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read()).get("content", "")


def speed(bundle_dir: Path, llama: LlamaCpp, threads: int, target: Target | None, estimate: float | None) -> dict:
    """llama-bench (512-token prompt, 128 decoded tokens) where the target's hardware is this machine's."""
    import resource

    elsewhere = hardware_here(target) if target else "no target given"
    if elsewhere:
        return not_measured(elsewhere, estimate)
    server = json.loads((bundle_dir / "server.json").read_text())
    flags = server["server_flags"]
    ngl = flags[flags.index("-ngl") + 1]
    output = run_tool(
        [llama.tool("llama-bench"), "-m", bundle_dir / server["model"], "-p", "512", "-n", "128", "-r", "2",
         "-ngl", ngl, "-t", threads, "-o", "json"],
        "llama-bench",
    )  # fmt: skip
    table = re.search(r"^\[\s*\{.*?^\]", output, re.MULTILINE | re.DOTALL)  # the JSON among the log lines
    rows = json.loads(table.group(0))
    rate = {("prompt" if row["n_prompt"] else "decode"): row["avg_ts"] for row in rows}
    return {
        "status": "measured",
        "engine": "llama.cpp (llama-bench)",
        "prompt_tokens_per_s": round(rate["prompt"], 1),
        "decode_tokens_per_s": round(rate["decode"], 1),
        "peak_memory_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6, 3),
        "roofline_decode_tokens_per_s": estimate,
    }


def _bytes(size: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([KMG]?)", size.upper()).groups()
    return int(number) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[unit]


def _last_float(pattern: str, text: str) -> float:
    found = re.findall(pattern, text)
    if not found:
        raise DeepcastError(f"could not find {pattern!r} in the tool's output; see the log.")
    return float(found[-1])


def _last_int(pattern: str, text: str) -> int:
    return int(_last_float(pattern, text))
