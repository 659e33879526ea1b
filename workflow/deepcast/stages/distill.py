"""Distillation: a smaller student trained from the teacher's cached signal, then handed to every
downstream branch as a model like any other.

- `signal`: the teacher's top-k distribution at the loss positions of every distillation window
  (deepcast.kd), computed once per teacher revision by transformers or by the teacher's own
  llama.cpp build (deepcast.kld_topk).
- `sequences`: teacher completions of a prompt set (deepcast.sequences), for sequence-level KD.
- `train`: logit KD through a `transformers.Trainer` with deepcast's sparse forward-KL loss (no
  packaged trainer reads an offline top-k cache: TRL #3055, DistillKit pins conflict), or sequence
  KD through TRL's `SFTTrainer`. Resumable checkpoints; deterministic on the CPU for a seed.
- `evaluate`: the student against the TEACHER on the reference tokens: perplexity, KL divergence,
  top-1 agreement.
- `summary`: students, controls and the teacher side by side, and the loss curves.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

from deepcast.config import DistillSettings, StudentSpec
from deepcast.errors import DeepcastError
from deepcast.files import atomic_path, link_or_copy, remove, sha256_file
from deepcast.kd import SIGNAL, Signal, sparse_forward_kl, top_k_of
from deepcast.manifest import MANIFEST, Recorder, read
from deepcast.validation import pick_device

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
TRAIN_STATE = "train-state"  # resumable Trainer checkpoints, beside the final checkpoint
SETTINGS_FILE = "distill-settings.json"
CONTROL_SUFFIX = "-control"
# Per position on disk: what a dense fp16 distribution would cost, for the record.
DENSE_BYTES = 2


# ---------------------------------------------------------------------------------------------------
# Students: their configs (known before any training, so the planner and the DAG can use them)


def _read_config(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / "config.json").read_text())


def prune_layers(spec: StudentSpec, teacher: dict) -> list[int]:
    layers = teacher["num_hidden_layers"]
    keep = spec.keep_layers if spec.keep_layers is not None else sorted({0, layers - 1})
    if not keep or sorted(set(keep)) != keep or keep[0] < 0 or keep[-1] >= layers:
        raise DeepcastError(
            f"student {spec.name}: keep_layers {keep} must be increasing teacher layer numbers in 0..{layers - 1}. "
            "Fix distill.students."
        )
    if len(keep) == layers:
        raise DeepcastError(
            f"student {spec.name} keeps all {layers} teacher layers: it is the teacher. Fix: drop some in keep_layers."
        )
    return keep


def student_config(spec: StudentSpec, teacher: dict) -> dict | None:
    """The student's config.json, from the teacher's and the spec; None for a downloaded `hf` source."""
    if spec.kind == "prune":
        keep = prune_layers(spec, teacher)
        dense = teacher.get("first_k_dense_replace") or 0
        return {**teacher, "num_hidden_layers": len(keep), "first_k_dense_replace": sum(k < dense for k in keep)}
    if spec.shape is None:
        return None
    shape = spec.shape
    if shape.architecture == "deepseek_v3":
        return {
            **teacher,
            "hidden_size": shape.hidden,
            "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.heads,
            "intermediate_size": shape.intermediate,
            "first_k_dense_replace": min(teacher.get("first_k_dense_replace") or 0, shape.layers),
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": teacher["vocab_size"],
        "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads or shape.heads,
        "head_dim": shape.hidden // shape.heads,
        "intermediate_size": shape.intermediate,
        "hidden_act": "silu",
        "max_position_embeddings": teacher.get("max_position_embeddings", 4096),
        "rms_norm_eps": teacher.get("rms_norm_eps", 1e-6),
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": teacher.get("bos_token_id"),
        "eos_token_id": teacher.get("eos_token_id"),
        "pad_token_id": teacher.get("pad_token_id"),
        "dtype": teacher.get("dtype", "bfloat16"),
    }


def parameters_of(config: dict) -> int:
    from deepcast.registry import shape_from_hf_config
    from deepcast.tensors import parameter_count

    return parameter_count(config["architectures"][0], shape_from_hf_config(config))


def method_of(spec: StudentSpec, settings: DistillSettings) -> str:
    return spec.method or settings.method


def check_student(spec: StudentSpec, teacher: dict) -> None:
    """What can be refused of one student before any work: no smaller than its teacher, or not buildable."""
    config = student_config(spec, teacher)
    if config is None:
        return
    student, parent = parameters_of(config), parameters_of(teacher)
    if student >= parent:
        raise DeepcastError(
            f"student {spec.name} has {student:,} parameters, no fewer than its teacher's {parent:,}. "
            "Fix: give it fewer layers or a smaller shape."
        )


def check_top_k(settings: DistillSettings, teacher: dict) -> None:
    if settings.loss.top_k > teacher["vocab_size"]:
        raise DeepcastError(
            f"distill.loss.top_k ({settings.loss.top_k}) is larger than the teacher's vocabulary "
            f"({teacher['vocab_size']}). Fix: lower top_k (32 to 128 is usual)."
        )


def run_settings(settings: DistillSettings, alpha: float) -> dict:
    """What a training run depends on (the digest and the resume check): everything but where it runs and how
    often it checkpoints."""
    data = settings.model_dump(exclude={"students", "control", "device", "save_steps"})
    data["loss"]["alpha"] = alpha
    return data


SIGNAL_FIELDS = {"source", "text_field", "steps", "batch_size", "window", "loss_positions", "seed", "device",
                 "signal_producer"}  # fmt: skip


SEQUENCE_FIELDS = {"source", "text_field", "seed", "sequences"}


def teacher_data_settings(settings: DistillSettings, fields: set[str]) -> str:
    """The settings a teacher artifact (signal or sequences) depends on, as JSON: editing a student or the
    learning rate reruns neither."""
    data = settings.model_dump(include=fields)
    data["loss"] = {"top_k": settings.loss.top_k}
    return json.dumps(data, sort_keys=True)


def student_settings(settings: DistillSettings, spec: StudentSpec) -> str:
    """One student's settings, as JSON: editing another student reruns nothing of this one."""
    return settings.model_copy(update={"students": [spec]}).model_dump_json()


