"""Helpers shared by the tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def randomize_(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial weights: init leaves norm weights at 1 and biases at 0, which would hide a missing one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm_weight = "norm" in name.lower() and name.endswith(".weight")
            p.copy_(1 + 0.1 * noise if is_norm_weight else 0.15 * noise)


TINY_MODEL = (
    "model.overrides={hidden_size: 64, intermediate_size: 192, num_hidden_layers: 2, num_attention_heads: 4}"
)
"""A `--set` override that makes the pretrain preset a ~0.1M-parameter Llama for fast tests."""


def save_random_hf_decoder(config_cls: str, config: dict, path: Path) -> Path:
    """A seeded random `transformers` decoder (eager attention, `randomize_`d) saved with `save_pretrained`."""
    import transformers

    hf_config = getattr(transformers, config_cls)(**config)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    randomize_(model)
    model.save_pretrained(path)
    return path


def invoke(*args: object):
    """`lmforge ARGS...` in this process (typer's CliRunner), every argument as text."""
    from typer.testing import CliRunner

    from lmforge.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (hidden ones included) with the sha256 of its bytes."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def error(result, code: int = 2) -> str:
    """The one `error:` line of a command that exited `code`, last on stderr (a stage may log before it)."""
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
    assert "Traceback" not in result.output
    return errors[0]


@contextmanager
def interrupted_at(step: int) -> Iterator[None]:
    """Inside the block the one training loop gets Ctrl-C when it asks for step `step`'s micro-batch."""
    import lmforge.train.loop as loop

    real_next = loop._next

    def stop(batches, at):
        if at == step:
            raise KeyboardInterrupt
        return real_next(batches, at)

    loop._next = stop
    try:
        yield
    finally:
        loop._next = real_next
