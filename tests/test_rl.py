"""RL pieces: GRPO advantages against a hand computation and TRL's formula, GAE against a per-row loop, the KL
estimators, the clipped losses' values and gradients, the value head, and a rollout on a tiny random Llama."""

from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_

from lmforge.infer.engine import Engine
from lmforge.infer.sampling import GenerationConfig
from lmforge.model.configs import preset
from lmforge.model.decoder import IGNORE_INDEX, CausalLM
from lmforge.model.linear import Linear
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train.logprobs import token_logprobs
from lmforge.train.rl import (
    ValueHead,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    group_advantages,
    grpo_loss,
    kl_per_token,
    masked_mean,
    policy_and_values,
    ppo_token_rewards,
    rollout,
    values,
    whiten,
)

VOCAB = 300
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "héllo wörld ☃ snow", "numbers 123 456"] * 20

# ------------------------------------------------------------------------------------------- GRPO pieces


def test_group_advantages_by_hand():
    # Group [1, 2, 3]: mean 2, unbiased std sqrt(((1)^2 + 0 + 1^2) / 2) = 1 → (-1, 0, 1) / (1 + eps).
    # Group [5, 5, 5]: std 0 → 0 / eps = 0.
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    got = group_advantages(rewards, 3)
    eps = 1e-4
    torch.testing.assert_close(got, torch.tensor([-1 / (1 + eps), 0.0, 1 / (1 + eps), 0.0, 0.0, 0.0]))
    torch.testing.assert_close(group_advantages(rewards, 3, scale=False), torch.tensor([-1.0, 0, 1, 0, 0, 0]))


def _trl_function(module: str, name: str):
    """A function of the installed TRL, compiled from its source alone: importing trl takes ~8 s."""
    spec = importlib.util.find_spec("trl")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("trl is not installed")
    path = Path(next(iter(spec.submodule_search_locations)), *module.split(".")).with_suffix(".py")
    tree = ast.parse(path.read_text())
    (node,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    namespace = {"torch": torch}
    exec(compile(ast.Module([node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


def test_group_advantages_equal_trls_formula():
    nanstd = _trl_function("trainer.utils", "nanstd")
    rewards = torch.randn(12, generator=torch.Generator().manual_seed(0))
    n = 4
    # TRL 1.16 GRPOTrainer (scale_rewards="group"), grpo_trainer.py:2765-2787.
    mean = torch.nanmean(rewards.view(-1, n), dim=1).repeat_interleave(n)
    std = nanstd(rewards.view(-1, n), dim=1).repeat_interleave(n)
    torch.testing.assert_close(group_advantages(rewards, n), (rewards - mean) / (std + 1e-4))


def test_k3_is_nonnegative_and_zero_when_equal():
    g = torch.Generator().manual_seed(0)
    logp, ref = -torch.rand(4, 7, generator=g) * 5, -torch.rand(4, 7, generator=g) * 5
    k3 = kl_per_token(logp, ref)
    assert (k3 >= 0).all() and (k3 > 0).any()
    assert kl_per_token(logp, logp).abs().max() == 0
    x = ref - logp
    torch.testing.assert_close(k3, torch.exp(x) - x - 1)
    torch.testing.assert_close(kl_per_token(logp, ref, "k1"), logp - ref)
    torch.testing.assert_close(kl_per_token(logp, ref, "k2"), 0.5 * (logp - ref) ** 2)
    with pytest.raises(ValueError, match="k4"):
        kl_per_token(logp, ref, "k4")


def _mask() -> torch.Tensor:
    # Row 0: completion at positions 1-3; row 1: 0-4 with a hole at 2 (ignored); row 2: none.
    return torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)


def test_clipped_policy_loss_at_ratio_one_is_minus_mean_advantage():
    mask = _mask()
    logp = -torch.rand(3, 6)
    adv = torch.randn(3, 6)
    loss, metrics = clipped_policy_loss(logp, logp.clone(), adv, mask, 0.2)
    torch.testing.assert_close(loss, -adv[mask].mean())
    assert metrics["clipfrac"] == 0 and metrics["approx_kl"] == 0
    torch.testing.assert_close(metrics["ratio"], torch.tensor(1.0))
    # Per-sequence advantages broadcast over the tokens.
    seq_adv = torch.tensor([1.0, -2.0, 3.0])
    loss, _ = clipped_policy_loss(logp, logp, seq_adv, mask, 0.2)
    torch.testing.assert_close(loss, -(seq_adv[:, None].expand(3, 6)[mask]).mean())


def test_clipping_stops_the_gradient_beyond_one_plus_minus_clip():
    clip = 0.2
    old = torch.zeros(1, 6)
    # ratios 1.5 (A>0: clipped), 1.5 (A<0: not), 0.5 (A<0: clipped), 0.5 (A>0: not), 1.1 and 0.9 (inside)
    ratios = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.1, 0.9]])
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0, -1.0]])
    mask = torch.ones(1, 6, dtype=torch.bool)
    logp = ratios.log().requires_grad_()
    loss, metrics = clipped_policy_loss(logp, old, adv, mask, clip)
    loss.backward()
    clipped = torch.tensor([True, False, True, False, False, False])
    assert (logp.grad[0, clipped] == 0).all()
    # Unclipped tokens: d/dlogp of -A r / 6 = -A r / 6.
    torch.testing.assert_close(logp.grad[0, ~clipped], (-adv * ratios / 6)[0, ~clipped])
    torch.testing.assert_close(metrics["clipfrac"], torch.tensor(2 / 6))
    expected = torch.tensor([-1.2, 1.5, 0.8, -0.5, -1.1, 0.9]).mean()
    torch.testing.assert_close(loss.detach(), expected)


