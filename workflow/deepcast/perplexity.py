"""Perplexity the way llama-perplexity computes it, so HF and GGUF figures compare.

The text is tokenized once (with BOS if the tokenizer adds one) and cut into
chunks of `n_ctx` tokens; only the second half of each chunk is scored, every
token there seeing at least n_ctx/2 tokens of context.

The reference stage keeps the 16-bit model's log-probabilities at the scored positions (`LOG_PROBS`), as
llama-perplexity keeps its KL-divergence base: a validation then reads them back instead of loading and
running the 16-bit model a second time, and holds one model, not two.
"""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from deepcast.errors import DeepcastError

LOG_PROBS = "log_probs.npy"
# float16's lowest finite value: its exp() is 0 as the true probability's is, where -inf would make the KL's
# 0 * -inf a NaN. float16 keeps 11 significant bits: 0.05 % of a log-probability near the top of the
# distribution, where the KL divergence's weight is.
LOG_PROB_FLOOR = float(torch.finfo(torch.float16).min)


@dataclass
class Perplexity:
    perplexity: float
    mean_nll: float
    tokens_scored: int
    chunks: int
    n_ctx: int

    def as_dict(self) -> dict:
        return asdict(self)


def chunk_tokens(tokens: list[int], bos_id: int | None, n_ctx: int, max_chunks: int) -> list[list[int]]:
    """Chunks as llama-perplexity forms them from text tokenized with special tokens.

    When the tokenizer adds BOS (`bos_id` given), every chunk starts with it; when it
    does not (DeepSeek-V3's tokenizer_config, Qwen), chunks are plain slices.
    """
    count = min(len(tokens) // n_ctx, max_chunks)
    chunks = [list(tokens[i * n_ctx : (i + 1) * n_ctx]) for i in range(count)]
    if bos_id is not None:
        for chunk in chunks:
            chunk[0] = bos_id
    return chunks


class LogProbWriter:
    """The scored positions' log-probabilities as one float16 array (chunks, positions, vocabulary) in numpy's
    .npy format (no pickle), written a block of positions at a time, so memory does not grow with the chunks."""

    def __init__(self, path: Path, chunks: int, positions: int):
        self.path, self.shape, self.file = Path(path), (chunks, positions), None

    def add(self, log_probs: torch.Tensor) -> None:
        if self.file is None:
            self.file = self.path.open("wb")
            header = {"descr": "<f2", "fortran_order": False, "shape": (*self.shape, log_probs.shape[-1])}
            np.lib.format.write_array_header_1_0(self.file, header)
        log_probs.clamp_min(LOG_PROB_FLOOR).to(torch.float16).cpu().numpy().tofile(self.file)

    def __enter__(self) -> LogProbWriter:
        return self

    def __exit__(self, *_) -> None:
        if self.file is not None:
            self.file.close()


def scored_positions(n_ctx: int) -> int:
    """Positions scored per chunk: the second half, each predicting the next token (llama-perplexity's)."""
    return n_ctx - n_ctx // 2 - 1


class StoredLogProbs:
    """A reference's `LOG_PROBS`, read back a batch of chunks at a time, in order, into one reused buffer, and
    hashed as it is read, on a thread beside the scoring. A context manager: leaving it without an error refuses
    a file that differs from the digest its manifest lists, after the one read the scoring needs anyway instead
    of a second one before it."""

    def __init__(self, path: Path, sha256: str, chunks: int, positions: int):
        self.path, self.sha256 = Path(path), sha256
        self.file = self.path.open("rb")
        version = np.lib.format.read_magic(self.file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(self.file)
        if shape[:2] != (chunks, positions) or dtype != np.float16:
            self.file.close()
            raise DeepcastError(
                f"{path} holds {shape[0]} chunks of {shape[1]} positions ({dtype}), the evaluation has {chunks} "
                f"of {positions}: it is another reference's. "
                "Fix: rerun the reference rule (snakemake --forcerun reference)."
            )
        self.shape, self.buffer = shape, bytearray()
        header_size = self.file.tell()
        self.file.seek(0)
        self.digest = hashlib.sha256(self.file.read(header_size))
        self.hasher = ThreadPoolExecutor(max_workers=1)  # hashlib releases the GIL, as torch does
        self.hashed: Future | None = None

    def read(self, chunks: int) -> torch.Tensor:
        """The next `chunks` chunks' log-probabilities, float16 (converted a block at a time by the caller), in
        the buffer that the next call refills: the caller is done with them by then."""
        size = chunks * math.prod(self.shape[1:]) * 2
        self.wait_for_hash()  # of the buffer's last batch, before it is overwritten
        if len(self.buffer) < size:
            self.buffer = bytearray(size)
        data = memoryview(self.buffer)[:size]
        if self.file.readinto(data) != size:
            raise DeepcastError(
                f"{self.path} is truncated. Fix: delete {self.path.parent} and rerun the reference rule."
            )
        self.hashed = self.hasher.submit(self.digest.update, data)
        return torch.frombuffer(data, dtype=torch.float16).view(chunks, *self.shape[1:])

    def wait_for_hash(self) -> None:
        if self.hashed is not None:
            self.hashed.result()

    def __enter__(self) -> StoredLogProbs:
        return self

    def __exit__(self, error_type, *_) -> None:
        self.wait_for_hash()
        self.hasher.shutdown()
        if error_type is None:
            self.digest.update(self.file.read())
        self.file.close()
        if error_type is None and self.digest.hexdigest() != self.sha256:
            raise DeepcastError(
                f"{self.path} differs from the sha256 its manifest lists: the file is corrupt. "
                f"Fix: delete {self.path.parent} and rerun the reference rule (snakemake --forcerun reference)."
            )


@torch.no_grad()
def evaluate(model, chunks: list[list[int]], batch_size: int = 4, progress=None,
             keep: LogProbWriter | None = None) -> Perplexity:  # fmt: skip
    """Perplexity on the chunks; `keep` also receives the log-probabilities at every scored position."""
    if not chunks:
        raise ValueError("no evaluation chunks: the evaluation text is shorter than one context")
    n_ctx = len(chunks[0])
    first = n_ctx // 2
    total_nll = 0.0
    for start in range(0, len(chunks), batch_size):
        ids = torch.tensor(chunks[start : start + batch_size])
        total_nll += batch_nll(scored_logits(model, ids, first), ids[:, first + 1 :], keep)
        if progress is not None:
            progress.update(ids.shape[0])
    scored = len(chunks) * scored_positions(n_ctx)
    mean = float(total_nll) / scored
    return Perplexity(math.exp(mean), mean, scored, len(chunks), n_ctx)


def batch_nll(logits: torch.Tensor, targets: torch.Tensor, keep: LogProbWriter | None) -> torch.Tensor:
    """The batch's summed NLL. A function of its own so that the batch's logits (and the blocks' views of them)
    are freed before the next batch's are computed: memory holds one batch, not two."""
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for rows, row_targets in positions(logits, targets.to(logits.device)):
        log_probs = torch.log_softmax(rows, dim=-1)
        total -= log_probs.gather(-1, row_targets.unsqueeze(-1)).double().sum()
        if keep is not None:
            keep.add(log_probs)
    return total


@dataclass
class Comparison:
    """A quantized model against the 16-bit one on the same scored tokens, as llama-perplexity's KLD mode."""

    perplexity: float
    kl_divergence: float  # mean KL(16-bit || quantized) per scored token
    same_top_token_percent: float
    tokens_scored: int

    def as_dict(self) -> dict:
        return asdict(self)


def model_device(model) -> torch.device:
    """Where a transformers model's weights are; the CPU for a callable without parameters (an ONNX session)."""
    parameters = getattr(model, "parameters", None)
    return next(parameters()).device if parameters else torch.device("cpu")


def scored_logits(model, ids: torch.Tensor, first: int) -> torch.Tensor:
    """Float logits, on the model's device, at the scored positions (first .. n_ctx-2, each predicting the next token).

    A transformers model computes its output layer only there (`logits_to_keep`): with a 129,280-token
    vocabulary that layer is most of an embedded model's work, and the unscored half's logits would double
    the memory. Any other callable (an onnxruntime-genai session) that takes input_ids and returns an
    object with .logits gets every position, sliced here."""
    n_ctx = ids.shape[1]
    if getattr(model, "parameters", None) is None:
        return model(input_ids=ids).logits[:, first : n_ctx - 1].float()
    logits = model(input_ids=ids.to(model_device(model)), logits_to_keep=n_ctx - first).logits
    return logits[:, :-1].float()


POSITIONS_PER_BLOCK = 4


def positions(*batches: torch.Tensor):
    """The scored positions of a batch, `POSITIONS_PER_BLOCK` at a time, as (logits, ...) blocks of the same
    positions of each tensor. A log-softmax over a 129,280-token vocabulary allocates a temporary the size of
    its input; at one chunk's 255 positions that is 132 MB, fresh pages from the kernel for every operation,
    where a block's 2 MB stays in the cache (bench/scoring.py measures the two)."""
    for row in range(batches[0].shape[0]):
        for start in range(0, batches[0].shape[1], POSITIONS_PER_BLOCK):
            yield tuple(batch[row, start : start + POSITIONS_PER_BLOCK] for batch in batches)


def all_finite(values: torch.Tensor) -> bool:
    """No NaN or infinity, from the extremes (NaN propagates through them): 20x faster than isfinite().all()
    on a batch of 129,280-wide logits, which allocates a flag per value."""
    return bool(torch.isfinite(torch.stack([values.amax(), values.amin()])).all())


@torch.no_grad()
def compare(model, reference, chunks: list[list[int]], batch_size: int = 4) -> Comparison:
    """Perplexity, KL divergence and top-1 agreement on the second half of every chunk, against `reference`: a
    model, or its `StoredLogProbs` on these chunks (the caller's `with` checks the file). Memory holds one
    batch's scored logits of each and one block's intermediates, whatever the number of chunks."""
    n_ctx = len(chunks[0])
    first = n_ctx // 2
    sums = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(chunks), batch_size):
        ids = torch.tensor(chunks[start : start + batch_size])
        quantized = scored_logits(model, ids, first)
        from_file = isinstance(reference, StoredLogProbs)
        base = reference.read(ids.shape[0]) if from_file else scored_logits(reference, ids, first)
        sums += batch_comparison(quantized, base, ids[:, first + 1 :]).cpu()  # one device sync per batch
        del quantized, base  # before the next batch's logits: memory holds one batch of each, not two
    scored = len(chunks) * scored_positions(n_ctx)
    nll, kld, same = sums.tolist()
    return Comparison(math.exp(nll / scored), kld / scored, 100 * same / scored, scored)


def batch_comparison(quantized_logits: torch.Tensor, base_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The batch's summed NLL, KL divergence and top-1 agreements, in that order; the blocks' views of the
    logits go with the function's frame."""
    if not all_finite(quantized_logits):
        raise ValueError("the quantized model returned NaN or infinite logits")
    device = quantized_logits.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for quantized_rows, base_rows, row_targets in positions(
        quantized_logits, base_logits.to(device), targets.to(device)
    ):
        quantized = torch.log_softmax(quantized_rows, dim=-1)
        base = torch.log_softmax(base_rows.float(), dim=-1)
        sums[0] -= quantized.gather(-1, row_targets.unsqueeze(-1)).double().sum()
        sums[1] += torch.nn.functional.kl_div(quantized, base, reduction="sum", log_target=True).double()
        sums[2] += (base.argmax(-1) == quantized.argmax(-1)).sum()
    return sums
