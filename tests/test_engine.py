"""The inference engine: greedy decoding equals `transformers.generate` for every decoder family, batches equal
single prompts, the KV cache equals recomputation, stop strings and streaming behave."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import save_random_hf_decoder  # noqa: E402

from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.infer.engine import Engine, TokenText, _unless_all_banned  # noqa: E402
from lmforge.infer.sampling import GenerationConfig  # noqa: E402
from lmforge.model.hf import load_model  # noqa: E402
from lmforge.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

VOCAB = 300
SMALL = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=96, bos_token_id=2, eos_token_id=3, pad_token_id=0,
)  # fmt: skip
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "smollm-tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "mistral-window": ("MistralConfig", {"sliding_window": 5}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 32, "attention_bias": True}),
}
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "héllo wörld ☃ snow", "numbers 123 456"] * 20
GREEDY = GenerationConfig(temperature=0, max_new_tokens=24)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_tokenizer(TEXTS, "bpe", VOCAB, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module", params=list(FAMILIES))
def model_dir(request, tmp_path_factory, tokenizer_dir):
    """A seeded random HF model of the family with the test tokenizer, saved with `save_pretrained`."""
    config_cls, extra = FAMILIES[request.param]
    path = save_random_hf_decoder(config_cls, {**SMALL, **extra}, tmp_path_factory.mktemp(request.param))
    for f in tokenizer_dir.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    return path


def prompts(engine: Engine) -> list[list[int]]:
    return [engine.encode(t) for t in ("the cat sat", "a dog ran in the park and", "héllo")]


def hf_greedy(path, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy `generate` on a left-padded batch: the new ids of each row, cut at EOS."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    width = max(len(p) for p in prompt_ids)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompt_ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                      eos_token_id=[3, 5], pad_token_id=0)  # fmt: skip
    rows = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in (3, 5)), len(row))
        rows.append(row[:cut])
    return rows


def test_greedy_equals_transformers_generate(model_dir):
    engine = Engine.from_dir(model_dir, device="cpu")
    batch = prompts(engine)
    expected = hf_greedy(model_dir, batch, GREEDY.max_new_tokens)
    assert [c.token_ids for c in engine.generate(batch, GREEDY)] == expected  # a left-padded batch
    for p, want in zip(batch, expected, strict=True):  # and each prompt alone
        (alone,) = engine.generate([p], GREEDY)
        assert alone.token_ids == want


def test_kv_cache_equals_recomputing_the_sequence(model_dir):
    engine = Engine.from_dir(model_dir, device="cpu")
    (c,) = engine.generate([prompts(engine)[1]], GREEDY)
    ids = prompts(engine)[1]
    model = load_model(model_dir)
    for token in c.token_ids:  # no cache: the whole sequence every step
        logits = model(torch.tensor([ids]))[0, -1]
        assert int(logits.argmax()) == token
        ids = [*ids, token]


def test_stream_concatenates_to_the_text_and_never_splits_characters(model_dir):
    engine = Engine.from_dir(model_dir, device="cpu")
    batch = prompts(engine)
    cfg = GenerationConfig(temperature=1.0, seed=3, max_new_tokens=40, n=2)
    full = engine.generate(batch, cfg)
    pieces: dict[int, list[str]] = {}
    reasons = {}
    for d in engine.stream(batch, cfg):
        pieces.setdefault(d.index, []).append(d.text)
        if d.finish_reason:
            reasons[d.index] = d.finish_reason
    assert ["".join(pieces[i]) for i in range(len(full))] == [c.text for c in full]
    assert [reasons[i] for i in range(len(full))] == [c.finish_reason for c in full]


class Scripted(torch.nn.Module):
    """A stand-in decoder that emits a fixed token sequence (greedy), to drive the streaming logic exactly."""

    extra_positions = 0  # as a CausalLM's: no virtual tokens in front of the prompt

    def __init__(self, config, script: list[int]):
        super().__init__()
        self.config, self.script, self.weight = config, script, torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, cache=None, last_only=True):
        self.calls = 0 if cache.length == 0 else self.calls + 1  # the prefill, then one call per token
        cache.length += input_ids.shape[1]
        logits = torch.full((input_ids.shape[0], 1, self.config.vocab_size), -1e9)
        logits[..., self.script[min(self.calls, len(self.script) - 1)]] = 0.0
        return logits


def test_stream_holds_back_partial_characters_and_stop_prefixes(tokenizer_dir):
    from lmforge.model.configs import preset

    tok = Tokenizer.from_dir(tokenizer_dir)
    text = "ok ü☃ then END more"
    script = [*tok.encode(text), tok.eos_id]
    assert len(tok.encode("☃")) > 1  # the character arrives over several steps
    engine = Engine(Scripted(preset("tiny-llama", vocab_size=VOCAB), script), tok)
    deltas = list(engine.stream([[5]], GenerationConfig(temperature=0, max_new_tokens=40, stop=["END"])))
    assert "".join(d.text for d in deltas) == "ok ü☃ then "  # cut before the stop string
    assert all("\ufffd" not in d.text for d in deltas)  # never half a character
    assert deltas[-1].finish_reason == "stop"
    (whole,) = engine.generate([[5]], GenerationConfig(temperature=0, max_new_tokens=40))
    assert whole.text == text and whole.finish_reason == "stop"  # stopped by EOS, not included


def test_same_seed_same_samples(model_dir):
    engine = Engine.from_dir(model_dir, device="cpu")
    batch = prompts(engine)
    cfg = GenerationConfig(temperature=1.0, top_p=0.9, seed=7, max_new_tokens=16, n=2)
    a, b = engine.generate(batch, cfg), engine.generate(batch, cfg)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    other = engine.generate(batch, cfg.model_copy(update={"seed": 8}))
    assert [c.token_ids for c in a] != [c.token_ids for c in other]
    assert len(a) == 6 and [(c.prompt_index, c.sample_index) for c in a[:2]] == [(0, 0), (0, 1)]


def test_stop_strings_that_span_tokens(tokenizer_dir, model_dir):
    engine = Engine.from_dir(model_dir, device="cpu")
    p = prompts(engine)[0]
    (free,) = engine.generate([p], GREEDY)
    tok = Tokenizer.from_dir(tokenizer_dir)
    # A stop string made of the end of one generated token and the start of the next.
    pieces = [tok.decode([t]) for t in free.token_ids]
    k = next(i for i in range(1, len(pieces)) if pieces[i - 1] and pieces[i])
    stop = pieces[k - 1][-1] + pieces[k][0]
    start = free.text.find(stop)
    (cut,) = engine.generate([p], GREEDY.model_copy(update={"stop": [stop]}))
    assert cut.finish_reason == "stop" and cut.text == free.text[:start]
    streamed = "".join(d.text for d in engine.stream([p], GREEDY.model_copy(update={"stop": [stop]})))
    assert streamed == cut.text


def test_ignore_eos_goes_on_to_max_new_tokens(model_dir):
    """EOS forced by a logit bias ends a sample at once, unless `ignore_eos`: then every requested token comes, EOS
    ids in the tokens and not in the text (as vLLM's ignore_eos)."""
    engine = Engine.from_dir(model_dir, device="cpu")
    p = prompts(engine)[:2]
    forced = GenerationConfig(temperature=0, max_new_tokens=6, logit_bias={3: 100.0})
    assert [(c.token_ids, c.finish_reason, c.stop_token) for c in engine.generate(p, forced)] == [
        ([], "stop", 3)
    ] * 2
    going = forced.model_copy(update={"ignore_eos": True})
    assert [(c.token_ids, c.finish_reason, c.text) for c in engine.generate(p, going)] == [
        ([3] * 6, "length", "")
    ] * 2


def test_length_and_context_limits(model_dir):
    engine = Engine.from_dir(model_dir, device="cpu")
    (c,) = engine.generate([prompts(engine)[0]], GenerationConfig(temperature=0, max_new_tokens=3))
    assert c.finish_reason in ("length", "stop") and len(c.token_ids) <= 3
    assert len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs)
    # The message states the real limit, for the longest prompt of the batch, and that limit then works.
    with pytest.raises(LmforgeError) as e:
        engine.generate([[5] * 10, [5] * 90], GenerationConfig(max_new_tokens=10))
    assert str(e.value) == (
        "max_new_tokens 10: the model's context is 96 tokens and the prompt (prompt 1, 90 tokens) leaves room "
        "for at most 6 new tokens; lower max_new_tokens, shorten the prompt"
    )
    assert all(
        len(c.token_ids) <= 6
        for c in engine.generate([[5] * 10, [5] * 90], GREEDY.model_copy(update={"max_new_tokens": 6}))
    )
    with pytest.raises(LmforgeError, match=r"prompt \(prompt 0, 96 tokens\) fills the model's context of 96"):
        engine.generate([[5] * 96], GenerationConfig(max_new_tokens=1))


