"""Continuous batching: requests join the running batch at any decode step and leave it when they finish.

The engine's `generate` decodes a fixed batch; a server's requests arrive while others decode. The `Scheduler`
keeps one running batch and, at each step:

1. admits waiting requests while the batch has room (`max_batch` rows) and prefills them together (their own
   left-padded forward, exactly as the engine's prefill);
2. re-lays the batch out when rows joined or many left: every row's keys and values are copied so that all rows
   end at the same cache column (rows are left-padded; `valid` marks each row's real tokens and positions
   restart after its padding, so a row computes what it would alone);
3. picks each row's next token with its own request's settings (rows with the same processors in one call;
   a seeded request draws from its own generator), streams the released text, and retires finished rows;
4. runs one decode forward over every row (rows that finished since the last re-layout are carried with their
   new positions masked).

A request that is cancelled (its client went away) or past its deadline leaves at the next step. With a
`LoraBank`, each row names its adapter: requests for different LoRA adapters share the forward passes.

It runs in one thread (`start`); `submit` and `cancel` are safe from any thread, and `call` runs a function
between two steps (loading or unloading an adapter). `step` can be driven directly (tests, batch jobs).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmforge.adapters.multilora import LoraBank
from lmforge.errors import LmforgeError
from lmforge.infer.engine import (
    Completion,
    Delta,
    Engine,
    Row,
    check_room,
    held_back,
    host_step,
    release,
)
from lmforge.infer.sampling import (
    GenerationConfig,
    process_logits,
    sample_next,
    sampling_generator,
    token_logprobs,
)
from lmforge.model.decoder import KVCache

Event = Delta | list[Completion] | LmforgeError
"""What a request's sink receives: text deltas, then its completions, or an error that ended it."""


class QueueFull(LmforgeError):
    """The scheduler's queue is full: the client should retry later."""


class TimedOut(LmforgeError):
    """A request ran past its timeout."""


@dataclass(eq=False)
class Request:
    """One generation request: prompt ids, settings, an adapter name (None: the base) and a sink for its events
    (called from the scheduler's thread)."""

    ids: list[int]
    cfg: GenerationConfig
    sink: Callable[[Event], None]
    adapter: str | None = None
    timeout: float | None = None
    """Seconds from submission after which the request ends with an error."""
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    closed: bool = False
    """Its completions or error were sent: nothing more reaches its sink."""
    rows: list[Row] = field(default_factory=list)
    generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        """Whether every sample has finished."""
        return bool(self.rows) and all(row.done for row in self.rows)


@dataclass(eq=False)
class _Slot:
    """A row of the running batch: which request and sample, where its tokens start, how many it generated."""

    request: Request
    sample: int
    start: int  # the cache column of its first token
    steps: int = 0

    @property
    def row(self) -> Row:
        return self.request.rows[self.sample]

    @property
    def remaining(self) -> int:
        return self.request.cfg.max_new_tokens - self.steps


