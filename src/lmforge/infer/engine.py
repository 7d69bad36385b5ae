"""The inference engine: prefill + KV-cached decoding of a batch of prompts, streamed as text deltas.

One engine serves `generate`, `chat`, evaluation and (later) the server. A call takes token-id prompts and a
`GenerationConfig`; each prompt is repeated `n` times, the batch is left-padded (positions restart after the
padding, so each row computes exactly what it would alone), and the KV cache is allocated once for the whole
call. Each step: logits of the last position → `process_logits` (the documented processor order) →
`sample_next`; a row stops at an end-of-turn/EOS id, at a stop string (matched on the decoded text, so one
may span tokens; it is cut from the output), or at `max_new_tokens`.

Streaming never splits a character: a row's text is decoded from all its ids each step and only the part
that ends in complete characters (no U+FFFD from a partial byte sequence) and cannot be the start of a stop
string is released.

With `compile=True` each decode step is one compiled graph (`torch.compile`; on the CPU Inductor's C++ wrapper):
the step writes its keys and values at a column index (a tensor) of the pre-allocated cache and attends over the
filled columns under the mask, reading no Python state that changes from step to step; the batch size, the
cache's width and the filled width are dynamic dimensions, so one graph serves batch 1 and one every larger
batch, whatever the lengths. Prefill and speculation's verification stay eager on the same cache. The compiled
step gives the eager step's tokens; its log-probs differ by float rounding only.

With `speculate=K` (greedy, one sample) a step may add several tokens: `NgramIndex` drafts up to K ids that
followed an earlier occurrence of the last few ids, `_verify` checks them in one forward and keeps the prefix
greedy decoding agrees with, and the KV cache is rolled back over the rest.

Each generated token is reported with its bytes and text alone (`TokenText`), as OpenAI's logprobs are: a
token may hold part of a character, so its text alone escapes the bytes it cannot decode.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.infer.sampling import (
    GenerationConfig,
    hf_generation_defaults,
    process_logits,
    sample_next,
    sampling_generator,
    token_logprobs,
)
from lmforge.model.decoder import KVCache
from lmforge.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what a decoder prints for an incomplete UTF-8 sequence


@dataclass
class Delta:
    """A piece of one sample's text: `index` = prompt index x n + sample; `finish_reason` on its last delta."""

    index: int
    text: str
    finish_reason: str | None = None
    tokens: tuple[int, int] | None = None
    """The sample's tokens [start, end) generated since its previous delta (set by the scheduler, for streamed
    log-probs)."""


