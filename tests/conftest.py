"""Fixtures shared by the test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one intra-op thread each. With torch's default (one per core) every OpenMP
    # region of one worker waits on a thread the other worker's process has taken, and tests run 2-3x slower.
    import torch

    torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _cache_folder(tmp_path_factory) -> None:
    """lmforge's cache in a temporary folder (inherited by CLI subprocesses), not the user's ~/.cache."""
    os.environ["LMFORGE_CACHE"] = str(tmp_path_factory.mktemp("lmforge-cache"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the checkout (the real datasets); tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the shared datasets at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def story_dataset(tmp_path_factory) -> Path:
    """A prepared, highly repetitive text dataset (400 short stories) with its own 300-id BPE."""
    from lmforge.data.prepare import PrepareConfig, prepare
    from lmforge.tokenizer import train_tokenizer

    story = "the cat sat on the mat and the dog ran to the park where the children played until dark"
    root = tmp_path_factory.mktemp("stories")
    docs = [f"{story} {i % 7}" for i in range(400)]
    src = root / "corpus.txt"
    src.write_text("\n\n".join(docs) + "\n")
    tok = train_tokenizer(docs, "bpe", 300, root / "tok")
    prepare(PrepareConfig(inputs=[src], tokenizer=tok, num_proc=1, dedup="off"), root / "data")
    return root / "data"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny Llama with a 300-id BPE (and its chat template): for the engine's command-line and server
    tests."""
    import torch

    from lmforge.model.configs import preset
    from lmforge.model.hf import build_model, save_model
    from lmforge.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tiny-model")
    train_tokenizer(["the cat sat on the mat", "a dog ran"] * 40, "bpe", 300, path)
    torch.manual_seed(0)
    save_model(build_model(preset("tiny-llama", vocab_size=300, eos_token_id=3, pad_token_id=0)), path)
    return path


@pytest.fixture(scope="session")
def tiny_lora_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Two PEFT LoRA adapters of the tiny Llama, saved by PEFT itself: "a" (r 4 on q, v) and "b" (r 8 on q, o,
    down), their B scaled up so that the three models' greedy outputs differ."""
    import torch

    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny-loras")
    out = {}
    for name, seed, r, targets in [
        ("a", 1, 4, ["q_proj", "v_proj"]),
        ("b", 2, 8, ["q_proj", "o_proj", "down_proj"]),
    ]:
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
        model = peft.get_peft_model(base, config)
        with torch.no_grad():
            for key, p in model.named_parameters():
                if "lora_B" in key:
                    p.mul_(20)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out
