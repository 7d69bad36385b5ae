"""Log-likelihoods of continuations: what multiple choice, perplexity and lm-evaluation-harness all score.

`score_continuations` takes (context ids, continuation ids) pairs and returns Σ log p(continuation | context),
whether every continuation token is its position's argmax, and the tokens scored, through the one log-prob path
(`train/logprobs.py`), the LM head run only at the scored positions. Three kinds of sharing:

- pairs whose model input is the same (one context, one-token continuations: the choices of an ARC or MMLU
  question) share one row; the others read their final token's log-prob from that row's logits;
- rows whose tokens before the last context token are the same (one context, multi-token continuations: the
  endings of a HellaSwag question) run that prefix once, left-padded, and each row's remaining tokens from a
  copy of its KV cache (two forwards per batch);
- the remaining rows, sorted longest first and right-padded, run whole: one forward per batch (a causal model
  never attends to padding after a token, so no mask is needed and attention keeps SDPA's causal kernel).

`rolling_logprob` is lm-evaluation-harness's `loglikelihood_rolling`: a document cut into disjoint windows
(`rolling_windows`), each token scored exactly once with as much earlier context as the window holds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.model.decoder import IGNORE_INDEX, KVCache
from lmforge.train.logprobs import token_logprobs_and_logits


@dataclass(frozen=True)
class Scored:
    """One continuation's log-likelihood under a model."""

    logprob: float
    """Σ log p(continuation tokens | context), natural log."""
    greedy: bool
    """Every continuation token is the argmax of its position."""
    tokens: int
    """Continuation tokens scored."""


@dataclass
class _Row:
    """One model input (the last `window` tokens before a pair's final token) shared by the pairs that have it."""

    ids: tuple[int, ...]
    span: int = 0  # positions scored: the longest continuation among its pairs
    last: int = -1  # the target at its last position (its first pair's final token)


def model_window(model: nn.Module) -> int:
    """Tokens a forward of `model` may hold: its positions less prompt tuning's virtual tokens."""
    return model.config.max_position_embeddings - getattr(model, "extra_positions", 0)


def score_continuations(
    model: nn.Module, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 32
) -> list[Scored]:
    """Σ log p(continuation | context) of each (context ids, continuation ids) pair, in input order.

    Context + continuation are cut from the left to the model's window (+1: the last token is only predicted);
    the whole continuation is always kept. Batched: `batch_size` rows per forward, longest first; pairs that
    share their input or their context share the work (see the module's docstring).
    """
    if batch_size < 1:
        raise LmforgeError(f"batch_size {batch_size}: expected at least 1")
    window = model_window(model)
    rows: dict[tuple[int, ...], _Row] = {}
    placed: list[tuple[_Row, int, int]] = []  # each pair's row, continuation length and final token
    for i, (context, continuation) in enumerate(pairs):
        if not continuation:
            raise LmforgeError(f"pair {i}: the continuation is empty; expected at least one token to score")
        if not context:
            raise LmforgeError(
                f"pair {i}: the context is empty; expected at least one token (e.g. BOS) before the continuation"
            )
        if len(continuation) > window:
            raise LmforgeError(
                f"pair {i}: a continuation of {len(continuation)} tokens does not fit the model's context of "
                f"{window} tokens"
            )
        ids = [*context, *continuation]
        key = tuple(ids[-(window + 1) : -1])  # what the model reads: all but the last token, at most `window`
        row = rows.get(key)
        if row is None:
            row = rows[key] = _Row(key, last=ids[-1])
        row.span = max(row.span, len(continuation))
        placed.append((row, len(continuation), ids[-1]))

    # Per row (filled batch by batch): log p of each scored position's target and whether it is the argmax;
    # `others[(row, token)]`: (log p, greedy) of another final token at the row's last position.
    logp: dict[int, list[float]] = {}
    hits: dict[int, list[bool]] = {}
    others: dict[tuple[int, int], tuple[float, bool]] = {}
    alternatives: dict[int, set[int]] = {}
    for row, _, final in placed:
        if final != row.last:
            alternatives.setdefault(id(row), set()).add(final)
    record = (alternatives, logp, hits, others)
    whole, shared = _plan(rows.values(), batch_size)
    with torch.inference_mode():
        for batch in whole:
            _score_batch(model, batch, None, *record)
        for groups in shared:
            _score_batch(model, [r for g in groups for r in g], groups, *record)

    results = []
    for row, n, final in placed:
        lp, hit = logp[id(row)], hits[id(row)]
        # The pair's positions are the row's last n; all but the last have the row's own targets.
        body, body_hit = math.fsum(lp[len(lp) - n : -1]), all(hit[len(hit) - n : -1])
        last, last_hit = (lp[-1], hit[-1]) if final == row.last else others[(id(row), final)]
        results.append(Scored(body + last, body_hit and last_hit, n))
    return results