def student_digest(teacher_name: str, teacher_revision: str, spec: StudentSpec, settings: dict) -> str:
    """Names a student's revision: its teacher's revision, its spec and the training settings."""
    payload = json.dumps(
        {"teacher": teacher_name, "revision": teacher_revision, "spec": spec.model_dump(), "settings": settings},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------
# Data: the distillation windows


def read_texts(source: Path, text_field: str) -> list[str]:
    from deepcast.stages.calibrate import read_documents

    try:
        return read_documents(source, text_field, 4096)
    except DeepcastError as error:
        message = str(error).replace("calibration.", "distill.").replace("calibration", "distillation")
        raise DeepcastError(message) from None


def seeded_order(count: int, needed: int, seed: int) -> list[int]:
    """`needed` window numbers out of `count`: a seeded shuffle, reshuffled for each further epoch."""
    generator = random.Random(seed)
    order: list[int] = []
    while len(order) < needed:
        epoch = list(range(count))
        generator.shuffle(epoch)
        order += epoch
    return order[:needed]


def make_windows(texts: list[str], tokenizer, settings: DistillSettings):
    """The distinct windows of `window` tokens the run reads, cut without overlap from the texts, and the
    seeded order of steps x batch in which it reads them (further epochs reshuffle; the signal keeps each
    window once). The student and its control read the same windows in the same order."""
    import torch

    needed = settings.steps * settings.batch_size
    ids: list[int] = []
    for text in texts:  # a pool of up to four times the windows needed, so the order is a real shuffle
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= 4 * needed * settings.window:
            break
    count = len(ids) // settings.window
    if count == 0:
        raise DeepcastError(
            f"the distillation data has {len(ids)} tokens, fewer than one {settings.window}-token window. "
            "Fix: give distill.source more text or lower distill.window."
        )
    order = seeded_order(count, needed, settings.seed)
    used = sorted(set(order))
    number = {window: n for n, window in enumerate(used)}
    pool = torch.tensor(ids[: count * settings.window], dtype=torch.int32).view(count, settings.window)
    return pool[used], torch.tensor([number[w] for w in order], dtype=torch.int32)


def first_loss_position(settings: DistillSettings) -> int:
    """The logit position of the first loss target: the last `loss_positions` tokens are predicted."""
    return settings.window - settings.loss_positions - 1


SAFETENSORS_HEADER = 1 << 16  # an allowance for the file's JSON header


def predicted_signal_bytes(settings: DistillSettings, windows: int | None = None) -> int:
    """The teacher signal's size before it is made (checked against the free disk): each distinct window with
    its ids, its top-k and its tail, plus the training order. Before the text is cut, every window of the
    budget counts as distinct: an upper bound."""
    examples = settings.steps * settings.batch_size
    per_position = settings.loss.top_k * (4 + 2) + 2
    per_window = settings.loss_positions * per_position + settings.window * 4
    return (windows or examples) * per_window + examples * 4 + SAFETENSORS_HEADER


def check_disk(settings: DistillSettings, results: Path, windows: int | None = None) -> None:
    need = predicted_signal_bytes(settings, windows)
    results = Path(results)
    while not results.exists():
        results = results.parent
    free = shutil.disk_usage(results).free
    if need > free:
        count = windows or settings.steps * settings.batch_size
        raise DeepcastError(
            f"the teacher signal needs {need / 1e9:,.2f} GB ({count} windows x "
            f"{settings.loss_positions} positions x top {settings.loss.top_k}); {results} has {free / 1e9:,.2f} GB "
            "free. Fix: free disk, or lower distill.steps, batch_size, loss_positions or loss.top_k."
        )


# ---------------------------------------------------------------------------------------------------
# The teacher signal


def _load_model(checkpoint: Path, device: str, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    return (
        AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, trust_remote_code=False, use_safetensors=True)
        .to(device)
        .eval()
    )


def signal_with_transformers(teacher: Path, windows, order, settings: DistillSettings, batch: int = 8) -> Signal:
    import torch
    from tqdm import tqdm

    device = pick_device(settings.device)
    model = _load_model(teacher, device)
    first, positions, k = first_loss_position(settings), settings.loss_positions, settings.loss.top_k
    ids, logprobs, tails = [], [], []
    with torch.no_grad(), tqdm(total=len(windows), desc="teacher signal", unit="window") as bar:
        for start in range(0, len(windows), batch):
            chunk = windows[start : start + batch].long().to(device)
            logits = model(input_ids=chunk, logits_to_keep=positions + 1).logits[:, :positions]
            top_ids, top_logprobs, tail = top_k_of(logits, k)
            ids.append(top_ids.int().cpu())
            logprobs.append(top_logprobs.half().cpu())
            tails.append(tail.half().cpu())
            bar.update(len(chunk))
    return Signal(windows, torch.cat(ids), torch.cat(logprobs), torch.cat(tails), order, first, "transformers")


def signal(
    teacher: Path, source: Path, out: Path, settings: DistillSettings, gguf: Path | None = None, threads: int = 1,
    llama_cpp: str | None = None,
) -> dict:  # fmt: skip
    """The teacher's top-k signal over the distillation windows, from transformers or, given the teacher's
    GGUF, from its own llama.cpp build."""
    from transformers import AutoTokenizer

    params = json.loads(teacher_data_settings(settings, SIGNAL_FIELDS))
    recorder = Recorder("distill_signal", params, seed=settings.seed)
    recorder.input("teacher_config", teacher / "config.json")
    recorder.input("source", source)
    tokenizer = AutoTokenizer.from_pretrained(teacher, trust_remote_code=False)
    check_top_k(settings, _read_config(teacher))
    if gguf is None:
        windows, order = make_windows(read_texts(source, settings.text_field), tokenizer, settings)
        check_disk(settings, out.parent, len(windows))
        started = time.perf_counter()  # the teacher's forward passes, not the tokenizing
        result = signal_with_transformers(teacher, windows, order, settings)
    else:
        started = time.perf_counter()
        vocab = _read_config(teacher)["vocab_size"]
        result = signal_with_llama_cpp(gguf, source, settings, vocab, threads, llama_cpp)
    seconds = time.perf_counter() - started
    with atomic_path(out) as tmp:
        tmp.mkdir()
        result.save(tmp / SIGNAL)
        kept_mass = 1.0 - result.tail_mass.float().mean().item()
        scored = result.windows * result.positions
        recorder.results = {
            "producer": result.producer,
            "windows": result.windows,
            "examples": len(result.order),
            "window": result.input_ids.shape[1],
            "positions_per_window": result.positions,
            "first_position": result.first_position,
            "top_k": result.top_k,
            "positions": scored,
            "mean_top_k_mass": round(kept_mass, 4),
            "bytes_per_position": result.bytes_per_position(),
            "dense_fp16_bytes_per_position": _read_config(teacher)["vocab_size"] * DENSE_BYTES,
            "file_bytes": (tmp / SIGNAL).stat().st_size,
            "predicted_bytes": predicted_signal_bytes(settings, result.windows) if gguf is None else None,
            "positions_per_s": round(scored / seconds, 1),
        }
        recorder.write(tmp)
    return recorder.results




def signal_with_llama_cpp(
    gguf: Path, source: Path, settings: DistillSettings, vocab: int, threads: int, llama_cpp: str | None
) -> Signal:
    """llama-perplexity's dense logits of the teacher GGUF, reduced to top-k chunk by chunk (never kept dense).

    llama-perplexity scores the second half of each window, so the loss positions are that half."""
    import torch

    from deepcast import kld_topk
    from deepcast.tools import locate

    needed = settings.steps * settings.batch_size
    dense = needed * (settings.window - 1 - settings.window // 2) * kld_topk.record_width(vocab) * 2
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if dense > free:
        raise DeepcastError(
            f"llama-perplexity writes {dense / 1e9:,.1f} GB of dense logits before they are reduced to top-k; "
            f"{tempfile.gettempdir()} has {free / 1e9:,.1f} GB free. Fix: point TMPDIR at a larger disk, or lower "
            "distill.steps or batch_size."
        )
    result = kld_topk.produce(gguf, source, settings.window, needed, settings.loss.top_k, threads, locate(llama_cpp))
    result.order = torch.tensor(seeded_order(result.windows, needed, settings.seed), dtype=torch.int32)
    return result


def signal_producer(settings: DistillSettings, teacher_parameters: int) -> str:
    """transformers when the 16-bit teacher fits in half of this machine's (GPU) memory, else llama.cpp."""
    if settings.signal_producer != "auto":
        return settings.signal_producer
    import psutil

    from deepcast.tools import visible_gpus

    gpus = visible_gpus("memory.total")
    memory = sum(float(m.split()[0]) * 2**20 for m in gpus) if gpus else psutil.virtual_memory().total
    return "transformers" if 2 * teacher_parameters < memory / 2 else "llama.cpp"


def verified_signal(directory: Path) -> Signal:
    """The signal after checking its file against the producer's manifest (a flipped byte is caught here)."""
    path = Path(directory) / SIGNAL
    expected = read(directory)["files"][SIGNAL]["sha256"]
    if not path.is_file() or sha256_file(path) != expected:
        raise DeepcastError(
            f"teacher signal {path} does not match its manifest. Fix: delete {directory} and rerun its rule."
        )
    return Signal.load(path)


def sequences(
    teacher: Path, source: Path, out: Path, settings: DistillSettings, bundle: Path | None, llama_cpp: str | None
) -> dict:
    """Teacher completions of prompts cut from the data source: through the teacher's own llama.cpp bundle
    (its launch.sh on loopback) or through transformers; greedy, so a rerun gives the same text."""
    from transformers import AutoTokenizer

    from deepcast import sequences as producers
    from deepcast.tools import locate

    options = settings.sequences
    tokenizer = AutoTokenizer.from_pretrained(teacher, trust_remote_code=False)
    text = "\n\n".join(read_texts(source, settings.text_field))
    prompts = producers.prompts_from_text(text, tokenizer, options.prompts, options.prompt_tokens, settings.seed)
    started = time.perf_counter()
    if bundle is not None:
        llama = locate(llama_cpp)
        top_k = settings.loss.top_k
        records = producers.generate_with_bundle(bundle, prompts, options.max_new_tokens, settings.seed, top_k, llama)
        producer = producers.bundle_producer(bundle, llama)
    else:
        records = producers.generate_with_transformers(teacher, prompts, options.max_new_tokens, settings.seed)
        producer = producers.transformers_producer(teacher)
    seconds = round(time.perf_counter() - started, 2)
    return producers.write(records, {**options.model_dump(), "seed": settings.seed}, producer, out, seconds)


# ---------------------------------------------------------------------------------------------------
# The student's starting point


def copy_tokenizer(teacher: Path, dest: Path, architecture: str) -> None:
    """The teacher's tokenizer files; for a Llama student, a tokenizer class that keeps the ids identical
    (transformers would otherwise load LlamaTokenizer for model_type llama and change them, and llama.cpp's
    converter would reject the pre-tokenizer; distill.md 5.2)."""
    for name in TOKENIZER_FILES:
        if (teacher / name).is_file():
            shutil.copy2(teacher / name, dest / name)
    if architecture != "deepseek_v3":
        keep_token_ids(dest)


def keep_token_ids(directory: Path) -> None:
    """Name a tokenizer class in tokenizer_config.json that reads tokenizer.json as it is, whatever the model type."""
    path = Path(directory) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2) + "\n")


