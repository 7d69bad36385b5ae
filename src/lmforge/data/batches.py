"""Batch builders: CLM windows, SFT rows (packed with isolation, or one sample per row), BERT's MLM masking, NSP
sentence pairs and their padding.

Pure functions of their inputs and an explicit generator (`torch.Generator` or `numpy.random.Generator`),
never the global RNG, so a seed and a data cursor reproduce every batch. Batches are `dict[str, Tensor]`
with the keys the objectives of `lmforge.train.objectives` read.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmforge.model.decoder import IGNORE_INDEX

# ------------------------------------------------------------------------------------------------- CLM


def clm_windows(
    tokens: np.ndarray, seq_len: int, mask: np.ndarray | None = None, documents: np.ndarray | None = None
) -> dict[str, Tensor]:
    """Cut a token stream into next-token windows: {"input_ids", "targets"}, each (N, seq_len) int64.

    Window i reads tokens[i*T : i*T + T] and predicts tokens[i*T + 1 : i*T + T + 1], so every token but the
    first is a target once; the tail that cannot fill a window is dropped (N = (len - 1) // T). With a loss
    `mask` (1 = train on this token, e.g. assistant turns of chat data), a target whose token has mask 0 is
    IGNORE_INDEX. Windows cross document boundaries (pretraining); `sft_rows` keeps samples apart.

    With `documents` (each token's document number, (len,)) the windows also get "segment_ids" (N, T): each
    document in a window attends only to itself with positions restarting at its start, and a document's
    last token predicts nothing (its target is the next document's first token), so a window's per-document
    losses are each document's loss alone (intra-document masking, as Llama 3 pretrains).
    """
    T = seq_len
    N = max(len(tokens) - 1, 0) // T
    stream = torch.from_numpy(np.asarray(tokens[: N * T + 1], dtype=np.int64))  # (N*T + 1,)
    inputs = stream[: N * T].view(N, T)
    targets = stream[1 : N * T + 1].clone().view(N, T)
    if mask is not None:
        counted = torch.from_numpy(np.asarray(mask[1 : N * T + 1]) != 0).view(N, T)  # mask of each target
        targets[~counted] = IGNORE_INDEX
    if documents is None:
        return {"input_ids": inputs, "targets": targets}
    doc = torch.from_numpy(np.asarray(documents[: N * T + 1], dtype=np.int64))  # (N*T + 1,)
    targets[(doc[1:] != doc[:-1]).view(N, T)] = IGNORE_INDEX  # no target across a document boundary
    return {"input_ids": inputs, "targets": targets, "segment_ids": doc[: N * T].view(N, T)}


Sample = tuple[np.ndarray, np.ndarray | None]
"""One SFT sample: token ids (n,) and its loss mask (n,) (1 = trained on; None = every token)."""


def sft_rows(
    samples: Sequence[Sample], seq_len: int, pad_id: int, *, pack: bool
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """SFT samples → rows {"input_ids", "targets", "segment_ids"} (N, seq_len) int64, and counts {"cut",
    "dropped", "tokens" (real tokens in the rows)}.

    A sample predicts its own next tokens only: target t is ids[t + 1] where mask[t + 1] is 1, and a sample's
    last position has no target, so no loss ever reads across samples. `pack` fills each row with whole
    samples (best fit, longest first), each with its own segment id (0, 1, ...): the model's attention never crosses
    a segment and positions restart per segment, so a packed sample computes what it computes alone.
    Without `pack` each sample gets a row, right-padded, and no "segment_ids": causal attention alone keeps
    real tokens from the padding after them. Padding has segment -1 and no target. A sample longer than
    `seq_len` keeps its first `seq_len` tokens ("cut"); one whose kept tokens have no target left (a long
    prompt, the reply beyond `seq_len`) would cost positions and train nothing, so it is left out ("dropped").
    """
    T, counts = seq_len, {"cut": 0, "dropped": 0, "tokens": 0}
    kept: list[Sample] = []
    for ids, mask in samples:
        if len(ids) > T:
            counts["cut"] += 1
        ids, mask = _fit(ids, mask, T)
        if not _trains(ids, mask):
            counts["dropped"] += 1
            continue
        kept.append((ids, mask))
        counts["tokens"] += len(ids)
    rows: list[list[Sample]] = [[s] for s in kept]
    if pack:  # best fit, longest first: each sample goes to the fullest row that still has room for it
        rows, free = [], []  # free: sorted (room left, row index)
        for i in sorted(range(len(kept)), key=lambda i: -len(kept[i][0])):
            n = len(kept[i][0])
            at = bisect.bisect_left(free, (n, -1))
            if at == len(free):
                rows.append([kept[i]])
                bisect.insort(free, (T - n, len(rows) - 1))
            else:
                room, r = free.pop(at)
                rows[r].append(kept[i])
                bisect.insort(free, (room - n, r))
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.int64)
    targets = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.int64)
    segment_ids = torch.full((len(rows), T), -1, dtype=torch.int64)
    for r, row in enumerate(rows):
        start = 0
        for seg, (ids, mask) in enumerate(row):
            n, ids_t = len(ids), torch.from_numpy(np.asarray(ids, dtype=np.int64))
            input_ids[r, start : start + n] = ids_t
            segment_ids[r, start : start + n] = seg
            target = ids_t[1:].clone()  # (n - 1,)
            if mask is not None:
                target[torch.from_numpy(np.asarray(mask[1:]) == 0)] = IGNORE_INDEX
            targets[r, start : start + n - 1] = target
            start += n
    rows_out = {"input_ids": input_ids, "targets": targets}
    return ({**rows_out, "segment_ids": segment_ids} if pack else rows_out), counts


def _fit(ids: np.ndarray, mask: np.ndarray | None, T: int) -> Sample:
    """A sample's first T tokens (and mask)."""
    return ids[:T], None if mask is None else mask[:T]


def _trains(ids: np.ndarray, mask: np.ndarray | None) -> bool:
    """Whether a (cut) sample has a target left: a second token, and one whose mask is set."""
    return len(ids) >= 2 and (mask is None or bool(np.asarray(mask[1:]).any()))


def preference_rows(
    pairs: Sequence[tuple[Sample, Sample]], seq_len: int, pad_id: int
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Preference pairs (chosen sample, rejected sample) → rows {"chosen_input_ids", "chosen_targets",
    "rejected_input_ids", "rejected_targets"} (N, seq_len) as `sft_rows` lays one sample per row (targets only
    on the reply), "chosen_length", "rejected_length" (N,) and "pair" (N,) the pair's index; counts {"cut",
    "dropped"}. A pair is left out ("dropped") when either reply has no token within the first `seq_len`."""
    counts = {"cut": 0, "dropped": 0}
    kept: list[tuple[int, Sample, Sample]] = []
    for i, (chosen, rejected) in enumerate(pairs):
        counts["cut"] += len(chosen[0]) > seq_len or len(rejected[0]) > seq_len
        chosen, rejected = _fit(*chosen, seq_len), _fit(*rejected, seq_len)
        if _trains(*chosen) and _trains(*rejected):
            kept.append((i, chosen, rejected))
        else:
            counts["dropped"] += 1
    rows: dict[str, Tensor] = {"pair": torch.tensor([i for i, _, _ in kept], dtype=torch.int64)}
    for side, column in ((1, "chosen"), (2, "rejected")):
        samples = [k[side] for k in kept]
        built, _ = sft_rows(samples, seq_len, pad_id, pack=False)
        rows[f"{column}_input_ids"], rows[f"{column}_targets"] = built["input_ids"], built["targets"]
        rows[f"{column}_length"] = torch.tensor([len(ids) for ids, _ in samples], dtype=torch.int64)
    return rows, counts


def classification_rows(
    samples: Sequence[tuple[np.ndarray, int]], seq_len: int, pad_id: int
) -> dict[str, Tensor]:
    """(ids, label) samples → {"input_ids", "attention_mask"} (N, seq_len) right-padded, "labels" (N,).

    A sample longer than `seq_len` keeps its first `seq_len` tokens; a decoder classifies the last real token
    (the rightmost non-pad id), BERT its [CLS].
    """
    input_ids = torch.full((len(samples), seq_len), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(samples), seq_len), dtype=torch.int64)
    for r, (ids, _) in enumerate(samples):
        n = min(len(ids), seq_len)
        input_ids[r, :n] = torch.from_numpy(np.asarray(ids[:n], dtype=np.int64))
        attention_mask[r, :n] = 1
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ------------------------------------------------------------------------------------------------- MLM


def mask_tokens(
    ids: Tensor,
    special: Tensor,
    *,
    vocab_size: int,
    mask_id: int,
    rate: float = 0.15,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """BERT's masking of (B, T) ids: (inputs, labels), labels = the original id where chosen, else IGNORE_INDEX.

    Each position that is not `special` (pass [CLS], [SEP] and padding as special) is chosen with probability
    `rate`; a chosen one becomes [MASK] 80% of the time, a random id 10%, and stays unchanged 10%. This is
    `transformers.DataCollatorForLanguageModeling`'s distribution (independent draws per position, so a row
    may have no chosen position; the objectives normalise by the step's masked count, so that is harmless).
    Random ids are drawn from the whole vocabulary, specials included, as HF and the BERT reference do: a
    special id lands at rate 0.15 * 0.1 * n_special / V (~1e-5 for 5 of 8192), not worth a second code path.
    """
    device = ids.device
    chosen = (torch.rand(ids.shape, generator=generator, device=device) < rate) & ~special  # (B, T)
    # One draw decides the fate of a chosen position: [0, 0.8) mask, [0.8, 0.9) random, [0.9, 1) unchanged.
    fate = torch.rand(ids.shape, generator=generator, device=device)  # (B, T)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, device=device)  # (B, T)
    inputs = torch.where(chosen & (fate < 0.8), mask_id, ids)
    inputs = torch.where(chosen & (fate >= 0.8) & (fate < 0.9), random_ids, inputs)
    labels = torch.where(chosen, ids, IGNORE_INDEX)
    return inputs, labels


# ------------------------------------------------------------------------------------------------- NSP


def truncate_pair(
    a: np.ndarray, b: np.ndarray, budget: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Shorten segments a and b to at most `budget` tokens together, as BERT's `truncate_seq_pair`.

    BERT removes one token at a time from the longer segment (b on a tie), from its front or back by a coin
    flip. The final lengths follow from the lengths alone, and each segment's front cut is Binomial(cut, 1/2):
    the same distribution in O(1) draws instead of one per removed token (a sentence can be thousands long).
    """
    la, lb = len(a), len(b)
    excess = la + lb - budget
    if excess <= 0:
        return a, b
    if abs(la - lb) >= excess:  # only the longer one is cut
        la, lb = (la - excess, lb) if la > lb else (la, lb - excess)
    else:  # both cut until even; an odd budget leaves a one longer (ties cut b)
        la, lb = (budget + 1) // 2, budget // 2
    return _cut(a, la, rng), _cut(b, lb, rng)


def _cut(seq: np.ndarray, keep: int, rng: np.random.Generator) -> np.ndarray:
    """Keep `keep` contiguous tokens of seq, removing a Binomial(cut, 1/2) number of them from the front."""
    front = int(rng.binomial(len(seq) - keep, 0.5))
    return seq[front : front + keep]


def nsp_pairs(
    documents: Sequence[Sequence[Sequence[int]]],
    *,
    max_len: int,
    cls_id: int,
    sep_id: int,
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    """Sentence pairs `[CLS] A [SEP] B [SEP]` for next-sentence prediction, after BERT's `create_pretraining_data`.

    `documents` are one split's documents (document → sentences → ids): random B segments are drawn only
    from them, so pairs built from the train split never contain a validation sentence. A document's
    sentences are gathered into chunks of at least two sentences and max_len - 3 tokens; A is the chunk's
    first 1..n-1 sentences; by a fair coin B is the rest of the chunk (label 0) or a run of sentences from
    another document (label 1), and then the sentences after A go back for the next chunk. Each pair is
    {"input_ids": (L,) int64, "token_type_ids": (L,) int64 (0 for [CLS] A [SEP], 1 for B [SEP]),
    "next_sentence_label": 0 | 1} with L <= max_len, the longer segment truncated first.
    """
    if max_len < 5:
        raise ValueError(f"max_len={max_len}: a pair needs [CLS] a [SEP] b [SEP], at least 5 tokens")
    docs = [[np.asarray(s, dtype=np.int64) for s in doc if len(s)] for doc in documents]
    docs = [d for d in docs if d]
    if len(docs) < 2:
        raise ValueError("NSP pairs need at least two non-empty documents (random B comes from another one)")
    budget = max_len - 3
    pairs: list[dict[str, Any]] = []
    for d, doc in enumerate(docs):
        # BERT lets a one-sentence chunk have only a random B, which skews short documents towards label 1
        # (59% on 3-12 sentence documents). Here every chunk has two sentences, so every label is a fair coin:
        # a one-sentence document serves only as a random B, and a last sentence left alone at the end of a
        # document is paired with the sentence before it.
        start = 0
        while len(doc) >= 2 and start < len(doc):
            last = start == len(doc) - 1
            if last:
                start -= 1
            end, length = start + 1, len(doc[start])
            while end < len(doc) and (end - start < 2 or length < budget):
                length += len(doc[end])
                end += 1
            a_end = start + int(rng.integers(1, end - start))  # A = doc[start:a_end], at least one sentence
            a = np.concatenate(doc[start:a_end])
            is_random = bool(rng.random() < 0.5)
            b = (
                _random_segment(docs, d, budget - len(a), rng)
                if is_random
                else np.concatenate(doc[a_end:end])
            )
            a, b = truncate_pair(a, b, budget, rng)
            pairs.append(_pair(a, b, int(is_random), cls_id, sep_id))
            # A random B leaves doc[a_end:end] unused: the next chunk starts there (BERT's put-back).
            start = len(doc) if last else (a_end if is_random else end)
    return pairs


def _random_segment(
    docs: list[list[np.ndarray]], d: int, target: int, rng: np.random.Generator
) -> np.ndarray:
    """Consecutive sentences of a random document other than d, from a random start, up to `target` tokens."""
    other = int(rng.integers(len(docs) - 1))
    doc = docs[other + (other >= d)]  # skip d: uniform over the other documents
    start = int(rng.integers(len(doc)))
    parts, length = [], 0
    for sentence in doc[start:]:
        parts.append(sentence)
        length += len(sentence)
        if length >= target:
            break
    return np.concatenate(parts)


def _pair(a: np.ndarray, b: np.ndarray, label: int, cls_id: int, sep_id: int) -> dict[str, Any]:
    """One NSP example: ids of [CLS] a [SEP] b [SEP], their segment ids, and the label."""
    ids = np.concatenate([[cls_id], a, [sep_id], b, [sep_id]]).astype(np.int64)
    types = np.zeros(len(ids), dtype=np.int64)
    types[len(a) + 2 :] = 1  # B and its [SEP]
    return {"input_ids": ids, "token_type_ids": types, "next_sentence_label": label}


def collate(pairs: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad NSP pairs into a batch: input_ids, token_type_ids, attention_mask (B, L), next_sentence_label (B,)."""
    B, L = len(pairs), max(len(p["input_ids"]) for p in pairs)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    types = torch.zeros((B, L), dtype=torch.long)
    attention = torch.zeros((B, L), dtype=torch.long)
    for row, p in enumerate(pairs):
        n = len(p["input_ids"])
        ids[row, :n] = torch.as_tensor(p["input_ids"])
        types[row, :n] = torch.as_tensor(p["token_type_ids"])
        attention[row, :n] = 1
    labels = torch.tensor([p["next_sentence_label"] for p in pairs], dtype=torch.long)
    return {
        "input_ids": ids,
        "token_type_ids": types,
        "attention_mask": attention,
        "next_sentence_label": labels,
    }
