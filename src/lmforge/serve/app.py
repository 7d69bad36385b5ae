"""The OpenAI-compatible app: FastAPI routes over the one inference engine.

First increment (issue 18): one request decodes at a time (a lock around the engine); continuous batching,
per-request adapters, embeddings, metrics and the web page come next. Every error is OpenAI's error object; no
stack trace reaches a client.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError

from lmforge.errors import LmforgeError
from lmforge.infer.embed import Embedder
from lmforge.infer.engine import Completion, Engine, TokenText, prompt_ids
from lmforge.infer.sampling import GenerationConfig
from lmforge.serve.metrics import Metrics
from lmforge.serve.schemas import ChatRequest, CompletionRequest, EmbeddingRequest

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered as OpenAI's error object with this status."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


def create_app(
    model: Engine | Embedder, name: str, *, api_key: str | None = None, max_body: int = 1 << 20
) -> FastAPI:
    """The app serving `model` as `name`: a decoder's engine (chat and text completions) or an encoder's embedder
    (embeddings); with `api_key`, every /v1 route needs `Authorization: Bearer KEY`; a body over `max_body`
    bytes is a 413."""
    app = FastAPI(title="lmforge", version="1", docs_url=None, redoc_url=None)
    metrics = Metrics()
    lock = _Slot(metrics)  # one forward pass at a time until the scheduler lands
    engine = model if isinstance(model, Engine) else None
    text = TokenText(engine.tokenizer) if engine is not None else None
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message, e.kind, e.param)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return _error(
            400, f"{param}: {first['msg']}" if param else first["msg"], "invalid_request_error", param
        )

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
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "lmforge"}],
        }

    def generator() -> Engine:
        if engine is None:
            raise ApiError(
                400, f"{name} is an encoder: it serves /v1/embeddings, not completions", param="model"
            )
        return engine

    @app.post("/v1/embeddings", dependencies=[Depends(authorised)])
    def embeddings(body: EmbeddingRequest) -> Any:
        _check_model(body.model, name)
        if engine is not None:
            raise ApiError(
                400, f"{name} is a decoder: it serves completions, not /v1/embeddings", param="model"
            )
        texts = [body.input] if isinstance(body.input, str) else body.input
        with lock:
            vectors, tokens = model.embed(texts)  # (N, C)
        if body.encoding_format == "base64":  # float32 little-endian bytes, as OpenAI sends them
            encoded = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() for v in vectors]
        else:
            encoded = [v.tolist() for v in vectors]
        data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)]
        return {"object": "list", "data": data, "model": name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip

    @app.post("/v1/chat/completions", dependencies=[Depends(authorised)])
    def chat(body: ChatRequest) -> Any:
        _check_model(body.model, name)
        engine = generator()
        cfg = _config(engine, body, body.max_completion_tokens or body.max_tokens,
                      (body.top_logprobs or 0) if body.logprobs else 0)  # fmt: skip
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        ids = _ids(engine, messages, cfg.max_new_tokens, chat=True)
        if body.stream:
            return _stream(engine, lock, metrics, ids, cfg, body, "chat.completion.chunk", name)
        with lock:
            completions = engine.generate([ids], cfg)
        metrics.generation(len(ids), sum(len(c.token_ids) for c in completions), _ttft(completions))
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                    "logprobs": {"content": text.logprobs(c)} if body.logprobs else None}
                   for i, c in enumerate(completions)]  # fmt: skip
        return _response("chatcmpl", "chat.completion", name, choices, ids, completions)

    @app.post("/v1/completions", dependencies=[Depends(authorised)])
    def completions(body: CompletionRequest) -> Any:
        _check_model(body.model, name)
        engine = generator()
        cfg = _config(engine, body, body.max_tokens, body.logprobs or 0)
        ids = _ids(engine, body.prompt, cfg.max_new_tokens, chat=False)
        if body.stream:
            return _stream(engine, lock, metrics, ids, cfg, body, "text_completion", name)
        with lock:
            done = engine.generate([ids], cfg)
        metrics.generation(len(ids), sum(len(c.token_ids) for c in done), _ttft(done))
        choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason,
                    "logprobs": _legacy_logprobs(text, c) if body.logprobs is not None else None}
                   for i, c in enumerate(done)]  # fmt: skip
        return _response("cmpl", "text_completion", name, choices, ids, done)

    return app


class _Slot:
    """The engine's one slot: a lock whose waiting and running requests are the metrics' gauges."""

    def __init__(self, metrics: Metrics) -> None:
        self.lock, self.metrics = threading.Lock(), metrics

    def __enter__(self) -> None:
        self.metrics.queue(waiting=1)
        self.lock.acquire()
        self.metrics.queue(waiting=-1, running=1)

    def __exit__(self, *exc: object) -> None:
        self.metrics.queue(running=-1)
        self.lock.release()


def _ttft(completions: list[Completion]) -> float | None:
    """The first sample's time to its first token (None without samples)."""
    return min((c.time_to_first_token for c in completions), default=None)


