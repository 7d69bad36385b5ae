"""Optimisers and schedules: hand-derived schedule values, decay groups, AdamW and Muon parity, resume."""

from __future__ import annotations

import copy
import io
import itertools
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from lmforge.model.configs import preset
from lmforge.model.hf import build_model
from lmforge.train.optim import (
    CombinedOptimizer,
    Muon,
    OptimSection,
    build_optimizer,
    hidden_matrices,
    lr_at,
    param_groups,
    set_lr,
    zeropower_via_newtonschulz5,
)

DECODER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
BERT_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value",
                "attention.output.dense", "intermediate.dense", "output.dense")  # fmt: skip


def names(model: nn.Module, params: list[torch.Tensor]) -> set[str]:
    """The (deduplicated) names of `params` in `model`."""
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def qwen2() -> nn.Module:
    """tiny-qwen2: tied embeddings, q/k/v biases."""
    torch.manual_seed(0)
    return build_model(preset("tiny-qwen2"))


def clm_loss(model: nn.Module, seed: int) -> torch.Tensor:
    """Next-token loss of a CausalLM on a seeded random batch."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=g)
    return model(ids[:, :-1], ids[:, 1:])


# ------------------------------------------------------------------------------------------- schedules

# warmup 10 of 110 steps, so the decay covers the 100 steps 10..109; step s uses progress (s + 1 - 10) / 100.
SCHED = dict(warmup_steps=10, min_lr_ratio=0.1)
TOTAL = 110


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "wsd"])
def test_warmup_is_linear_to_the_peak(schedule: str) -> None:
    """(step + 1) / warmup: 0.1 at step 0, 0.5 at step 4, 1.0 at step 9 (the warmup's end)."""
    cfg = OptimSection(schedule=schedule, **SCHED)
    assert [lr_at(s, TOTAL, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


def test_cosine() -> None:
    """Progress 1/4 at step 34: 0.1 + 0.9 * (1 + cos(pi/4)) / 2 = 0.868198; progress 1/2 at step 59:
    (1 + 0.1) / 2 = 0.55; progress 1 at the last step 109 and after it: 0.1."""
    cfg = OptimSection(schedule="cosine", **SCHED)
    assert lr_at(34, TOTAL, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_at(34, TOTAL, cfg) == pytest.approx(0.868198, abs=1e-6)
    assert lr_at(59, TOTAL, cfg) == pytest.approx(0.55)
    assert lr_at(109, TOTAL, cfg) == pytest.approx(0.1)
    assert lr_at(500, TOTAL, cfg) == pytest.approx(0.1)
    assert lr_at(109, TOTAL, OptimSection(schedule="cosine", warmup_steps=10, min_lr_ratio=0.0)) == 0.0


def test_linear() -> None:
    """1 - 0.9 * progress: 0.775 at step 34, 0.55 at step 59, 0.1 at step 109."""
    cfg = OptimSection(schedule="linear", **SCHED)
    assert [lr_at(s, TOTAL, cfg) for s in (34, 59, 109)] == pytest.approx([0.775, 0.55, 0.1])


def test_constant() -> None:
    """1 after the warmup, to the end; 1 from step 0 without warmup."""
    cfg = OptimSection(schedule="constant", **SCHED)
    assert [lr_at(s, TOTAL, cfg) for s in (9, 59, 109, 500)] == [1.0] * 4
    assert lr_at(0, TOTAL, OptimSection(schedule="constant", warmup_steps=0)) == 1.0


def test_wsd() -> None:
    """decay_fraction 0.2 of 110 steps: the last 22 (88..109) decay. Flat 1 on 9..87; step 98 has progress
    (98 + 1 - 88) / 22 = 1/2 -> 1 - 0.9 / 2 = 0.55; step 109: 0.1."""
    cfg = OptimSection(schedule="wsd", decay_fraction=0.2, **SCHED)
    assert {lr_at(s, TOTAL, cfg) for s in range(9, 88)} == {1.0}
    assert lr_at(88, TOTAL, cfg) == pytest.approx(1 - 0.9 / 22)
    assert lr_at(98, TOTAL, cfg) == pytest.approx(0.55)
    assert lr_at(109, TOTAL, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "wsd"])
@pytest.mark.parametrize(("warmup", "total"), [(10, 110), (0, 37), (50, 20)])
def test_schedule_shape(schedule: str, warmup: int, total: int) -> None:
    """In [0, 1]; rises through the warmup, never rises after it; ends at min_lr_ratio unless constant."""
    cfg = OptimSection(schedule=schedule, warmup_steps=warmup, min_lr_ratio=0.1)
    values = [lr_at(s, total, cfg) for s in range(total + 5)]
    assert all(0.0 <= v <= 1.0 for v in values)
    cut = min(warmup, len(values))
    assert all(a < b for a, b in itertools.pairwise(values[:cut]))
    assert all(a >= b for a, b in itertools.pairwise(values[max(cut - 1, 0) :]))
    if warmup < total:
        assert values[total - 1] == pytest.approx(1.0 if schedule == "constant" else 0.1)


def test_config_validation() -> None:
    """Typos and out-of-range values are errors, not silent defaults."""
    for bad in (
        {"schedul": "cosine"},
        {"schedule": "step"},
        {"min_lr_ratio": 1.5},
        {"lr": 0},
        {"name": "sgd"},
    ):
        with pytest.raises(ValidationError):
            OptimSection(**bad)


# ---------------------------------------------------------------------------------------- param groups


def test_param_groups_decoder_tied() -> None:
    """tiny-qwen2 (2 layers): the 14 projection weights decay; the tied embedding (= lm_head, once), the 6
    q/k/v biases and the 5 RMSNorm weights do not. Every parameter is in exactly one group."""
    model = qwen2()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    decay, no_decay = param_groups(model, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    layers = [f"model.layers.{i}" for i in range(2)]
    assert names(model, decay["params"]) == {
        f"{layer}.{m}.weight" for layer in layers for m in DECODER_LINEARS
    }
    assert names(model, no_decay["params"]) == {
        "model.embed_tokens.weight",
        "model.norm.weight",
        *(f"{layer}.self_attn.{x}_proj.bias" for layer in layers for x in "qkv"),
        *(
            f"{layer}.{norm}.weight"
            for layer in layers
            for norm in ("input_layernorm", "post_attention_layernorm")
        ),
    }
    everything = decay["params"] + no_decay["params"]
    assert len(everything) == len({id(p) for p in everything}) == len(list(model.parameters())) == 26


def test_param_groups_bert_pretraining() -> None:
    """BertForPreTraining: the MLM decoder is the word embedding and its bias the head's bias (each once);
    Linear weights decay (heads included); embeddings, LayerNorms and every bias do not."""
    model = build_model(preset("tiny-bert"), "BertForPreTraining")
    decay, no_decay = param_groups(model, 0.1)
    named = dict(model.named_parameters())
    assert model.cls.predictions.decoder.weight is named["bert.embeddings.word_embeddings.weight"]
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)} - {"cls.predictions.decoder"}
    assert names(model, decay["params"]) == {f"{n}.weight" for n in linears}
    assert {n.rsplit(".", 1)[0] for n in names(model, no_decay["params"]) if n.endswith("weight")} == {
        "bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings",
        "bert.embeddings.token_type_embeddings", "bert.embeddings.LayerNorm",
        "bert.encoder.layer.0.attention.output.LayerNorm", "bert.encoder.layer.0.output.LayerNorm",
        "bert.encoder.layer.1.attention.output.LayerNorm", "bert.encoder.layer.1.output.LayerNorm",
        "cls.predictions.transform.LayerNorm",
    }  # fmt: skip
    everything = decay["params"] + no_decay["params"]
    assert len(everything) == len({id(p) for p in everything}) == len(list(model.parameters()))


def test_param_groups_skip_frozen() -> None:
    """Frozen parameters (a LoRA base) are in no group; a group left empty is dropped."""
    model = qwen2()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("model.layers.1."))
    groups = param_groups(model, 0.1)
    assert names(model, [p for g in groups for p in g["params"]]) == {
        n for n in dict(model.named_parameters()) if n.startswith("model.layers.1.")
    }
    for p in model.parameters():
        p.requires_grad_(p.ndim == 1)
    assert [g["weight_decay"] for g in param_groups(model, 0.1)] == [0.0]


# ----------------------------------------------------------------------------------------------- AdamW


@pytest.mark.parametrize("device_type", ["cpu", "other"])  # fused on CPU; foreach for other device types
def test_adamw_matches_torch(device_type: str) -> None:
    """build_optimizer's AdamW (fused or foreach) = plain torch.optim.AdamW on the same groups, 3 steps.

    Both get the same random gradients: from a forward pass, the k_proj bias's gradient is rounding noise
    (softmax ignores a shift of every key by one vector), which Adam would amplify into a spurious mismatch.
    """
    cfg = OptimSection(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    model, reference = qwen2(), qwen2()
    opt = build_optimizer(model, cfg, device_type)
    assert opt.defaults["fused" if device_type == "cpu" else "foreach"] is True
    ref = torch.optim.AdamW(param_groups(reference, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
    start = qwen2()
    assert (model.model.norm.weight - start.model.norm.weight).abs().mean() > 1e-3  # they did move
    # Decay only where asked: a zero-gradient step moves a decayed weight by -lr * wd * w, a norm not at all.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    state = opt.state_dict()
    opt.load_state_dict({**state, "state": {}})  # fresh moments: the Adam term is 0 / (0 + eps) = 0
    opt.step()
    w = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(dict(model.named_parameters())[w], before[w] * (1 - 1e-2 * 0.1))
    assert torch.equal(model.model.norm.weight, before["model.norm.weight"])
    assert torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])


# ------------------------------------------------------------------------------------------------ Muon


def svd_map(G: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """G's singular values and what Newton–Schulz maps each to: it acts on singular values only
    (a polynomial in X X^T times X), so diag(U^T NS(G) V) is p(sigma_i)."""
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    out = zeropower_via_newtonschulz5(G, 5, dtype).float()
    return S, torch.diagonal(U.T @ out @ Vh.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (96, 48)])
def test_newton_schulz_random_is_near_orthogonal(shape: tuple[int, int], dtype: torch.dtype) -> None:
    """Gaussian rectangular matrices: every singular value of the output lies in [0.5, 1.5] (the reference's
    band for the quintic; exact UV^T would be all 1)."""
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    out = zeropower_via_newtonschulz5(G, 5, dtype)
    assert out.shape == shape
    S = torch.linalg.svdvals(out.float())
    assert S.min() >= 0.5 and S.max() <= 1.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_ill_conditioned(dtype: torch.dtype) -> None:
    """Singular values 1 .. 1e-4 (condition 1e4): those within 100x of the largest land in [0.5, 1.5] (the
    slope at 0 is 3.4445, so five steps lift x by up to 3.4445^5 ~ 485), none exceed 1.5, order kept."""
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(64, 32, generator=g))
    V, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    G = U @ torch.diag(torch.logspace(0, -4, 32)) @ V.T
    S, mapped = svd_map(G, dtype)
    assert mapped.max() <= 1.5
    assert ((mapped >= 0.5) | (S < 1e-2)).all()
    assert torch.linalg.svdvals(zeropower_via_newtonschulz5(G, 5, dtype).float()).min() > 0  # nothing lost


def test_muon_matches_torch_muon() -> None:
    """Our Muon with bf16 Newton–Schulz = torch.optim.Muon (adjust_lr_fn="original", Keller Jordan's
    sqrt(max(1, rows/cols)) scaling) bit for bit, on a tall and a wide matrix with weight decay, 3 steps."""
    g = torch.Generator().manual_seed(2)
    ours = [nn.Parameter(torch.randn(48, 16, generator=g)), nn.Parameter(torch.randn(16, 48, generator=g))]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    a = Muon(ours, lr=0.02, momentum=0.95, weight_decay=0.1, ns_dtype=torch.bfloat16)
    b = torch.optim.Muon(theirs, lr=0.02, momentum=0.95, weight_decay=0.1, adjust_lr_fn="original")
    for _ in range(3):
        for p, q in zip(ours, theirs, strict=True):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs, strict=True):
        assert torch.equal(p, q)