class Scheduler:
    """The running batch of an `Engine`, fed from a bounded queue of requests."""

    def __init__(
        self,
        engine: Engine,
        *,
        bank: LoraBank | None = None,
        max_batch: int = 32,
        max_queue: int = 256,
    ) -> None:
        if engine.model.extra_positions:
            raise LmforgeError(
                "a prompt-tuned model cannot be served with continuous batching yet; use lmforge generate/chat"
            )
        self.engine, self.bank = engine, bank
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: deque[Request] = deque()
        self.slots: list[_Slot] = []
        self.calls: deque[tuple[Callable[[], Any], list, threading.Event]] = deque()
        self.wake = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self._empty()

    # ----------------------------------------------------------------------------------- other threads

    @property
    def running(self) -> int:
        """Requests in the running batch."""
        return len({id(s.request) for s in self.slots if not s.request.closed})

    @property
    def batch_size(self) -> int:
        """Unfinished rows in the running batch."""
        return sum(not s.row.done for s in self.slots)

    def submit(self, request: Request) -> None:
        """Queue `request` (an LmforgeError for a prompt that does not fit, QueueFull when the queue is full)."""
        if not request.ids:
            raise LmforgeError("a prompt is empty: give at least one token")
        if request.cfg.n > self.max_batch:
            raise LmforgeError(f"n={request.cfg.n}: the batch holds at most {self.max_batch} samples")
        check_room([len(request.ids)], self.engine.context, request.cfg.max_new_tokens)
        with self.wake:
            if request.adapter is not None and (self.bank is None or request.adapter not in self.bank.names):
                raise LmforgeError(f"no adapter {request.adapter!r} is loaded")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting): retry later")
            self.waiting.append(request)
            self.wake.notify()

    def cancel(self, request: Request) -> None:
        """End `request` at the next step (its client went away); its sink hears nothing more."""
        request.cancelled = True
        with self.wake:
            self.wake.notify()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` in the scheduler's thread between two steps (or here when no thread runs); its result, or
        its exception raised here."""
        if self.thread is None:
            return fn()
        box: list = []
        done = threading.Event()
        with self.wake:
            self.calls.append((fn, box, done))
            self.wake.notify()
        done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def load(self, name: str, adapter_dir: Path) -> None:
        """Load a LoRA adapter as `name`, between two steps."""
        if self.bank is None:
            raise LmforgeError("this scheduler has no adapter bank")
        self.call(lambda: self.bank.add(name, adapter_dir))

    def unload(self, name: str) -> None:
        """Unload adapter `name` between two steps; an LmforgeError while a request waits for or decodes with
        it."""

        def unload() -> None:
            with self.wake:  # no request can name it between the check and the removal
                busy = sum(r.adapter == name for r in self.waiting)
                busy += len(
                    {id(s.request) for s in self.slots if s.request.adapter == name and not s.request.closed}
                )
                if busy:
                    raise LmforgeError(
                        f"adapter {name!r} serves {busy} request(s): unload it when they finish"
                    )
                if self.bank is None:
                    raise LmforgeError(f"no adapter {name!r} is loaded")
                self.bank.remove(name)

        self.call(unload)

    def start(self) -> None:
        """Run the loop in a daemon thread."""
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="lmforge-scheduler", daemon=True)
        self.thread.start()

    def ensure_started(self) -> None:
        """Start the loop unless it runs (an app used without its startup event, e.g. a bare TestClient)."""
        with self.wake:
            if self.thread is None:
                self.start()

    def stop(self) -> None:
        """End the loop after its current step."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)
            self.thread = None

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not (self.stopping or self.waiting or self.calls or self.slots):
                    self.wake.wait()
                if self.stopping:
                    return
            self.step()

    # ------------------------------------------------------------------------------------- the loop

    def step(self) -> bool:
        """Run calls, admit and prefill waiting requests, pick every row's next token, decode one step; whether
        any row is still running."""
        self._run_calls()
        self._drop_ended()
        joining = self._admit()
        dead = sum(s.row.done for s in self.slots)
        if joining or dead > max(4, len(self.slots) // 4) or (self.slots and self.end >= self.cap):
            self._relayout(joining)
        if not self.slots:
            return False
        self._choose()
        self._retire()
        if all(s.row.done for s in self.slots):
            self._empty()
            return bool(self.waiting)
        self._decode()
        return True

    def run_until_done(self) -> None:
        """Step until no request waits or runs (without a thread)."""
        while self.step() or self.waiting:
            pass

    def _run_calls(self) -> None:
        while self.calls:
            with self.wake:
                fn, box, done = self.calls.popleft()
            try:
                box.append(fn())
            except BaseException as e:  # handed to the caller's thread
                box.append(e)
            done.set()

    def _drop_ended(self) -> None:
        """Retire cancelled requests and those past their deadline (these hear an error)."""
        now = time.perf_counter()
        with self.wake:
            for r in [r for r in self.waiting if r.cancelled or _late(r, now)]:
                self.waiting.remove(r)
                if not r.cancelled:
                    r.sink(TimedOut(f"the request took over its timeout of {r.timeout:g} s"))
        for r in {id(s.request): s.request for s in self.slots}.values():
            if r.closed or not (r.cancelled or _late(r, now)):
                continue
            timeout = (
                None if r.cancelled else TimedOut(f"the request took over its timeout of {r.timeout:g} s")
            )
            self._close(r, timeout)

    def _admit(self) -> list[Request]:
        """Waiting requests whose samples fit the batch, in arrival order."""
        room = self.max_batch - sum(not s.row.done for s in self.slots)
        joining = []
        with self.wake:
            while self.waiting and self.waiting[0].cfg.n <= room:
                r = self.waiting.popleft()
                room -= r.cfg.n
                joining.append(r)
        return joining

    def _empty(self) -> None:
        """No rows: free the batch's tensors."""
        self.slots = []
        self.cache: KVCache | None = None
        self.tokens = self.valid = self.generated = torch.zeros(0, 0)
        self.logits: Tensor | None = None  # (B, V) the logits of each row's next token
        self.end = self.cap = 0

    @torch.no_grad()
    def _relayout(self, joining: list[Request] | None) -> None:
        """Drop finished rows, prefill `joining`, and lay every row out so that all end at one column, with room
        for the longest remaining generation."""
        engine, dev = self.engine, self.engine.device
        keep = [i for i, s in enumerate(self.slots) if not s.row.done]
        kept = [self.slots[i] for i in keep]
        prompts = [r.ids for r in joining or [] for _ in range(r.cfg.n)]
        kept_span = max((self.end - s.start for s in kept), default=0)
        width = max(map(len, prompts), default=0)
        span = max(kept_span, width)
        room = max([s.remaining for s in kept] + [r.cfg.max_new_tokens for r in joining or []])
        B, cap = len(kept) + len(prompts), span + room + 1
        dtype = next(engine.model.parameters()).dtype
        cache = KVCache(engine.config, B, cap, dev, dtype)
        tokens = torch.full((B, cap), engine.tokenizer.pad_id or 0, dtype=torch.long, device=dev)
        valid = torch.zeros((B, cap), dtype=torch.bool, device=dev)
        generated = torch.zeros_like(valid)
        logits = []
        if kept:
            idx = torch.tensor(keep, device=dev)
            old, new = slice(self.end - kept_span, self.end), slice(span - kept_span, span)
            cache.place(slice(len(kept)), new, self.cache, idx, old)
            for dst, src in ((tokens, self.tokens), (valid, self.valid), (generated, self.generated)):
                dst[: len(kept), new] = src[idx, old]
            logits.append(self.logits[idx])
            for s in kept:
                s.start += span - self.end
        slots = kept
        if prompts:
            logits.append(self._prefill(joining, prompts, cache, tokens, valid, span, len(kept)))
            for r in joining:
                slots += [_Slot(r, i, span - len(r.ids)) for i in range(r.cfg.n)]
        self.slots, self.cache, self.tokens, self.valid, self.generated = (
            slots,
            cache,
            tokens,
            valid,
            generated,
        )
        self.logits, self.end, self.cap = torch.cat(logits), span, cap
        cache.length = span

    def _prefill(
        self,
        joining: list[Request],
        prompts: list[list[int]],
        cache: KVCache,
        tokens: Tensor,
        valid: Tensor,
        span: int,
        first: int,
    ) -> Tensor:
        """Prefill the joining rows (left-padded to the longest, as the engine does) into rows first... of the
        batch's cache, ending at column `span`; their next-token logits (b, V)."""
        engine, dev = self.engine, self.engine.device
        b, P = len(prompts), max(map(len, prompts))
        ids = torch.full((b, P), engine.tokenizer.pad_id or 0, dtype=torch.long, device=dev)
        mask = torch.zeros((b, P), dtype=torch.bool, device=dev)
        for i, p in enumerate(prompts):
            ids[i, P - len(p) :], mask[i, P - len(p) :] = torch.tensor(p, device=dev), True
        own = KVCache(engine.config, b, P, dev, cache.k[0].dtype)
        self._select([r.adapter for r in joining for _ in range(r.cfg.n)])
        padded = not bool(mask.all())
        out = engine.model(ids, attention_mask=mask if padded else None, cache=own, last_only=True)
        rows = slice(first, first + b)
        cache.place(rows, slice(span - P, span), own)
        tokens[rows, span - P : span], valid[rows, span - P : span] = ids, mask
        for r in joining:
            r.rows = [Row(Completion(0, i, prompt_tokens=len(r.ids))) for i in range(r.cfg.n)]
            r.generator = sampling_generator(r.cfg.seed, dev)
        return out[:, -1].float()  # (b, V)

    def _select(self, adapters: list[str | None]) -> None:
        if self.bank is not None:
            self.bank.select([self.bank.slot(a) for a in adapters])

    def _choose(self) -> None:
        """Each unfinished row's next token by its request's settings; stream what it releases."""
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(self.slots):
            if not s.row.done:
                groups.setdefault(_processing(s.request.cfg), []).append(i)
        now = time.perf_counter()
        for members in groups.values():
            cfg = self.slots[members[0]].request.cfg
            idx = torch.tensor(members, device=self.engine.device)
            logits = self.logits[idx]  # (b, V)
            history = (
                self.tokens[idx, : self.end],
                self.valid[idx, : self.end],
                self.generated[idx, : self.end],
            )
            scores = process_logits(logits, *history, cfg)
            banned = torch.isneginf(scores).all(-1).tolist()  # (b,) no token left: that request fails
            if any(banned):
                for i, b in zip(members, banned, strict=True):
                    if b:
                        error = LmforgeError("every token is banned at this step (logit_bias)")
                        self._close(self.slots[i].request, error)
                scores = scores.masked_fill(torch.tensor(banned, device=scores.device)[:, None], 0.0)
            gens = [self.slots[i].request.generator for i in members]
            next_ids = sample_next(scores, cfg, gens if any(g is not None for g in gens) else None)
            chosen, top_logp, top_ids = token_logprobs(logits, next_ids, cfg.logprobs)
            self.tokens[idx, self.end] = next_ids
            step_ids, step_logp, step_top = host_step(next_ids, chosen, top_ids, top_logp, cfg.logprobs)
            for j, i in enumerate(members):
                s = self.slots[i]
                c = s.row.completion
                if s.request.closed:  # failed above
                    continue
                if s.steps == 0:
                    c.time_to_first_token = now - s.request.arrived
                self.engine.take(c, step_ids[j], step_logp[j], step_top[j] if step_top else None,
                                 s.request.cfg, self.engine.stops(s.request.cfg))  # fmt: skip
                s.steps += 1
                if not s.row.done and s.steps == s.request.cfg.max_new_tokens:
                    c.finish_reason = "length"
                c.seconds = time.perf_counter() - s.request.arrived
                if (delta := release(s.row, s.sample, held_back(s.request.cfg))) is not None:
                    delta.tokens, s.row.reported = (s.row.reported, len(c.token_ids)), len(c.token_ids)
                    s.request.sink(delta)

    def _close(self, request: Request, error: LmforgeError | None) -> None:
        """End a request early: its rows finish (and leave at the next re-layout); its sink hears `error`."""
        for row in request.rows:
            row.completion.finish_reason = row.completion.finish_reason or "abort"
        if error is not None:
            request.sink(error)
        request.closed = True

    def _retire(self) -> None:
        """Send each request whose samples all finished its completions."""
        for r in {id(s.request): s.request for s in self.slots}.values():
            if r.done and not r.closed:
                r.sink([row.completion for row in r.rows])
                r.closed = True

    @torch.no_grad()
    def _decode(self) -> None:
        """One forward of every row's new token (finished rows carry a masked pad)."""
        live = torch.tensor([not s.row.done for s in self.slots], device=self.engine.device)
        pos = self.end
        self.tokens[:, pos].masked_fill_(~live, self.engine.tokenizer.pad_id or 0)
        self.valid[:, pos], self.generated[:, pos] = live, live
        self._select([s.request.adapter for s in self.slots])
        ids = self.tokens[:, pos : pos + 1].contiguous()  # (B, 1)
        self.logits, self.end = self.engine.decode(ids, self.valid, self.cache, pos), pos + 1  # (B, V)


def _late(request: Request, now: float) -> bool:
    return request.timeout is not None and now - request.arrived > request.timeout


def _processing(cfg: GenerationConfig) -> tuple:
    """What decides how a row's logits become its next token: rows with the same key are processed together."""
    return (cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, cfg.repetition_penalty, cfg.frequency_penalty,
            cfg.presence_penalty, cfg.no_repeat_ngram_size, tuple(sorted(cfg.logit_bias.items())), cfg.logprobs)  # fmt: skip
