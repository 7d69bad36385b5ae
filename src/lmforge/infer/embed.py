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
        self.tokenizer.no_padding()  # `embed` pads each batch itself, after sorting the texts by length
        self.pad_id = 0 if pad is None else pad
        self.device = device

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 32) -> tuple[Tensor, int]:
        """Unit-length mean-pooled embeddings (N, C) on the CPU, in the order of `texts`, and the number of tokens
        read. Batches take the texts longest first, so a batch pads little (98% real tokens instead of ~75% in
        input order on mixed-length chunks: 1.3x faster; sentence-transformers sorts by characters)."""
        encodings = self.tokenizer.encode_batch(list(texts))
        order = sorted(range(len(texts)), key=lambda i: -len(encodings[i].ids))
        out = torch.empty(len(texts), self.model.config.hidden_size)
        tokens = 0
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = len(encodings[rows[0]].ids)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, T)
            mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
            for r, i in enumerate(rows):
                n = len(encodings[i].ids)
                ids[r, :n], mask[r, :n] = torch.tensor(encodings[i].ids), 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            hidden = self.model(ids, attention_mask=mask).last_hidden_state  # (B, T, C)
            out[rows] = torch.nn.functional.normalize(mean_pool(hidden, mask), dim=-1).cpu()
            tokens += int(mask.sum())
        return out, tokens
