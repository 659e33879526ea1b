"""Knowledge distillation's two shared pieces: the cached teacher signal and the loss that reads it.

The signal is the teacher's top-k next-token distribution at every loss position of every
distillation window, stored once per teacher revision so that no student run keeps the teacher in
memory or recomputes it: token ids as int32, log-probabilities (temperature 1) as fp16 sorted
best first, and the probability mass outside the top k (fp16) so the loss can keep it as a tail
bucket instead of renormalising it away (DistillKit's `symmetric_uniform`, TRL's `loss_add_tail`).
One safetensors file, never pickle.

Position convention: window tokens x[0..W-1]; the logits at position t predict x[t+1]. A signal
covers the logit positions first .. first+P-1 of each window.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it computes: the workflow imports this module while it parses
    import torch

SIGNAL = "signal.safetensors"
TAIL_FLOOR = 1e-6  # the smallest tail mass the loss trusts (fp16 rounds tiny masses to zero)


@dataclass
class Signal:
    input_ids: torch.Tensor  # int32 [N, W]: each distinct window once
    topk_ids: torch.Tensor  # int32 [N, P, K]
    topk_logprobs: torch.Tensor  # float16 [N, P, K], sorted descending
    tail_mass: torch.Tensor  # float16 [N, P]: 1 - sum(top-k probabilities)
    order: torch.Tensor  # int32 [steps x batch]: the training order, as window numbers (epochs repeat them)
    first_position: int
    producer: str

    @property
    def windows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def positions(self) -> int:
        return self.topk_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[2]

    def bytes_per_position(self) -> int:
        """What one scored position costs on disk: k ids, k log-probs and the tail mass."""
        return self.top_k * (self.topk_ids.element_size() + self.topk_logprobs.element_size()) + 2

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {
            "input_ids": self.input_ids.contiguous(),
            "topk_ids": self.topk_ids.contiguous(),
            "topk_logprobs": self.topk_logprobs.contiguous(),
            "tail_mass": self.tail_mass.contiguous(),
            "order": self.order.contiguous(),
        }
        # One metadata key: safetensors writes several in hash order, which would change the bytes run to run.
        facts = json.dumps({"first_position": self.first_position, "producer": self.producer}, sort_keys=True)
        save_file(tensors, str(path), metadata={"deepcast": facts})

    @classmethod
    def load(cls, path: Path) -> Signal:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["deepcast"])
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
        return cls(
            tensors["input_ids"], tensors["topk_ids"], tensors["topk_logprobs"], tensors["tail_mass"],
            tensors["order"], int(meta["first_position"]), meta["producer"],
        )  # fmt: skip


def top_k_of(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids, their log-probabilities (fp32, sorted) and the mass outside them, from raw logits [..., V]."""
    import torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logprobs.topk(k, dim=-1, sorted=True)
    tail = (1.0 - values.exp().sum(-1)).clamp_min(0.0)
    return ids, values, tail


def sparse_forward_kl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_mass: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(teacher_T || student_T) per position over the teacher's top-k plus one tail bucket, in fp32.

    The temperature is applied to the cached log-probs after the fact: p_i^(1/T) for the kept tokens, and
    for the tail as if its mass were spread evenly over the V - k other tokens (DistillKit's
    `symmetric_uniform`), then renormalised; the student's tail is exact. The result is scaled by T^2
    (Hinton) so its gradient does not shrink with T.
    """
    import torch

    student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = topk_logprobs.float() / temperature
    kept = student.gather(-1, topk_ids.long())
    others = student_logits.shape[-1] - topk_ids.shape[-1]
    if others:
        share = math.log(others)
        tail = share + (tail_mass.float().clamp_min(TAIL_FLOOR).log() - share) / temperature
        teacher = torch.cat([teacher, tail.unsqueeze(-1)], dim=-1)
        student_tail = torch.log1p(-kept.exp().sum(-1).clamp(max=1 - 1e-6))
        kept = torch.cat([kept, student_tail.unsqueeze(-1)], dim=-1)
    teacher = teacher - torch.logsumexp(teacher, dim=-1, keepdim=True)
    kl = (teacher.exp() * (teacher - kept)).sum(-1)
    return kl * temperature**2
