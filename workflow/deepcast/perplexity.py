"""Perplexity the way llama-perplexity computes it, so HF and GGUF figures compare.

The text is tokenized once (with BOS if the tokenizer adds one) and cut into
chunks of `n_ctx` tokens; only the second half of each chunk is scored, every
token there seeing at least n_ctx/2 tokens of context.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


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


@torch.no_grad()
def evaluate(model, chunks: list[list[int]], batch_size: int = 4, progress=None) -> Perplexity:
    if not chunks:
        raise ValueError("no evaluation chunks: the evaluation text is shorter than one context")
    n_ctx = len(chunks[0])
    first = n_ctx // 2
    device = next(model.parameters()).device
    total_nll, scored = 0.0, 0
    for start in range(0, len(chunks), batch_size):
        ids = torch.tensor(chunks[start : start + batch_size], device=device)
        logits = model(input_ids=ids).logits.float()
        logprobs = torch.log_softmax(logits[:, first : n_ctx - 1], dim=-1)
        targets = ids[:, first + 1 : n_ctx]
        nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        total_nll += nll.double().sum().item()
        scored += nll.numel()
        if progress is not None:
            progress.update(ids.shape[0])
    mean = total_nll / scored
    return Perplexity(math.exp(mean), mean, scored, len(chunks), n_ctx)


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


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Float logits on the CPU from a transformers model on any device, or from any callable model
    (an onnxruntime-genai session) that takes input_ids and returns an object with .logits."""
    return model(input_ids=ids.to(model_device(model))).logits.float().cpu()


@torch.no_grad()
def compare(model, reference_model, chunks: list[list[int]], batch_size: int = 4) -> Comparison:
    """Perplexity, KL divergence and top-1 agreement on the second half of every chunk."""
    n_ctx = len(chunks[0])
    first = n_ctx // 2
    nll = kld = same = 0.0
    scored = 0
    for start in range(0, len(chunks), batch_size):
        ids = torch.tensor(chunks[start : start + batch_size])
        quantized = torch.log_softmax(_logits(model, ids)[:, first : n_ctx - 1], dim=-1)
        base = torch.log_softmax(_logits(reference_model, ids)[:, first : n_ctx - 1], dim=-1)
        if not torch.isfinite(quantized).all():
            raise ValueError("the quantized model returned NaN or infinite logits")
        targets = ids[:, first + 1 : n_ctx]
        nll -= quantized.gather(-1, targets.unsqueeze(-1)).double().sum().item()
        kld += (base.exp() * (base - quantized)).sum(-1).double().sum().item()
        same += (base.argmax(-1) == quantized.argmax(-1)).sum().item()
        scored += targets.numel()
    return Comparison(math.exp(nll / scored), kld / scored, 100 * same / scored, scored)
