"""Student shapes for distilling a model that fits a target badly: a ladder of standard dense shapes.

Each student is a Llama-style decoder (GQA, SwiGLU, no q/k/v biases) of a published model's width and
depth, with the teacher's vocabulary instead of its own: a student that shares the teacher's tokenizer can
learn from the teacher's logits (logit KD), token by token. The planner (deepcast.stages.plan) sizes and
places each one as it does any model.
"""

from __future__ import annotations

from deepcast.registry import ModelShape

ARCHITECTURE = "LlamaForCausalLM"
# (the model whose shape it is, layers, hidden, heads, kv_heads, intermediate, tied embeddings), smallest first.
# Six are the bases of DeepSeek's own R1-Distill students (config/models/deepseek-r1-distill-*.yaml; a test
# checks they agree); Llama-3.2-3B: meta-llama/Llama-3.2-3B config.json.
LADDER = (
    ("Qwen2.5-1.5B", 28, 1536, 12, 2, 8960, False),
    ("Llama-3.2-3B", 28, 3072, 24, 8, 8192, True),
    ("Qwen2.5-7B", 28, 3584, 28, 4, 18944, False),
    ("Llama-3.1-8B", 32, 4096, 32, 8, 14336, False),
    ("Qwen2.5-14B", 48, 5120, 40, 8, 13824, False),
    ("Qwen2.5-32B", 64, 5120, 40, 8, 27648, False),
    ("Llama-3.3-70B", 80, 8192, 64, 8, 28672, False),
)
METHOD = "logit KD"  # every rung keeps the teacher's tokenizer
# DeepSeek-R1 paper, section 2.4 "Distillation": Qwen and Llama fine-tuned on "800k samples curated with DeepSeek-R1".
SEQUENCE_KD_NOTE = (
    "sequence-level KD (fine-tuning on the teacher's generated answers) needs no shared tokenizer: "
    "DeepSeek's own R1-Distill students (Qwen2.5 and Llama 3 tokenizers) were trained that way, on 800k R1 samples"
)


def ladder(teacher: ModelShape) -> list[tuple[str, ModelShape]]:
    """Every rung as a shape with the teacher's vocabulary and maximum context, largest first."""
    shapes = []
    for name, layers, hidden, heads, kv_heads, intermediate, tied in reversed(LADDER):
        shape = ModelShape(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=hidden // heads,
                           intermediate=intermediate, vocab=teacher.vocab, max_context=teacher.max_context,
                           tied_embeddings=tied)  # fmt: skip
        shapes.append((name, shape))
    return shapes