def test_grpo_loss_is_the_token_level_mean_with_k3():
    g = torch.Generator().manual_seed(1)
    mask = _mask()
    logp = (-torch.rand(3, 6, generator=g)).masked_fill(~mask, 0).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(3, 6, generator=g).masked_fill(~mask, 0)
    ref = (-torch.rand(3, 6, generator=g)).masked_fill(~mask, 0)
    adv = torch.tensor([0.5, -1.0, 2.0])
    loss, metrics = grpo_loss(logp, old, ref, adv, mask, clip=0.2, kl_coef=0.04)
    # TRL 1.16 GRPOTrainer._compute_loss, loss_type "dapo", one process, no accumulation.
    coef_1 = torch.exp(logp - old)
    coef_2 = coef_1.clamp(0.8, 1.2)
    per_token = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None])
    per_token = per_token + 0.04 * (torch.exp(ref - logp) - (ref - logp) - 1)
    torch.testing.assert_close(loss, (per_token * mask).sum() / mask.sum())
    assert set(metrics) == {"clipfrac", "ratio", "kl"}
    # A micro-batch of a larger step divides by the step's completion tokens.
    half, _ = grpo_loss(logp, old, ref, adv, mask, clip=0.2, kl_coef=0.04, num_tokens=2 * mask.sum())
    torch.testing.assert_close(half, loss / 2)
    _, metrics = grpo_loss(logp, old, None, adv, mask, clip=0.2, kl_coef=0.04)
    assert "kl" not in metrics


# -------------------------------------------------------------------------------------------- PPO pieces


def test_masked_mean_and_whiten():
    mask = _mask()
    x = torch.randn(3, 6)
    torch.testing.assert_close(masked_mean(x, mask), x[mask].mean())
    torch.testing.assert_close(
        masked_mean(x, mask, dim=1)[:2], torch.stack([x[0, 1:4].mean(), x[1, mask[1]].mean()])
    )
    assert masked_mean(x, mask, dim=1)[2] == 0  # nothing masked
    w = whiten(x, mask)
    torch.testing.assert_close(w[mask], (x[mask] - x[mask].mean()) / (x[mask].var() + 1e-8).sqrt())
    assert (w[~mask] == 0).all()
    torch.testing.assert_close(whiten(x, mask, shift_mean=False)[mask], w[mask] + x[mask].mean())


def test_gae_equals_a_per_row_loop():
    g = torch.Generator().manual_seed(2)
    mask = _mask()
    rewards, vals = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, vals, mask, gamma, lam)
    for b in range(3):
        steps = mask[b].nonzero().flatten().tolist()  # the row's time steps, in order
        running, expected = 0.0, {}
        for i in reversed(range(len(steps))):
            t = steps[i]
            next_value = vals[b, steps[i + 1]].item() if i + 1 < len(steps) else 0.0
            delta = rewards[b, t].item() + gamma * next_value - vals[b, t].item()
            running = delta + gamma * lam * running
            expected[t] = running
        for t in range(6):
            assert adv[b, t].item() == pytest.approx(expected.get(t, 0.0), abs=1e-5)
            want = expected[t] + vals[b, t].item() if t in expected else 0.0
            assert ret[b, t].item() == pytest.approx(want, abs=1e-5)