def check_same_ids(teacher: Path, student: Path, label: str) -> None:
    """The student's tokenizer must give the teacher's ids, or logit KD compares different tokens."""
    from transformers import AutoTokenizer

    probe = "To be, or not to be: that is the question. 12345 — naïve café\n\tend"
    first = AutoTokenizer.from_pretrained(teacher, trust_remote_code=False)(probe)["input_ids"]
    second = AutoTokenizer.from_pretrained(student, trust_remote_code=False)(probe)["input_ids"]
    if first != second:
        raise DeepcastError(
            f"logit KD needs one tokenizer, but the teacher ({teacher}) and the student {label} tokenize "
            f"differently ({len(first)} against {len(second)} ids on a probe). Fix: set method: sequences for this "
            "student, which trains on teacher text instead of teacher logits."
        )


def projected(embeddings, hidden: int):
    """The teacher's token embeddings in `hidden` dimensions: as they are when the sizes match, else their
    projection onto the leading principal directions, rescaled to the teacher's mean row norm (a start that
    keeps which tokens are alike, where a random one keeps nothing)."""
    import torch

    if hidden >= embeddings.shape[1]:
        return torch.nn.functional.pad(embeddings, (0, hidden - embeddings.shape[1]))
    _, _, directions = torch.linalg.svd(embeddings - embeddings.mean(0), full_matrices=False)
    low = embeddings @ directions[:hidden].T
    return low * (embeddings.norm(dim=1).mean() / low.norm(dim=1).mean())


