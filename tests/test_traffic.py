"""A served model's traffic: A/B routes (shares, stickiness), the request log (rotation), feedback (404 for an
unknown response) and its export into preference pairs that a DPO run trains on."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.errors import LmforgeError
from lmforge.serve.traffic import RequestLog, Route, read_log

runner = CliRunner()


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_routes_split_by_share_and_stick_to_a_user():
    route = Route.parse("chat=base:0.7,tuned:0.3")
    users = [f"user-{i}" for i in range(2000)]
    first = {u: route.choose(u) for u in users}
    share = Counter(first.values())["tuned"] / len(users)
    assert abs(share - 0.3) <= 0.03, share
    assert all(route.choose(u) == v for u, v in first.items())  # the same user, the same variant
    with pytest.raises(LmforgeError, match=r"sum to 0.9 \(base 0.6 \+ tuned 0.3\)"):
        Route.parse("chat=base:0.6,tuned:0.3")
    with pytest.raises(LmforgeError, match="expected NAME=VARIANT:SHARE"):
        Route.parse("chat=base")


def test_the_log_rotates_and_reads_back_in_order(tmp_path):
    log = RequestLog(tmp_path / "requests.jsonl", max_bytes=200, backups=3)
    for i in range(20):
        log.write(
            {
                "type": "request",
                "id": f"r{i}",
                "variant": "m",
                "prompt_tokens": 1,
                "completion_tokens": 1,
                "ttft_s": 0.1,
                "latency_s": 0.2,
            }
        )
    ids = [e["id"] for e in read_log(tmp_path / "requests.jsonl")]
    assert ids == [f"r{i}" for i in range(20 - len(ids), 20)] and 4 <= len(ids) < 20  # oldest files dropped
    (tmp_path / "requests.jsonl").write_text(
        '{"type": "feedback", "response_id": "r1", "rating": "up"}\nnot json\n'
    )
    with pytest.raises(LmforgeError, match=r"requests.jsonl:2: not JSON"):
        list(read_log(tmp_path / "requests.jsonl"))


@pytest.fixture(scope="module")
def served(tiny_model_dir, tiny_lora_dirs, tmp_path_factory):
    from live_server import serving

    from lmforge.infer.engine import Engine
    from lmforge.serve.app import create_app

    log = tmp_path_factory.mktemp("log") / "requests.jsonl"
    server = create_app(Engine.from_dir(tiny_model_dir, device="cpu"), "tiny", adapters={"a": tiny_lora_dirs["a"]},
                        base_dir=tiny_model_dir, routes=[Route.parse("chat=tiny:0.5,a:0.5")],
                        request_log=RequestLog(log, text=True))  # fmt: skip
    for url in serving(server):
        yield url, log


def test_routed_requests_are_logged_rated_and_exported_into_dpo(served, tiny_model_dir, tmp_path):
    url, log = served
    prompts = ["the cat sat", "a dog ran", "the mat"]
    ids, variants = {}, {}
    for n, user in enumerate(["ann", "bob", "cy", "dee", "ed", "flo"]):
        for prompt in prompts:
            # sampled, so two answers to one prompt differ and can be paired
            status, r = post(f"{url}/v1/chat/completions", {"model": "chat", "user": user, "max_tokens": 6,
                             "temperature": 1.0, "seed": n, "messages": [{"role": "user", "content": prompt}]})  # fmt: skip
            assert status == 200 and r["route"] == "chat" and r["variant"] in ("tiny", "a")
            variants.setdefault(user, set()).add(r["variant"])
            ids[(user, prompt)] = r["id"]
    assert all(len(v) == 1 for v in variants.values())  # sticky per user
    for (user, _prompt), rid in ids.items():
        rating = "up" if user in ("ann", "cy", "ed") else "down"
        assert post(f"{url}/v1/feedback", {"response_id": rid, "rating": rating})[0] == 200
    status, err = post(f"{url}/v1/feedback", {"response_id": "chatcmpl-nope", "rating": "up"})
    assert status == 404 and "chatcmpl-nope" in err["error"]["message"]
    entries = list(read_log(log))
    requests = [e for e in entries if e["type"] == "request"]
    assert len(requests) == 18 and all(sum(e["prompt_token_hist"]) == e["prompt_tokens"] for e in requests)
    assert {e["variant"] for e in requests} <= {"tiny", "a"} and all(e["route"] == "chat" for e in requests)

    prefs = tmp_path / "prefs.jsonl"
    res = runner.invoke(app, ["feedback", "export", str(log), "--out", str(prefs), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["rated"] == 18 and summary["prompts"] == 3 and summary["pairs"] >= 3
    records = [json.loads(line) for line in prefs.read_text().splitlines()]
    assert all({"prompt", "chosen", "rejected"} <= r.keys() and r["chosen"] != r["rejected"] for r in records)
    res = runner.invoke(app, ["align", "--init-from", str(tiny_model_dir), "--out", str(tmp_path / "dpo"), "--json",
                              "--set", "method=dpo", "--set", f"data.dataset={prefs}", "--set", "train.seq_len=64",
                              "--set", "train.micro_batch_size=2", "--set", "train.max_steps=2",
                              "--set", "train.eval_every=0"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert Path(tmp_path / "dpo" / "adapter" / "adapter_config.json").is_file()


def test_serve_command_wires_policy_routes_and_log(tiny_model_dir, tiny_lora_dirs, tmp_path, monkeypatch):
    import uvicorn

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(app))
    policy = tmp_path / "policy.yaml"
    policy.write_text("redact_pii: {input: true}\n")
    args = ["serve", str(tiny_model_dir), "--name", "tiny", "--adapter", f"a={tiny_lora_dirs['a']}",
            "--policy", str(policy), "--route", "chat=tiny:0.5,a:0.5", "--log", str(tmp_path / "log.jsonl")]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert len(started) == 1 and any(getattr(r, "path", None) == "/v1/feedback" for r in started[0].routes)
    res = runner.invoke(app, [*args[:-4], "--route", "chat=tiny:0.5,a:0.4"])
    assert res.exit_code == 2 and "sum to 0.9" in res.stderr
    res = runner.invoke(app, [*args[:-4], "--route", "chat=tiny:0.5,b:0.5"])
    assert res.exit_code == 2 and "variants b are not served" in res.stderr
    policy.write_text("redact_pi: {input: true}\n")
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "did you mean 'redact_pii'" in res.stderr
