"""Sampling controls: each processor against its `transformers` twin, OpenAI's penalties by hand, invariants."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.generation import logits_process as hf

from lmforge.errors import LmforgeError
from lmforge.infer.sampling import (
    GenerationConfig,
    apply_logit_bias,
    apply_temperature,
    frequency_presence_penalty,
    generation_config,
    min_p_filter,
    no_repeat_ngram,
    process_logits,
    repetition_penalty,
    sample_next,
    sampling_generator,
    token_logprobs,
    top_k_filter,
    top_p_filter,
)

B, V, L = 3, 50, 14
PADS = [0, 3, 6]  # left padding per row
N_GENERATED = 4  # the last 4 positions of each row were generated


def _logits(seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    """(B, V) random fp32 logits of both signs."""
    return scale * torch.randn(B, V, generator=torch.Generator().manual_seed(seed))


def _history(
    seed: int = 0, alphabet: int = V, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`tokens`, `valid`, `generated` (B, L): random ids, rows left-padded with `pad_id` by PADS."""
    tokens = torch.randint(0, alphabet, (B, L), generator=torch.Generator().manual_seed(seed))
    positions = torch.arange(L)[None, :]  # (1, L)
    valid = positions >= torch.tensor(PADS)[:, None]  # (B, L)
    tokens = tokens.masked_fill(~valid, pad_id)
    generated = (positions >= L - N_GENERATED).expand(B, L)
    return tokens, valid, generated