def test_muon_decreases_a_quadratic() -> None:
    """0.5 ||W - T||^2 has gradient D = W - T. Step 1: the buffer is 0.05 D and the Nesterov update
    D.lerp(buf, 0.95) = 0.0975 D; Newton–Schulz ignores the scale, so W1 = W0 - lr sqrt(32/16) NS(D), a
    descent direction (<NS(D), D> = sum sigma_i p(sigma_i) > 0). The loss then falls at every step."""
    g = torch.Generator().manual_seed(3)
    W, T = nn.Parameter(torch.randn(32, 16, generator=g)), torch.randn(32, 16, generator=g)
    W0 = W.detach().clone()
    opt = Muon([W], lr=0.05)
    losses = []
    for _ in range(31):
        opt.zero_grad()
        loss = 0.5 * (W - T).pow(2).sum()
        loss.backward()
        losses.append(loss.item())
        opt.step()
        if len(losses) == 1:
            expected = W0 - 0.05 * 2**0.5 * zeropower_via_newtonschulz5(W0 - T, 5, torch.float32)
            torch.testing.assert_close(W.detach(), expected, atol=1e-6, rtol=0)
    assert all(b < a for a, b in itertools.pairwise(losses))
    assert losses[-1] < 0.7 * losses[0]


def test_muon_rejects_non_matrices() -> None:
    """Muon is for 2-D weights only."""
    with pytest.raises(ValueError, match="2-D"):
        Muon([nn.Parameter(torch.ones(4))])