def initial_student(spec: StudentSpec, teacher: Path, base: Path | None, dest: Path, seed: int) -> None:
    """Write the untrained student into `dest`: pruned teacher layers, a random inline shape, or a base checkpoint."""
    import torch
    from safetensors.torch import load_file, save_file

    teacher_config = _read_config(teacher)
    dest.mkdir(parents=True, exist_ok=True)
    if spec.kind == "hf" and spec.source is not None:
        for path in base.iterdir():
            if path.is_file() and path.name != MANIFEST:
                link_or_copy(path, dest / path.name)
        return
    config = student_config(spec, teacher_config)
    architecture = "deepseek_v3" if config.get("model_type") == "deepseek_v3" else "llama"
    if spec.kind == "prune":
        keep = prune_layers(spec, teacher_config)
        renumber = {old: new for new, old in enumerate(keep)}
        weights = {}
        for name, tensor in load_file(teacher / "model.safetensors").items():
            parts = name.split(".")
            if parts[:2] == ["model", "layers"]:
                layer = int(parts[2])
                if layer not in renumber:
                    continue
                parts[2] = str(renumber[layer])
            weights[".".join(parts)] = tensor.contiguous()
        save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
        (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
        if spec.shape.copy_embeddings:
            embeddings = load_file(teacher / "model.safetensors")["model.embed_tokens.weight"].float()
            model.get_input_embeddings().weight.data.copy_(projected(embeddings, spec.shape.hidden))
        model.save_pretrained(dest, safe_serialization=True)
    copy_tokenizer(teacher, dest, architecture)


# ---------------------------------------------------------------------------------------------------
# Training


class WindowData:
    """Training examples: the i-th window of the seeded order with its teacher top-k."""

    def __init__(self, cached: Signal):
        self.signal = cached

    def __len__(self) -> int:
        return len(self.signal.order)

    def __getitem__(self, index: int) -> dict:
        s, window = self.signal, int(self.signal.order[index])
        return {
            "input_ids": s.input_ids[window].long(),
            "topk_ids": s.topk_ids[window],
            "topk_logprobs": s.topk_logprobs[window],
            "tail_mass": s.tail_mass[window],
        }


def make_trainer_class():
    """A Trainer whose loss is (1 - alpha) CE + alpha KD on the cached positions, and whose data order is fixed."""
    import torch
    from transformers import Trainer

    class DistillTrainer(Trainer):
        def __init__(self, *args, alpha: float, temperature: float, first: int, positions: int, **kwargs):
            super().__init__(*args, **kwargs)
            self.alpha, self.temperature, self.first, self.positions = alpha, temperature, first, positions
            self.parts: dict[str, list[float]] = {"ce": [], "kd": []}

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            # transformers 5 fuses MoE experts in memory (experts.gate_up_proj) but saves them per expert; its
            # own resume loads the file's keys as they are and silently keeps the experts at their starting
            # values. from_pretrained converts them.
            from transformers import AutoModelForCausalLM

            saved = AutoModelForCausalLM.from_pretrained(resume_from_checkpoint, dtype=torch.float32,
                                                         trust_remote_code=False, use_safetensors=True)  # fmt: skip
            (model or self.model).load_state_dict(saved.state_dict(), strict=True)

        def _get_train_sampler(self, train_dataset=None):
            # The windows are already in the seeded order; student and control read them alike.
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids = inputs["input_ids"]
            keep = ids.shape[1] - self.first  # logits from `first` to the end; the last one predicts nothing
            logits = model(input_ids=ids, logits_to_keep=keep).logits[:, : self.positions].float()
            targets = ids[:, self.first + 1 : self.first + 1 + self.positions]
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            kd = sparse_forward_kl(
                logits, inputs["topk_ids"], inputs["topk_logprobs"], inputs["tail_mass"], self.temperature
            ).mean()
            self.parts["ce"].append(ce.item())
            self.parts["kd"].append(kd.item())
            loss = (1 - self.alpha) * ce + self.alpha * kd
            return (loss, {"logits": logits}) if return_outputs else loss

        def log(self, logs, start_time=None):
            for name, values in self.parts.items():
                if values and "loss" in logs:
                    logs[name] = round(sum(values) / len(values), 6)
                    values.clear()
            super().log(logs, start_time)

    return DistillTrainer


def _collate(examples: list[dict]) -> dict:
    import torch

    return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}


