"""`lmforge monitor`: traffic percentiles, drift against a prepared dataset, per-variant ratings, log reading."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lmforge.commands.common import make_app
from lmforge.commands.monitor import register
from lmforge.serve.monitor import bucket_counts, drift, ratings, read_log, reference_profile, traffic

runner = CliRunner()
app = make_app()
register(app)

KITCHEN = {
    "who": ["the cook", "my aunt", "the baker", "a chef", "our neighbour"],
    "verb": ["stirred", "baked", "chopped", "seasoned", "simmered", "roasted"],
    "what": ["the onions", "a loaf of bread", "the tomato soup", "fresh garlic", "the pasta", "some carrots"],
    "where": ["in the kitchen", "on the stove", "in a clay pot", "before dinner", "with olive oil"],
}
SPACE = {
    "who": ["the astronomer", "a telescope", "the probe", "an observatory", "the satellite"],
    "verb": ["observed", "measured", "photographed", "tracked", "detected", "mapped"],
    "what": ["a distant quasar", "the spiral galaxy", "neutron stars", "the comet tail", "cosmic radiation"],
    "where": [
        "beyond jupiter",
        "near the nebula",
        "through the atmosphere",
        "across light years",
        "in orbit",
    ],
}


def sentence(topic: dict[str, list[str]], rng: random.Random) -> str:
    return " ".join(rng.choice(topic[k]) for k in ("who", "verb", "what", "where")) + "."


def text(topic: dict[str, list[str]], rng: random.Random, sentences: int) -> str:
    return " ".join(sentence(topic, rng) for _ in range(sentences))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tokenizer that knows both topics, and a prepared dataset of kitchen texts (1 to 4 sentences each)."""
    from lmforge.data.prepare import PrepareConfig, prepare
    from lmforge.tokenizer import Tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("monitor")
    rng = random.Random(0)
    docs = [text(KITCHEN, rng, rng.randint(1, 4)) for _ in range(600)]
    tok = train_tokenizer(docs + [text(SPACE, rng, 3) for _ in range(600)], "bpe", 400, root / "tok")
    (root / "kitchen.txt").write_text("\n\n".join(docs) + "\n")
    prepare(
        PrepareConfig(inputs=[root / "kitchen.txt"], tokenizer=tok, num_proc=1, dedup="off"), root / "data"
    )
    return {"root": root, "data": root / "data", "tok": Tokenizer.from_dir(tok)}


def request(i: int, variant: str = "base", **fields) -> dict:
    entry = {"type": "request", "time": f"2025-01-01T00:{i // 60:02d}:{i % 60:02d}Z", "id": f"chatcmpl-{i}",
             "model": "m", "variant": variant, "route": None, "user": None, "prompt_tokens": 10,
             "completion_tokens": 5, "ttft_s": 0.1, "latency_s": 0.5, "finish_reason": "stop", "policy": []}  # fmt: skip
    return entry | fields


def prompt_request(i: int, tok, prompt: str) -> dict:
    """A request as the server logs it; the prompt ends with EOS as the prepared documents do."""
    ids = np.asarray([*tok.encode(prompt), tok.eos_id])
    return request(i, prompt_tokens=len(ids), prompt_token_hist=bucket_counts(ids, tok.vocab_size).tolist())


