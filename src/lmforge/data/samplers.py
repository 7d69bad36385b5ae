"""Resumable micro-batch streams: CLM windows, SFT rows, MLM windows, NSP sentence pairs, and mixes.

Every stream is an `EpochSampler` over some `Examples`: epoch e visits the examples in the order of
`numpy.random.default_rng([seed, e]).permutation(n)`, cut into full micro-batches (an epoch's last
`n % micro_batch_size` examples of the order are dropped, so every micro-batch has the same row count). The
cursor is three integers (seed, epoch, position); any randomness inside a batch (MLM masking) comes from a
generator seeded by the cursor too, so a resumed run continues the exact sequence of batches.

Data parallelism is by rows: a stage builds its sampler with the GLOBAL micro-batch (micro_batch_size x
world size) and each rank takes its slice, so the cursor is the same on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch

from lmforge.data.batches import clm_windows, collate, mask_tokens, nsp_pairs
from lmforge.errors import LmforgeError

Batch = dict[str, torch.Tensor]


class Examples(Protocol):
    """What an epoch holds: a number of examples and a way to batch some of them."""

    def __len__(self) -> int: ...

    def batch(self, rows: np.ndarray, generator: torch.Generator) -> Batch:
        """The micro-batch of examples `rows` (randomness only from `generator`)."""
        ...


def _batch_generator(seed: int, epoch: int, position: int) -> torch.Generator:
    """A generator seeded by the cursor: the same batch gets the same masking after a resume."""
    state = np.random.SeedSequence([seed, epoch, position]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class EpochSampler:
    """Micro-batches forever: each epoch a fresh permutation of `epoch_examples(e)`, cut into full batches."""

    def __init__(
        self, epoch_examples: Callable[[int], Examples], micro_batch_size: int, *, seed: int
    ) -> None:
        self.epoch_examples, self.micro_batch_size, self.seed = epoch_examples, micro_batch_size, seed
        self._start(0)
        self.position = 0

    def _start(self, epoch: int) -> None:
        self.epoch, self.examples = epoch, self.epoch_examples(epoch)
        self.n = len(self.examples)
        if self.n < self.micro_batch_size:
            raise LmforgeError(
                f"{self.n} training examples (windows or sentence pairs) are fewer than one micro-batch of "
                f"{self.micro_batch_size}: use more data, a shorter train.seq_len or a smaller batch"
            )
        rng = np.random.default_rng([self.seed, epoch])
        order = getattr(self.examples, "order", None)  # examples may choose their own epoch order
        self._order = order(rng, self.micro_batch_size) if order else rng.permutation(self.n)

    def __iter__(self) -> EpochSampler:
        return self

    def __next__(self) -> Batch:
        if self.position + self.micro_batch_size > self.n:
            self._start(self.epoch + 1)
            self.position = 0
        rows = self._order[self.position : self.position + self.micro_batch_size]
        generator = _batch_generator(self.seed, self.epoch, self.position)
        self.position += self.micro_batch_size
        return self.examples.batch(rows, generator)

    def state_dict(self) -> dict[str, Any]:
        """The data cursor: {"seed", "epoch", "position"}."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved cursor (same data, seq_len and batch size; the seed must match)."""
        if state["seed"] != self.seed:
            raise LmforgeError(
                f"data cursor was saved with seed {state['seed']}, this run has seed {self.seed}"
            )
        if state["epoch"] != self.epoch:
            self._start(state["epoch"])
        self.position = state["position"]


def fixed(examples: Examples) -> Callable[[int], Examples]:
    """The same examples every epoch (windows of a token stream)."""
    return lambda epoch: examples


def window_sampler(
    tokens: np.ndarray, seq_len: int, micro_batch_size: int, *, seed: int, mask: np.ndarray | None = None
) -> EpochSampler:
    """Shuffled next-token micro-batches (`Windows`) of `micro_batch_size` x `seq_len`, cycling over epochs."""
    return EpochSampler(fixed(Windows(tokens, seq_len, mask)), micro_batch_size, seed=seed)


Sampling = Literal["fixed", "offset", "shuffle"]
"""How a document stream is cut into windows each epoch (`stream_epochs`)."""