def test_gae_with_gamma_and_lambda_one_is_the_reward_to_go_minus_value():
    mask = torch.ones(1, 4, dtype=torch.bool)
    rewards, vals = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[0.5, 0.1, 0.2, 0.3]])
    adv, ret = gae(rewards, vals, mask, 1.0, 1.0)
    torch.testing.assert_close(ret, torch.tensor([[10.0, 9.0, 7.0, 4.0]]))
    torch.testing.assert_close(adv, ret - vals)


def test_ppo_token_rewards_put_the_score_on_the_last_completion_token():
    mask = _mask()
    logp, ref = -torch.rand(3, 6), -torch.rand(3, 6)
    score = torch.tensor([2.0, -1.0, 7.0])
    rewards = ppo_token_rewards(score, logp, ref, mask, 0.1)
    expected = (-0.1 * (logp - ref)).masked_fill(~mask, 0)
    expected[0, 3] += 2.0
    expected[1, 4] += -1.0  # row 2 has no completion token: no score anywhere
    torch.testing.assert_close(rewards, expected)


def test_clipped_value_loss():
    mask = torch.ones(1, 3, dtype=torch.bool)
    old, ret = torch.zeros(1, 3), torch.tensor([[1.0, 1.0, -1.0]])
    v = torch.tensor([[0.5, 2.0, -0.5]], requires_grad=True)
    loss = clipped_value_loss(v, old, ret, mask, 0.2)
    # token 0: max((0.5-1)^2, (0.2-1)^2) = 0.64, the clipped term (no gradient); token 1: max(1, 0.64) = 1;
    # token 2: max((-0.5+1)^2, (-0.2+1)^2) = 0.64 (clipped).
    torch.testing.assert_close(loss, torch.tensor(0.5 * (0.64 + 1.0 + 0.64) / 3))
    loss.backward()
    torch.testing.assert_close(v.grad, torch.tensor([[0.0, 0.5 * 2 * 1.0 / 3, 0.0]]))
    torch.testing.assert_close(clipped_value_loss(old, old, ret, mask, 0.2), 0.5 * (ret**2).mean())