def write_log(path: Path, entries: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def test_in_distribution_prompts_are_not_flagged_and_shifted_ones_are(world, tmp_path):
    profile = reference_profile(world["data"])
    assert profile["documents"] > 500 and sum(profile["token_hist"]) > 0
    rng = random.Random(1)  # new kitchen texts, not the training documents themselves
    same = [prompt_request(i, world["tok"], text(KITCHEN, rng, rng.randint(1, 4))) for i in range(300)]
    # another topic, three times as long
    shifted = [prompt_request(i, world["tok"], text(SPACE, rng, 3 * rng.randint(1, 4))) for i in range(300)]

    calm = drift(same, profile)
    assert not calm["flagged"], calm
    assert calm["length"]["psi"] < 0.1 and calm["tokens"]["psi"] < 0.1

    alarm = drift(shifted, profile, out=tmp_path)
    assert alarm["flagged"] and len(alarm["reasons"]) == 2, alarm
    assert alarm["length"]["psi"] > 1 and alarm["tokens"]["psi"] > 1
    assert alarm["length"]["kl"] > calm["length"]["kl"] and alarm["tokens"]["kl"] > calm["tokens"]["kl"]
    # half the prompts lie past the reference's 9th decile (those of 6 to 12 sentences), against a tenth there
    assert alarm["length"]["live"][-1] > 0.4 and calm["length"]["live"][-1] < 0.2
    assert Path(alarm["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the threshold decides: past the calm log's own PSI, it is flagged
    assert drift(same, profile, threshold_psi=calm["length"]["psi"] / 2)["flagged"]


def test_traffic_percentiles_match_numpy():
    rng = np.random.default_rng(0)
    latency, ttft = rng.lognormal(0, 1, 101), rng.uniform(0, 1, 101)
    entries = [request(i, "a" if i % 3 else "b", latency_s=float(latency[i]), ttft_s=float(ttft[i]),
                       prompt_tokens=i, completion_tokens=2 * i, finish_reason="length" if i % 10 == 0 else "stop",
                       policy=[{"rule": "r", "direction": "input", "effect": "block", "detail": None}] * (i % 2))
               for i in range(101)]  # fmt: skip
    entries.append(
        {"type": "feedback", "time": "t", "response_id": "chatcmpl-1", "rating": "up", "comment": None}
    )
    got = traffic(entries)
    assert got["requests"] == 101 and got["prompt_tokens"] == sum(range(101))
    assert got["completion_tokens"] == 2 * sum(range(101))
    for key, values in (("latency_s", latency), ("ttft_s", ttft)):
        for q in (50, 90, 99):
            assert got[key][f"p{q}"] == pytest.approx(np.percentile(values, q), rel=1e-12)
    assert got["finish_reasons"] == {"length": 11, "stop": 90}
    assert got["policy_actions"] == 50
    b = [i for i in range(101) if i % 3 == 0]
    assert got["by_variant"]["b"]["requests"] == len(b) and got["by_variant"]["a"]["requests"] == 101 - len(b)
    assert got["by_variant"]["b"]["latency_s"]["p90"] == pytest.approx(
        np.percentile(latency[b], 90), rel=1e-12
    )
    assert got["first"] == "2025-01-01T00:00:00Z" and got["last"] == "2025-01-01T00:01:40Z"


def rated_log(ups: dict[str, int], n: int = 100) -> list[dict]:
    entries, i = [], 0
    for variant, up in ups.items():
        for k in range(n):
            entries.append(request(i, variant))
            entries.append({"type": "feedback", "time": "t", "response_id": f"chatcmpl-{i}",
                            "rating": "up" if k < up else "down", "comment": None})  # fmt: skip
            i += 1
    return entries


def test_ratings_name_the_better_variant_when_the_difference_is_significant():
    got = ratings(rated_log({"lora-b": 50, "lora-a": 80}))
    a = got["variants"]["lora-a"]
    assert (a["up"], a["down"], a["n"], a["rate"]) == (80, 20, 100, 0.8)
    assert a["ci95"][0] < 0.8 < a["ci95"][1] and a["ci95"][0] > got["variants"]["lora-b"]["ci95"][1]
    cmp = got["comparison"]
    assert cmp["best"] == "lora-a" and cmp["runner_up"] == "lora-b" and cmp["significant"]
    assert cmp["z"] == pytest.approx(0.3 / np.sqrt(0.65 * 0.35 * 0.02)) and cmp["p"] < 1e-4

    close = ratings(rated_log({"lora-a": 50, "lora-b": 52}))["comparison"]
    assert close["best"] == "lora-b" and not close["significant"] and close["p"] > 0.5


def test_ratings_count_a_responses_last_rating_and_unmatched_feedback():
    entries = rated_log({"solo": 3}, n=4)
    entries += [{"type": "feedback", "time": "t", "response_id": "chatcmpl-3", "rating": "up", "comment": "ok"},
                {"type": "feedback", "time": "t", "response_id": "chatcmpl-999", "rating": "up", "comment": None}]  # fmt: skip
    got = ratings(entries)
    assert got["variants"]["solo"]["up"] == 4 and got["variants"]["solo"]["down"] == 0
    assert got["rated"] == 4 and got["unmatched"] == 1 and "comparison" not in got


def test_rotated_files_are_read_oldest_first(tmp_path):
    log = tmp_path / "requests.log"
    write_log(tmp_path / "requests.log.2", [request(0)])
    write_log(tmp_path / "requests.log.10", [request(-1)])  # numeric order: .10 is older than .2
    write_log(tmp_path / "requests.log.1", [request(1), request(2)])
    write_log(log, [request(3)])
    (tmp_path / "requests.log.bak").write_text("not a log\n")  # not a rotation: never read
    assert [e["id"] for e in read_log(log)] == ["chatcmpl--1", "chatcmpl-0", "chatcmpl-1", "chatcmpl-2",
                                                "chatcmpl-3"]  # fmt: skip
    # only rotated files left (the server has not written since the rotation)
    log.unlink()
    assert len(read_log(log)) == 4


@pytest.mark.parametrize(
    ("line", "why"),
    [("{not json", "not JSON"), ('["a"]', "not a JSON object"), ('{"type": "click"}', "type 'click'"),
     ('{"type": "request", "id": "x"}', "without variant"),
     ('{"type": "feedback", "response_id": "x", "rating": "meh"}', "rating 'meh'")],
)  # fmt: skip
def test_a_bad_line_exits_2_naming_file_and_line(tmp_path, line, why):
    log = tmp_path / "requests.log"
    write_log(tmp_path / "requests.log.1", [request(0)])
    log.write_text(json.dumps(request(1)) + "\n\n" + line + "\n")
    result = runner.invoke(app, ["monitor", str(log)])
    assert result.exit_code == 2, result.output
    assert f"{log}:3:" in result.output and why in result.output


def test_missing_log_exits_2(tmp_path):
    result = runner.invoke(app, ["monitor", str(tmp_path / "nothing.log")])
    assert result.exit_code == 2 and "no request log" in result.output


def test_cli_writes_the_report_and_plot(world, tmp_path):
    rng = random.Random(2)
    entries = [prompt_request(i, world["tok"], text(SPACE, rng, 6)) for i in range(50)] + rated_log(
        {"x": 3}, 5
    )
    log = write_log(tmp_path / "requests.log", entries)
    out = tmp_path / "report"
    result = runner.invoke(app, ["monitor", str(log), "--reference", str(world["data"]), "--out", str(out),
                                 "--threshold", "0.5", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["drift"]["flagged"] and got["drift"]["threshold_psi"] == 0.5
    assert got["traffic"]["requests"] == 55 and got["ratings"]["variants"]["x"]["up"] == 3
    assert json.loads((out / "monitor.json").read_text()) == got
    assert (out / "drift.png").stat().st_size > 1000

    # for people: a table, with no reference no drift
    result = runner.invoke(app, ["monitor", str(log)])
    assert result.exit_code == 0, result.output
    assert "traffic.latency_s.p99" in result.output and "drift" in result.output
