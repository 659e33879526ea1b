"""The embedded dense student laid out with 32-wide attention heads, for vLLM's CPU attention kernels (head sizes
32, 64, 80, ...; the student's are 16). The copy computes the same function, not an approximation:

- each head's 16 query/key dimensions go to the even slots of the first half and of the second half of a 32-wide
  head, so Llama's rotate-half RoPE pairs the same dimensions at the same frequencies (theta^(-2j/32) at slot 2j
  is theta^(-2i/16) at i); the other slots are zero and add nothing to q.k;
- queries are scaled by sqrt(32/16), undoing the change of softmax scale 1/sqrt(head_dim);
- values are padded with zeros, and o_proj reads only the real slots.

Scaling the bf16 query weights rounds them, so the logits agree to bf16 precision, not bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

WIDE = 32


def slots(narrow: int) -> list[int]:
    """Where each of a narrow head's dimensions goes in a WIDE head."""
    half = narrow // 2
    return [2 * i for i in range(half)] + [WIDE // 2 + 2 * i for i in range(half)]


def widen(source: Path, out: Path) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    config = json.loads((source / "config.json").read_text())
    narrow, heads, kv_heads = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    place = torch.tensor(slots(narrow))
    tensors = load_file(source / "model.safetensors")

    def rows(weight, count, scale=1.0):  # (count * narrow, in) -> (count * WIDE, in)
        wide = weight.new_zeros(count, WIDE, weight.shape[1])
        wide[:, place] = weight.view(count, narrow, -1) * scale
        return wide.reshape(count * WIDE, -1)

    for name in list(tensors):
        weight = tensors[name]
        if name.endswith("self_attn.q_proj.weight"):
            tensors[name] = rows(weight.float(), heads, (WIDE / narrow) ** 0.5).to(weight.dtype)
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            tensors[name] = rows(weight.float(), kv_heads).to(weight.dtype)
        elif name.endswith("self_attn.o_proj.weight"):
            wide = weight.new_zeros(weight.shape[0], heads, WIDE)
            wide[:, :, place] = weight.view(weight.shape[0], heads, narrow)
            tensors[name] = wide.reshape(weight.shape[0], heads * WIDE)
    out.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and path.name not in ("model.safetensors", "config.json", "SHA256SUMS", "README.md"):
            shutil.copy2(path, out / path.name)
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({**config, "head_dim": WIDE}, indent=2) + "\n")
    return out
