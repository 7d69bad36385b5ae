"""Batch builders: CLM windows, MLM masking statistics (against HF's collator), NSP pairs and padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.data.batches import clm_windows, collate, mask_tokens, nsp_pairs, truncate_pair
from lmforge.model.decoder import IGNORE_INDEX

X = IGNORE_INDEX

# ------------------------------------------------------------------------------------------------- CLM


def test_clm_windows_shift_targets_by_one():
    """tokens 0..9, T = 3: N = (10 - 1) // 3 = 3 windows; targets are the inputs shifted by one."""
    w = clm_windows(np.arange(10, dtype=np.uint16), 3)
    assert w["input_ids"].tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert w["targets"].tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert w["input_ids"].dtype == torch.int64


def test_clm_windows_mask_ignores_untrained_targets():
    """Mask 0 on tokens 0-3 and 7 (a prompt and a separator): those targets become IGNORE_INDEX.

    Token 0 is never a target; targets 1, 2, 3 and 7 are ignored; the tail token 9 is dropped (T = 4: N = 2).
    """
    mask = np.array([0, 0, 0, 0, 1, 1, 1, 0, 1, 1], dtype=np.uint8)
    w = clm_windows(np.arange(10), 4, mask)
    assert w["input_ids"].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert w["targets"].tolist() == [[X, X, X, 4], [5, 6, X, 8]]


def test_clm_windows_short_stream_gives_no_window():
    """Fewer than T + 1 tokens: no window, shape (0, T)."""
    assert clm_windows(np.arange(4), 4)["input_ids"].shape == (0, 4)


# ------------------------------------------------------------------------------------------------- MLM

VOCAB, MASK = 1000, 4


def random_ids(seed: int = 0, shape: tuple[int, int] = (64, 512)) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids in [5, VOCAB) with [CLS]=2 first, [SEP]=3 last and a padded tail on odd rows; specials flagged."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, shape, generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    ids[1::2, -100:] = 0
    return ids, torch.isin(ids, torch.tensor([0, 2, 3]))


def fates(ids, special, inputs, labels) -> dict[str, float]:
    """Share of non-special positions chosen, and among chosen ones: [MASK], another id, unchanged."""
    chosen = labels != X
    n = chosen.sum().item()
    return {
        "rate": n / (~special).sum().item(),
        "mask": (inputs[chosen] == MASK).sum().item() / n,
        "random": ((inputs[chosen] != MASK) & (inputs[chosen] != ids[chosen])).sum().item() / n,
        "kept": (inputs[chosen] == ids[chosen]).sum().item() / n,
    }


def test_mask_tokens_statistics_80_10_10():
    """~30k non-special positions: rate 0.15 (σ ≈ 0.002), and 80/10/10 among the ~4.5k chosen (σ ≈ 0.006)."""
    ids, special = random_ids()
    inputs, labels = mask_tokens(
        ids, special, vocab_size=VOCAB, mask_id=MASK, generator=torch.Generator().manual_seed(1)
    )
    f = fates(ids, special, inputs, labels)
    assert f["rate"] == pytest.approx(0.15, abs=0.01)
    assert f["mask"] == pytest.approx(0.8, abs=0.02)
    assert f["random"] == pytest.approx(0.1, abs=0.02)
    assert f["kept"] == pytest.approx(0.1, abs=0.02)
    # Labels hold the original ids exactly where chosen; unchosen and special positions are untouched.
    chosen = labels != X
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])
    assert not chosen[special].any()


def test_mask_tokens_rate_is_configurable():
    """rate 0.4 chooses ~40% of the non-special positions; rate 0 chooses none."""
    ids, special = random_ids()
    g = torch.Generator().manual_seed(2)
    _, labels = mask_tokens(ids, special, vocab_size=VOCAB, mask_id=MASK, rate=0.4, generator=g)
    assert (labels != X).sum().item() / (~special).sum().item() == pytest.approx(0.4, abs=0.01)
    _, labels = mask_tokens(ids, special, vocab_size=VOCAB, mask_id=MASK, rate=0.0, generator=g)
    assert (labels == X).all()


