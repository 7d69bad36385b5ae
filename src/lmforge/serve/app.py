"""The OpenAI-compatible app: FastAPI routes over the one inference engine's continuous-batching scheduler.

A completion request becomes a `Request` of the `Scheduler`, which decodes it in the running batch (with the
LoRA adapter its `model` names) and hands its events to the route through an asyncio queue. A client that goes
away cancels its request: its rows leave the batch at the next step. A full queue is a 429 with Retry-After.
Every error is OpenAI's error object; no stack trace reaches a client.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.adapters.multilora import LoraBank
from lmforge.errors import LmforgeError
from lmforge.infer.embed import Embedder
from lmforge.infer.engine import Completion, Delta, Engine, TokenText
from lmforge.infer.prompts import prompt_ids
from lmforge.infer.sampling import GenerationConfig, generation_config
from lmforge.infer.scheduler import Event, QueueFull, Scheduler, TimedOut
from lmforge.infer.scheduler import Request as Job
from lmforge.rag.index import RagIndex
from lmforge.rag.prompt import RagPrompt, Retriever, rag_prompt_ids
from lmforge.serve.metrics import Metrics
from lmforge.serve.policy import (
    Action,
    InputDecision,
    OutputFilter,
    Policy,
    PolicyFile,
    check_input,
    filter_reply,
)
from lmforge.serve.schemas import ChatRequest, CompletionRequest, EmbeddingRequest, FeedbackRequest
from lmforge.serve.traffic import RequestLog, Route, bucket_counts
from lmforge.serve.web import mount_web

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered as OpenAI's error object with this status."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


class AdapterLoad(BaseModel):
    """POST /admin/adapters: load a LoRA adapter directory (on the server's disk) under a name."""

    model_config = ConfigDict(extra="forbid")

    name: str
    path: str


def _error(
    status: int, message: str, kind: str, param: str | None = None, headers: dict | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status, headers=headers)


def create_app(
    model: Engine | Embedder,
    name: str,
    *,
    adapters: Mapping[str, str | Path] | None = None,
    base_dir: str | Path | None = None,
    api_key: str | None = None,
    max_body: int = 1 << 20,
    max_batch: int = 32,
    max_queue: int = 256,
    timeout: float | None = 600.0,
    rag: Mapping[str, str | Path] | None = None,
    policy: PolicyFile | None = None,
    routes: Sequence[Route] = (),
    request_log: RequestLog | None = None,
) -> FastAPI:
    """The app serving `model` as `name`: a decoder's engine (chat and text completions, continuous batching of
    up to `max_batch` samples, `max_queue` requests waiting, each ending after `timeout` seconds) with LoRA
    `adapters` (name → directory) chosen per request, or an encoder's embedder (embeddings). With `api_key`,
    every /v1 and /admin route needs `Authorization: Bearer KEY`; a body over `max_body` bytes is a 413.
    `base_dir` (the base model's directory) lets adapters be checked against the weights they trained on. `rag`
    (name → index directory) are the RAG indexes a chat request may ask for with "rag". A `policy` (guardrails,
    serve/policy.py) applies its input rules to each chat request and its output rules to each reply, streamed
    or not; the rules that acted come back in the response's "policy" field. `routes` split a name between
    variants (sticky per `user`); `request_log` records every chat request and the feedback on it."""
    engine = model if isinstance(model, Engine) else None
    scheduler = bank = None
    if engine is not None:
        bank = LoraBank(engine.model, Path(base_dir) if base_dir is not None else None)
        for adapter, path in (adapters or {}).items():
            _check_name(adapter, name, bank)
            bank.add(adapter, Path(path))
        scheduler = Scheduler(engine, bank=bank, max_batch=max_batch, max_queue=max_queue)
    elif adapters:
        raise LmforgeError("an encoder is served for embeddings, without adapters")
    embed_slot = _Slot()  # an encoder embeds one request at a time
    indexes = {key: RagIndex(Path(path)) for key, path in (rag or {}).items()}
    served_names = {name, *(bank.names if bank else [])}
    routed = {}
    for route in routes:
        unknown = [v for v, _ in route.variants if v not in served_names]
        if unknown or route.name in served_names or route.name in routed:
            why = f"variants {', '.join(unknown)} are not served" if unknown else "its name is taken"
            raise LmforgeError(f"--route {route.name}: {why} (served: {', '.join(sorted(served_names))})")
        routed[route.name] = route
    answered: dict[str, None] = {}  # response ids feedback may name (the newest 100,000)

    def log_request(rid: str, body: ChatRequest | CompletionRequest, asked: dict[str, Any] | None,
                    actions: list[Action], ids: list[int], done: list[Completion], latency_s: float,
                    finish: str | None, prompt: Any = None, reply: str = "") -> None:  # fmt: skip
        """One request's line in the request log (when there is one); its id may then receive feedback."""
        if request_log is None:
            return
        answered[rid] = None
        if len(answered) > 100_000:
            del answered[next(iter(answered))]
        vocab = engine.tokenizer.vocab_size if engine is not None else 1
        entry = {"type": "request", "time": _now(), "id": rid, **(asked or {"model": body.model, "route": None}),
                 "variant": body.model, "user": body.user, "prompt_tokens": len(ids),
                 "completion_tokens": sum(len(c.token_ids) for c in done), "ttft_s": _ttft(done),
                 "latency_s": latency_s, "finish_reason": finish, "policy": [asdict(a) for a in actions],
                 "prompt_token_hist": bucket_counts(ids, vocab).tolist()}  # fmt: skip
        if request_log.text:
            entry |= {"messages": prompt, "completion": reply}
        request_log.write(entry)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if scheduler is not None:
            scheduler.ensure_started()
        yield
        if scheduler is not None:
            scheduler.stop()

    def gauges() -> dict[str, int]:
        if scheduler is None:
            return {"waiting": embed_slot.waiting, "running": embed_slot.running, "batch": embed_slot.running}
        return {
            "waiting": len(scheduler.waiting),
            "running": scheduler.running,
            "batch": scheduler.batch_size,
        }

    app = FastAPI(title="lmforge", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    metrics = Metrics(gauges)
    text = TokenText(engine.tokenizer) if engine is not None else None
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message, e.kind, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            return _error(400, f"the body is not valid JSON ({first['ctx'].get('error', 'invalid')})",
                          "invalid_request_error")  # fmt: skip
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return _error(
            400, f"{param}: {first['msg']}" if param else first["msg"], "invalid_request_error", param
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        # The framework's own answers (no route, wrong method, an unreadable body) as OpenAI's error object.
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error(e.status_code, str(e.detail), kind, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return _error(500, "the server failed on this request (its log has the details)", "server_error")

    def authorised(request: Request) -> None:
        if api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise ApiError(
                401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "authentication_error"
            )

    def admin(request: Request) -> None:
        if api_key is None:
            raise ApiError(403, "adapters are managed with the server's key: start it with --api-key",
                           "permission_error")  # fmt: skip
        authorised(request)

    @app.middleware("http")
    async def measured(request: Request, call_next: Any) -> Any:
        start = time.perf_counter()
        if int(request.headers.get("content-length") or 0) > max_body:
            response = _error(413, f"the request body is over {max_body:,} bytes", "invalid_request_error")
        else:
            response = await call_next(request)
        # A streamed response counts when its headers go out; its tokens when its last event does.
        metrics.request(request.url.path, response.status_code, time.perf_counter() - start)
        return response

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> str:
        return metrics.render()

    @app.get("/v1/models", dependencies=[Depends(authorised)])
    def models() -> dict[str, Any]:
        base = {"id": name, "object": "model", "created": created, "owned_by": "lmforge"}
        served = [{**base, "id": a, "parent": name} for a in (bank.names if bank else [])]
        return {"object": "list", "data": [base, *served]}

    def adapter_of(asked: str) -> str | None:
        """The adapter a request's `model` names (None: the base); a 404 for a model not served here."""
        if asked == name:
            return None
        if bank is not None and asked in bank.names:
            return asked
        served = ", ".join(repr(m) for m in [name, *(bank.names if bank else [])])
        raise ApiError(
            404, f"model {asked!r} is not served here; GET /v1/models lists {served}", param="model"
        )

    def index_of(asked: bool | str) -> RagIndex:
        """The RAG index a request asks for: true, the first; a name, that one."""
        if not indexes:
            raise ApiError(400, "this server has no RAG index: start it with --rag INDEX", param="rag")
        if asked is True:
            return next(iter(indexes.values()))
        if asked not in indexes:
            raise ApiError(404, f"no RAG index {asked!r}; this server has {', '.join(map(repr, indexes))}",
                           param="rag")  # fmt: skip
        return indexes[asked]

    def generator() -> tuple[Engine, Scheduler]:
        if engine is None or scheduler is None:
            raise ApiError(
                400, f"{name} is an encoder: it serves /v1/embeddings, not completions", param="model"
            )
        return engine, scheduler

    @app.post("/admin/adapters", dependencies=[Depends(admin)])
    def load_adapter(body: AdapterLoad) -> dict[str, Any]:
        _, scheduler = generator()
        try:
            _check_name(body.name, name, bank)
        except LmforgeError as e:
            raise ApiError(409, str(e), param="name") from None
        try:
            scheduler.load(body.name, Path(body.path))
        except LmforgeError as e:
            raise ApiError(400, str(e), param="path") from None
        return {"id": body.name, "object": "model", "parent": name, "loaded": True}

    @app.delete("/admin/adapters/{adapter}", dependencies=[Depends(admin)])
    def unload_adapter(adapter: str) -> dict[str, Any]:
        _, scheduler = generator()
        if bank is None or adapter not in bank.names:
            raise ApiError(404, f"no adapter {adapter!r} is loaded", param="adapter")
        try:
            scheduler.unload(adapter)
        except LmforgeError as e:
            raise ApiError(409, str(e), param="adapter") from None
        return {"id": adapter, "object": "model", "deleted": True}

    @app.post("/v1/embeddings", dependencies=[Depends(authorised)])
    def embeddings(body: EmbeddingRequest) -> Any:
        if body.model != name:
            adapter_of(body.model)  # the 404
        if not isinstance(model, Embedder):
            raise ApiError(
                400, f"{name} is a decoder: it serves completions, not /v1/embeddings", param="model"
            )
        texts = [body.input] if isinstance(body.input, str) else body.input
        with embed_slot:
            vectors, tokens = model.embed(texts)  # (N, C)
        if body.encoding_format == "base64":  # float32 little-endian bytes, as OpenAI sends them
            encoded = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() for v in vectors]
        else:
            encoded = [v.tolist() for v in vectors]
        data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)]
        return {"object": "list", "data": data, "model": name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip

    async def completion(
        request: Request,
        body: ChatRequest | CompletionRequest,
        prompt: str | list[dict],
        top: int | None,
        asked: dict[str, Any] | None = None,
        rules: Policy | None = None,
        decision: InputDecision | None = None,
    ) -> Any:
        """Decode one chat or text completion in the running batch: the whole response, or its events. Under a
        policy, `rules` are the output rules and `decision` what the input rules did."""
        acted = decision.actions if decision is not None else []
        referral = decision.referral if decision is not None else None
        adapter = adapter_of(body.model)
        engine, scheduler = generator()
        chat = isinstance(body, ChatRequest)
        max_tokens = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
        cfg = _config(engine, body, max_tokens, top or 0)
        rag_prompt: RagPrompt | None = None
        if chat and body.rag:
            retriever = Retriever(index_of(body.rag), k=body.rag_k or 5)
            want = cfg.max_new_tokens if max_tokens else min(cfg.max_new_tokens, engine.context // 2)
            try:  # the search embeds the question: off the event loop
                ids, rag_prompt = await run_in_threadpool(rag_prompt_ids, engine.tokenizer, retriever, prompt,
                                                          engine.context - want)  # fmt: skip
            except LmforgeError as e:
                raise ApiError(400, str(e), param="messages") from None
        else:
            ids = _ids(engine, prompt, cfg.max_new_tokens if max_tokens else 1, chat=chat)
        if not max_tokens:  # the model's default, or the rest of the context when that is less (OpenAI's)
            room = min(cfg.max_new_tokens, engine.context - len(ids))
            cfg = cfg.model_copy(update={"max_new_tokens": room})
        scheduler.ensure_started()
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(ids, cfg, lambda e: loop.call_soon_threadsafe(queue.put_nowait, e), adapter, timeout)
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise ApiError(429, str(e), "rate_limit_error", headers={"Retry-After": "1"}) from None
        except LmforgeError as e:
            raise ApiError(400, str(e)) from None
        kind = "chat.completion" if chat else "text_completion"
        rid, started = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", time.perf_counter()

        def record(done: list[Completion], replies: list[str], actions: list[Action]) -> None:
            log_request(rid, body, asked, actions, ids, done, time.perf_counter() - started,
                        done[0].finish_reason if done else None, prompt, replies[0] if replies else "")  # fmt: skip

        if body.stream:
            filters = (
                [OutputFilter(rules, referral=referral) for _ in range(cfg.n)] if rules is not None else None
            )
            events = _stream(job, queue, scheduler, metrics, text, body, kind, rag_prompt, filters, acted, rid,
                             record, asked)  # fmt: skip
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), 0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return None  # nobody to answer; `finally` frees the slot
                    continue
                if isinstance(event, list):
                    break
                if isinstance(event, LmforgeError):
                    raise _failed(event)
        finally:
            scheduler.cancel(job)  # a no-op once it finished
        done: list[Completion] = event
        metrics.generation(len(ids), sum(len(c.token_ids) for c in done), _ttft(done))
        replies = [c.text for c in done]
        if rules is not None:  # the output rules over each whole reply
            filtered = [filter_reply(rules, r, referral) for r in replies]
            replies = [r for r, _ in filtered]
            acted = [*acted, *(a for _, actions in filtered for a in actions)]
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": replies[i]},
                        "finish_reason": c.finish_reason,
                        "logprobs": {"content": text.logprobs(c)} if body.logprobs else None}
                       for i, c in enumerate(done)]  # fmt: skip
        else:
            choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason,
                        "logprobs": _legacy_logprobs(text, c) if body.logprobs is not None else None}
                       for i, c in enumerate(done)]  # fmt: skip
        response = {"id": rid, "object": kind, "created": int(time.time()), "model": body.model,
                    "choices": choices, "usage": _usage(ids, done), **_route_fields(asked, body)}  # fmt: skip
        record(done, replies, acted)
        if rules is not None:
            response["policy"] = [asdict(a) for a in acted]
        return {**response, **_rag_fields(rag_prompt, done[0].text)} if rag_prompt is not None else response

    @app.post("/v1/chat/completions", dependencies=[Depends(authorised)], responses=COMPLETION_RESPONSES)
    async def chat(request: Request, body: ChatRequest) -> Any:
        # OpenAI's "developer" role is the system prompt's newer name; chat templates know "system"
        messages = [{**m.model_dump(exclude_none=True), "role": "system" if m.role == "developer" else m.role}
                    for m in body.messages]  # fmt: skip
        top = (body.top_logprobs or 0) if body.logprobs else None
        asked = {"model": body.model, "route": None}
        if body.model in routed:  # A/B: one variant per request, the same one for the same user
            asked["route"] = body.model
            body = body.model_copy(update={"model": routed[body.model].choose(body.user)})
        if policy is None:
            return await completion(request, body, messages, top, asked=asked)
        rules = policy.for_model(body.model)
        decision = check_input(rules, messages, body.max_completion_tokens or body.max_tokens)
        if decision.refusal is not None:  # answered by the policy: the model never sees the request
            rid = f"chatcmpl-{uuid.uuid4().hex}"
            log_request(rid, body, asked, decision.actions, [], [], 0.0, "policy", messages, decision.refusal)
            return _refused(body, decision, rid)
        if decision.max_tokens is not None:
            body = body.model_copy(update={"max_tokens": decision.max_tokens, "max_completion_tokens": None})
        return await completion(request, body, decision.messages, top, asked, rules, decision)

    @app.post("/v1/feedback", dependencies=[Depends(authorised)])
    def feedback(body: FeedbackRequest) -> dict[str, Any]:
        """A user's rating of a chat response, into the request log (lmforge feedback export pairs them)."""
        if request_log is None:
            raise ApiError(
                400, "this server keeps no request log: start it with --log FILE", param="response_id"
            )
        if body.response_id not in answered:
            raise ApiError(404, f"no response {body.response_id!r} was served here (or it is too old)",
                           param="response_id")  # fmt: skip
        request_log.write({"type": "feedback", "time": _now(), **body.model_dump()})
        return {"object": "feedback", "response_id": body.response_id, "rating": body.rating}

    @app.post("/v1/completions", dependencies=[Depends(authorised)], responses=COMPLETION_RESPONSES)
    async def completions(request: Request, body: CompletionRequest) -> Any:
        return await completion(request, body, body.prompt, body.logprobs)

    mount_web(app)
    app.openapi = lambda: _openapi(app)
    return app


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"type": ["string", "null"]}}}},
}  # fmt: skip
COMPLETION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The completion (JSON), or with `stream: true` its server-sent events ending with "
          "`data: [DONE]`", "content": {"text/event-stream": {}}},
}  # fmt: skip


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, with what the server really answers a bad body: a 400 with OpenAI's error object
    (not FastAPI's 422)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        error = {"content": {"application/json": {"schema": ERROR_SCHEMA}}}
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                responses = operation.setdefault("responses", {})
                if responses.pop("422", None) is not None:
                    responses["400"] = {"description": "A bad request (OpenAI's error object)", **error}
                # 401, 403, 404, 409, 413, 429 (with Retry-After), 504: all OpenAI's error object
                responses["default"] = {"description": "An error (OpenAI's error object)", **error}
        schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
        schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
        app.openapi_schema = schema
    return app.openapi_schema


class _Slot:
    """One request at a time, counted as waiting or running (an encoder's embeddings)."""

    def __init__(self) -> None:
        self.lock, self.waiting, self.running = threading.Lock(), 0, 0

    def __enter__(self) -> None:
        self.waiting += 1
        self.lock.acquire()
        self.waiting, self.running = self.waiting - 1, self.running + 1

    def __exit__(self, *exc: object) -> None:
        self.running -= 1
        self.lock.release()


def _check_name(adapter: str, name: str, bank: LoraBank | None) -> None:
    """Refuse an adapter name that is empty or already serves the base or another adapter."""
    if not adapter or adapter == name or (bank is not None and adapter in bank.names):
        raise LmforgeError(
            f"adapter name {adapter!r}: it is empty or taken (the base is {name!r}); pick another"
        )


def _failed(e: LmforgeError) -> ApiError:
    """The API error of a request the scheduler ended."""
    if isinstance(e, TimedOut):
        return ApiError(504, str(e), "timeout_error")
    return ApiError(400, str(e))


def _ttft(completions: list[Completion]) -> float | None:
    """The first sample's time to its first token (None without samples)."""
    return min((c.time_to_first_token for c in completions), default=None)


def _config(
    engine: Engine, body: ChatRequest | CompletionRequest, max_tokens: int | None, top: int
) -> GenerationConfig:
    """The request's sampling settings over the model's generation_config defaults."""
    update: dict[str, Any] = {"n": body.n, "presence_penalty": body.presence_penalty,
                              "frequency_penalty": body.frequency_penalty, "logprobs": top, "seed": body.seed,
                              "speculate": 0}  # fmt: skip
    if max_tokens is not None:
        update["max_new_tokens"] = max_tokens
    for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "no_repeat_ngram_size"):
        if getattr(body, key) is not None:
            update[key] = getattr(body, key)
    if body.stop is not None:
        update["stop"] = [body.stop] if isinstance(body.stop, str) else body.stop
    if body.logit_bias:
        try:
            update["logit_bias"] = {int(k): v for k, v in body.logit_bias.items()}
        except ValueError:
            raise ApiError(400, "logit_bias keys must be token ids", param="logit_bias") from None
    try:  # the model's generation_config.json (read once) < the request, with generate's sampling rule
        return generation_config(update, engine.model_dir, file_settings=engine.file_settings)
    except LmforgeError as e:
        raise ApiError(400, str(e)) from None