def test_every_token_banned_is_an_error_not_a_nan_draw():
    # no_repeat_ngram_size can ban every id (softmax would be NaN, argmax an arbitrary id): an error for a row
    # still decoding, uniform scores for a finished one (its draw is dropped)
    scores = torch.tensor([[0.5, -1.0, 2.0], [-torch.inf, -torch.inf, -torch.inf]])
    with pytest.raises(LmforgeError, match="every token is banned at this step"):
        _unless_all_banned(scores, [False, False])
    assert _unless_all_banned(scores, [False, True]).tolist() == [[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]]
    assert _unless_all_banned(scores[:1], [False]) is not None


def test_token_text_gives_each_tokens_bytes_and_escapes_partial_characters(tokenizer_dir):
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    text = TokenText(tokenizer)
    for s in ("the cat sat", " héllo wörld ☃ snow", "日本 😀"):  # the last: characters never seen in training
        ids = tokenizer.encode(s)
        pieces = [text.bytes(i) for i in ids]
        assert b"".join(pieces) == s.encode()  # the bytes of the tokens spell the text
        whole = [(i, p) for i, p in zip(ids, pieces, strict=True) if p.decode(errors="ignore").encode() == p]
        assert [TokenText.text(p) for _, p in whole] == [tokenizer.decode([i]) for i, _ in whole]
    # "😀" is 4 bytes no merge covers: four tokens, each one byte, its text the escaped byte (no U+FFFD).
    ids = tokenizer.encode("😀")
    assert [text.bytes(i) for i in ids] == [b"\xf0", b"\x9f", b"\x98", b"\x80"]
    assert [text.entry(i, -1.5)["token"] for i in ids] == ["\\xf0", "\\x9f", "\\x98", "\\x80"]
    assert text.entry(ids[0], -1.5) == {"id": ids[0], "token": "\\xf0", "logprob": -1.5, "bytes": [0xF0]}
    bos = tokenizer.bos_id
    assert text.bytes(bos) == tokenizer.bos_token.encode() and text.bytes(10**6) == b""


