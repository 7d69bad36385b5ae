"""The compiled decode step (`Engine(compile=True)`): keys and values written at a column index of a static KV
cache, one graph per batch-size bucket. It gives the eager engine's tokens and log-probs for every decoder
family, with processors, sampling, stop strings, speculation, prompt tuning, and the server's continuous
batching with several LoRA adapters in one batch."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import save_random_hf_decoder  # noqa: E402
from test_engine import FAMILIES, SMALL, TEXTS, VOCAB  # noqa: E402
from test_scheduler import assert_alone, request  # noqa: E402

from lmforge.infer.engine import Completion, Engine  # noqa: E402
from lmforge.infer.sampling import GenerationConfig  # noqa: E402
from lmforge.infer.scheduler import Scheduler  # noqa: E402
from lmforge.model.decoder import KVCache  # noqa: E402
from lmforge.tokenizer import train_tokenizer  # noqa: E402


@pytest.fixture(autouse=True)
def room_for_every_graph():
    """One process compiles the step for many models here; past dynamo's recompile limit it would quietly run
    eager, and the tests would compare eager with eager."""
    with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        yield


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_tokenizer(TEXTS, "bpe", VOCAB, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module", params=list(FAMILIES))
def engines(request, tmp_path_factory, tokenizer_dir) -> tuple[Engine, Engine]:
    """(eager, compiled) engines over one seeded random model of the family."""
    config_cls, extra = FAMILIES[request.param]
    path = save_random_hf_decoder(config_cls, {**SMALL, **extra}, tmp_path_factory.mktemp(request.param))
    for f in tokenizer_dir.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    eager = Engine.from_dir(path, device="cpu")
    return eager, Engine(eager.model, eager.tokenizer, defaults=eager.defaults, compile=True)


def assert_same(got: list[Completion], want: list[Completion]) -> None:
    """Each sample as `assert_alone` checks it (tokens, text, finish, log-probs within float rounding), and the
    same stop token and top alternatives in the same order."""
    assert len(got) == len(want)
    for mine, theirs in zip(got, want, strict=True):
        assert_alone(mine, theirs)
        assert mine.stop_token == theirs.stop_token
        assert [list(t) for t in mine.top_logprobs] == [list(t) for t in theirs.top_logprobs]


def test_static_cache_steps_equal_the_growing_cache(engines):
    """Without the compiler: a step that writes at `cache.index` and attends over every column, masked, gives
    the logits of the step that attends over the filled columns only (left padding, sliding windows)."""
    eager, _ = engines
    model = eager.model
    rows = [eager.encode(t) for t in ("the cat sat on the mat", "a dog", "héllo wörld ☃")]
    P, N = max(map(len, rows)), 12
    ids = torch.randint(3, VOCAB, (3, P + N), generator=torch.Generator().manual_seed(0))
    valid = torch.zeros((3, P + N), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, P - len(r) : P], valid[i, P - len(r) :] = torch.tensor(r), True
    caches = [KVCache(model.config, 3, P + N, "cpu", torch.float32) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(ids[:, :P], attention_mask=valid[:, :P], cache=cache)
        for pos in range(P, P + N):
            growing = model(ids[:, pos : pos + 1], attention_mask=valid[:, : pos + 1], cache=caches[0])
            static = caches[1]
            static.index = torch.tensor([pos])
            columns = valid.clone()
            columns[:, pos + 1 :] = False  # columns not yet written are padding
            fixed = model(ids[:, pos : pos + 1], attention_mask=columns, cache=static)
            static.index, static.length = None, pos + 1
            torch.testing.assert_close(fixed, growing, atol=1e-5, rtol=1e-5)


def test_compiled_steps_give_the_eager_tokens_and_logprobs(engines):
    """Batch 1 and a left-padded batch of samples (each its own graph), with processors, sampling, stop strings
    and speculation."""
    eager, compiled = engines
    batch = [eager.encode(t) for t in ("the cat sat", "a dog ran in the park and", "héllo")]
    settings = [
        GenerationConfig(temperature=0, max_new_tokens=24, logprobs=3),
        GenerationConfig(temperature=0.9, top_p=0.9, seed=1, n=2, max_new_tokens=20, stop=["at", "ö"]),
        GenerationConfig(
            temperature=0,
            max_new_tokens=20,
            repetition_penalty=1.3,
            no_repeat_ngram_size=3,
            logit_bias={7: 2.0},
            logprobs=2,
        ),
    ]
    for cfg in settings:
        assert_same(compiled.generate(batch, cfg), eager.generate(batch, cfg))
        assert_same(compiled.generate(batch[:1], cfg), eager.generate(batch[:1], cfg))
    greedy = settings[0]
    for p in batch:  # speculation: the eager verification forward on the compiled step's cache
        speculate = greedy.model_copy(update={"speculate": 3})
        assert_same(compiled.generate([p], speculate), eager.generate([p], greedy))
    stream = list(compiled.stream(batch, settings[1]))
    for i, c in enumerate(eager.generate(batch, settings[1])):
        assert "".join(d.text for d in stream if d.index == i) == c.text


def test_after_warm_up_no_length_or_batch_size_recompiles(engines):
    """One graph per batch-size bucket: after `warm_up` (batch 1 and 2), other batch sizes, prompt lengths and
    generation lengths run without compiling again."""
    eager, compiled = engines
    compiled.warm_up()
    texts = ["the cat sat on the mat and then", "a dog", "héllo wörld ☃ snow", "numbers 123", "the"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for B, new in ((1, 5), (1, 30), (2, 9), (5, 17), (3, 40)):
            batch = [eager.encode(t) for t in texts[:B]]
            cfg = GenerationConfig(temperature=0, max_new_tokens=new)
            assert_same(compiled.generate(batch, cfg), eager.generate(batch, cfg))


def test_compiled_prompt_tuning_equals_eager(tokenizer_dir, tmp_path):
    """The virtual tokens sit in the cache in front of the prompt: the step's columns and positions count them."""
    from lmforge.adapters.prompt import apply_prompt_tuning
    from lmforge.stages.configs import PromptSection
    from lmforge.tokenizer import Tokenizer

    config_cls, extra = FAMILIES["llama"]
    from lmforge.model.hf import load_model

    model = load_model(save_random_hf_decoder(config_cls, {**SMALL, **extra}, tmp_path))
    torch.manual_seed(0)
    model = apply_prompt_tuning(model, PromptSection(num_virtual_tokens=5))
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    eager, compiled = Engine(model, tokenizer), Engine(model, tokenizer, compile=True)
    batch = [eager.encode(t) for t in ("the cat sat", "a dog ran in the park and")]
    cfg = GenerationConfig(temperature=0, max_new_tokens=16, logprobs=2)
    assert_same(compiled.generate(batch, cfg), eager.generate(batch, cfg))


