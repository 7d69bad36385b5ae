"""`lmforge merge`: a LoRA adapter folded into its base's weights, written as a plain HF model directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge import __version__
from lmforge.adapters.io import adapter_kind, base_fingerprint, load_with_adapter
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write, staging_dir
from lmforge.model.hf import save_model
from lmforge.paths import check_output
from lmforge.tokenizer import copy_tokenizer


def merge_adapter(base: Path, adapter: Path, out: Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Load `base`, apply the LoRA `adapter`, fold it into the weights and save the plain model to `out` (a model
    already there is replaced only with `overwrite`, once the new one is written whole)."""
    from lmforge.adapters.lora import merge_lora

    check_output(out, "model", inputs=[base, adapter], overwrite=overwrite)
    kind = adapter_kind(adapter)
    if kind != "lora":
        raise LmforgeError(
            f"{adapter}: a {kind} adapter adds computation that no weight can absorb; only LoRA merges "
            "(use --adapter with generate/chat instead)"
        )
    merged = merge_lora(load_with_adapter(base, adapter)).eval()
    lineage = {"parent": str(base), "adapter": str(adapter), "stage": "merge", "lmforge_version": __version__,
               "base_fingerprint": base_fingerprint(base)}  # fmt: skip
    adapter_lineage = adapter / "lmforge.json"
    if adapter_lineage.is_file():
        lineage["adapter_lineage"] = json.loads(adapter_lineage.read_text())
    with staging_dir(out) as tmp:  # the model appears whole; an old one is removed last
        save_model(merged, tmp)
        copy_tokenizer(adapter if (adapter / "tokenizer.json").exists() else base, tmp)
        atomic_write(tmp / "lmforge.json", json.dumps(lineage, indent=2) + "\n")
    return {"model": str(out), "base": str(base), "adapter": str(adapter)}
