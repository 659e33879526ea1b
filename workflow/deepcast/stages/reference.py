"""Reference evaluation: perplexity of the downloaded checkpoint on the evaluation split, and its scores on the
configured lm-eval tasks.

Every quantized artifact is compared with these figures. The token chunks are
saved with them, so later validations score exactly the same tokens, and so are the
model's log-probabilities at the scored positions, which those validations' KL
divergence is computed against.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from deepcast import tasks
from deepcast.config import EvaluationSettings, ValidateSettings
from deepcast.errors import DeepcastError
from deepcast.files import atomic_path
from deepcast.manifest import Recorder, verify
from deepcast.perplexity import LOG_PROBS, LogProbWriter, chunk_tokens, evaluate, scored_positions
from deepcast.validation import pick_device


def run(checkpoint: Path, evaluation_text: Path, out: Path, settings: EvaluationSettings,
        task_settings: ValidateSettings | None = None) -> dict:  # fmt: skip
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    verify(checkpoint)
    task_settings = task_settings or ValidateSettings()
    task_fields = task_settings.model_dump(mode="json", include=tasks.FIELDS)
    recorder = Recorder("reference", {**settings.model_dump(), "tasks": task_fields})
    recorder.input("evaluation_text", evaluation_text)
    for name, path in sorted(task_settings.task_data.items()):
        recorder.input(f"task_data:{name}", path)
    text = evaluation_text.read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=False)
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    adds_bos = tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]
    chunks = chunk_tokens(ids, tokenizer.bos_token_id if adds_bos else None, settings.context, settings.max_chunks)
    if not chunks:
        raise DeepcastError(
            f"{evaluation_text} has {len(ids)} tokens, fewer than one {settings.context}-token chunk. "
            "Fix: use a longer evaluation text or a smaller evaluation.context."
        )
    device = pick_device(settings.device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = (
        AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, trust_remote_code=False, use_safetensors=True)
        .to(device)
        .eval()
    )
    positions = scored_positions(settings.context)
    log_prob_bytes = len(chunks) * positions * model.config.vocab_size * 2
    with atomic_path(out, needed_bytes=log_prob_bytes) as tmp:
        tmp.mkdir()
        with (
            LogProbWriter(tmp / LOG_PROBS, len(chunks), positions) as keep,
            tqdm(total=len(chunks), desc="perplexity", unit="chunk") as bar,
        ):
            result = evaluate(model, chunks, settings.batch_size, progress=bar, keep=keep)
        figures = {**result.as_dict(), "device": device, "dtype": str(dtype).removeprefix("torch.")}
        scores = tasks.run(task_settings, "hf", model=model, tokenizer=tokenizer)
        texts = {
            "chunks.json": json.dumps(chunks),
            "perplexity.json": json.dumps(figures, indent=2) + "\n",
            tasks.REFERENCE_FILE: json.dumps(scores, indent=2) + "\n",
        }
        results = {**result.as_dict(), "device": device, "tasks": scores.get("scores", {})}
        return recorder.complete(tmp, results, texts)