class DocumentStream:
    """A split's documents joined into one token stream: ids (N,), its loss mask (N,) or None, and each
    document's length (D,), in the prepared order."""

    def __init__(self, ids: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None) -> None:
        self.ids, self.mask = ids, mask
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)  # (D,)

    def __len__(self) -> int:
        return len(self.ids)

    def arrange(
        self, order: np.ndarray | None, offset: int
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """The stream with its documents in `order` (None: as prepared), rotated left by `offset` tokens:
        (ids, mask, document number of each token), each (N,). The rotated-off head goes to the end, so every
        token is still there once; it gets a document number of its own (D), apart from the rest of its
        document at the front."""
        D = len(self.lengths)
        ids, mask, lengths = self.ids, self.mask, self.lengths
        if order is not None:  # index of each token of the new order in the prepared stream
            lengths = self.lengths[order]  # (D,)
            shift = np.repeat(self.starts[order] - (np.cumsum(lengths) - lengths), lengths)  # (N,)
            index = np.arange(len(self.ids), dtype=np.int64) + shift
            ids, mask = ids[index], None if mask is None else mask[index]
        documents = np.repeat(np.arange(D, dtype=np.int64), lengths)  # (N,) position in the order
        if offset:
            documents = np.concatenate([documents[offset:], np.full(offset, D, dtype=np.int64)])
            ids = np.roll(ids, -offset)
            mask = None if mask is None else np.roll(mask, -offset)
        return ids, mask, documents


def stream_epochs(
    stream: DocumentStream,
    build: Callable[[np.ndarray, np.ndarray | None, np.ndarray], Examples],
    *,
    sampling: Sampling,
    period: int,
    seed: int,
) -> Callable[[int], Examples]:
    """Epoch e's window examples, `build(ids, mask, documents)` of the stream arranged by `sampling`:

    - fixed: the prepared order cut at the same places every epoch (each window always shows a document
      behind the same preceding text: a small model memorises the stream by position);
    - offset: the prepared order, cut from a random offset in [0, `period`) each epoch;
    - shuffle: the documents in a fresh random order each epoch, cut from a random offset.

    Every token is in the stream once per epoch (the windows then drop at most the tail that fills no window).
    Draws come from rng [seed, e, 2], so a resumed run rebuilds the same epoch.
    """
    if sampling == "fixed":
        examples = build(*stream.arrange(None, 0))
        return lambda epoch: examples

    def epoch_examples(epoch: int) -> Examples:
        rng = np.random.default_rng([seed, epoch, 2])
        order = rng.permutation(len(stream.lengths)) if sampling == "shuffle" else None
        return build(*stream.arrange(order, int(rng.integers(period)) % max(len(stream), 1)))

    return epoch_examples


# ---------------------------------------------------------------------------------------------- examples


class Rows:
    """Examples that are fixed rows of named (N, T) tensors; a batch is some of the rows (no randomness)."""

    def __init__(self, rows: dict[str, torch.Tensor]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(next(iter(self.rows.values())))

    def batch(self, rows: np.ndarray, generator: torch.Generator) -> Batch:
        """The rows `rows` of every tensor."""
        index = torch.from_numpy(rows)
        return {k: v[index] for k, v in self.rows.items()}


class PaddedRows(Rows):
    """Right-padded rows with an "attention_mask": a batch drops the columns no row of it uses, so short
    samples (classification queries) do not pay for the longest one.

    With `group_by_length` an epoch's order batches samples of similar length together (as `transformers`'
    `group_by_length`): a random permutation is cut into groups of `GROUP` micro-batches, each group sorted by
    length, and the resulting micro-batches shuffled, so a batch of short queries is not padded to one long
    query (BANKING77: 16 real tokens a sample, 46 columns a batch without grouping).
    """

    GROUP = 50

    def __init__(self, rows: dict[str, torch.Tensor], group_by_length: bool = False) -> None:
        super().__init__(rows)
        self.group_by_length = group_by_length
        self.lengths = rows["attention_mask"].sum(1).numpy()  # (N,)

    def order(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        """An epoch's order of the rows: a permutation, length-grouped per micro-batch when asked."""
        perm = rng.permutation(len(self))
        if not self.group_by_length:
            return perm
        size = self.GROUP * batch_size
        grouped = np.concatenate([
            chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            for chunk in np.split(perm, range(size, len(perm), size))
        ])  # fmt: skip
        full = len(grouped) // batch_size * batch_size  # the epoch's rest stays last (dropped as usual)
        batches = grouped[:full].reshape(-1, batch_size)[rng.permutation(full // batch_size)]
        return np.concatenate([batches.ravel(), grouped[full:]])

    def batch(self, rows: np.ndarray, generator: torch.Generator) -> Batch:
        """The rows `rows`, cut to their longest sample."""
        out = super().batch(rows, generator)
        width = max(int(out["attention_mask"].sum(1).max()), 1)
        return {k: v[:, :width] if v.dim() == 2 else v for k, v in out.items()}


class Windows(Rows):
    """Next-token windows of a token stream (`clm_windows`): {"input_ids", "targets"} (B, seq_len), and
    "segment_ids" (B, seq_len) when `documents` numbers each token's document (intra-document masking)."""

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        mask: np.ndarray | None = None,
        documents: np.ndarray | None = None,
    ) -> None:
        super().__init__(clm_windows(tokens, seq_len, mask, documents))


@dataclass(frozen=True)
class MaskSpec:
    """What BERT masking needs from the tokenizer, and the masking rate."""

    vocab_size: int
    mask_id: int
    special_ids: tuple[int, ...]  # never chosen for masking: [CLS], [SEP], [PAD]
    rate: float = 0.15

    def apply(self, batch: Batch, generator: torch.Generator) -> Batch:
        """Mask `batch["input_ids"]` (B, T) in place of the originals; add "labels" (B, T)."""
        ids = batch["input_ids"]
        special = torch.isin(ids, torch.tensor(self.special_ids))
        inputs, labels = mask_tokens(ids, special, vocab_size=self.vocab_size, mask_id=self.mask_id,
                                     rate=self.rate, generator=generator)  # fmt: skip
        return {**batch, "input_ids": inputs, "labels": labels}


class MaskedWindows:
    """MLM examples: `[CLS] window [SEP]` over a token stream (documents joined by [SEP]), masked per batch."""

    def __init__(self, tokens: np.ndarray, seq_len: int, cls_id: int, sep_id: int, spec: MaskSpec) -> None:
        if seq_len < 3:
            raise LmforgeError(f"train.seq_len={seq_len}: an MLM window needs [CLS] text [SEP], at least 3")
        inner = seq_len - 2
        n = len(tokens) // inner
        body = torch.from_numpy(np.asarray(tokens[: n * inner], dtype=np.int64)).view(n, inner)
        self.ids = torch.cat(
            [torch.full((n, 1), cls_id), body, torch.full((n, 1), sep_id)], dim=1
        )  # (N, seq_len)
        self.spec = spec

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows: np.ndarray, generator: torch.Generator) -> Batch:
        """{"input_ids" (masked), "labels", "attention_mask"}, each (B, seq_len)."""
        ids = self.ids[torch.from_numpy(rows)]
        return self.spec.apply({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, generator)


class SentencePairs:
    """NSP examples (`nsp_pairs`) of one epoch, padded per batch; masked too for mlm+nsp."""

    def __init__(self, pairs: list[dict[str, Any]], pad_id: int, spec: MaskSpec | None) -> None:
        self.pairs, self.pad_id, self.spec = pairs, pad_id, spec

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, rows: np.ndarray, generator: torch.Generator) -> Batch:
        """`collate`d pairs (B, L), padded to the longest; with MLM also masked "labels" (B, L)."""
        batch = collate([self.pairs[i] for i in rows], self.pad_id)
        return batch if self.spec is None else self.spec.apply(batch, generator)


def split_sentences(ids: np.ndarray, enders: Iterable[int]) -> list[np.ndarray]:
    """Cut a document's ids after every sentence-ending token ("." "!" "?"): its sentences, in order."""
    ids = np.asarray(ids, dtype=np.int64)
    ends = np.flatnonzero(np.isin(ids, list(enders))) + 1  # positions just after an ender
    return [s for s in np.split(ids, ends) if len(s)]


def sentence_pairs(
    documents: Sequence[Sequence[np.ndarray]],
    *,
    max_len: int,
    cls_id: int,
    sep_id: int,
    pad_id: int,
    seed: int,
    spec: MaskSpec | None,
) -> Callable[[int], Examples]:
    """Epoch e's NSP pairs: drawn afresh from `documents` (document → sentences) with rng [seed, e, 1]."""

    def epoch(e: int) -> Examples:
        rng = np.random.default_rng([seed, e, 1])
        pairs = nsp_pairs(documents, max_len=max_len, cls_id=cls_id, sep_id=sep_id, rng=rng)
        return SentencePairs(pairs, pad_id, spec)

    return epoch


# -------------------------------------------------------------------------------------------------- mix


class MixSampler:
    """Micro-batches drawn from several named samplers in fixed proportions (continued pretraining's replay).

    Each micro-batch comes whole from one source, picked by smooth weighted round-robin: every draw adds each
    source's weight to its credit and takes the source with the most credit, which then pays 1. The sequence
    is deterministic and every prefix is within one batch of the exact proportions ({domain: 0.8, general:
    0.2} → d d g d d d d g d d ...), with no random drift on a short run. The cursor is the credits plus each
    source's own cursor.
    """

    def __init__(self, samplers: dict[str, EpochSampler], weights: dict[str, float]) -> None:
        if set(samplers) != set(weights):
            raise LmforgeError(
                f"data.mix names {sorted(weights)} must be the data.datasets names {sorted(samplers)}"
            )
        total = sum(weights.values())
        if total <= 0 or any(w < 0 for w in weights.values()):
            raise LmforgeError(f"data.mix weights must be non-negative with a positive sum, got {weights}")
        self.samplers = samplers
        self.weights = {k: w / total for k, w in weights.items()}
        self.credits = dict.fromkeys(samplers, 0.0)

    def __iter__(self) -> MixSampler:
        return self

    def __next__(self) -> Batch:
        for name, w in self.weights.items():
            self.credits[name] += w
        name = max(self.credits, key=lambda k: (self.credits[k], self.weights[k]))
        self.credits[name] -= 1.0
        return next(self.samplers[name])

    def state_dict(self) -> dict[str, Any]:
        """{"credits": {...}, "sources": {name: cursor}}."""
        return {
            "credits": dict(self.credits),
            "sources": {k: s.state_dict() for k, s in self.samplers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved mix cursor (same sources)."""
        if set(state["sources"]) != set(self.samplers):
            raise LmforgeError(
                f"the checkpoint's data sources {sorted(state['sources'])} are not this run's "
                f"{sorted(self.samplers)}"
            )
        self.credits = dict(state["credits"])
        for k, s in self.samplers.items():
            s.load_state_dict(state["sources"][k])
