"""Sampling controls: `GenerationConfig` and the logits processors, each a small pure function.

Every processor takes fp32 logits (B, V) and returns new logits; a filtered-out token gets -inf (HF's
`filter_value`). The batch's history is `tokens` (B, L) int64, prompt + generated ids so far (prompts
left-padded), `valid` (B, L) bool, False at padding, and `generated` (B, L) bool, True at generated positions.

`process_logits` applies them in one order, HF's (`GenerationMixin._get_logits_processor`) where HF has them:

1. logit bias          HF's `SequenceBiasLogitsProcessor` comes first: it edits what the model said, and the
                       penalties below then act on the biased scores.
2. repetition penalty  HF semantics: over prompt + generated (HF's `input_ids`), left padding excluded.
3. frequency and presence penalties
                       OpenAI semantics: over generated tokens only. HF has none; they sit with the other
                       history-based edits, after HF's repetition penalty (vLLM's order too).
4. no-repeat-n-gram    HF semantics: bans (-inf) the tokens that would repeat an n-gram of prompt + generated.
5. temperature         0 means greedy: steps 5-8 are skipped, as HF skips its warpers when `do_sample=False`
                       (they keep the argmax anyway), and `sample_next` takes the argmax.
6-8. top-k, top-p, min-p
                       HF's warper order, after temperature: top-p and min-p see the tempered distribution
                       (HF and llama.cpp apply min-p after temperature).

Greedy or sampled, transformers' rule: decoding is greedy (temperature 0) unless the model's
`generation_config.json` says `do_sample: true` (then its temperature, top_k, top_p, with transformers' 1.0,
50, 1.0 for those it leaves out), or the request asks to sample: a temperature above 0, or top_k, top_p or
min_p turned on without a temperature (sampling at the file's temperature, else 1.0). `speculate` without any
of those decodes greedily, whatever the file says, since speculation checks drafts against greedy decoding.

Reported log-probs (`token_logprobs`) come from the model's raw log-softmax, before any processor: they say
what the model believes, independent of the sampling knobs (vLLM's default `raw_logprobs`; OpenAI does not
document which distribution it reports).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, Field, ValidationError, model_validator
from torch import Tensor

from lmforge.config import Section, validation_message
from lmforge.errors import LmforgeError


def _within(interval: str) -> AfterValidator:
    """A validator of a number in `interval` ('(0, 1]', '[1, inf)') whose error names the whole interval."""
    # Integer bounds stay ints: a float 2**64 - 1 would round and let 2**64 through.
    lo, hi = (int(s) if s.strip().lstrip("-").isdigit() else float(s) for s in interval[1:-1].split(","))

    def check(v: float) -> float:
        above = v > lo if interval[0] == "(" else v >= lo
        below = v < hi if interval[-1] == ")" else v <= hi
        if not (above and below):  # also rejects NaN
            raise ValueError(f"expected a value in {interval}")
        return v

    return AfterValidator(check)


# Logits divided by less (a temperature, a repetition penalty) can pass fp32's range: inf, then NaN probabilities.
_MIN_DIVISOR = 1e-5


def _at_least(floor: float, zero: str = "") -> AfterValidator:
    """A validator of a number >= `floor`, or of 0 too when `zero` says what 0 means ('0 (greedy)')."""

    def check(v: float) -> float:
        if v < floor and not (zero and v == 0):
            raise ValueError(f"expected {zero + ' or ' if zero else ''}a value >= {floor:g}")
        return v

    return AfterValidator(check)


class GenerationConfig(Section):
    """How to pick each next token and when to stop; the model dir's `generation_config.json` gives defaults."""

    max_new_tokens: Annotated[int, _within("[1, inf)")] = 256
    """Generate at most this many tokens per sample (>= 1)."""
    temperature: Annotated[float, _within("[0, inf)"), _at_least(_MIN_DIVISOR, "0 (greedy)")] = 0.0
    """Divide the logits by this before sampling (0, or >= 1e-5); 0 = greedy (always the most likely token), the default
    as in transformers (`do_sample=False`). Left out while top_k, top_p or min_p is on, it is 1.0: those only act
    when sampling, so turning one on asks to sample."""
    top_k: Annotated[int, _within("[0, inf)")] = 0
    """Sample only among the k most likely tokens (>= 0); 0 = off."""
    top_p: Annotated[float, _within("(0, 1]")] = 1.0
    """Nucleus sampling: only the most likely tokens whose probabilities sum to top_p, in (0, 1]; 1 = off."""
    min_p: Annotated[float, _within("[0, 1)")] = 0.0
    """Drop tokens less likely than min_p x the top token's probability, in [0, 1); 0 = off."""
    repetition_penalty: Annotated[float, _within("(0, inf)"), _at_least(_MIN_DIVISOR)] = 1.0
    """HF/CTRL penalty (>= 1e-5) on every token of prompt + output: positive logits / p, negative x p; 1 = off."""
    frequency_penalty: Annotated[float, _within("[-2, 2]")] = 0.0
    """OpenAI's: subtract this x (times the token was generated) from its logit, in [-2, 2]; 0 = off."""
    presence_penalty: Annotated[float, _within("[-2, 2]")] = 0.0
    """OpenAI's: subtract this from the logit of every token generated at least once, in [-2, 2]; 0 = off."""
    logit_bias: dict[Annotated[int, _within("[0, inf)")], Annotated[float, _within("[-100, 100]")]] = Field(
        default_factory=dict
    )
    """Token id -> value added to its logit, each in [-100, 100] (OpenAI's): -100 bans, 100 forces."""
    no_repeat_ngram_size: Annotated[int, _within("[0, inf)")] = 0
    """Never repeat an n-gram of this size of prompt + output (>= 0); 0 = off."""
    stop: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    """Stop a sample when its text contains one of these strings (the stop string is not returned)."""
    seed: Annotated[int, _within(f"[0, {2**64 - 1}]")] | None = None
    """Seed of this request's sampling generator, in [0, 2^64) (torch's range; same seed, same samples);
    null = unseeded."""
    n: Annotated[int, _within("[1, inf)")] = 1
    """Samples to generate per prompt (>= 1)."""
    logprobs: Annotated[int, _within("[0, 20]")] = 0
    """Report each token's log-prob and this many most likely alternatives, in [0, 20] (OpenAI's
    `top_logprobs` range); 0 = the token's only."""
    speculate: Annotated[int, _within("[0, 64]")] = 0
    """Prompt-lookup speculative decoding, in [0, 64]: per step, draft up to this many tokens that followed the
    latest earlier occurrence of the last 1-3 tokens (in the prompt or the output) and check them in one forward.
    Greedy decoding of one sample only (temperature 0, one prompt, n = 1); the tokens are greedy's, up to
    floating-point ties. Pays where the output repeats its context (RAG, edits, extraction); 0 = off."""
    ignore_eos: bool = False
    """Go on past end-of-turn and EOS ids (vLLM's ignore_eos; the ids stay in the tokens, not in the text): for
    benchmarks that need every requested token of a trained model."""

    @model_validator(mode="before")
    @classmethod
    def _filters_ask_to_sample(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "temperature" not in data and asks_to_sample(data):
            return {**data, "temperature": 1.0}
        return data

    @model_validator(mode="after")
    def _speculation_is_greedy(self) -> GenerationConfig:
        if self.speculate and self.temperature != 0:
            raise ValueError(
                f"speculate={self.speculate} checks drafts against greedy decoding: set temperature 0 (or speculate 0)"
            )
        return self

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, **overrides: Any) -> GenerationConfig:
        """The model dir's `generation_config.json` as defaults, then `overrides`; errors are LmforgeError."""
        return generation_config(overrides, model_dir)


