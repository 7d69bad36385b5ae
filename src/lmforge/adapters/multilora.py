"""Many LoRA adapters over one base in memory, chosen per row of a batch (multi-LoRA serving, as S-LoRA and
vLLM do): a request for adapter a and one for adapter b decode in the same forward pass.

Each adapted Linear becomes a `BankedLinear`: W x + b plus, for row i, s_a B_a A_a x with a = the row's adapter.
The adapters' tensors are stacked per layer, zero-padded to the largest rank, with slot 0 all zeros (the base):
A (slots, r, in) and B (slots, out, r) with the scaling folded into B. `LoraBank.select(slots)` sets the rows'
slots for the next forward passes. LoRA without DoRA only: DoRA rescales the whole updated weight per adapter,
which has no per-row form that keeps the base matmul shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from lmforge.adapters.io import adapter_kind, check_base
from lmforge.adapters.lora import read_lora
from lmforge.errors import LmforgeError
from lmforge.model.linear import Linear


class BankedLinear(Linear):
    """A base Linear whose rows add their own adapter's s B A x (none for slot 0)."""

    def __init__(self, base: nn.Linear, bank: LoraBank) -> None:
        # Built on meta, then given the base's Parameters: the base weight is shared, never copied.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.bank = bank
        self.A: Tensor | None = None  # (slots, r, in)
        self.B: Tensor | None = None  # (slots, out, r), scaling folded in

    def forward(self, x: Tensor) -> Tensor:  # x (B, T, in)
        result = super().forward(x)  # (B, T, out)
        slots = self.bank.slots
        if self.A is None or slots is None or self.bank.only_base:
            return result
        if self.bank.single is not None:  # one adapter for every row: two plain matmuls
            a = self.bank.single
            return result + (x @ self.A[a].T) @ self.B[a].T
        # Per row: (B, T, in) @ (B, in, r) @ (B, r, out); slot 0's zeros add nothing.
        return result + torch.bmm(torch.bmm(x, self.A[slots].transpose(1, 2)), self.B[slots].transpose(1, 2))


class LoraBank:
    """The adapters served over one base model, by name; `select` picks each row's adapter."""

    def __init__(self, model: nn.Module, base_dir: Path | None = None) -> None:
        self.model, self.base_dir = model, base_dir
        self.adapters: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}  # name -> layer -> (A, s B)
        self.layers: dict[str, BankedLinear] = {}
        self.slots: Tensor | None = None  # (B,) the rows' slots for the next forward passes
        self.single: int | None = None  # the one slot every row has, if they share one
        self.only_base = True

    @property
    def names(self) -> list[str]:
        """The adapters' names, in slot order (slot i + 1)."""
        return list(self.adapters)

    def slot(self, name: str | None) -> int:
        """The slot of adapter `name` (0: the base)."""
        return 0 if name is None else self.names.index(name) + 1

    def add(self, name: str, adapter_dir: Path) -> None:
        """Load the LoRA adapter of `adapter_dir` as `name` (checked against the base before anything changes)."""
        if name in self.adapters:
            raise LmforgeError(f"adapter {name!r} is already loaded: unload it first")
        adapter_dir = Path(adapter_dir)
        kind = adapter_kind(adapter_dir)
        if kind != "lora":
            raise LmforgeError(
                f"{adapter_dir}: a {kind!r} adapter cannot share a batch with others (only LoRA can); serve it "
                "on its own: lmforge serve BASE --adapter DIR"
            )
        if self.base_dir is not None:
            check_base(adapter_dir, self.base_dir)
        lora = read_lora(self.model, adapter_dir)
        if lora.dora:
            raise LmforgeError(
                f"{adapter_dir}: a DoRA adapter cannot share a batch with others; merge it into the base "
                "(lmforge merge) or serve it on its own: lmforge serve BASE --adapter DIR"
            )
        like = next(self.model.parameters())
        self.adapters[name] = {
            layer: (
                lora.tensors[f"{layer}.lora_A.weight"].to(like.device, like.dtype),  # (r, in)
                (lora.tensors[f"{layer}.lora_B.weight"].float() * lora.scaling).to(like.device, like.dtype),
            )
            for layer in lora.layers
        }
        self._restack()

    def remove(self, name: str) -> None:
        """Unload adapter `name` (the slots of the others may change: select again after)."""
        if name not in self.adapters:
            raise LmforgeError(f"no adapter {name!r} is loaded; loaded: {', '.join(self.names) or 'none'}")
        del self.adapters[name]
        self._restack()

    def select(self, slots: Sequence[int]) -> None:
        """Each row's slot for the next forward passes: (B,) of ints, 0 for the base."""
        self.only_base = not any(slots)
        self.single = slots[0] if len(set(slots)) == 1 else None
        device = next(self.model.parameters()).device
        self.slots = torch.tensor(list(slots), dtype=torch.long, device=device)

    def _restack(self) -> None:
        """Wrap every layer some adapter adapts; stack each layer's (A, s B) by slot, padded to the largest r."""
        wanted = {layer for tensors in self.adapters.values() for layer in tensors}
        for layer in sorted(wanted - set(self.layers)):
            banked = BankedLinear(self.model.get_submodule(layer), self)
            self.model.set_submodule(layer, banked)
            self.layers[layer] = banked
        for layer, banked in self.layers.items():
            pairs = [tensors.get(layer) for tensors in self.adapters.values()]
            r = max((a.shape[0] for a, _ in filter(None, pairs)), default=0)
            if r == 0:
                banked.A = banked.B = None
                continue
            like = {"device": banked.weight.device, "dtype": banked.weight.dtype}
            A = torch.zeros(len(pairs) + 1, r, banked.in_features, **like)
            B = torch.zeros(len(pairs) + 1, banked.out_features, r, **like)
            for slot, pair in enumerate(pairs, 1):
                if pair is not None:
                    A[slot, : pair[0].shape[0]], B[slot, :, : pair[1].shape[1]] = pair
            banked.A, banked.B = A, B
