"""Pretraining's window sampling: per-epoch reshuffled documents and random offsets (every document once per
epoch, a new order each epoch, resumable) and intra-document masking (a window's per-document losses equal each
document alone, in lmforge and in transformers; the option leaves the exported model unchanged)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lmforge.data.samplers import DocumentStream, EpochSampler, Windows, stream_epochs
from lmforge.model.configs import preset
from lmforge.model.decoder import IGNORE_INDEX
from lmforge.model.hf import build_model, save_model

T = 16


def stream(n_docs: int = 23, seed: int = 0) -> DocumentStream:
    """Documents whose tokens say which document they are: document d is d*100 + 0, 1, 2, ..."""
    lengths = np.random.default_rng(seed).integers(3, 30, n_docs)
    ids = np.concatenate([d * 100 + np.arange(n) for d, n in enumerate(lengths)]).astype(np.int64)
    return DocumentStream(ids, lengths)


def build(document_mask: bool = False):
    return lambda ids, mask, documents: Windows(ids, T, mask, documents if document_mask else None)


@pytest.mark.parametrize("sampling", ["offset", "shuffle"])
def test_every_document_once_per_epoch_in_a_new_cut_each_epoch(sampling: str) -> None:
    docs = stream()
    epochs = stream_epochs(docs, build(), sampling=sampling, period=T, seed=3)
    firsts, orders = [], []
    for epoch in range(3):
        rows = epochs(epoch).rows
        # Consecutive windows: the inputs and the last window's last target are the epoch's stream, once.
        seen = torch.cat([rows["input_ids"].flatten(), rows["targets"][-1:, -1]]).tolist()
        assert len(seen) == len(set(seen))  # no token twice
        assert len(set(docs.ids.tolist()) - set(seen)) < T  # none missing but the tail that fills no window
        runs = np.split(np.array(seen), np.flatnonzero(np.diff(seen) != 1) + 1)
        assert all(run[0] % 100 == 0 or i == 0 for i, run in enumerate(runs))  # documents stay whole
        firsts.append(seen[0])
        orders.append([int(run[0]) // 100 for run in runs[1:]])
    assert len(set(firsts)) == 3  # each epoch is cut at another place
    if sampling == "shuffle":  # ... and orders its documents afresh
        assert orders[0] != orders[1] != orders[2]
    else:
        # The prepared order, rotated: it descends at most once (where the rotated-off head follows the end).
        assert all(sum(b < a for a, b in itertools.pairwise(o)) <= 1 for o in orders)


def test_shuffle_reorders_whole_documents_and_offset_keeps_the_order() -> None:
    docs = stream()
    order = np.random.default_rng(1).permutation(len(docs.lengths))
    ids, _, documents = docs.arrange(order, 0)
    pieces = np.split(ids, np.cumsum(docs.lengths[order])[:-1])
    assert [int(p[0]) // 100 for p in pieces] == order.tolist()  # whole documents, in the new order
    assert all(np.array_equal(p, p[0] + np.arange(len(p))) for p in pieces)
    assert np.array_equal(documents, np.repeat(np.arange(len(order)), docs.lengths[order]))
    rotated, _, rotated_docs = docs.arrange(None, 7)
    assert np.array_equal(rotated, np.roll(docs.ids, -7))  # offset: the prepared order, cut 7 tokens later
    assert (rotated_docs[-7:] == len(docs.lengths)).all()  # the rotated-off head is a document of its own
    assert sorted(docs.arrange(order, 5)[0].tolist()) == sorted(docs.ids.tolist())


@pytest.mark.parametrize("sampling", ["fixed", "offset", "shuffle"])
@pytest.mark.parametrize("document_mask", [False, True])
def test_sampling_is_seeded_and_resumes_exactly(sampling: str, document_mask: bool) -> None:
    def make(seed: int = 5) -> EpochSampler:
        epochs = stream_epochs(stream(), build(document_mask), sampling=sampling, period=T, seed=seed)
        return EpochSampler(epochs, 4, seed=seed)

    per_epoch = make().n // 4
    whole = list(itertools.islice(make(), 3 * per_epoch + 1))  # crosses two epoch boundaries
    for cut in (1, per_epoch + 1, 2 * per_epoch + 2):
        first = make()
        for _ in range(cut):
            next(first)
        resumed = make()
        resumed.load_state_dict(first.state_dict())
        for a, b in zip(itertools.islice(resumed, len(whole) - cut), whole[cut:], strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if sampling != "fixed":  # a new cut each epoch: the second epoch's batches are not the first's
        assert not torch.equal(whole[0]["input_ids"], whole[per_epoch]["input_ids"])


def test_document_mask_windows_never_predict_across_documents() -> None:
    docs = stream()
    ids, mask, documents = docs.arrange(None, 0)
    rows = Windows(ids, T, mask, documents).rows
    inputs, targets, segments = rows["input_ids"], rows["targets"], rows["segment_ids"]
    same_doc = (inputs // 100)[:, 1:] == (inputs // 100)[:, :-1]
    assert torch.equal(segments[:, 1:] == segments[:, :-1], same_doc)
    # A target is the next token of the same document, or nothing.
    counted = targets != IGNORE_INDEX
    assert torch.equal(targets[counted] // 100, inputs[counted] // 100)
    assert (targets[counted] == inputs[counted] + 1).all()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral"])
def test_document_masked_window_losses_equal_each_document_alone(name: str, tmp_path) -> None:
    """lmforge's packed window (SDPA with a block mask) against each document alone in lmforge (SDPA's causal
    path) and in transformers (eager and SDPA attention), per token, fp32, 1e-5."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    overrides = {"vocab_size": 64, "sliding_window": 4} if name == "tiny-mistral" else {"vocab_size": 64}
    model = build_model(preset(name, **overrides)).eval()
    rng = np.random.default_rng(0)
    lengths = np.array([5, 9, 3, 7, 8])
    tokens = rng.integers(1, 64, int(lengths.sum())).astype(np.int64)
    ids, _, documents = DocumentStream(tokens, lengths).arrange(None, 0)
    rows = Windows(np.append(ids, 0), int(lengths.sum()), None, np.append(documents, -1)).rows  # one window
    save_model(model, tmp_path / "m")
    hf = {
        impl: transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "m", attn_implementation=impl
        ).eval()
        for impl in ("eager", "sdpa")
    }
    with torch.no_grad():
        packed = model(rows["input_ids"], rows["targets"], segment_ids=rows["segment_ids"], reduction="none")[
            0
        ]
        start = 0
        for n in lengths:
            doc = torch.from_numpy(tokens[start : start + n])[None]  # (1, n)
            target = torch.cat([doc[0, 1:], torch.tensor([IGNORE_INDEX])])[None]
            alone = model(doc, target, reduction="none")[0]  # (n,)
            torch.testing.assert_close(packed[start : start + n], alone, atol=1e-5, rtol=0)
            for impl, reference in hf.items():
                logits = reference(doc).logits[0, :-1]  # (n - 1, V)
                hf_loss = torch.nn.functional.cross_entropy(logits, doc[0, 1:], reduction="none")
                torch.testing.assert_close(
                    packed[start : start + n - 1], hf_loss, atol=1e-5, rtol=0, msg=impl
                )
            assert packed[start + n - 1] == 0  # the last token predicts nothing across the boundary
            start += n