# ------------------------------------------------------------------------------------ model and rollout


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(train_tokenizer(TEXTS, "bpe", VOCAB, tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def model(tokenizer) -> CausalLM:
    """A tiny random Llama whose LM head has a bias that makes EOS likely, so some samples finish."""
    torch.manual_seed(0)
    m = CausalLM(preset("tiny-llama", vocab_size=VOCAB))
    m.init_weights()
    randomize_(m)
    head = Linear(m.config.hidden_size, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(m.lm_head.weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_id] = 4.0  # p(EOS) ~ 8% a token
    m.lm_head = head
    return m.train()  # rollout must hand it back in this mode


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [
        tokenizer.encode(t, add_special_tokens=True)
        for t in ("the cat sat", "a dog ran in the park", "héllo")
    ]


SAMPLING = dict(n=3, max_new_tokens=10, temperature=1.0, seed=7)


@pytest.fixture(scope="module")
def rolled(model, tokenizer, prompts):
    return rollout(model, tokenizer, prompts, **SAMPLING)


def test_rollout_layout(rolled, model, tokenizer, prompts):
    r, n = rolled, SAMPLING["n"]
    B, T = r.input_ids.shape
    assert len(prompts) * n == B and len(r.completion_ids) == len(r.texts) == B
    for name in ("targets", "completion_mask", "old_logprobs"):
        assert getattr(r, name).shape == (B, T)
    assert r.prompt_lengths.shape == r.finished.shape == (B,)
    assert model.training  # the mode it had before
    assert 0 < int(r.finished.sum()) < B  # some samples ended with EOS, some hit max_new_tokens
    pad = tokenizer.pad_id
    for b in range(B):
        prompt, ids = prompts[b // n], r.completion_ids[b]  # prompt i's samples are rows i*n .. i*n+n-1
        P, L = len(prompt), len(ids)
        assert int(r.prompt_lengths[b]) == P
        assert r.input_ids[b].tolist() == [*prompt, *ids] + [pad] * (T - P - L)
        # The targets cover exactly the completion tokens, each at the position before it.
        expected = [IGNORE_INDEX] * (P - 1) + ids + [IGNORE_INDEX] * (T - P - L + 1)
        assert r.targets[b].tolist() == expected
        assert r.completion_mask[b].tolist() == [t != IGNORE_INDEX for t in expected]
        assert bool(r.finished[b]) == (ids[-1] in tokenizer.eot_ids)
        assert bool(r.finished[b]) or SAMPLING["max_new_tokens"] == L
        assert r.texts[b] == tokenizer.decode(ids, skip_special_tokens=True)
    assert max(len(prompts[b // n]) + len(r.completion_ids[b]) for b in range(B)) == T


def test_rollout_samples_are_the_engines(rolled, model, tokenizer, prompts):
    cfg = GenerationConfig(**SAMPLING)
    completions = Engine(model, tokenizer).generate(prompts, cfg)
    model.train()
    got = [c.token_ids + ([c.stop_token] if c.stop_token is not None else []) for c in completions]
    assert rolled.completion_ids == got
    # The engine's KV-cached log-probs agree with the recomputed ones (raw distribution, temperature 1).
    for b, c in enumerate(completions):
        recomputed = rolled.old_logprobs[b][rolled.completion_mask[b]][: len(c.logprobs)]
        torch.testing.assert_close(recomputed, torch.tensor(c.logprobs), atol=1e-4, rtol=1e-4)


def test_rollout_logprobs_equal_log_softmax_of_the_logits(rolled, model):
    r = rolled
    with torch.no_grad():
        logits = model(r.input_ids).float()  # (B, T, V), a separate forward without targets
        logp = token_logprobs(model, r.batch())
    safe = r.targets.clamp(min=0)
    expected = (
        logits.log_softmax(-1).gather(-1, safe[..., None]).squeeze(-1).masked_fill(~r.completion_mask, 0)
    )
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.old_logprobs, expected, atol=1e-5, rtol=1e-5)
    assert (r.old_logprobs[~r.completion_mask] == 0).all()
    assert (r.old_logprobs[r.completion_mask] < 0).all()


def test_seeded_rollouts_repeat(rolled, model, tokenizer, prompts):
    again = rollout(model, tokenizer, prompts, **SAMPLING)
    assert again.completion_ids == rolled.completion_ids
    assert torch.equal(again.input_ids, rolled.input_ids) and torch.equal(
        again.old_logprobs, rolled.old_logprobs
    )
    other = rollout(model, tokenizer, prompts, **{**SAMPLING, "seed": 8})
    assert other.completion_ids != rolled.completion_ids


def test_values_and_policy_and_values_share_one_forward(rolled, model):
    head = ValueHead(model.config.hidden_size)
    assert (values(model, head, rolled.batch()) == 0).all()  # zero-initialised
    torch.nn.init.normal_(head.score.weight, std=0.5)
    torch.nn.init.normal_(head.score.bias)
    batch = rolled.batch()
    with torch.no_grad():
        hidden = model.model(batch["input_ids"])  # (B, T, C), the trunk before the LM head
        expected = head.score(hidden).squeeze(-1)
        v = values(model, head, batch)
    torch.testing.assert_close(v, expected)
    calls = []
    hook = model.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        logp, v2 = policy_and_values(model, head, batch)
    finally:
        hook.remove()
    assert len(calls) == 1  # one decoder forward for both
    torch.testing.assert_close(v2, expected)
    torch.testing.assert_close(logp, rolled.old_logprobs, atol=1e-5, rtol=1e-5)
    # Both heads get gradients from one backward.
    (logp.sum() + v2.sum()).backward()
    assert head.score.weight.grad is not None and model.model.layers[0].mlp.up_proj.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_ppo_step_composes(rolled, model):
    """One PPO step's pieces on a rollout: rewards → GAE → whitened advantages → losses, all finite."""
    r, mask = rolled, rolled.completion_mask
    head = ValueHead(model.config.hidden_size)
    with torch.no_grad():
        old_values = values(model, head, r.batch())
    score = torch.randn(r.input_ids.size(0))
    rewards = ppo_token_rewards(score, r.old_logprobs, r.old_logprobs - 0.1, mask, kl_coef=0.05)
    adv, ret = gae(rewards, old_values, mask, gamma=1.0, lam=0.95)
    adv = whiten(adv, mask)
    logp, v = policy_and_values(model, head, r.batch())
    pg, metrics = clipped_policy_loss(logp, r.old_logprobs, adv, mask, 0.2)
    vf = clipped_value_loss(v, old_values, ret, mask, 0.2)
    assert math.isfinite(float(pg.detach() + vf.detach()))
    assert metrics["ratio"].item() == pytest.approx(1.0, abs=1e-5)  # first update: the same forward
    model.zero_grad(set_to_none=True)
    assert F.mse_loss(masked_mean(adv, mask), torch.tensor(0.0)) < 1e-10