# HF `generation_config.json` keys lmforge has a field for; the rest (token ids, max_length, ...) are ignored.
_HF_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p",
            "repetition_penalty", "no_repeat_ngram_size")  # fmt: skip
# What transformers uses for the sampling settings a file with `do_sample: true` leaves out
# (`GenerationConfig._get_default_generation_params`): its top_k 50 filters though the file does not say so.
_HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


def hf_generation_defaults(model_dir: str | Path) -> dict[str, Any]:
    """The sampling settings of `model_dir/generation_config.json` as GenerationConfig fields; {} if none."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deeply
        raise LmforgeError(f"cannot read {path}: {e}") from e
    if not isinstance(hf, dict):
        raise LmforgeError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    out = {k: hf[k] for k in _HF_KEYS if hf.get(k) is not None}  # HF writes null for unset fields
    if hf.get("do_sample") is True:
        return {**_HF_SAMPLING_DEFAULTS, **out}
    out["temperature"] = 0.0  # do_sample false or left out (HF's default): greedy whatever the temperature
    return out


def asks_to_sample(settings: Mapping[str, Any]) -> bool:
    """Whether `settings` turn on a filter that only acts when sampling: top_k > 0, top_p < 1 or min_p > 0."""
    on = {"top_k": lambda v: v > 0, "top_p": lambda v: v < 1, "min_p": lambda v: v > 0}
    for key, test in on.items():
        try:
            if settings.get(key) is not None and test(float(settings[key])):
                return True
        except (TypeError, ValueError):
            pass  # not a number: validation names it
    return False


def generation_config(
    overrides: Mapping[str, Any] | None = None,
    model_dir: str | Path | None = None,
    origin: str = "from the request",
    *,
    file_settings: Mapping[str, Any] | None = None,
) -> GenerationConfig:
    """Validate lmforge defaults < `model_dir`'s generation_config.json < `overrides`; errors are LmforgeError.
    `file_settings`: that file's settings read once before (`hf_generation_defaults`), for callers that ask often.

    Greedy unless the file or the overrides ask to sample (the module docstring's rule): overrides that turn on
    top_k, top_p or min_p without a temperature sample at the file's temperature, else 1.0; overrides with
    `speculate` and none of those decode greedily. `origin` names where the overrides came from in error
    messages ("from --set", "from the request").
    """
    overrides = dict(overrides or {})
    if file_settings is not None:
        defaults = dict(file_settings)
    else:
        defaults = hf_generation_defaults(model_dir) if model_dir is not None else {}
    file = Path(model_dir or ".") / "generation_config.json"
    source = lambda key: f"from {file}" if key in defaults and key not in overrides else origin  # noqa: E731
    settings = {**defaults, **overrides}
    if "temperature" not in overrides:
        if asks_to_sample(overrides):
            if settings.get("temperature") == 0:
                del settings[
                    "temperature"
                ]  # a greedy file's: the filters ask to sample (GenerationConfig's 1.0)
        elif overrides.get("speculate"):
            settings["temperature"] = 0.0  # speculation is greedy, whatever the file says
    try:
        return GenerationConfig.model_validate(settings)
    except ValidationError as e:
        raise LmforgeError(validation_message(e, GenerationConfig, source)) from e


def _seen(tokens: Tensor, mask: Tensor, vocab: int) -> Tensor:
    """(B, V) bool: which ids occur at the positions where `mask` (B, L) is True."""
    # Masked-out positions and ids past the head's vocab go to a spare column that is dropped.
    ids = tokens.clamp(max=vocab).masked_fill(~mask, vocab)  # (B, L)
    seen = torch.zeros(tokens.size(0), vocab + 1, dtype=torch.bool, device=tokens.device)
    return seen.scatter_(1, ids, True)[:, :vocab]


def apply_logit_bias(logits: Tensor, bias: Mapping[int, float]) -> Tensor:
    """Add `bias[id]` to column `id` of every row (OpenAI's `logit_bias`, HF's one-token `sequence_bias`)."""
    if not bias:
        return logits
    if max(bias) >= logits.size(-1):
        raise LmforgeError(
            f"logit_bias: token id {max(bias)} is outside the vocabulary [0, {logits.size(-1)})"
        )
    ids = torch.tensor(list(bias), device=logits.device)  # (n,)
    values = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)  # (n,)
    return logits.index_add(1, ids, values.expand(logits.size(0), -1))


def repetition_penalty(logits: Tensor, tokens: Tensor, valid: Tensor, penalty: float) -> Tensor:
    """HF's: each token of the (valid) history gets logit / penalty if positive, logit x penalty if not."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(_seen(tokens, valid, logits.size(-1)), penalised, logits)


def frequency_presence_penalty(
    logits: Tensor, tokens: Tensor, generated: Tensor, frequency: float, presence: float
) -> Tensor:
    """OpenAI's: logit[j] -= count[j] x frequency + (count[j] > 0) x presence, counting `generated` positions."""
    vocab = logits.size(-1)
    ids = tokens.clamp(max=vocab).masked_fill(~generated, vocab)  # (B, L); the spare column takes the rest
    counts = logits.new_zeros(logits.size(0), vocab + 1).scatter_add_(
        1, ids, torch.ones_like(ids, dtype=logits.dtype)
    )
    counts = counts[:, :vocab]  # (B, V)
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def no_repeat_ngram(logits: Tensor, tokens: Tensor, valid: Tensor, size: int) -> Tensor:
    """HF's: ban (-inf) every token that would complete an n-gram already in the (valid) history."""
    if size <= 0:
        return logits
    # Move each row's real tokens to the right end (a stable sort on `valid`), so the last size-1 columns are
    # the newest tokens whatever the padding; n-grams never span padding.
    order = valid.to(torch.int8).argsort(dim=1, stable=True)  # (B, L): padding first, then real in order
    tokens, valid = tokens.gather(1, order), valid.gather(1, order)
    B, L = tokens.shape
    if size > L:
        return logits
    # Like HF: match the newest size-1 tokens against the first size-1 of every window; a match bans the
    # window's last token. O(L x size) per row, no Python loop.
    windows = tokens.unfold(1, size, 1)  # (B, L - size + 1, size)
    real = valid.unfold(1, size, 1).all(-1)  # (B, L - size + 1)
    prefix = tokens[:, L - size + 1 :]  # (B, size - 1)
    matches = (windows[..., :-1] == prefix[:, None]).all(-1) & real  # (B, L - size + 1)
    vocab = logits.size(-1)
    banned = torch.zeros(B, vocab + 1, dtype=torch.bool, device=logits.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
    return logits.masked_fill(banned[:, :vocab], float("-inf"))


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Divide the logits by `temperature` (> 0; greedy decoding, temperature 0, skips this)."""
    return logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep each row's `k` largest logits (ties with the k-th stay, as in HF); k = 0 keeps all."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the fewest most likely tokens whose probabilities sum to at least `p` (nucleus); p = 1 keeps all."""
    if p >= 1:
        return logits
    sorted_logits, order = logits.sort(dim=-1)  # ascending, (B, V)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop = cumulative <= 1 - p  # the least likely tokens, together at most 1 - p (HF's exact rule)
    drop[:, -1] = False  # the most likely token always stays
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below `min_p` x the row's top probability; min_p = 0 keeps all."""
    if min_p <= 0:
        return logits
    probs = logits.softmax(-1)  # (B, V)
    return logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))