def test_token_text_of_a_sentencepiece_style_byte_fallback_tokenizer():
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers

    # Llama 2's layout: "▁" for spaces, <0xNN> pieces for bytes no piece covers.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    vocab |= {piece: 259 + i for i, piece in enumerate(["▁", "h", "i", "▁h", "▁hi", "é"])}
    backend = Backend(models.BPE(vocab, [("▁", "h"), ("▁h", "i")], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    text = TokenText(Tokenizer(backend, {}))
    ids = backend.encode("hi hé☃").ids
    assert [text.bytes(i) for i in ids] == [b" hi", b" h", "é".encode(), b"\xe2", b"\x98", b"\x83"]
    assert [text.entry(i, 0.0)["token"] for i in ids] == [" hi", " h", "é", "\\xe2", "\\x98", "\\x83"]


def test_bf16_generation_runs_for_every_family(model_dir):
    engine = Engine.from_dir(model_dir, device="cpu", dtype=torch.bfloat16)
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    batch = prompts(engine)
    out = engine.generate(batch, GenerationConfig(temperature=0.7, seed=0, max_new_tokens=8))
    assert all(len(c.token_ids) <= 8 and all(lp <= 0 for lp in c.logprobs) for c in out)
    assert all(c.finish_reason in ("stop", "length") for c in out)


@pytest.mark.parametrize(
    "extra",
    [{}, {"repetition_penalty": 1.3, "logit_bias": {7: 2.0}}, {"no_repeat_ngram_size": 3}],
    ids=["plain", "penalties", "no-repeat"],
)
def test_speculative_decoding_gives_greedy_tokens_in_fewer_forwards(model_dir, extra):
    """Prompt-lookup drafts checked in one forward: the same tokens, log-probs and finish as plain greedy."""
    engine = Engine.from_dir(model_dir, device="cpu")
    forwards = 0
    forward = engine.model.forward

    def counted(*args, **kwargs):
        nonlocal forwards
        forwards += 1
        return forward(*args, **kwargs)

    engine.model.forward = counted
    base = GenerationConfig(temperature=0, max_new_tokens=40, logprobs=3, **extra)
    for p in prompts(engine):
        forwards = 0
        (want,) = engine.generate([p], base)
        plain_forwards = forwards
        for k in (2, 5):
            forwards = 0
            (got,) = engine.generate([p], base.model_copy(update={"speculate": k}))
            assert got.token_ids == want.token_ids and got.text == want.text
            assert (got.finish_reason, got.stop_token) == (want.finish_reason, want.stop_token)
            assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
            assert [list(t) for t in got.top_logprobs] == [list(t) for t in want.top_logprobs]
            assert forwards <= plain_forwards
            stream = list(engine.stream([p], base.model_copy(update={"speculate": k})))
            assert (
                "".join(d.text for d in stream) == got.text and stream[-1].finish_reason == got.finish_reason
            )


class Periodic(torch.nn.Module):
    """A stand-in decoder whose greedy continuation of any prefix of length L is cycle[L % len(cycle)]."""

    extra_positions = 0

    def __init__(self, config, cycle: list[int]):
        super().__init__()
        self.config, self.cycle, self.weight = config, cycle, torch.nn.Parameter(torch.zeros(1))
        self.forwards = 0

    def forward(self, input_ids, attention_mask=None, cache=None, last_only=False):
        self.forwards += 1
        B, T = input_ids.shape
        logits = torch.full((B, T, self.config.vocab_size), -1e9)
        for i in range(T):  # the token after position cache.length + i
            logits[:, i, self.cycle[(cache.length + i + 1) % len(self.cycle)]] = 0.0
        cache.length += T
        return logits[:, -1:] if last_only else logits


def test_speculation_accepts_a_repeating_continuation_in_few_forwards(tokenizer_dir):
    from lmforge.model.configs import preset

    cycle = [10, 11, 12, 13]
    model = Periodic(preset("tiny-llama", vocab_size=VOCAB), cycle)
    engine = Engine(model, Tokenizer.from_dir(tokenizer_dir))
    want = [cycle[i % 4] for i in range(8, 8 + 40)]  # the prompt is 8 ids
    for k, most in ((0, 41), (3, 12), (8, 7)):  # forwards: the prefill + one per 1 + k tokens, after a cycle
        model.forwards = 0
        (c,) = engine.generate([cycle * 2], GenerationConfig(temperature=0, max_new_tokens=40, speculate=k))
        assert c.token_ids == want and c.finish_reason == "length"
        assert model.forwards <= most, (k, model.forwards)


def test_speculation_stops_at_stop_strings_and_the_length_limit(model_dir):
    engine = Engine.from_dir(model_dir, device="cpu")
    p = prompts(engine)[1]
    (free,) = engine.generate([p], GenerationConfig(temperature=0, max_new_tokens=30))
    for cfg in (
        GenerationConfig(temperature=0, max_new_tokens=7),
        GenerationConfig(
            temperature=0, max_new_tokens=30, stop=[free.text[5:8]] if len(free.text) > 8 else []
        ),
    ):
        (want,) = engine.generate([p], cfg)
        (got,) = engine.generate([p], cfg.model_copy(update={"speculate": 6}))
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)


def test_ngram_index_drafts_what_followed_the_latest_longest_match():
    from lmforge.infer.engine import NgramIndex

    index = NgramIndex([1, 2, 3, 9, 1, 2, 3, 4, 5, 7, 2, 3])
    assert index.draft(4, 3) == [5, 7, 2]  # "2 3 4" last seen at 5..7, followed by 5 7 2
    index = NgramIndex([5, 6, 7, 5, 6, 8])
    assert index.draft(5, 2) == [6, 8]  # the latest "5" is followed by 6 8, an earlier one by 6 7
    assert NgramIndex([1, 2, 3]).draft(4, 5) == []  # 4 never occurred
    assert NgramIndex([1, 2, 1]).draft(2, 0) == []
    assert NgramIndex([1, 2, 1, 2]).draft(1, 5) == [2, 1, 2, 1, 2]  # a cycle goes on past the sequence's end


def test_speculation_needs_greedy_decoding():
    with pytest.raises(
        ValueError, match="speculate=4 checks drafts against greedy decoding: set temperature 0"
    ):
        GenerationConfig(temperature=0.7, speculate=4)
    with pytest.raises(ValueError, match=r"expected a value in \[0, 64\]"):
        GenerationConfig(temperature=0, speculate=65)