def _assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal within 1e-6, with exactly the same entries filtered out (-inf)."""
    assert torch.equal(torch.isneginf(ours), torch.isneginf(theirs))
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


# --- each processor vs transformers ------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_temperature_matches_hf(temperature):
    x, ids = _logits(), _history()[0]
    _assert_same(apply_temperature(x, temperature), hf.TemperatureLogitsWarper(temperature)(ids, x.clone()))


@pytest.mark.parametrize("k", [1, 5, 49, 50, 80])
@pytest.mark.parametrize("ties", [False, True])
def test_top_k_matches_hf(k, ties):
    x, ids = _logits(), _history()[0]
    x = x.round() if ties else x  # integer logits: many ties with the k-th value, which both keep
    out = top_k_filter(x, k)
    _assert_same(out, hf.TopKLogitsWarper(k)(ids, x.clone()))
    assert (out.isfinite().sum(-1) >= min(k, V)).all()


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.999])
def test_top_p_matches_hf(p):
    x, ids = _logits(1), _history()[0]
    out = top_p_filter(x, p)
    _assert_same(out, hf.TopPLogitsWarper(p)(ids, x.clone()))
    assert out.isinf().any()  # the case filters something


@pytest.mark.parametrize("min_p", [0.01, 0.2, 0.9])
def test_min_p_matches_hf(min_p):
    x, ids = _logits(2), _history()[0]
    out = min_p_filter(x, min_p)
    _assert_same(out, hf.MinPLogitsWarper(min_p)(ids, x.clone()))
    assert out.isinf().any()


@pytest.mark.parametrize("penalty", [0.6, 1.3])
def test_repetition_penalty_matches_hf(penalty):
    # HF's generate() ignores left padding through `prompt_ignore_length` = padding lengths; so do we (`valid`).
    x = _logits(3)
    tokens, valid, _ = _history(3, alphabet=20, pad_id=45)  # 45 only ever appears as padding
    out = repetition_penalty(x, tokens, valid, penalty)
    theirs = hf.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=torch.tensor(PADS))(
        tokens, x.clone()
    )
    _assert_same(out, theirs)
    assert torch.equal(out[:, 45], x[:, 45])  # padding never counted
    assert not torch.equal(out, x)


@pytest.mark.parametrize("size", [1, 2, 3])
def test_no_repeat_ngram_matches_hf(size):
    x = _logits(4)
    tokens, valid, _ = _history(4, alphabet=4)  # a 4-token alphabet: many repeated n-grams
    out = no_repeat_ngram(x, tokens, valid, size)
    assert out.isinf().any()
    # HF sees no padding: compare row by row on the row's real tokens.
    for b in range(B):
        theirs = hf.NoRepeatNGramLogitsProcessor(size)(tokens[b][valid[b]][None], x[b : b + 1].clone())
        _assert_same(out[b : b + 1], theirs)
    # Without padding, the whole batch at once.
    full = torch.ones_like(valid)
    _assert_same(
        no_repeat_ngram(x, tokens, full, size), hf.NoRepeatNGramLogitsProcessor(size)(tokens, x.clone())
    )


def test_no_repeat_ngram_ignores_padding():
    # Padding id 7: pad pad | 7 9 7. The real bigram (7, 9) bans 9 after the final 7; the bigrams (7, 7) of
    # pad-pad and pad-real do not exist, so 7 stays allowed (it would be banned if padding counted).
    x = torch.zeros(1, 10)
    tokens = torch.tensor([[7, 7, 7, 9, 7]])
    valid = torch.tensor([[False, False, True, True, True]])
    out = no_repeat_ngram(x, tokens, valid, 2)
    assert out[0].isinf().nonzero().flatten().tolist() == [9]
    with_padding = no_repeat_ngram(x, tokens, torch.ones_like(valid), 2)
    assert with_padding[0].isinf().nonzero().flatten().tolist() == [7, 9]


def test_logit_bias_matches_hf():
    x, ids = _logits(5), _history()[0]
    bias = {3: -100.0, 17: 5.5, 49: 100.0}
    theirs = hf.SequenceBiasLogitsProcessor([[[i], v] for i, v in bias.items()])(ids, x.clone())
    _assert_same(apply_logit_bias(x, bias), theirs)
    with pytest.raises(LmforgeError, match=r"logit_bias: token id 50 is outside the vocabulary \[0, 50\)"):
        apply_logit_bias(x, {50: 1.0})


# --- OpenAI's frequency and presence penalties, by hand ---------------------------------------------------------


def test_frequency_presence_penalty_hand_computed():
    # Prompt 1 1 2, generated 3 3 1 (pad id 4 before the prompt). Only generated tokens count:
    # count = {1: 1, 3: 2}. logit[j] -= count[j] * 0.5 + (count[j] > 0) * 0.25:
    #   j=1: -(1 * 0.5 + 0.25) = -0.75;  j=3: -(2 * 0.5 + 0.25) = -1.25;  j=2 (prompt only), 0, 4, 5: 0.
    x = torch.zeros(1, 6)
    tokens = torch.tensor([[4, 1, 1, 2, 3, 3, 1]])
    generated = torch.tensor([[False, False, False, False, True, True, True]])
    out = frequency_presence_penalty(x, tokens, generated, frequency=0.5, presence=0.25)
    assert out[0].tolist() == [0.0, -0.75, 0.0, -1.25, 0.0, 0.0]
    # Negative values reward repetition; through process_logits a padding slot marked generated is not counted.
    valid = torch.tensor([[False, True, True, True, True, True, True]])
    cfg = GenerationConfig(frequency_penalty=-1.0, presence_penalty=2.0)
    generated_with_pad = generated.clone()
    generated_with_pad[0, 0] = True
    out = process_logits(x, tokens, valid, generated_with_pad, cfg)
    assert out[0].tolist() == [0.0, -1.0, 0.0, 0.0, 0.0, 0.0]  # 1: +1 - 2; 3: +2 - 2; 4 (padding): 0


# --- the composed order -------------------------------------------------------------------------------------


def test_process_logits_follows_hf_order():
    # HF's `_get_logits_processor` order: sequence bias, repetition penalty, no-repeat-ngram, then (sampling)
    # temperature, top-k, top-p, min-p. No padding here: HF's no-repeat-ngram would count pad ids.
    x = _logits(6)
    tokens, _, generated = _history(6, alphabet=6)
    valid = torch.ones_like(tokens, dtype=torch.bool)
    cfg = GenerationConfig(
        logit_bias={0: 3.0, 9: -2.0}, repetition_penalty=1.4, no_repeat_ngram_size=2, temperature=2.5,
        top_k=30, top_p=0.7, min_p=0.05,
    )  # fmt: skip
    chain = hf.LogitsProcessorList([
        hf.SequenceBiasLogitsProcessor([[[0], 3.0], [[9], -2.0]]),
        hf.RepetitionPenaltyLogitsProcessor(1.4),
        hf.NoRepeatNGramLogitsProcessor(2),
        hf.TemperatureLogitsWarper(2.5),
        hf.TopKLogitsWarper(30),
        hf.TopPLogitsWarper(0.7),
        hf.MinPLogitsWarper(0.05),
    ])  # fmt: skip
    out = process_logits(x, tokens, valid, generated, cfg)
    _assert_same(out, chain(tokens, x.clone()))
    # The order matters: top-p before temperature keeps a different set of tokens.
    swapped = apply_temperature(top_p_filter(x, 0.7), 2.5)
    assert not torch.equal(top_p_filter(apply_temperature(x, 2.5), 0.7).isinf(), swapped.isinf())


def test_process_logits_is_pure_and_fp32():
    x = _logits(7).to(torch.bfloat16)
    tokens, valid, generated = _history(7)
    before = x.clone()
    cfg = GenerationConfig(repetition_penalty=1.2, frequency_penalty=0.5, top_k=10, temperature=0.7)
    out = process_logits(x, tokens, valid, generated, cfg)
    assert out.dtype == torch.float32 and out.shape == (B, V)
    assert torch.equal(x, before)


# --- sampling -----------------------------------------------------------------------------------------------


def _draws(seed: int | None, steps: int = 20) -> torch.Tensor:
    """(steps, B) samples from fixed logits with a generator seeded by `seed`."""
    x, cfg = _logits(8, scale=0.5), GenerationConfig(temperature=1.0)
    g = sampling_generator(seed, "cpu")
    return torch.stack([sample_next(x, cfg, g) for _ in range(steps)])


def test_same_seed_same_samples():
    assert torch.equal(_draws(0), _draws(0))
    assert not torch.equal(_draws(0), _draws(1))
    assert sampling_generator(None, "cpu") is None


def test_per_row_generators_do_not_depend_on_the_batch():
    # One generator per request: row 0's draw is the same alone or batched with other seeded requests.
    x, cfg = _logits(9, scale=0.5), GenerationConfig(temperature=1.0)
    for seed in range(5):
        alone = sample_next(x[:1], cfg, [sampling_generator(seed, "cpu")])
        batch = sample_next(x, cfg, [sampling_generator(s, "cpu") for s in (seed, 100, 101)])
        assert batch.shape == (B,) and batch[0] == alone[0]


def test_temperature_zero_is_greedy():
    x = _logits(10)
    tokens, valid, generated = _history(10)
    cfg = GenerationConfig(temperature=0, top_k=3, top_p=0.5, repetition_penalty=1.5)
    processed = process_logits(x, tokens, valid, generated, cfg)
    expected = repetition_penalty(x, tokens, valid, 1.5).argmax(-1)  # the warpers are skipped
    for seed in range(3):
        assert torch.equal(sample_next(processed, cfg, sampling_generator(seed, "cpu")), expected)


def test_sample_follows_the_distribution():
    # 4000 draws from p = (0.7, 0.2, 0.1): frequencies within 0.03.
    x = torch.tensor([0.7, 0.2, 0.1]).log().expand(4000, 3)
    draws = sample_next(x, GenerationConfig(temperature=1.0), sampling_generator(0, "cpu"))
    freq = torch.bincount(draws, minlength=3) / 4000
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)


def test_filtered_tokens_are_never_drawn():
    # Tokens at -inf (top-k / top-p filtered), first and last included, are never drawn; the rest keep their
    # shares (inverse-CDF sampling: 100,000 draws within 0.005).
    x = torch.tensor([float("-inf"), 0.0, float("-inf"), 1.0, 2.0, float("-inf")]).expand(100_000, 6)
    draws = sample_next(x, GenerationConfig(temperature=1.0), sampling_generator(3, "cpu"))
    freq = torch.bincount(draws, minlength=6) / len(draws)
    assert freq[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(freq, x[0].softmax(-1), atol=0.005, rtol=0)


def test_token_logprobs_from_the_raw_distribution():
    x = _logits(11)
    chosen = torch.tensor([0, 7, 49])
    lp, top_lp, top_ids = token_logprobs(x, chosen, 5)
    logp = x.log_softmax(-1)
    torch.testing.assert_close(lp, logp[torch.arange(B), chosen])
    assert top_lp.shape == top_ids.shape == (B, 5)
    assert torch.equal(top_ids[:, 0], x.argmax(-1)) and (top_lp.diff(dim=-1) <= 0).all()
    assert token_logprobs(x, chosen, 0)[1].shape == (B, 0)


# --- config: validation and generation_config.json --------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"top_p": 0}, "top_p: expected a value in (0, 1], got 0"),
        ({"top_p": 1.5}, "top_p: expected a value in (0, 1], got 1.5"),
        ({"temperature": -0.5}, "temperature: expected a value in [0, inf), got -0.5"),
        ({"n": 0}, "n: expected a value in [1, inf), got 0"),
        ({"max_new_tokens": 0}, "max_new_tokens: expected a value in [1, inf), got 0"),
        ({"top_k": -1}, "top_k: expected a value in [0, inf), got -1"),
        ({"min_p": 1.0}, "min_p: expected a value in [0, 1), got 1.0"),
        ({"repetition_penalty": 0}, "repetition_penalty: expected a value in (0, inf), got 0"),
        ({"frequency_penalty": 2.5}, "frequency_penalty: expected a value in [-2, 2], got 2.5"),
        ({"presence_penalty": -3}, "presence_penalty: expected a value in [-2, 2], got -3"),
        ({"logit_bias": {"5": 101}}, "logit_bias: expected a value in [-100, 100], got 101"),
        ({"logit_bias": {"-1": 1}}, "logit_bias: expected a value in [0, inf), got '-1'"),
        ({"logprobs": -1}, "logprobs: expected a value in [0, 20], got -1"),
        ({"logprobs": 21}, "logprobs: expected a value in [0, 20], got 21"),
        ({"seed": -1}, "seed: expected a value in [0, 18446744073709551615], got -1"),
        ({"seed": 2**64}, "seed: expected a value in [0, 18446744073709551615], got 18446744073709551616"),
        ({"speculate": 65}, "speculate: expected a value in [0, 64], got 65"),
        ({"top_p": float("nan")}, "top_p: expected a"),  # a value in (0, 1], or a finite number
        ({"top_k": "many"}, "top_k: expected an integer, got 'many'"),
        ({"topp": 0.5}, "unknown config key 'topp' (from the request); did you mean 'top_p'?"),
    ],
)
def test_bad_values_name_the_parameter_and_range(overrides, message):
    with pytest.raises(LmforgeError) as e:
        generation_config(overrides)
    assert str(e.value).startswith(message)


def test_good_values_and_json_keys():
    cfg = generation_config({"temperature": 0, "top_p": 1, "logit_bias": {"50256": -100}, "stop": ["\n\n"]})
    assert cfg.temperature == 0.0 and cfg.logit_bias == {50256: -100.0} and cfg.stop == ["\n\n"]
    assert generation_config() == GenerationConfig()


def test_greedy_unless_asked_to_sample(tmp_path):
    # transformers' rule: do_sample is false unless set, so the defaults decode greedily ...
    assert GenerationConfig().temperature == 0.0 and generation_config().temperature == 0.0
    assert generation_config({"seed": 2**64 - 1}).temperature == 0.0
    # ... and a temperature above 0, or a sampling filter without one, asks to sample.
    assert generation_config({"temperature": 0.7}).temperature == 0.7
    for knob in ({"top_k": 5}, {"top_p": 0.9}, {"min_p": 0.1}):
        assert GenerationConfig(**knob).temperature == generation_config(knob).temperature == 1.0
    for off in ({"top_k": 0}, {"top_p": 1.0}, {"min_p": 0.0}, {"temperature": 0, "top_p": 0.9}):
        assert generation_config(off).temperature == 0.0
    # A model dir whose generation_config.json leaves do_sample out (lmforge writes token ids only) is greedy.
    plain = tmp_path / "plain"
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(plain)
    assert GenerationConfig.from_model_dir(plain).temperature == 0.0
    assert GenerationConfig.from_model_dir(plain, top_p=0.5).temperature == 1.0
    # do_sample true: its settings, with transformers' defaults (top_k 50) for what it leaves out; a filter in
    # the request keeps the file's temperature; --speculate alone decodes greedily, sampling flags or not.
    sampling = tmp_path / "sampling"
    transformers.GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9).save_pretrained(sampling)
    cfg = GenerationConfig.from_model_dir(sampling)
    assert (cfg.temperature, cfg.top_k, cfg.top_p) == (0.6, 50, 0.9)
    assert GenerationConfig.from_model_dir(sampling, min_p=0.1).temperature == 0.6
    assert GenerationConfig.from_model_dir(sampling, speculate=4).temperature == 0.0
    (sampling / "generation_config.json").write_text('{"do_sample": true}')
    cfg = GenerationConfig.from_model_dir(sampling)
    assert (cfg.temperature, cfg.top_k, cfg.top_p) == (1.0, 50, 1.0)
    with pytest.raises(LmforgeError, match="speculate=4 checks drafts against greedy decoding"):
        GenerationConfig.from_model_dir(sampling, speculate=4, top_p=0.9)


def test_from_model_dir_reads_hf_generation_config(tmp_path):
    transformers.GenerationConfig(
        do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.1,
        no_repeat_ngram_size=3, max_new_tokens=64, bos_token_id=1, eos_token_id=[2, 3], pad_token_id=0,
    ).save_pretrained(tmp_path)  # fmt: skip
    cfg = GenerationConfig.from_model_dir(tmp_path, top_k=5)
    assert (cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p) == (0.7, 5, 0.9, 0.02)
    assert (cfg.repetition_penalty, cfg.no_repeat_ngram_size, cfg.max_new_tokens) == (1.1, 3, 64)
    # do_sample false: HF decodes greedily, whatever the temperature.
    greedy = tmp_path / "greedy"
    transformers.GenerationConfig(do_sample=False).save_pretrained(greedy)
    assert GenerationConfig.from_model_dir(greedy).temperature == 0.0
    (greedy / "generation_config.json").write_text(
        '{"do_sample": false, "temperature": 0.7}'
    )  # HF won't write it
    assert GenerationConfig.from_model_dir(greedy, max_new_tokens=3).temperature == 0.0
    # ... unless the request asks to sample: a filter turned on without a temperature samples at 1.0.
    assert GenerationConfig.from_model_dir(greedy, top_k=3).temperature == 1.0
    assert GenerationConfig.from_model_dir(tmp_path / "missing", n=2) == GenerationConfig(n=2)
    # A bad value in the file names the file.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "generation_config.json").write_text('{"top_p": 0.0, "eos_token_id": 2}')
    with pytest.raises(LmforgeError, match=r"top_p: expected a value in \(0, 1\], got 0.0 \(from .*bad"):
        GenerationConfig.from_model_dir(bad)
    (bad / "generation_config.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="cannot read"):
        GenerationConfig.from_model_dir(bad)
