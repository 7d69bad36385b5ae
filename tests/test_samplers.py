"""Resumable micro-batch streams: CLM/MLM windows, NSP pairs and mixes continue exactly from a saved cursor."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from lmforge.data.samplers import (
    EpochSampler,
    MaskedWindows,
    MaskSpec,
    MixSampler,
    Windows,
    fixed,
    sentence_pairs,
    split_sentences,
)
from lmforge.model.decoder import IGNORE_INDEX

CLS, SEP, PAD, MASK = 1, 2, 0, 3
SPEC = MaskSpec(vocab_size=50, mask_id=MASK, special_ids=(CLS, SEP, PAD), rate=0.3)
STREAM = np.arange(4, 404) % 46 + 4  # ordinary ids 4..49


def documents(n: int = 12) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(0)
    return [[rng.integers(4, 50, rng.integers(3, 9)) for _ in range(6)] for _ in range(n)]


def samplers() -> dict[str, callable]:
    return {
        "clm": lambda seed: EpochSampler(fixed(Windows(STREAM, 16)), 4, seed=seed),
        "mlm": lambda seed: EpochSampler(fixed(MaskedWindows(STREAM, 16, CLS, SEP, SPEC)), 4, seed=seed),
        "mlm+nsp": lambda seed: EpochSampler(
            sentence_pairs(documents(), max_len=24, cls_id=CLS, sep_id=SEP, pad_id=PAD, seed=seed, spec=SPEC),
            4,
            seed=seed,
        ),
    }


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cursor_resumes_every_stream_exactly_across_epochs():
    for name, make in samplers().items():
        reference = make(7)
        n_per_epoch = reference.n // 4
        whole = list(itertools.islice(reference, 3 * n_per_epoch + 1))  # crosses two epoch boundaries
        for cut in (1, n_per_epoch, 2 * n_per_epoch + 1):
            first = make(7)
            for _ in range(cut):
                next(first)
            resumed = make(7)
            resumed.load_state_dict(first.state_dict())
            rest = list(itertools.islice(resumed, len(whole) - cut))
            assert all(same(a, b) for a, b in zip(rest, whole[cut:], strict=True)), (name, cut)
        assert not same(whole[0], next(make(8))), name  # another seed, another order


def test_windows_are_the_permuted_clm_windows():
    sampler = EpochSampler(fixed(Windows(STREAM, 16)), 4, seed=3)
    order = np.random.default_rng([3, 0]).permutation(sampler.n)
    batch = next(sampler)
    starts = torch.from_numpy(order[:4] * 16)
    assert torch.equal(batch["input_ids"][:, 0], torch.from_numpy(STREAM)[starts])
    assert torch.equal(batch["targets"][:, :-1], batch["input_ids"][:, 1:])


def test_masked_windows_frame_and_mask():
    batch = next(EpochSampler(fixed(MaskedWindows(STREAM, 16, CLS, SEP, SPEC)), 28, seed=0))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == (28, 16)  # 400 tokens // 14 per window
    assert (ids[:, 0] == CLS).all() and (ids[:, -1] == SEP).all()
    assert (labels[:, [0, -1]] == IGNORE_INDEX).all()  # [CLS] and [SEP] are never predicted
    chosen = labels != IGNORE_INDEX
    assert 0.2 < chosen.float().mean() < 0.4  # rate 0.3 over the 14 ordinary positions
    assert ((ids == MASK) <= chosen).all()  # [MASK] only where a label is


def test_sentence_pairs_are_masked_pairs():
    sampler = EpochSampler(
        sentence_pairs(documents(), max_len=24, cls_id=CLS, sep_id=SEP, pad_id=PAD, seed=0, spec=SPEC),
        8,
        seed=0,
    )
    batch = next(sampler)
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "next_sentence_label", "labels"}
    assert batch["input_ids"].shape[1] <= 24 and (batch["input_ids"][:, 0] == CLS).all()
    assert ((batch["labels"] != IGNORE_INDEX) <= (batch["attention_mask"] == 1)).all()  # never on padding


def test_split_sentences_cuts_after_enders():
    parts = split_sentences(np.array([5, 6, 9, 7, 9, 8]), enders=[9])
    assert [p.tolist() for p in parts] == [[5, 6, 9], [7, 9], [8]]


def test_mix_follows_the_weights_exactly_and_resumes():
    def make() -> MixSampler:
        domain = EpochSampler(fixed(Windows(STREAM, 16)), 2, seed=0)
        general = EpochSampler(fixed(Windows(STREAM[::-1].copy(), 16)), 2, seed=0)
        return MixSampler({"domain": domain, "general": general}, {"domain": 4, "general": 1})

    mix = make()
    picks = []
    for _ in range(20):
        before = {k: s.position for k, s in mix.samplers.items()}
        next(mix)
        picks.append(next(k for k, s in mix.samplers.items() if s.position != before[k]))
    assert picks[:5].count("general") == 1 and picks.count("general") == 4  # 0.8 / 0.2, no drift
    resumed = make()
    resumed.load_state_dict(mix.state_dict())
    assert all(
        same(a, b) for a, b in zip(itertools.islice(mix, 7), itertools.islice(resumed, 7), strict=True)
    )