@dataclass
class Completion:
    """One sample: its text, tokens, per-token log-probs (and top alternatives), finish reason and timing."""

    prompt_index: int
    sample_index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_token: int | None = None  # the end-of-turn / EOS id that ended the sample (not in token_ids)
    prompt_tokens: int = 0
    time_to_first_token: float = 0.0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second after the first token (the decode rate)."""
        decode = self.seconds - self.time_to_first_token
        return (len(self.token_ids) - 1) / decode if len(self.token_ids) > 1 and decode > 0 else 0.0


class Row:
    """Decoding state of one sample: its ids, the text released so far, and whether it has finished."""

    def __init__(self, completion: Completion) -> None:
        self.completion = completion
        self.released = 0  # characters of the text already streamed
        self.reported = 0  # tokens already streamed

    @property
    def done(self) -> bool:
        return self.completion.finish_reason is not None


class Engine:
    """A decoder and its tokenizer on one device; `generate` and `stream` run batches of prompts."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        *,
        defaults: GenerationConfig | None = None,
        compile: bool = False,
    ):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = model.config
        self.defaults = defaults or GenerationConfig()
        self.device = next(model.parameters()).device
        # The settings `defaults` came from, as generation_config() takes them: generation_config.json's for
        # `from_dir`, else the ones given.
        self.file_settings: dict[str, Any] = self.defaults.model_dump(exclude_defaults=True)
        self.model_dir: Path | None = None  # the directory `from_dir` read
        self.compiled = compile_decode_step() if compile else None
        self._index = torch.zeros(1, dtype=torch.long, device=self.device)  # a static step's cache column

    @property
    def context(self) -> int:
        """Tokens the prompt and the generated ones share: the model's positions less prompt tuning's virtual
        tokens, which sit in the cache too."""
        return self.config.max_position_embeddings - self.model.extra_positions

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        adapter: str | Path | None = None,
        compile: bool = False,
    ) -> Engine:
        """Load a HF model directory with its tokenizer and its generation_config.json defaults, and an adapter
        directory (LoRA, bottleneck, prompt tuning) on top when given; `compile` compiles the decode step."""
        from lmforge.adapters.io import load_with_adapter

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_with_adapter(Path(path), adapter, device=device, dtype=dtype)
        if not hasattr(model, "lm_head"):
            raise LmforgeError(f"{path}: a {type(model).__name__} cannot generate text (a decoder is needed)")
        engine = cls(
            model, Tokenizer.from_dir(path), defaults=GenerationConfig.from_model_dir(path), compile=compile
        )
        engine.model_dir, engine.file_settings = Path(path), hf_generation_defaults(path)
        return engine

    @property
    def stop_ids(self) -> set[int]:
        """The end-of-turn and EOS ids that finish a sample."""
        return {i for i in self.tokenizer.eot_ids if i is not None}

    def stops(self, cfg: GenerationConfig) -> set[int]:
        """The ids that finish a sample under `cfg`: `stop_ids`, none with `ignore_eos`."""
        return set() if cfg.ignore_eos else self.stop_ids

    def encode(self, prompt: str) -> list[int]:
        """A plain-text prompt's ids, with the tokenizer's BOS as in training data."""
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def generate(
        self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig | None = None
    ) -> list[Completion]:
        """Every sample of every prompt, in order (prompt 0's n samples first)."""
        completions: list[Completion] = []
        for item in self._run(prompts, cfg or self.defaults):
            if isinstance(item, list):
                completions = item
        return completions

    def stream(
        self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig | None = None
    ) -> Iterator[Delta]:
        """Text deltas as they are decoded; each sample's last delta carries its finish reason."""
        for item in self._run(prompts, cfg or self.defaults):
            if isinstance(item, Delta):
                yield item

    def run(
        self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig | None = None
    ) -> Iterator[Delta | list[Completion]]:
        """Text deltas as they are decoded, then the list of every sample (what `stream` and `generate` read)."""
        return self._run(prompts, cfg or self.defaults)

    # ----------------------------------------------------------------------------------------- decoding

    @torch.no_grad()
    def _run(self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig) -> Iterator[Delta | list]:
        start = time.perf_counter()
        if not prompts:
            raise LmforgeError("no prompts to generate from")
        if any(len(p) == 0 for p in prompts):
            raise LmforgeError("a prompt is empty: give at least one token")
        check_room([len(p) for p in prompts], self.context, cfg.max_new_tokens)
        rows_ids = [list(p) for p in prompts for _ in range(cfg.n)]
        longest = max(len(p) for p in rows_ids)
        extra = self.model.extra_positions  # prompt tuning's virtual tokens, in the cache
        B, P, N = len(rows_ids), longest, cfg.max_new_tokens
        dev = self.device
        # tokens (B, P + N): left-padded prompts, then the generated ids; valid marks real tokens.
        tokens = torch.full((B, P + N), self.tokenizer.pad_id or 0, dtype=torch.long, device=dev)
        valid = torch.zeros((B, P + N), dtype=torch.bool, device=dev)
        for i, ids in enumerate(rows_ids):
            tokens[i, P - len(ids) : P] = torch.tensor(ids, device=dev)
            valid[i, P - len(ids) : P] = True
        generated = torch.zeros_like(valid)
        padded = not bool(valid[:, :P].all())
        dtype = next(self.model.parameters()).dtype
        cache = KVCache(self.config, B, extra + P + N, dev, dtype)
        generator = sampling_generator(cfg.seed, dev)
        rows = [
            Row(Completion(i // cfg.n, i % cfg.n, prompt_tokens=len(ids))) for i, ids in enumerate(rows_ids)
        ]
        stop_ids, hold = self.stops(cfg), held_back(cfg)

        logits = self.model(tokens[:, :P], attention_mask=valid[:, :P] if padded else None, cache=cache,
                            last_only=True)[:, -1].float()  # (B, V)  # fmt: skip
        # Prompt-lookup speculation (one greedy sample): drafts from earlier n-grams, checked in one forward.
        drafter = NgramIndex(rows_ids[0]) if cfg.speculate and B == 1 and cfg.temperature == 0 else None
        t = 0  # tokens generated so far by every unfinished row
        while True:
            pos = P + t
            scores = process_logits(logits, tokens[:, :pos], valid[:, :pos], generated[:, :pos], cfg)
            scores = _unless_all_banned(scores, [row.done for row in rows])
            next_ids = sample_next(scores, cfg, generator)  # (B,)
            chosen, top_logp, top_ids = token_logprobs(logits, next_ids, cfg.logprobs)  # raw log-probs
            tokens[:, pos], valid[:, pos], generated[:, pos] = next_ids, True, True
            now = time.perf_counter() - start
            # Per new token, every row's (id, log-prob, top alternatives); one device-to-host copy each.
            steps = [host_step(next_ids, chosen, top_ids, top_logp, cfg.logprobs)]
            draft = drafter.draft(int(next_ids[0]), min(cfg.speculate, N - t - 1)) if drafter else []
            if draft:
                logits, accepted = self._verify(tokens, valid, generated, pos, draft, cache, cfg)
                steps += [
                    host_step(d[None], lp[None], ti[None], tl[None], cfg.logprobs)
                    for d, lp, ti, tl in accepted
                ]
            for j, (step_ids, step_logp, step_top) in enumerate(steps):
                for i, row in enumerate(rows):
                    if row.done:
                        continue
                    c = row.completion
                    if t + j == 0:
                        c.time_to_first_token = now
                    self.take(c, step_ids[i], step_logp[i], step_top[i] if step_top else None, cfg, stop_ids)
                    if not row.done and t + j == N - 1:
                        c.finish_reason = "length"
                    c.seconds = time.perf_counter() - start if j else now
            for i, row in enumerate(rows):
                if (delta := release(row, i, hold)) is not None:
                    yield delta
            t += len(steps)
            if all(row.done for row in rows):
                break
            if drafter:
                drafter.extend(step_ids[0] for step_ids, _, _ in steps[1:])  # the accepted drafts
            if not draft:
                logits = self.decode(next_ids[:, None], valid, cache, pos, padded)
        yield [row.completion for row in rows]

    def warm_up(self) -> None:
        """Compile the decode step now for both batch-size buckets (1, and 2 or more), not at the first calls."""
        if self.compiled is None:
            return
        dtype, extra = next(self.model.parameters()).dtype, self.model.extra_positions
        with torch.no_grad():
            # An eager prefill of one token, then one compiled step; the cache keeps a column free, as every
            # real step's does (the graph may depend on that). The values do not matter.
            for B in (1, 2):
                cache = KVCache(self.config, B, extra + 3, self.device, dtype)
                ids = torch.zeros((B, 1), dtype=torch.long, device=self.device)
                self.model(ids, cache=cache, last_only=True)
                self.decode(ids, torch.ones((B, 2), dtype=torch.bool, device=self.device), cache, 1)

    def decode(self, ids: Tensor, valid: Tensor, cache: KVCache, pos: int, padded: bool = True) -> Tensor:
        """The logits (B, V) after one decode step: `ids` (B, 1) are every row's token at column `pos` (the
        cache's next column), `valid` (B, >= pos + 1) marks each row's real tokens. Eager, or the compiled
        static step."""
        if self.compiled is None:
            mask = valid[:, : pos + 1] if padded else None
            return self.model(ids, attention_mask=mask, cache=cache, last_only=True)[:, -1].float()
        if cache.length != pos + self.model.extra_positions:
            raise ValueError(f"column {pos} is not the cache's next one ({cache.length} filled)")
        # The step attends to the filled columns only (fewer bytes read). A copy, so that the graph always meets
        # the same strides (a slice's row stride is the full width, a (1, n) slice counts as contiguous).
        seen = valid[:, : pos + 1].clone(memory_format=torch.contiguous_format)
        torch._dynamo.maybe_mark_dynamic(ids, 0)
        torch._dynamo.maybe_mark_dynamic(seen, 0)
        torch._dynamo.maybe_mark_dynamic(seen, 1)
        cache.index = self._index.fill_(cache.length)
        try:
            logits = self.compiled(self.model, ids, seen, cache)
        finally:
            cache.index = None  # the cache is static only inside the step; eager forwards read `length`
        cache.length += 1
        return logits

    def take(
        self,
        c: Completion,
        token: int,
        logp: float,
        top: dict | None,
        cfg: GenerationConfig,
        stop_ids: set[int],
    ) -> None:
        """Append one generated token to a sample, or finish it at an end-of-turn id or a stop string."""
        if token in stop_ids:
            c.finish_reason, c.stop_token = "stop", token
            return
        c.token_ids.append(token)
        c.logprobs.append(logp)
        if top is not None:
            c.top_logprobs.append(top)
        c.text = self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        hits = [c.text.find(s) for s in cfg.stop if s in c.text]  # earlier text had none
        if hits:
            c.text, c.finish_reason = c.text[: min(hits)], "stop"

    def _verify(
        self,
        tokens: Tensor,
        valid: Tensor,
        generated: Tensor,
        pos: int,
        draft: list[int],
        cache: KVCache,
        cfg: GenerationConfig,
    ) -> tuple[Tensor, list[tuple[Tensor, ...]]]:
        """Check `draft` (ids for positions pos+1...) after the token at `pos` in one forward of one row: the draft
        tokens greedy decoding would have chosen too, each with its (id, log-prob, top log-probs, top ids), and the
        logits (1, V) for the position after them. The cache keeps only the accepted positions."""
        k, end = len(draft), pos + 1 + len(draft)
        drafted = torch.tensor(draft, device=tokens.device)  # (k,)
        tokens[0, pos + 1 : end] = drafted
        valid[0, pos + 1 : end], generated[0, pos + 1 : end] = True, True
        # (k + 1, V): the logits after positions pos, pos + 1, ..., pos + k
        raw = self.model(tokens[:, pos:end], cache=cache)[0].float()
        # Position pos+j's history is the row up to it: one (k + 1)-row batch of prefixes for the processors.
        seen = (
            torch.arange(end, device=tokens.device)[None]
            <= torch.arange(pos, end, device=tokens.device)[:, None]
        )
        history = (tokens[:, :end].expand(k + 1, -1), valid[:, :end] & seen, generated[:, :end] & seen)
        best = process_logits(raw, *history, cfg).argmax(-1)  # (k + 1,): greedy's choice after each position
        n = int((best[:k] == drafted).long().cumprod(0).sum())  # drafts accepted: the agreeing prefix
        cache.length -= k - n
        valid[0, pos + 1 + n : end], generated[0, pos + 1 + n : end] = False, False
        logp, top_logp, top_ids = token_logprobs(raw[:n], drafted[:n], cfg.logprobs)
        return raw[n : n + 1], list(zip(drafted[:n], logp, top_ids, top_logp, strict=True))


def _static_step(model: nn.Module, ids: Tensor, valid: Tensor, cache: KVCache) -> Tensor:
    """One decode step on a static cache (`cache.index` set): logits (B, V) in fp32."""
    return model(ids, attention_mask=valid, cache=cache, last_only=True)[:, -1].float()


def compile_decode_step() -> Any:
    """`_static_step` under `torch.compile`: on the CPU with Inductor's C++ wrapper, which calls the kernels
    without a Python frame per op (3.5 ms against 4.5 ms a step for llama-14m here)."""
    options = {} if torch.cuda.is_available() else {"cpp_wrapper": True}
    return torch.compile(_static_step, options=options)


def held_back(cfg: GenerationConfig) -> int:
    """Characters of a sample's text not yet streamed because a stop string could still claim them."""
    return max((len(s) for s in cfg.stop), default=1) - 1


def release(row: Row, index: int, hold: int) -> Delta | None:
    """The text a row can stream now: all of it once finished, else up to a possibly partial character
    or stop string."""
    c = row.completion
    end = len(c.text)
    if not row.done:
        end = max(row.released, end - hold)
        while end > row.released and c.text[end - 1] == REPLACEMENT:
            end -= 1  # an incomplete multi-byte character: wait for its last byte
    if end == row.released and not row.done:
        return None
    delta = Delta(index, c.text[row.released : end], c.finish_reason)
    row.released = end
    return delta


def host_step(
    ids: Tensor, logp: Tensor, top_ids: Tensor, top_logp: Tensor, top: int
) -> tuple[list, list, list | None]:
    """One new token of every row on the host: ids, log-probs and {id: log-prob} of the top alternatives."""
    tops = [dict(zip(i, lp, strict=True)) for i, lp in zip(top_ids.tolist(), top_logp.tolist(), strict=True)]
    return ids.tolist(), logp.tolist(), tops if top else None


class NgramIndex:
    """Prompt-lookup drafting: the ids that followed the latest earlier occurrence of the sequence's last n ids
    (n = `max_ngram` down to 1, as vLLM's n-gram speculator and transformers' prompt lookup), from an index of
    every n-gram's latest start, kept up to date as ids arrive."""

    def __init__(self, ids: Sequence[int], max_ngram: int = 3) -> None:
        self.ids: list[int] = []
        self.max_ngram = max_ngram
        self.starts: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram + 1)]
        self.extend(ids)

    def extend(self, ids: Iterable[int]) -> None:
        """Append ids; an n-gram is indexed once an id follows it (so a draft always has a first id)."""
        for token in ids:
            L = len(self.ids)
            for n in range(1, min(self.max_ngram, L) + 1):
                self.starts[n][tuple(self.ids[L - n :])] = L - n
            self.ids.append(token)

    def draft(self, token: int, k: int) -> list[int]:
        """Append `token`, then up to `k` ids that followed the longest recent match of the sequence's end."""
        self.extend([token])
        L = len(self.ids)
        for n in range(min(self.max_ngram, L - 1), 0, -1):
            start = self.starts[n].get(tuple(self.ids[L - n :]))
            if start is not None:
                # What followed, copied with overlap as LZ77 does: a match just behind the end repeats as a cycle.
                draft: list[int] = []
                for i in range(start + n, start + n + k):
                    draft.append(self.ids[i] if i < L else draft[i - L])
                return draft
        return []