def _ids(engine: Engine, prompt: str | list[dict], max_new_tokens: int, *, chat: bool) -> list[int]:
    """The prompt's ids (the chat template for messages); a prompt that leaves no room to answer is a 400."""
    if max_new_tokens >= engine.context:
        raise ApiError(400, f"max_tokens {max_new_tokens}: the model's context is {engine.context} tokens",
                       param="max_tokens")  # fmt: skip
    try:
        return prompt_ids(engine, prompt, chat=chat, system=None, room=engine.context - max_new_tokens)
    except LmforgeError as e:
        message = str(e)
        if engine.model_dir is not None:  # the server's paths are not the client's business
            message = message.replace(str(engine.model_dir), "the model")
        raise ApiError(400, message, param="messages" if chat else "prompt") from None


def _refused(body: ChatRequest, decision: InputDecision, rid: str) -> Any:
    """The policy's refusal as a chat completion (streamed as one delta when asked), with the rules that acted."""
    created = int(time.time())
    acted = [asdict(a) for a in decision.actions]
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    if not body.stream:
        choice = {"index": 0, "message": {"role": "assistant", "content": decision.refusal},
                  "finish_reason": "stop", "logprobs": None}  # fmt: skip
        return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [choice], "usage": usage, "policy": acted}  # fmt: skip

    def events() -> Iterator[str]:
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model}
        for delta, finish, extra in (({"role": "assistant", "content": decision.refusal}, None, {}),
                                     ({}, "stop", {"policy": acted})):  # fmt: skip
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            yield f"data: {json.dumps({**head, 'choices': [choice], **extra})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _route_fields(asked: dict[str, Any] | None, body: ChatRequest | CompletionRequest) -> dict[str, Any]:
    """A routed response names its route and the variant that answered."""
    return {"route": asked["route"], "variant": body.model} if asked and asked.get("route") else {}