def _complete(checkpoint: Path) -> bool:
    """The Trainer writes trainer_state.json last and not atomically: a checkpoint is whole once it parses."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return True


def _last_checkpoint(state: Path) -> Path | None:
    """The newest whole checkpoint; a half-written one (a kill during the save) is removed, never resumed."""
    found = sorted(state.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    while found and not _complete(found[-1]):
        remove(found.pop())
    return found[-1] if found else None


def _resume_point(state: Path, settings: dict) -> Path | None:
    """The last checkpoint to resume from, refused when it was written with other settings."""
    recorded = state / SETTINGS_FILE
    if not recorded.is_file():
        remove(state)
        return None
    if json.loads(recorded.read_text()) != settings:
        raise DeepcastError(
            f"{state} holds a training run with other settings; deepcast never mixes two runs. "
            f"Fix: delete {state} to start over, or restore the settings it was written with ({recorded})."
        )
    return _last_checkpoint(state)


def trainer_arguments(state: Path, settings: DistillSettings, device: str) -> dict:
    """What both trainers share: the budget, AdamW with a cosine schedule, a checkpoint every save_steps (two
    kept, so a kill during a save leaves the previous one whole), full determinism on the CPU, bf16 on a GPU."""
    return dict(
        output_dir=str(state),
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=settings.warmup_ratio,
        weight_decay=settings.weight_decay,
        max_grad_norm=1.0,
        logging_steps=1,
        save_steps=settings.save_steps,
        save_total_limit=2,
        report_to=[],
        seed=settings.seed,
        data_seed=settings.seed,
        full_determinism=device == "cpu",
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        dataloader_num_workers=0,
    )


def train_logits(model, cached: Signal, state: Path, settings: DistillSettings, alpha: float, device: str):
    from transformers import TrainingArguments

    args = TrainingArguments(**trainer_arguments(state, settings, device), remove_unused_columns=False)
    trainer_class = make_trainer_class()
    return trainer_class(
        model=model,
        args=args,
        train_dataset=WindowData(cached),
        data_collator=_collate,
        alpha=alpha,
        temperature=settings.loss.temperature,
        first=cached.first_position,
        positions=cached.positions,
    )


def train_sequences(model, tokenizer, records: Path, state: Path, settings: DistillSettings, device: str):
    """Sequence-level KD: TRL's SFTTrainer on teacher completions, the loss on completion tokens only."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in records.read_text(encoding="utf-8").splitlines() if line.strip()]
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    args = SFTConfig(**trainer_arguments(state, settings, device), max_length=settings.window,
                     completion_only_loss=True)  # fmt: skip
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)