def _plan(rows: Iterable[_Row], batch_size: int) -> tuple[list[list[_Row]], list[list[list[_Row]]]]:
    """(batches of whole rows, batches of groups of rows that share a prefix), each longest first.

    A row's prefix is everything before its last context token (its first scored position's input). Rows with
    the same prefix (the multi-token choices of one question) form a group that runs the prefix once; a group
    holds at most `batch_size` rows, and a batch of groups too. Rows alone with their prefix run whole."""
    groups: dict[tuple[int, ...], list[_Row]] = {}
    for row in rows:
        groups.setdefault(row.ids[: len(row.ids) - row.span], []).append(row)
    whole, parts = [], []
    for prefix, members in groups.items():
        if len(members) > 1 and prefix:
            parts += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
        else:
            whole += members
    whole.sort(key=lambda r: (-len(r.ids), r.ids))
    parts.sort(key=lambda g: (-len(g[0].ids) + g[0].span, g[0].ids))  # by prefix length
    shared: list[list[list[_Row]]] = []
    for group in parts:
        if shared and sum(map(len, shared[-1])) + len(group) <= batch_size:
            shared[-1].append(group)
        else:
            shared.append([group])
    return [whole[i : i + batch_size] for i in range(0, len(whole), batch_size)], shared


def _score_batch(
    model: nn.Module,
    batch: list[_Row],
    groups: list[list[_Row]] | None,
    alternatives: dict[int, set[int]],
    logp: dict[int, list[float]],
    hits: dict[int, list[bool]],
    others: dict[tuple[int, int], tuple[float, bool]],
) -> None:
    """Score `batch` (whole rows, or the rows of `groups` in order, each group from its shared prefix): fill each
    row's per-position log-probs and greedy hits, and the log-prob and greedy flag of every alternative final
    token at its last position."""
    device = next(model.parameters()).device
    if groups is None:
        per_token, logits, target_ids = _whole_forward(model, batch, device)
    else:
        per_token, logits, target_ids = _prefixed_forward(model, groups, device)
    counted = target_ids != IGNORE_INDEX  # (B, T); N scored positions, row by row
    flat_targets = target_ids[counted]  # (N,)
    flat_per_token = per_token[counted]  # (N,)
    best = logits.argmax(-1)  # (N,)
    # Alternative final tokens at each row's last scored position: log p(o) = log p(t) + logit_o - logit_t.
    ends = torch.tensor([r.span for r in batch], device=device).cumsum(0) - 1  # (B,) last position in N
    wanted = [(b, o) for b, r in enumerate(batch) for o in sorted(alternatives.get(id(r), ()))]
    if wanted:
        at = ends[torch.tensor([b for b, _ in wanted], device=device)]  # (M,)
        tokens = torch.tensor([o for _, o in wanted], device=device)  # (M,)
        shift = logits[at, tokens] - logits[at, flat_targets[at]]  # (M,)
        alt_logp = (flat_per_token[at] + shift).tolist()
        alt_greedy = (best[at] == tokens).tolist()
        for (b, o), lp, g in zip(wanted, alt_logp, alt_greedy, strict=True):
            others[(id(batch[b]), o)] = (lp, g)
    flat_logp = flat_per_token.tolist()  # one device-to-host copy per batch
    flat_hits = (best == flat_targets).tolist()
    offset = 0
    for row in batch:
        logp[id(row)] = flat_logp[offset : offset + row.span]
        hits[id(row)] = flat_hits[offset : offset + row.span]
        offset += row.span


def _scored(row: _Row, start: int) -> list[int]:
    """The row's targets from input position `start` on: the next input token, then its final token."""
    return [*row.ids[start + 1 :], row.last]


