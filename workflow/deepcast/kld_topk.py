"""The teacher signal from a GGUF teacher: llama-perplexity's dense KL-divergence base, reduced to top-k.

Layout of a `--kl-divergence-base` file, all little-endian, as tools/perplexity/perplexity.cpp of the
pinned tree writes it (perplexity() and the uint16 `log_softmax`) and kl_divergence() reads it back:

    char[8]  "_logits_"                          perplexity.cpp:466
    int32    n_ctx (the -c given)                perplexity.cpp:467
    int32    n_vocab, int32 n_chunk              perplexity.cpp:521-522
    int32    tokens[n_chunk * n_ctx]             perplexity.cpp:523
    per chunk, n_ctx - 1 - n_ctx/2 records of nv = 2*((n_vocab + 1)/2) + 4 uint16 (perplexity.cpp:524, 172):
        float32 scale, float32 min_log_prob      (the first 4 uint16; perplexity.cpp:95-97)
        uint16  q[n_vocab], then one pad uint16 when n_vocab is odd
    log-prob of token i = scale * q[i] + min_log_prob in fp32   (the reader, perplexity.cpp:225)

Record j of a chunk holds the logits at position n_ctx/2 + j, which predict token n_ctx/2 + j + 1
(perplexity.cpp:540, 573, 610-613: logits from `first` on, scored against tokens[i+1]); the last
position's logits predict nothing inside the chunk and are not saved. The tokens are those of the
text, not of the forward pass: when the model adds BOS, llama-perplexity feeds it at each chunk's
start and restores the stored token afterwards (perplexity.cpp:563-579).

The writer raises every log-prob more than 16 below the top one to that floor (q = 0), so the decoded
distribution sums to up to about 1.4 % more than one (measured on DeepSeek's vocabulary); the tail
mass is therefore 1 minus the top-k mass, never the decoded rest.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

from deepcast.errors import DeepcastError
from deepcast.gguf_file import read_header
from deepcast.kd import Signal
from deepcast.stages.gguf import KLD_BASE, run_tool, verified_gguf
from deepcast.tools import LlamaCpp

MAGIC = b"_logits_"
HEADER = struct.Struct("<8s3i")  # magic, n_ctx, n_vocab, n_chunk
PRODUCER = "llama.cpp"


def record_width(n_vocab: int) -> int:
    """uint16 per saved position: two fp32 (scale, floor) and n_vocab levels, padded to an even count."""
    return 2 * ((n_vocab + 1) // 2) + 4


def reduce(kld_base_file: Path, k: int, bos_id: int | None = None) -> Signal:
    """The top-k signal of a KL-divergence base, read one chunk at a time.

    `bos_id` is the teacher's BOS token: when the stored text starts with it (the model adds BOS),
    every window's first token becomes BOS, as the teacher saw it (deepcast.perplexity.chunk_tokens).
    """
    with open(kld_base_file, "rb") as handle:
        header = handle.read(HEADER.size)
        if not header.startswith(MAGIC):
            raise DeepcastError(f"{kld_base_file} is not a llama-perplexity --kl-divergence-base file.")
        if len(header) < HEADER.size:
            raise DeepcastError(
                f"{kld_base_file} holds no chunks: llama-perplexity writes them only for a text of at least "
                "two contexts of tokens. Fix: use a longer text or a smaller context."
            )
        _, n_ctx, n_vocab, n_chunk = HEADER.unpack(header)
        first = n_ctx // 2
        positions, width = n_ctx - 1 - first, record_width(n_vocab)
        expected = HEADER.size + 4 * n_chunk * n_ctx + 2 * n_chunk * positions * width
        if kld_base_file.stat().st_size != expected:
            raise DeepcastError(
                f"{kld_base_file} has {kld_base_file.stat().st_size} bytes, not the {expected} its header "
                f"(n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk}) implies: truncated or not from this "
                "llama.cpp. Fix: rerun llama-perplexity --kl-divergence-base."
            )
        if k > n_vocab:
            raise DeepcastError(f"top-k of {k} exceeds the vocabulary of {n_vocab} in {kld_base_file}.")
        tokens = np.fromfile(handle, "<i4", count=n_chunk * n_ctx).reshape(n_chunk, n_ctx)
        ids = torch.empty(n_chunk, positions, k, dtype=torch.int32)
        logprobs = torch.empty(n_chunk, positions, k, dtype=torch.float16)
        tail = torch.empty(n_chunk, positions, dtype=torch.float16)
        for chunk in range(n_chunk):
            records = np.fromfile(handle, "<u2", count=positions * width).reshape(positions, width)
            chunk_ids, chunk_logprobs, chunk_tail = top_k_of_records(records, n_vocab, k)
            ids[chunk], logprobs[chunk], tail[chunk] = chunk_ids, chunk_logprobs, chunk_tail
    if bos_id is not None and tokens[0, 0] == bos_id:
        tokens[:, 0] = bos_id
    order = torch.arange(len(tokens), dtype=torch.int32)  # each chunk once, in file order
    return Signal(torch.from_numpy(tokens), ids, logprobs, tail, order, first, PRODUCER)


def top_k_of_records(records: np.ndarray, n_vocab: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode one chunk's records as kl_divergence() does (fp32 scale * level + floor) and keep the top k."""
    scale_and_floor = np.ascontiguousarray(records[:, :4]).view("<f4")
    dense = records[:, 4 : 4 + n_vocab].astype(np.float32)
    dense *= scale_and_floor[:, :1]
    dense += scale_and_floor[:, 1:2]
    values, ids = torch.from_numpy(dense).topk(k, dim=-1, sorted=True)
    tail = (1.0 - values.exp().sum(-1)).clamp_min(0.0)
    return ids.to(torch.int32), values.to(torch.float16), tail.to(torch.float16)


def bos_token(model: Path, llama: LlamaCpp) -> int | None:
    """The GGUF's BOS id, from its header."""
    value = read_header(model, llama).metadata.get("tokenizer.ggml.bos_token_id")
    return None if value is None else int(value)


def produce(gguf_dir: Path, text: Path, context: int, chunks: int, k: int, threads: int, llama: LlamaCpp) -> Signal:
    """The top-k signal of a GGUF teacher on `text`; the dense file lives only in a temporary directory.

    The dense file takes about 2 * n_vocab bytes per position (260 kB for DeepSeek's vocabulary), so the
    temporary directory (TMPDIR) must hold that for all chunks of one call.
    """
    model = verified_gguf(gguf_dir)
    with tempfile.TemporaryDirectory(prefix="deepcast-kld-") as scratch:
        dense = Path(scratch) / KLD_BASE
        run_tool(
            [llama.tool("llama-perplexity"), "-m", model, "-f", text, "-c", context, "--chunks", chunks,
             "-t", threads, "--kl-divergence-base", dense],
            "llama-perplexity",
        )  # fmt: skip
        return reduce(dense, k, bos_token(model, llama))