def test_mask_tokens_deterministic_for_a_seed():
    """The same seed gives the same masking; another seed a different one."""
    ids, special = random_ids(shape=(4, 64))

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return mask_tokens(ids, special, vocab_size=VOCAB, mask_id=MASK, generator=g)

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_mask_tokens_matches_hf_collator_statistics():
    """transformers.DataCollatorForLanguageModeling on the same ids: the same rate and 80/10/10 (tolerance 0.02)."""
    from tokenizers import Tokenizer, models
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    names = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(names)}, unk_token="[UNK]"))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )  # fmt: skip
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=0)
    ids, special = random_ids()
    hf = fates(ids, special, *collator.torch_mask_tokens(ids.clone(), special))
    g = torch.Generator().manual_seed(0)
    ours = fates(ids, special, *mask_tokens(ids, special, vocab_size=VOCAB, mask_id=MASK, generator=g))
    for key in hf:
        assert ours[key] == pytest.approx(hf[key], abs=0.02), key


# ------------------------------------------------------------------------------------------------- NSP

CLS, SEP = 1, 2


def corpus(n_docs: int, seed: int = 0) -> list[list[np.ndarray]]:
    """Documents of 3-12 sentences of 2-15 tokens; every token id is unique and increases through the corpus,
    so an id tells its document and position."""
    rng = np.random.default_rng(seed)
    docs, next_id = [], 10
    for _ in range(n_docs):
        doc = []
        for _ in range(int(rng.integers(3, 13))):
            n = int(rng.integers(2, 16))
            doc.append(np.arange(next_id, next_id + n))
            next_id += n
        docs.append(doc)
    return docs


def doc_of(docs: list[list[np.ndarray]]) -> dict[int, int]:
    """Token id → index of its document."""
    return {int(t): d for d, doc in enumerate(docs) for s in doc for t in s}


def split_pair(p: dict) -> tuple[np.ndarray, np.ndarray]:
    """The A and B segments of a pair, checking the [CLS] A [SEP] B [SEP] layout and segment ids."""
    ids, types = p["input_ids"], p["token_type_ids"]
    seps = np.flatnonzero(ids == SEP)
    assert ids[0] == CLS and len(seps) == 2 and seps[1] == len(ids) - 1
    assert (types[: seps[0] + 1] == 0).all() and (types[seps[0] + 1 :] == 1).all()
    return ids[1 : seps[0]], ids[seps[0] + 1 : -1]


def test_nsp_pairs_layout_labels_and_sources():
    """Half the pairs have a random B (within 0.05 over ~1000 pairs, σ ≈ 0.016); B of a true pair follows A
    in A's document; B of a random pair comes from another document; every pair fits max_len."""
    docs = corpus(300)
    owner = doc_of(docs)
    pairs = nsp_pairs(docs, max_len=32, cls_id=CLS, sep_id=SEP, rng=np.random.default_rng(1))
    assert len(pairs) > 800
    labels = np.array([p["next_sentence_label"] for p in pairs])
    assert labels.mean() == pytest.approx(0.5, abs=0.05)
    for p in pairs:
        assert len(p["input_ids"]) <= 32
        a, b = split_pair(p)
        assert len(a) and len(b)
        a_docs, b_docs = {owner[int(t)] for t in a}, {owner[int(t)] for t in b}
        assert len(a_docs) == 1 and len(b_docs) == 1
        if p["next_sentence_label"] == 0:
            assert a_docs == b_docs and a.max() < b.min()  # B continues A in the same document
        else:
            assert a_docs != b_docs


def test_nsp_pairs_never_use_validation_documents():
    """Pairs built from the train split contain no validation token: random B is drawn from the given split only."""
    docs = corpus(60, seed=2)
    train, validation = docs[:45], docs[45:]
    held_out = {int(t) for doc in validation for s in doc for t in s}
    for seed in range(3):
        for p in nsp_pairs(train, max_len=24, cls_id=CLS, sep_id=SEP, rng=np.random.default_rng(seed)):
            assert not held_out.intersection(p["input_ids"].tolist())