def model_card(spec: StudentSpec, teacher_name: str, method: str, settings: dict, facts: dict) -> str:
    alpha = settings["loss"]["alpha"]
    what = "cross-entropy only (the same-budget control)" if alpha == 0 and method == "logits" else (
        f"forward KL on the teacher's top-{settings['loss']['top_k']} (alpha {alpha}, temperature "
        f"{settings['loss']['temperature']})" if method == "logits" else "sequence-level KD on teacher completions"
    )  # fmt: skip
    return (
        "---\n"
        f"base_model: {teacher_name}\n"
        "library_name: transformers\n"
        "tags: [distillation, deepcast]\n"
        "---\n\n"
        f"# {facts['name']}\n\n"
        f"A {facts['parameters']:,}-parameter student of {teacher_name} ({facts['architecture']}, {spec.kind} start), "
        f"trained by deepcast with {what}: {facts['steps']} steps, {facts['tokens_seen']:,} tokens seen "
        f"({facts['loss_tokens']:,} in the loss).\n\n"
        f"Settings: `{json.dumps(settings, sort_keys=True)}`\n"
    )


def train(
    spec: StudentSpec, teacher: Path, teacher_name: str, data: Path, out: Path, settings: DistillSettings,
    alpha: float, base: Path | None = None, name: str | None = None,
) -> dict:  # fmt: skip
    """Train one student (or its control, alpha 0) and write its checkpoint, model card and loss curve."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = name or spec.name
    method = method_of(spec, settings)
    recorded = run_settings(settings, alpha)
    recorder = Recorder("distill_train", {"student": spec.model_dump(), **recorded}, seed=settings.seed)
    recorder.input("teacher_config", teacher / "config.json")
    state = out.parent / TRAIN_STATE
    resume = _resume_point(state, recorded) if state.exists() else None
    device = pick_device(settings.device)
    downloaded = spec.kind == "hf" and spec.source is not None
    if downloaded and parameters_of(_read_config(base)) >= parameters_of(_read_config(teacher)):
        raise DeepcastError(
            f"student {spec.name} ({spec.source}) is no smaller than its teacher. Fix: choose a smaller student."
        )
    state.mkdir(parents=True, exist_ok=True)
    initial = state / "initial"  # rebuilt on every start, so a resumed run sees the same tokenizer files
    remove(initial)
    try:
        initial_student(spec, teacher, base, initial, settings.seed)
        if method == "logits":
            check_same_ids(teacher, initial, f"{spec.name} ({spec.source or spec.kind})")
    except DeepcastError:
        if resume is None:
            remove(state)  # a refused student leaves nothing behind
        raise
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_pretrained(
        initial, dtype=torch.float32, trust_remote_code=False, use_safetensors=True
    )
    tokenizer = AutoTokenizer.from_pretrained(initial, trust_remote_code=False)
    (state / SETTINGS_FILE).write_text(json.dumps(recorded, sort_keys=True))
    if method == "logits":
        cached = verified_signal(data)
        recorder.inputs["signal"] = read(data)["files"][SIGNAL]["sha256"]  # just verified: no second hash
        trainer = train_logits(model, cached, state, settings, alpha, device)
        loss_tokens = settings.steps * settings.batch_size * cached.positions
    else:
        recorder.input("sequences", data / "sequences.jsonl")
        trainer = train_sequences(model, tokenizer, data / "sequences.jsonl", state, settings, device)
        loss_tokens = None
    started = time.perf_counter()
    outcome = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - started
    with atomic_path(out) as tmp:
        tmp.mkdir()
        # The Trainer turns the KV cache off for training; the student serves with the setting it started with.
        trainer.model.config.use_cache = _read_config(initial).get("use_cache", True)
        trainer.model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        for path in initial.iterdir():
            if path.name in TOKENIZER_FILES:
                shutil.copy2(path, tmp / path.name)
        history = [entry for entry in trainer.state.log_history if "loss" in entry]
        steps_run = settings.steps - (int(resume.name.split("-")[1]) if resume else 0)
        tokens_seen = settings.steps * settings.batch_size * settings.window
        facts = {
            "name": name,
            # What a downloaded checkpoint's manifest says of its origin, for the bundles' READMEs.
            "source": name,
            "resolved_revision": out.parent.name,
            "method": method,
            "alpha": alpha,
            "architecture": _read_config(tmp)["architectures"][0],
            "parameters": sum(p.numel() for p in trainer.model.parameters()),
            "teacher_parameters": parameters_of(_read_config(teacher)),
            "steps": settings.steps,
            "resumed_from_step": int(resume.name.split("-")[1]) if resume else None,
            "tokens_seen": tokens_seen,
            "loss_tokens": loss_tokens or 0,
            "train_seconds": round(seconds, 1),
            "train_tokens_per_s": round(steps_run * settings.batch_size * settings.window / seconds, 1),
            "device": device,
            "final_loss": history[-1]["loss"] if history else outcome.training_loss,
            "first_loss": history[0]["loss"] if history else None,
        }
        (tmp / "training_log.json").write_text(json.dumps(history, indent=1) + "\n")
        (tmp / "README.md").write_text(model_card(spec, teacher_name, method, recorded, facts))
        recorder.results = facts
        recorder.write(tmp)
    remove(state)
    return recorder.results


# ---------------------------------------------------------------------------------------------------
# The student against the teacher


def evaluate(student: Path, teacher: Path, reference: Path, out: Path, batch_size: int = 4) -> dict:
    """Perplexity, KL(teacher || student) and top-1 agreement on the teacher's reference tokens."""
    from deepcast.perplexity import compare

    chunks = json.loads((reference / "chunks.json").read_text())
    recorder = Recorder("distill_evaluate", {"batch_size": batch_size})
    recorder.input("chunks", reference / "chunks.json")
    recorder.input("student", student / "model.safetensors")
    model, teacher_model = _load_model(student, "cpu"), _load_model(teacher, "cpu")
    figures = compare(model, teacher_model, chunks, batch_size).as_dict()
    teacher_ppl = json.loads((reference / "perplexity.json").read_text())["perplexity"]
    facts = read(student)["results"]
    results = {
        **figures,
        "teacher_perplexity": teacher_ppl,
        "perplexity_ratio_to_teacher": round(figures["perplexity"] / teacher_ppl, 4),
        **{key: facts[key] for key in ("name", "method", "alpha", "parameters", "teacher_parameters", "steps",
                                         "tokens_seen", "train_tokens_per_s", "final_loss", "first_loss")},
    }  # fmt: skip
    curve = json.loads((student / "training_log.json").read_text())
    texts = {"evaluation.json": json.dumps(results, indent=2) + "\n", "training_log.json": json.dumps(curve) + "\n"}
    return recorder.save(out, results, texts)