def test_compiled_scheduler_with_lora_rows_equals_eager_alone(tiny_model_dir, tiny_lora_dirs):
    """Continuous batching on the compiled step: rows join at different steps, under different adapters and
    settings, and each gets what the eager engine gives it alone."""
    from lmforge.adapters.multilora import LoraBank

    served = Engine.from_dir(tiny_model_dir, device="cpu", compile=True)
    bank = LoraBank(served.model, tiny_model_dir)
    for name, path in tiny_lora_dirs.items():
        bank.add(name, path)
    scheduler, events = Scheduler(served, bank=bank, max_batch=8), {}
    names = [None, "a", "b", "a", None]
    settings = [{"logprobs": 1}, {"temperature": 0.8, "seed": 2}, {"repetition_penalty": 1.3}, {"ignore_eos": True},
                {"n": 2}]  # fmt: skip
    requests = []
    for k, (name, extra) in enumerate(zip(names, settings, strict=True)):
        cfg = GenerationConfig(max_new_tokens=10 + k, **extra)
        requests.append(request(served, k, cfg, events, name))
        scheduler.submit(requests[-1])
        scheduler.step()  # each joins a batch already running
    scheduler.run_until_done()
    alone = {None: Engine.from_dir(tiny_model_dir, device="cpu")} | {
        name: Engine.from_dir(tiny_model_dir, device="cpu", adapter=path)
        for name, path in tiny_lora_dirs.items()
    }
    for k, r in enumerate(requests):
        assert_same(events[k][-1], alone[r.adapter].generate([r.ids], r.cfg))