def _rag_fields(rag: RagPrompt, answer: str) -> dict[str, Any]:
    """A RAG response's extra fields: the passages given, marked where the (first) answer cites them, and a note
    (no supporting passage; passages dropped to fit)."""
    return {"citations": rag.citations(answer), "rag": {"note": rag.note, "dropped": rag.dropped}}


def _usage(ids: list[int], completions: list[Completion]) -> dict[str, int]:
    generated = sum(len(c.token_ids) for c in completions)
    return {"prompt_tokens": len(ids), "completion_tokens": generated, "total_tokens": len(ids) + generated}


def _legacy_logprobs(text: TokenText, c: Completion, tokens: slice = slice(None)) -> dict[str, Any]:
    """The legacy completions `logprobs` object of `c`'s `tokens`: tokens, token_logprobs, top_logprobs,
    text_offset."""
    entries = text.logprobs(c, tokens)
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}  # fmt: skip


async def _stream(
    job: Job,
    queue: asyncio.Queue[Event],
    scheduler: Scheduler,
    metrics: Metrics,
    text: TokenText,
    body: ChatRequest | CompletionRequest,
    kind: str,
    rag_prompt: RagPrompt | None = None,
    filters: list[OutputFilter] | None = None,
    acted: list[Action] | None = None,
    rid: str = "",
    record: Any = None,
    asked: dict[str, Any] | None = None,
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per text delta with its tokens' log-probs when asked (chat: a first chunk
    with the role), a last chunk per sample with its finish reason, the usage when
    `stream_options.include_usage`, then `data: [DONE]`; an error ends the stream with an error event."""
    chat = kind == "chat.completion"
    created = int(time.time())
    kind = f"{kind}.chunk" if chat else kind
    logprobs = body.logprobs if chat else body.logprobs is not None

    def chunk(choices: list[dict], **extra: Any) -> str:
        data = {"id": rid, "object": kind, "created": created, "model": body.model, "choices": choices,
                **_route_fields(asked, body), **extra}  # fmt: skip
        return f"data: {json.dumps(data)}\n\n"

    def choice(delta: Delta | None, index: int, role: bool = False) -> dict:
        piece, finish = (delta.text, delta.finish_reason) if delta else ("", None)
        lp = None
        if logprobs and delta is not None and delta.tokens is not None:
            c = job.rows[index].completion
            tokens = slice(*delta.tokens)
            lp = {"content": text.logprobs(c, tokens)} if chat else _legacy_logprobs(text, c, tokens)
        if chat:
            content = {"role": "assistant", "content": ""} if role else ({"content": piece} if piece else {})
            return {"index": index, "delta": content, "logprobs": lp, "finish_reason": finish}
        return {"index": index, "text": piece, "logprobs": lp, "finish_reason": finish}

    try:
        if chat:
            yield chunk([choice(None, i, role=True) for i in range(job.cfg.n)])
        while True:
            event = await queue.get()
            if isinstance(event, list):
                break
            if isinstance(event, LmforgeError):
                e = _failed(event)
                error = {"message": e.message, "type": e.kind, "param": None, "code": None}
                yield f"data: {json.dumps({'error': error})}\n\n"
                return
            piece = event.text
            if filters is not None:  # held back until the output rules have judged it
                piece = filters[event.index].feed(piece) + (
                    filters[event.index].finish() if event.finish_reason else ""
                )
            news = logprobs and event.tokens is not None and event.tokens[0] < event.tokens[1]
            if piece or news:
                yield chunk([choice(Delta(event.index, piece, None, event.tokens), event.index)])
            if event.finish_reason:
                yield chunk([choice(Delta(event.index, "", event.finish_reason), event.index)])
    finally:  # also when the client goes away (the response is cancelled): its rows leave the batch
        scheduler.cancel(job)
    metrics.generation(len(job.ids), sum(len(c.token_ids) for c in event), _ttft(event))
    if rag_prompt is not None:  # the passages and what the answer cites, once it is whole
        yield chunk([], **_rag_fields(rag_prompt, event[0].text))
    actions = [*(acted or []), *(a for f in filters or [] for a in f.actions)]
    if filters is not None:  # every rule that acted, input and output
        yield chunk([], policy=[asdict(a) for a in actions])
    if record is not None:
        record(event, [c.text for c in event], actions)
    if body.stream_options and body.stream_options.get("include_usage"):
        yield chunk([], usage=_usage(job.ids, event))
    yield "data: [DONE]\n\n"