def process_logits(
    logits: Tensor, tokens: Tensor, valid: Tensor, generated: Tensor, cfg: GenerationConfig
) -> Tensor:
    """Apply `cfg`'s enabled processors in the module docstring's order; fp32 (B, V) in, fp32 (B, V) out."""
    x = logits.float()
    x = apply_logit_bias(x, cfg.logit_bias)
    if cfg.repetition_penalty != 1:
        x = repetition_penalty(x, tokens, valid, cfg.repetition_penalty)
    if cfg.frequency_penalty or cfg.presence_penalty:
        x = frequency_presence_penalty(
            x, tokens, generated & valid, cfg.frequency_penalty, cfg.presence_penalty
        )
    x = no_repeat_ngram(x, tokens, valid, cfg.no_repeat_ngram_size)
    if cfg.temperature == 0:
        return x  # greedy: the warpers below never drop the argmax
    if cfg.temperature != 1:
        x = apply_temperature(x, cfg.temperature)
    return min_p_filter(top_p_filter(top_k_filter(x, cfg.top_k), cfg.top_p), cfg.min_p)


def sampling_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator on `device` seeded with `seed` for one request's samples; None (torch's global) if unseeded."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def sample_next(
    logits: Tensor,
    cfg: GenerationConfig,
    generator: torch.Generator | Sequence[torch.Generator | None] | None,
) -> Tensor:
    """The next token of each row (B,): argmax if temperature is 0, else a draw from softmax(processed logits).

    `generator` is one generator for the batch or one per row (requests with their own seeds in one batch:
    a row's draw then does not depend on its neighbours). It must live on the logits' device.

    The draw inverts the cumulative distribution at one uniform number per row: exactly the categorical
    distribution, and ~25x faster than `torch.multinomial` on a CPU (0.16 against 3.7 ms for 16 x 8,192), whose
    cost was a sixth of an RL rollout. A token of probability 0 (filtered out) is never drawn.
    """
    if cfg.temperature == 0:
        return logits.argmax(-1)
    cdf = logits.float().softmax(-1).cumsum(-1)  # (B, V)
    B = cdf.shape[0]
    if generator is None or isinstance(generator, torch.Generator):
        u = torch.rand(B, 1, generator=generator, device=cdf.device)  # (B, 1) in [0, 1)
    else:
        u = torch.cat([torch.rand(1, 1, generator=g, device=cdf.device) for g in generator])  # (B, 1)
    # The first token whose cumulative probability exceeds u x total ("right": a zero-probability token, whose
    # cdf equals its predecessor's, is never the first to exceed it).
    drawn = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)  # (B,)
    return drawn.clamp_(max=cdf.shape[1] - 1)


def token_logprobs(raw_logits: Tensor, chosen: Tensor, top: int) -> tuple[Tensor, Tensor, Tensor]:
    """Under the model's raw distribution: log-prob of `chosen` (B,), and the `top` best (B, top) with ids."""
    logp = raw_logits.float().log_softmax(-1)  # (B, V)
    top_logp, top_ids = logp.topk(min(top, logp.size(-1)), dim=-1)  # (B, top), (B, top)
    return logp.gather(1, chosen[:, None]).squeeze(1), top_logp, top_ids