# ---------------------------------------------------------------------------------------------------
# The summary: students, controls and the teacher side by side


def summary(evaluations: list[Path], teacher_reference: Path, teacher_name: str, out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads((e / "evaluation.json").read_text()) for e in evaluations]
    teacher_ppl = json.loads((teacher_reference / "perplexity.json").read_text())["perplexity"]
    table = [
        "<table><tr><th>model</th><th>method</th><th>alpha</th><th>parameters</th><th>steps</th><th>perplexity</th>"
        "<th>x teacher</th><th>KLD to teacher</th><th>top-1 agreement %</th><th>train tokens/s</th></tr>",
        f"<tr><td>{teacher_name} (teacher)</td><td>-</td><td>-</td><td>{rows[0]['teacher_parameters']:,}</td>"
        f"<td>-</td><td>{teacher_ppl:.2f}</td><td>1.00</td><td>0</td><td>100</td><td>-</td></tr>"
        if rows else "",
    ]  # fmt: skip
    for row in rows:
        table.append(
            f"<tr><td>{row['name']}</td><td>{row['method']}</td><td>{row['alpha']}</td><td>{row['parameters']:,}</td>"
            f"<td>{row['steps']}</td><td>{row['perplexity']:.2f}</td><td>{row['perplexity_ratio_to_teacher']:.2f}</td>"
            f"<td>{row['kl_divergence']:.4f}</td><td>{row['same_top_token_percent']:.1f}</td>"
            f"<td>{row['train_tokens_per_s']:,.0f}</td></tr>"
        )
    table.append("</table>")
    near = [row["name"] for row in rows if row["parameters"] > 0.8 * row["teacher_parameters"]]
    note = (
        f"<p>{', '.join(near)} keep(s) more than 80 % of the teacher's parameters (a tokenizer's embedding can "
        "dominate a small model): these rows show quality transfer against the same-budget control (same "
        "start, data order and steps, cross-entropy only), not compression.</p>"
        if near else ""
    )
    figure, axis = plt.subplots(figsize=(7, 4))
    for evaluation, row in zip(evaluations, rows, strict=True):
        curve = json.loads((evaluation / "training_log.json").read_text())
        axis.plot([e["step"] for e in curve], [e["loss"] for e in curve], label=f"{row['name']} (alpha {row['alpha']})")
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
    axis.set_title(f"Distillation from {teacher_name}")
    axis.legend()
    with atomic_path(out) as tmp:
        tmp.mkdir()
        page = f"<h2>Students of {teacher_name}</h2>\n{note}\n" + "\n".join(table) + "\n"
        (tmp / "students.html").write_text(page)
        figure.savefig(tmp / "loss-curves.svg", format="svg")
        (tmp / "rows.json").write_text(json.dumps(rows, indent=2) + "\n")
    plt.close(figure)
    return {"students": [row["name"] for row in rows]}
