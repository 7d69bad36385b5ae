"""Sentence embeddings from an encoder directory: mean pooling over real tokens, L2-normalised (what
sentence-transformers' all-MiniLM-L6-v2 pipeline computes)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.model.encoder import mean_pool
from lmforge.model.hf import load_model


class Embedder:
    """A BERT-style encoder and its tokenizer, loaded once; `embed` gives (N, C) unit vectors."""

    def __init__(self, model_dir: str | Path, device: str = "cpu") -> None:
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        self.model = load_model(model_dir, device=device).eval()
        if not hasattr(self.model, "config") or self.model.config.model_type != "bert":
            raise LmforgeError(
                f"{model_dir}: embeddings need an encoder (BERT); this is {type(self.model).__name__}"
            )
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        pad = self.tokenizer.token_to_id("[PAD]")
        self.tokenizer.enable_padding(pad_id=0 if pad is None else pad, pad_token="[PAD]")
        self.tokenizer.enable_truncation(self.model.config.max_position_embeddings)
        self.device = device

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 32) -> tuple[Tensor, int]:
        """Unit-length mean-pooled embeddings (N, C) on the CPU, and the number of tokens read."""
        out, tokens = [], 0
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer.encode_batch(list(texts[start : start + batch_size]))
            ids = torch.tensor([e.ids for e in batch], device=self.device)  # (B, T)
            mask = torch.tensor([e.attention_mask for e in batch], device=self.device)  # (B, T)
            hidden = self.model(ids, attention_mask=mask).last_hidden_state  # (B, T, C)
            out.append(torch.nn.functional.normalize(mean_pool(hidden, mask), dim=-1).cpu())
            tokens += int(mask.sum())
        return torch.cat(out), tokens
