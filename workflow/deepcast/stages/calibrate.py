"""Calibration set: N samples of at most L tokens, one file shared by every quantizer.

`samples.jsonl` holds text and token ids (llm-compressor reads the ids);
`samples.txt` holds the same texts for llama-imatrix.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from deepcast import hub
from deepcast.config import CalibrationSettings
from deepcast.errors import DeepcastError
from deepcast.files import atomic_path, remove
from deepcast.manifest import Recorder

MIN_TOKENS = 16


def _text_blocks(text: str, size: int) -> list[str]:
    blocks, current = [], ""
    for paragraph in text.split("\n\n"):
        if not paragraph.strip():
            continue
        current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current) >= size:
            blocks.append(current)
            current = ""
    return blocks + ([current] if current.strip() else [])


def read_documents(path: Path, text_field: str, block_chars: int) -> list[str]:
    if not path.is_file():
        raise DeepcastError(f"calibration source {path} does not exist. Fix: set calibration.source to a file.")
    if path.suffix == ".jsonl":
        documents = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DeepcastError(f"{path}:{number} is not JSON. Fix the line or use a .txt source.") from None
            if text_field not in record:
                raise DeepcastError(f"{path}:{number} has no field {text_field!r}. Fix: set calibration.text_field.")
            documents.append(str(record[text_field]))
    else:
        documents = _text_blocks(path.read_text(encoding="utf-8"), block_chars)
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise DeepcastError(
            f"calibration source {path} is empty. Fix: give it text, or use calibration.source: corpus."
        )
    return documents


def fetch_hub_dataset(spec: str, dest: Path) -> Path:
    """hf-dataset://org/name@revision: the repo's .jsonl/.txt files, concatenated into one local file."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = spec.removeprefix("hf-dataset://").partition("@")
    try:
        local = Path(
            snapshot_download(
                repo_id,
                repo_type="dataset",
                revision=revision or None,
                allow_patterns=["*.jsonl", "*.txt"],
                local_dir=dest / "dataset",
                endpoint=hub.endpoint(),
                token=hub.token(),
            )
        )
    except (HfHubHTTPError, LocalEntryNotFoundError) as error:
        raise DeepcastError(
            f"cannot fetch calibration dataset {spec}: {str(error).splitlines()[0]}. "
            "Fix: check the id and revision, the network or HF_ENDPOINT, and HF_TOKEN for private data."
        ) from None
    files = sorted(local.rglob("*.jsonl")) or sorted(local.rglob("*.txt"))
    if not files:
        raise DeepcastError(f"{spec} has no .jsonl or .txt files. Fix: name a text dataset.")
    merged = dest / ("dataset" + files[0].suffix)
    merged.write_text("\n".join(f.read_text(encoding="utf-8").rstrip("\n") for f in files) + "\n", encoding="utf-8")
    return merged


def build_samples(documents: list[str], tokenizer, settings: CalibrationSettings) -> list[list[int]]:
    order = list(range(len(documents)))
    random.Random(settings.seed).shuffle(order)
    samples = []
    for index in order:
        text = documents[index]
        if settings.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
        ids = tokenizer(text, add_special_tokens=not settings.chat_template)["input_ids"][: settings.sequence_length]
        if len(ids) >= MIN_TOKENS:
            samples.append(ids)
        if len(samples) == settings.samples:
            break
    return samples


def run(checkpoint: Path, source_file: Path, out: Path, settings: CalibrationSettings) -> dict:
    recorder = Recorder("calibrate", settings.model_dump(), seed=settings.seed)
    from_hub = settings.source.startswith("hf-dataset://")
    # Blocks of about four characters per token fill a sample. A local source is read (and refused) before
    # the tokenizer loads: a missing or empty file is told in a second, not after transformers' start-up.
    block_chars = 4 * settings.sequence_length
    documents = None if from_hub else read_documents(source_file, settings.text_field, block_chars)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=False)
    if settings.chat_template and not tokenizer.chat_template:
        raise DeepcastError("calibration.chat_template is on but the tokenizer has no chat template. Fix: turn it off.")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        if from_hub:
            source_file = fetch_hub_dataset(settings.source, tmp)
            documents = read_documents(source_file, settings.text_field, block_chars)
        recorder.input("source", source_file)
        samples = build_samples(documents, tokenizer, settings)
        if not samples:
            raise DeepcastError(
                f"calibration source {settings.source if source_file.is_relative_to(tmp) else source_file} "
                f"has no text of at least {MIN_TOKENS} tokens. Fix: give it more text."
            )
        texts = [tokenizer.decode(ids) for ids in samples]
        with open(tmp / "samples.jsonl", "w", encoding="utf-8") as handle:
            for text, ids in zip(texts, samples, strict=True):
                handle.write(json.dumps({"text": text, "input_ids": ids}) + "\n")
        (tmp / "samples.txt").write_text("\n\n".join(texts) + "\n", encoding="utf-8")
        for leftover in ("dataset", "dataset.jsonl", "dataset.txt"):
            remove(tmp / leftover)
        recorder.results = {
            "samples": len(samples),
            "requested_samples": settings.samples,
            "tokens": sum(len(s) for s in samples),
        }
        recorder.write(tmp)
    return recorder.results