def test_combined_routes_hidden_matrices_to_muon() -> None:
    """tiny-llama (untied head): the 14 projection weights go to Muon; embedding, lm_head (decay), norms to
    AdamW. BERT: the 12 encoder-layer weights go to Muon; pooler, heads and embeddings stay with AdamW."""
    torch.manual_seed(0)
    model = build_model(preset("tiny-llama"))
    opt = build_optimizer(model, OptimSection(name="muon"), "cpu")
    assert isinstance(opt, CombinedOptimizer) and isinstance(opt.optimizers["muon"], Muon)
    layers = [f"model.layers.{i}" for i in range(2)]
    (muon,) = opt.optimizers["muon"].param_groups
    assert names(model, muon["params"]) == {
        f"{layer}.{m}.weight" for layer in layers for m in DECODER_LINEARS
    }
    decay, no_decay = opt.optimizers["adamw"].param_groups
    assert names(model, decay["params"]) == {"lm_head.weight"}
    assert names(model, no_decay["params"]) == {
        "model.embed_tokens.weight", "model.norm.weight",
        *(f"{layer}.{n}.weight" for layer in layers for n in ("input_layernorm", "post_attention_layernorm")),
    }  # fmt: skip

    bert = build_model(preset("tiny-bert"), "BertForPreTraining")
    hidden = names(bert, hidden_matrices(bert))
    assert hidden == {f"bert.encoder.layer.{i}.{m}.weight" for i in range(2) for m in BERT_LINEARS}
    opt = build_optimizer(bert, OptimSection(name="muon"), "cpu")
    routed = [p for group in opt.param_groups for p in group["params"]]
    assert len(routed) == len({id(p) for p in routed}) == len(list(bert.parameters()))


