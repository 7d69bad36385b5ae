"""Packing with isolation: a packed sample's per-token losses equal the sample alone (fp32, 1e-5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.data.batches import sft_rows
from lmforge.model.configs import preset
from lmforge.model.decoder import IGNORE_INDEX, positions_from_segments
from lmforge.model.hf import build_model


def _samples(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(3, 12))
        ids = rng.integers(6, 60, length)
        mask = np.zeros(length, dtype=np.uint8)
        mask[int(rng.integers(1, length)) :] = 1  # the "reply": a suffix, as chat data has
        out.append((ids, mask))
    return out


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral"])
def test_packed_losses_equal_unpacked(name: str) -> None:
    torch.manual_seed(0)
    overrides = {"vocab_size": 64, "sliding_window": 4} if name == "tiny-mistral" else {"vocab_size": 64}
    model = build_model(preset(name, **overrides)).eval()
    samples = _samples(9)
    rows, counts = sft_rows(samples, 24, pad_id=0, pack=True)
    assert counts["cut"] == 0 and len(rows["input_ids"]) < len(samples)  # several samples share rows
    with torch.no_grad():
        packed = model(rows["input_ids"], rows["targets"], segment_ids=rows["segment_ids"], reduction="none")
        seen = []
        for r in range(len(rows["input_ids"])):
            for seg in range(int(rows["segment_ids"][r].max()) + 1):
                at = (rows["segment_ids"][r] == seg).nonzero().flatten()
                k = next(
                    i
                    for i, (ids, _) in enumerate(samples)
                    if rows["input_ids"][r, at].tolist() == ids.tolist()
                )
                seen.append(k)
                ids, mask = samples[k]
                alone_in = torch.from_numpy(ids)[None]
                alone_t = torch.from_numpy(ids[1:].copy())
                alone_t[torch.from_numpy(mask[1:] == 0)] = IGNORE_INDEX
                alone_t = torch.cat([alone_t, torch.tensor([IGNORE_INDEX])])[None]
                alone = model(alone_in, alone_t, reduction="none")[0]
                assert torch.equal(rows["targets"][r, at], alone_t[0])
                torch.testing.assert_close(packed[r, at], alone, atol=1e-5, rtol=0)
    assert sorted(seen) == list(range(len(samples)))  # every sample packed exactly once


def test_rows_never_train_across_samples_or_on_prompts() -> None:
    samples = _samples(12, seed=1)
    for pack in (True, False):
        rows, _ = sft_rows(samples, 16, pad_id=0, pack=pack)
        targets = rows["targets"]
        # Unpacked rows hold one right-padded sample: segment 0, then padding.
        seg = rows["segment_ids"] if pack else torch.where(rows["input_ids"] != 0, 0, -1)
        # A target exists only where the next position is in the same sample and that token is a reply token.
        same_next = torch.zeros_like(seg, dtype=torch.bool)
        same_next[:, :-1] = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] >= 0)
        assert not ((targets != IGNORE_INDEX) & ~same_next).any()
        counted = sum(int(m[1:].sum()) for _, m in samples)
        assert int((targets != IGNORE_INDEX).sum()) == counted
    unpacked, _ = sft_rows(samples, 16, pad_id=0, pack=False)
    assert len(unpacked["input_ids"]) == len(samples) and "segment_ids" not in unpacked


def test_long_samples_are_cut_and_counted() -> None:
    rows, counts = sft_rows([(np.arange(10), None), (np.arange(3), None)], 6, pad_id=0, pack=True)
    assert counts == {"cut": 1, "dropped": 0, "tokens": 9}
    assert rows["input_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 0, 0]]
    assert rows["targets"][1].tolist() == [1, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]


def test_positions_restart_per_segment() -> None:
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    assert positions_from_segments(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def test_samples_with_nothing_left_to_train_are_dropped() -> None:
    long_prompt = (np.arange(10), np.array([0] * 8 + [1, 1]))  # its reply lies beyond 6 tokens
    short = (np.arange(4), np.array([0, 0, 1, 1]))
    no_reply = (np.arange(3), np.zeros(3, dtype=np.int64))
    for pack in (True, False):
        rows, counts = sft_rows([long_prompt, short, no_reply], 6, pad_id=0, pack=pack)
        assert counts == {"cut": 1, "dropped": 2, "tokens": 4}
        assert rows["input_ids"].tolist() == [[0, 1, 2, 3, 0, 0]]
        assert rows["targets"][0].tolist() == [IGNORE_INDEX, 2, 3] + [IGNORE_INDEX] * 3


def test_padded_rows_cut_each_batch_to_its_longest_sample() -> None:
    from lmforge.data.batches import classification_rows
    from lmforge.data.samplers import PaddedRows

    rows = PaddedRows(classification_rows([(np.arange(3), 0), (np.arange(7), 1), (np.arange(2), 2)], 10, 0))
    batch = rows.batch(np.array([0, 2]), torch.Generator())
    assert batch["input_ids"].shape == (2, 3) and batch["labels"].tolist() == [0, 2]
    assert rows.batch(np.array([1]), torch.Generator())["attention_mask"].tolist() == [[1] * 7]


def test_length_grouped_order_is_a_permutation_with_less_padding() -> None:
    from lmforge.data.batches import classification_rows
    from lmforge.data.samplers import EpochSampler, PaddedRows, fixed

    rng = np.random.default_rng(0)
    samples = [(np.arange(1, int(n) + 1), 0) for n in rng.integers(2, 60, size=1003)]
    plain = PaddedRows(classification_rows(samples, 64, 0))
    grouped = PaddedRows(classification_rows(samples, 64, 0), group_by_length=True)
    order = grouped.order(np.random.default_rng(1), 8)
    assert sorted(order.tolist()) == list(range(1003))  # every sample once; the 3 left over stay last
    assert (order == grouped.order(np.random.default_rng(1), 8)).all()  # the cursor's rng decides it

    def columns(examples: PaddedRows) -> int:
        sampler = EpochSampler(fixed(examples), 8, seed=0)
        return sum(next(sampler)["input_ids"].numel() for _ in range(1000 // 8))  # one epoch

    real = sum(len(ids) for ids, _ in samples)
    assert columns(grouped) < 1.2 * real < 1.5 * real < columns(plain)