def _check_model(asked: str, name: str) -> None:
    if asked != name:
        raise ApiError(
            404, f"model {asked!r} is not served here; GET /v1/models lists {name!r}", param="model"
        )


def _config(
    engine: Engine, body: ChatRequest | CompletionRequest, max_tokens: int | None, top: int
) -> GenerationConfig:
    """The request's sampling settings over the model's generation_config defaults."""
    update: dict[str, Any] = {"n": body.n, "presence_penalty": body.presence_penalty,
                              "frequency_penalty": body.frequency_penalty, "logprobs": top, "seed": body.seed}  # fmt: skip
    if max_tokens is not None:
        update["max_new_tokens"] = max_tokens
    if body.temperature is not None:
        update["temperature"] = body.temperature
    if body.top_p is not None:
        update["top_p"] = body.top_p
    if body.stop is not None:
        update["stop"] = [body.stop] if isinstance(body.stop, str) else body.stop
    if body.logit_bias:
        try:
            update["logit_bias"] = {int(k): v for k, v in body.logit_bias.items()}
        except ValueError:
            raise ApiError(400, "logit_bias keys must be token ids", param="logit_bias") from None
    try:
        return GenerationConfig.model_validate({**engine.defaults.model_dump(), **update})
    except ValidationError as e:
        first = e.errors()[0]
        raise ApiError(400, f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def _ids(engine: Engine, prompt: str | list[dict], max_new_tokens: int, *, chat: bool) -> list[int]:
    """The prompt's ids (the chat template for messages); a prompt that leaves no room to answer is a 400."""
    if max_new_tokens >= engine.context:
        raise ApiError(400, f"max_tokens {max_new_tokens}: the model's context is {engine.context} tokens",
                       param="max_tokens")  # fmt: skip
    try:
        return prompt_ids(engine, prompt, chat=chat, system=None, room=engine.context - max_new_tokens)
    except LmforgeError as e:
        raise ApiError(400, str(e), param="messages" if chat else "prompt") from None


def _usage(ids: list[int], completions: list[Completion]) -> dict[str, int]:
    generated = sum(len(c.token_ids) for c in completions)
    return {"prompt_tokens": len(ids), "completion_tokens": generated, "total_tokens": len(ids) + generated}


def _response(
    prefix: str, kind: str, name: str, choices: list, ids: list[int], done: list[Completion]
) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": name,
            "choices": choices, "usage": _usage(ids, done)}  # fmt: skip


def _legacy_logprobs(text: TokenText, c: Completion) -> dict[str, Any]:
    """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""
    entries = text.logprobs(c)
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}  # fmt: skip


def _stream(
    engine: Engine,
    lock: _Slot,
    metrics: Metrics,
    ids: list[int],
    cfg: GenerationConfig,
    body: ChatRequest | CompletionRequest,
    kind: str,
    name: str,
) -> StreamingResponse:
    """Server-sent events: one chunk per text delta (chat: a first chunk with the role), a last chunk per sample
    with its finish reason, the usage when `stream_options.include_usage`, then `data: [DONE]`."""
    rid, created = f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
    chat = kind.startswith("chat")

    def chunk(choices: list[dict], **extra: Any) -> str:
        data = {"id": rid, "object": kind, "created": created, "model": name, "choices": choices, **extra}
        return f"data: {json.dumps(data)}\n\n"

    def choice(index: int, piece: str | None, finish: str | None, role: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": piece} if piece else {})
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": index, "text": piece or "", "logprobs": None, "finish_reason": finish}

    def events() -> Iterator[str]:
        with lock:  # a client that goes away closes this generator: the lock is released at once
            if chat:
                yield chunk([choice(i, None, None, role=True) for i in range(cfg.n)])
            completions: list[Completion] = []
            for item in engine.run([ids], cfg):
                if isinstance(item, list):
                    completions = item
                elif item.text or item.finish_reason:
                    if item.text:
                        yield chunk([choice(item.index, item.text, None)])
                    if item.finish_reason:
                        yield chunk([choice(item.index, None, item.finish_reason)])
        metrics.generation(len(ids), sum(len(c.token_ids) for c in completions), _ttft(completions))
        if body.stream_options and body.stream_options.get("include_usage"):
            yield chunk([], usage=_usage(ids, completions))
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