def _whole_forward(
    model: nn.Module, batch: list[_Row], device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """One forward of whole rows, right-padded (no real token attends to a later position, so no mask and
    SDPA's causal kernel): per-token log-probs (B, T), head logits (N, V), targets (B, T)."""
    T = len(batch[0].ids)  # the longest row: rows come sorted
    inputs, targets = [], []
    for row in batch:
        pad, start = T - len(row.ids), len(row.ids) - row.span
        inputs.append([*row.ids, *[0] * pad])  # any id pads
        targets.append([*[IGNORE_INDEX] * start, *_scored(row, start), *[IGNORE_INDEX] * pad])
    target_ids = torch.tensor(targets, device=device)  # (B, T)
    batch_ids = {"input_ids": torch.tensor(inputs, device=device), "targets": target_ids}
    return (*token_logprobs_and_logits(model, batch_ids), target_ids)


def _prefixed_forward(
    model: nn.Module, groups: list[list[_Row]], device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Each group's prefix once (left-padded, as the engine's prefill: the cache stays contiguous, so sliding
    windows count real tokens), its KV cache copied to each of its rows, then each row's scored tokens (its
    last context token and all of its continuation but the last) from that cache: per-token log-probs (R, S),
    head logits (N, V), targets (R, S)."""
    prefixes = [g[0].ids[: len(g[0].ids) - g[0].span] for g in groups]
    rows = [r for g in groups for r in g]
    G, P, S = len(groups), max(map(len, prefixes)), max(r.span for r in rows)
    prefix_ids = torch.zeros((G, P), dtype=torch.long)
    prefix_mask = torch.zeros((G, P), dtype=torch.bool)
    for i, prefix in enumerate(prefixes):
        prefix_ids[i, P - len(prefix) :] = torch.tensor(prefix)
        prefix_mask[i, P - len(prefix) :] = True
    prefix_mask = prefix_mask.to(device)
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, G, getattr(model, "extra_positions", 0) + P + S, device, dtype)
    padded = not bool(prefix_mask.all())
    model(prefix_ids.to(device), attention_mask=prefix_mask if padded else None, cache=cache, last_only=True)
    owner = torch.tensor([i for i, g in enumerate(groups) for _ in g], device=device)  # (R,)
    cache.rows(owner)  # each layer (R, n_kv, max_len, head_dim)
    inputs, targets, valid = [], [], []
    for row in rows:
        start, pad = len(row.ids) - row.span, S - row.span
        inputs.append([*row.ids[start:], *[0] * pad])
        targets.append([*_scored(row, start), *[IGNORE_INDEX] * pad])
        valid.append([True] * row.span + [False] * pad)
    # The mask covers the cached prefix and the new tokens (R, P + S); positions follow from it.
    mask = torch.cat([prefix_mask[owner], torch.tensor(valid, device=device)], dim=1)
    target_ids = torch.tensor(targets, device=device)  # (R, S)
    batch_ids = {
        "input_ids": torch.tensor(inputs, device=device),
        "targets": target_ids,
        "attention_mask": mask,
    }
    return (*token_logprobs_and_logits(model, batch_ids, cache=cache), target_ids)


def rolling_windows(
    ids: Sequence[int], *, context: int, prefix_token: int
) -> list[tuple[list[int], list[int]]]:
    """lm-evaluation-harness's disjoint rolling windows of `ids` as (context, continuation) pairs.

    The first window scores the first `context` tokens after `prefix_token`; each later one scores the next
    `context` tokens (the last one fewer) with the tokens before them that fill the window (its model input is
    `context` tokens), so every token is scored exactly once. `get_rolling_token_windows(context_len=1)` +
    `make_disjoint_window`, exactly.
    """
    if context < 1:
        raise LmforgeError(f"context {context}: expected a window of at least 1 token")
    ids = list(ids)
    if not ids:
        return []
    first = min(context, len(ids))
    windows = [([prefix_token], ids[:first])]
    done = first
    while done < len(ids):
        n = min(len(ids) - done, context)  # tokens this window scores
        end = done + n
        inputs = ids[
            end - context - 1 : end - 1
        ]  # the model's `context` input tokens, ending before `end - 1`
        windows.append((inputs[: len(inputs) - n + 1], ids[done:end]))
        done = end
    return windows


def rolling_logprob(
    model: nn.Module,
    ids: Sequence[int],
    *,
    context: int,
    batch_size: int = 32,
    prefix_token: int | None = None,
) -> Scored:
    """Σ log p(ids) over disjoint windows of `context` tokens (lm-evaluation-harness's
    `loglikelihood_rolling`), the first token conditioned on `prefix_token` (default: the model's BOS, else EOS;
    lm-eval's `hf` model uses the tokenizer's BOS, else EOS)."""
    if context > model_window(model):
        raise LmforgeError(f"context {context}: the model holds at most {model_window(model)} tokens")
    if prefix_token is None:
        eos = model.config.eos_token_id
        prefix_token = model.config.bos_token_id if model.config.bos_token_id is not None else eos
        if isinstance(prefix_token, list):
            prefix_token = prefix_token[0]
        if prefix_token is None:
            raise LmforgeError("the model's config names no BOS or EOS token: give prefix_token")
    scored = score_continuations(
        model, rolling_windows(ids, context=context, prefix_token=prefix_token), batch_size=batch_size
    )
    return Scored(
        math.fsum(s.logprob for s in scored), all(s.greedy for s in scored), sum(s.tokens for s in scored)
    )