class TokenText:
    """Each token id's bytes and its text alone, as OpenAI's logprobs report them: byte-level BPE pieces map back
    to their bytes, byte-fallback pieces (`<0xE2>`) to their byte, added tokens to their text."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.backend = tokenizer.backend
        decoder = json.loads(self.backend.to_str()).get("decoder") or {}
        steps, stack = [], [decoder]
        while stack:  # the decoder and, inside a Sequence, its steps
            step = stack.pop()
            steps.append(step)
            stack.extend(step.get("decoders") or [])
        kinds = {step.get("type") for step in steps}
        self.byte_level, self.byte_fallback = "ByteLevel" in kinds, "ByteFallback" in kinds
        # SentencePiece-style pieces spell a space "▁": Metaspace, or Replace("▁", " ") (Llama 2)
        self.spaces = [
            (step.get("replacement", "▁"), " ") for step in steps if step.get("type") == "Metaspace"
        ]
        self.spaces += [
            (step["pattern"]["String"], step.get("content", ""))
            for step in steps
            if step.get("type") == "Replace" and "String" in (step.get("pattern") or {})
        ]
        self.added = {i: t.content for i, t in self.backend.get_added_tokens_decoder().items()}

    def bytes(self, token: int) -> bytes:
        """The bytes `token` stands for (b"" for an id past the tokenizer's vocabulary)."""
        if token in self.added:
            return self.added[token].encode()
        piece = self.backend.id_to_token(token)
        if piece is None:
            return b""
        if self.byte_level:
            from lmforge.fast_bpe import byte_level_bytes

            table = byte_level_bytes()
            return b"".join(bytes([table[ch]]) if ch in table else ch.encode() for ch in piece)
        if self.byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            return bytes([int(piece[3:5], 16)])
        if self.spaces:
            for old, new in self.spaces:
                piece = piece.replace(old, new)
            return piece.encode()
        return self.backend.decode([token]).encode()

    @staticmethod
    def text(data: bytes) -> str:
        """`data` as text, each byte of an incomplete character escaped as `\\xNN` (DeepSeek's API does so; vLLM
        gives U+FFFD); the bytes field carries them exactly."""
        return data.decode("utf-8", errors="backslashreplace")

    def entry(self, token: int, logprob: float) -> dict:
        """OpenAI's {"token", "logprob", "bytes"} of one token, with its "id"."""
        data = self.bytes(token)
        return {"id": token, "token": self.text(data), "logprob": logprob, "bytes": list(data)}

    def logprobs(self, c: Completion, tokens: slice = slice(None)) -> list[dict]:
        """OpenAI's `logprobs.content` of one sample's `tokens` (all by default): each token's entry and its
        `top_logprobs` entries."""
        tops = c.top_logprobs or [{} for _ in c.token_ids]  # empty when no alternatives were asked for
        return [
            {**self.entry(token, logprob), "top_logprobs": [self.entry(t, lp) for t, lp in top.items()]}
            for token, logprob, top in zip(c.token_ids[tokens], c.logprobs[tokens], tops[tokens], strict=True)
        ]


def _unless_all_banned(scores: Tensor, done: Sequence[bool]) -> Tensor:
    """`scores` (B, V), unless processors banned every token of an unfinished row (an error: softmax would be
    NaN, argmax an arbitrary id); a finished row's all-banned scores become uniform (its draw is dropped)."""
    banned = torch.isneginf(scores).all(-1)  # (B,)
    if not banned.any():
        return scores
    if any(b and not d for b, d in zip(banned.tolist(), done, strict=True)):
        raise LmforgeError(
            "every token is banned at this step (no_repeat_ngram_size, logit_bias -100 or top-k/top-p/min-p "
            "leave none): lower no_repeat_ngram_size or lift a ban"
        )
    return scores.masked_fill(banned[:, None], 0.0)


def check_room(lengths: Sequence[int], context: int, max_new_tokens: int, *, flags: bool = False) -> None:
    """Raise an LmforgeError that states the real limit when the longest prompt and `max_new_tokens` do not fit
    the `context`; `flags` names the command-line flags in its advice."""
    index = max(range(len(lengths)), key=lengths.__getitem__)  # the first of the longest
    length = lengths[index]
    if length + max_new_tokens <= context:
        return
    name, truncate = ("--max-new-tokens", ", or pass --truncate") if flags else ("max_new_tokens", "")
    if length >= context:
        raise LmforgeError(
            f"the prompt (prompt {index}, {length} tokens) fills the model's context of {context} tokens, "
            f"leaving no room for a new token; shorten it{truncate}"
        )
    raise LmforgeError(
        f"max_new_tokens {max_new_tokens}: the model's context is {context} tokens and the prompt (prompt "
        f"{index}, {length} tokens) leaves room for at most {context - length} new tokens; lower {name}, "
        f"shorten the prompt{truncate}"
    )