def test_set_lr_scales_each_groups_own_peak() -> None:
    """Muon groups scale muon_lr, AdamW groups lr; the multiplier is applied to the peak, not compounded."""
    model = build_model(preset("tiny-llama"))
    opt = build_optimizer(model, OptimSection(name="muon", lr=1e-3, muon_lr=0.02), "cpu")
    set_lr(opt, 0.5)
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.optimizers["muon"].param_groups] == [0.005]
    assert [g["lr"] for g in opt.optimizers["adamw"].param_groups] == [0.00025, 0.00025]
    plain = torch.optim.SGD(model.parameters(), lr=0.1)  # built elsewhere: its lr becomes the peak
    set_lr(plain, 0.5)
    set_lr(plain, 0.5)
    assert plain.param_groups[0]["lr"] == 0.05


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_state_dict_round_trip(name: str) -> None:
    """Save after 2 steps (through torch.save), restore into a fresh model and optimizer: the next 2 steps
    equal the uninterrupted run's bit for bit (momentum, Adam moments, step counts and lrs all restored)."""
    cfg = OptimSection(name=name, lr=1e-2, warmup_steps=2)
    torch.manual_seed(0)
    model = build_model(preset("tiny-llama"))
    opt = build_optimizer(model, cfg, "cpu")

    def train(m: nn.Module, o: object, steps: range) -> None:
        for step in steps:
            set_lr(o, lr_at(step, 4, cfg))
            o.zero_grad()
            clm_loss(m, step).backward()
            o.step()

    train(model, opt, range(2))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    train(model, opt, range(2, 4))

    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = build_model(preset("tiny-llama"))
    resumed.load_state_dict(saved["model"])
    opt2 = build_optimizer(resumed, cfg, "cpu")
    opt2.load_state_dict(saved["optim"])
    train(resumed, opt2, range(2, 4))
    for (n, p), q in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_combined_rejects_foreign_state() -> None:
    """Loading an AdamW-only state into Muon + AdamW is an error naming both."""
    model = build_model(preset("tiny-llama"))
    opt = build_optimizer(model, OptimSection(name="muon"), "cpu")
    with pytest.raises(ValueError, match="expected"):
        opt.load_state_dict({"adamw": copy.deepcopy(opt.state_dict()["adamw"])})