def test_nsp_pairs_deterministic_and_need_two_documents():
    """The same rng seed gives the same pairs; one document cannot give a random B."""
    docs = corpus(20)

    def run(seed):
        return nsp_pairs(docs, max_len=20, cls_id=CLS, sep_id=SEP, rng=np.random.default_rng(seed))

    a, b = run(3), run(3)
    assert len(a) == len(b)
    assert all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="two"):
        nsp_pairs(docs[:1], max_len=20, cls_id=CLS, sep_id=SEP, rng=np.random.default_rng(0))


def bert_truncate(
    a: list[int], b: list[int], budget: int, rng: np.random.Generator
) -> tuple[list[int], list[int]]:
    """BERT's truncate_seq_pair, literally: drop one token from the longer side (b on a tie), front or back."""
    a, b = list(a), list(b)
    while len(a) + len(b) > budget:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()
    return a, b


def test_truncate_pair_worked_examples():
    """la 10, lb 4, budget 8: excess 6 = 10 - 4, so only a is cut, to 4 (4 + 4 = 8).
    budget 7: excess 7 > 6, a is cut to 4, then b (tie) to 3: lengths (4, 3) = (ceil(7/2), floor(7/2)).
    la 3, lb 3, budget 10: nothing to cut."""
    rng = np.random.default_rng(0)
    a, b = np.arange(10), np.arange(100, 104)
    assert [len(s) for s in truncate_pair(a, b, 8, rng)] == [4, 4]
    assert [len(s) for s in truncate_pair(a, b, 7, rng)] == [4, 3]
    assert [len(s) for s in truncate_pair(a[:3], b[:3], 10, rng)] == [3, 3]


def test_truncate_pair_matches_bert_lengths_and_keeps_contiguous_slices():
    """On random lengths and budgets, the final lengths equal BERT's loop and each side stays a contiguous slice."""
    rng = np.random.default_rng(0)
    for _ in range(500):
        la, lb = (int(x) for x in rng.integers(1, 40, size=2))
        budget = int(rng.integers(2, 80))
        a, b = np.arange(la), np.arange(100, 100 + lb)
        ta, tb = truncate_pair(a, b, budget, rng)
        ra, rb = bert_truncate(a.tolist(), b.tolist(), budget, rng)
        assert (len(ta), len(tb)) == (len(ra), len(rb))
        for t in (ta, tb):
            assert len(t) == 0 or (np.diff(t) == 1).all()


def test_collate_pads_with_attention_mask():
    """Two pairs of 5 and 7 tokens: padded to 7 with pad_id 0, attention 1 on real tokens, labels (2,)."""
    p1 = {
        "input_ids": np.array([1, 5, 2, 6, 2]),
        "token_type_ids": np.array([0, 0, 0, 1, 1]),
        "next_sentence_label": 1,
    }
    p2 = {
        "input_ids": np.array([1, 5, 6, 2, 7, 8, 2]),
        "token_type_ids": np.array([0, 0, 0, 0, 1, 1, 1]),
        "next_sentence_label": 0,
    }
    batch = collate([p1, p2], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 2, 6, 2, 0, 0], [1, 5, 6, 2, 7, 8, 2]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [1] * 7]
    assert batch["next_sentence_label"].tolist() == [1, 0]


def test_nsp_pairs_fair_on_short_documents():
    """Documents of 1-3 sentences: labels stay 50/50 (BERT's forced random B for one-sentence chunks would not),
    and a one-sentence document is never an A, only a random B."""
    rng = np.random.default_rng(4)
    docs, next_id = [], 10
    for _ in range(1500):
        doc = []
        for _ in range(int(rng.integers(1, 4))):
            doc.append(np.arange(next_id, next_id + 4))
            next_id += 4
        docs.append(doc)
    owner = doc_of(docs)
    pairs = nsp_pairs(docs, max_len=16, cls_id=CLS, sep_id=SEP, rng=np.random.default_rng(5))
    labels = np.array([p["next_sentence_label"] for p in pairs])
    assert labels.mean() == pytest.approx(0.5, abs=0.04)  # ~1500 pairs, σ ≈ 0.013
    for p in pairs:
        a, _ = split_pair(p)
        assert len(docs[owner[int(a[0])]]) >= 2
