"""Continuous batching (`infer/scheduler.py`): requests that join a running batch at different steps, with
different settings and different LoRA adapters, each get exactly what they get alone (`Engine.generate`, the
adapter applied to its own copy of the base); cancelled and late requests leave; a full queue refuses."""

from __future__ import annotations

import pytest

from lmforge.errors import LmforgeError
from lmforge.infer.engine import Delta, Engine
from lmforge.infer.sampling import GenerationConfig
from lmforge.infer.scheduler import QueueFull, Request, Scheduler, TimedOut

TEXTS = [
    "the cat",
    "a dog ran the mat sat on",
    "mat",
    "the cat sat on the mat the cat",
    "dog",
    "a",
    "sat on the",
]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.from_dir(tiny_model_dir, device="cpu")


def request(engine, k: int, cfg: GenerationConfig, events: dict, adapter: str | None = None) -> Request:
    sink = lambda e: events.setdefault(k, []).append(e)  # noqa: E731
    return Request(engine.encode(TEXTS[k % len(TEXTS)]), cfg, sink, adapter)


def assert_alone(got, alone) -> None:
    assert got.token_ids == alone.token_ids
    assert got.finish_reason == alone.finish_reason and got.text == alone.text
    assert got.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
    for mine, theirs in zip(got.top_logprobs, alone.top_logprobs, strict=True):
        assert mine.keys() == theirs.keys()


def test_requests_joining_at_different_steps_get_what_they_get_alone(engine):
    scheduler, events = Scheduler(engine, max_batch=6), {}
    settings = [
        {"max_new_tokens": 6},
        {"max_new_tokens": 9, "temperature": 0.8, "top_p": 0.9, "seed": 1},
        {"max_new_tokens": 12, "repetition_penalty": 1.3, "logprobs": 2},
        {"max_new_tokens": 15, "temperature": 1.1, "seed": 2, "frequency_penalty": 0.5},
        {"max_new_tokens": 8, "stop": ["a"]},
        {"max_new_tokens": 10, "n": 2, "temperature": 0.7, "seed": 3},  # two rows of one request
        {"max_new_tokens": 7, "logit_bias": {5: 3.0}, "no_repeat_ngram_size": 2},
    ]
    requests = [request(engine, k, GenerationConfig(**s), events) for k, s in enumerate(settings)]
    for r in requests[:2]:
        scheduler.submit(r)
    for _ in range(3):
        scheduler.step()
    for r in requests[2:5]:
        scheduler.submit(r)
    for _ in range(4):
        scheduler.step()
    for r in requests[5:]:  # the batch holds 6 rows: some wait for others to leave
        scheduler.submit(r)
    scheduler.run_until_done()
    for k, r in enumerate(requests):
        *deltas, done = events[k]
        alone = engine.generate([r.ids], r.cfg)
        assert len(done) == len(alone) == r.cfg.n
        for got, want in zip(done, alone, strict=True):
            assert_alone(got, want)
            streamed = "".join(d.text for d in deltas if isinstance(d, Delta) and d.index == got.sample_index)
            assert streamed == got.text  # the deltas add up to the text
    assert scheduler.slots == [] and scheduler.running == 0 and scheduler.batch_size == 0


def test_rows_with_different_adapters_share_a_batch(engine, tiny_model_dir, tiny_lora_dirs):
    from lmforge.adapters.multilora import LoraBank

    served = Engine.from_dir(tiny_model_dir, device="cpu")
    bank = LoraBank(served.model, tiny_model_dir)
    for name, path in tiny_lora_dirs.items():
        bank.add(name, path)
    scheduler, events = Scheduler(served, bank=bank, max_batch=8), {}
    names = [None, "a", "b", "a", "b", None]
    requests = []
    for k, name in enumerate(names):
        requests.append(request(served, k, GenerationConfig(max_new_tokens=10, logprobs=1), events, name))
        scheduler.submit(requests[-1])
        scheduler.step()  # each joins a batch already running
    scheduler.run_until_done()
    alone = {None: engine} | {
        name: Engine.from_dir(tiny_model_dir, device="cpu", adapter=path)
        for name, path in tiny_lora_dirs.items()
    }
    for k, r in enumerate(requests):
        assert_alone(events[k][-1][0], alone[r.adapter].generate([r.ids], r.cfg)[0])
    first = requests[0]
    answers = {tuple(m.generate([first.ids], first.cfg)[0].token_ids) for m in alone.values()}
    assert len(answers) == 3  # the three models answer differently: the test means something


def test_unknown_adapter_full_queue_and_oversized_requests_are_refused(engine):
    scheduler, events = Scheduler(engine, max_batch=2, max_queue=1), {}
    with pytest.raises(LmforgeError, match="no adapter 'x'"):
        scheduler.submit(request(engine, 0, GenerationConfig(max_new_tokens=4), events, "x"))
    with pytest.raises(LmforgeError, match="at most 2 samples"):
        scheduler.submit(request(engine, 0, GenerationConfig(max_new_tokens=4, n=3), events))
    with pytest.raises(LmforgeError, match="context"):
        scheduler.submit(request(engine, 0, GenerationConfig(max_new_tokens=10_000), events))
    scheduler.submit(request(engine, 0, GenerationConfig(max_new_tokens=4), events))
    with pytest.raises(QueueFull):
        scheduler.submit(request(engine, 1, GenerationConfig(max_new_tokens=4), events))


def test_cancelled_and_late_requests_leave_the_batch(engine):
    scheduler, events = Scheduler(engine, max_batch=4), {}
    cfg = GenerationConfig(max_new_tokens=40, logit_bias={3: -100})  # no EOS: each runs its 40 tokens
    gone, late, stays = (request(engine, k, cfg, events) for k in range(3))
    late.timeout = 0.0
    for r in (gone, late, stays):
        scheduler.submit(r)
    scheduler.step()
    scheduler.cancel(gone)
    scheduler.step()
    assert scheduler.running == 1  # gone and late have left (late heard an error)
    assert isinstance(events[1][-1], TimedOut)
    scheduler.run_until_done()
    assert not any(isinstance(e, list) for e in events[0])  # the cancelled request hears no completion
    assert len(events[2][-1][0].token_ids) == 40
    assert scheduler.slots == [] and scheduler.batch_size == 0


@pytest.mark.parametrize("family", ["tiny-smollm", "tiny-mistral", "tiny-qwen2", "tiny-qwen3"])
def test_every_family_decodes_in_a_running_batch_as_alone(family, tiny_model_dir, tmp_path):
    """Tied embeddings, a sliding window of 8 (the re-laid-out cache columns must stay each row's positions),
    attention biases and q/k norms: requests joining at different steps equal `Engine.generate` alone."""
    import torch

    from lmforge.model.configs import preset
    from lmforge.model.hf import build_model, save_model
    from lmforge.tokenizer import copy_tokenizer

    torch.manual_seed(0)
    save_model(build_model(preset(family, vocab_size=300, eos_token_id=3, pad_token_id=0)), tmp_path)
    copy_tokenizer(tiny_model_dir, tmp_path)
    engine = Engine.from_dir(tmp_path, device="cpu")
    scheduler, events = Scheduler(engine, max_batch=4), {}
    requests = [request(engine, k, GenerationConfig(max_new_tokens=12 + 5 * k), events) for k in range(4)]
    for r in requests:
        scheduler.submit(r)
        scheduler.step()
        scheduler.step()
    scheduler.run_until_done()
    for k, r in enumerate(requests):
        assert_alone(events[k][-1][0], engine.generate([r.ids], r.cfg)[0])
