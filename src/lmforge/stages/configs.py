"""Stage configs (pydantic only, no torch: the CLI imports them to build `--help`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from lmforge.adapters.sections import BottleneckSection, LoraSection, PromptSection
from lmforge.config import Section, StageConfig
from lmforge.train.sections import LoopSection, OptimSection


class ModelSection(Section):
    """Which model to train: a preset built fresh, or an existing HF directory to continue from."""

    preset: str = "llama-14m"
    """Preset to build (vocabulary and special ids are taken from the dataset's tokenizer)."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Preset fields to change, e.g. {num_hidden_layers: 4, hidden_size: 256}; `--set
    model.overrides.hidden_size=256` changes one and keeps the recipe's others."""
    init_from: Path | None = None
    """Continue pretraining this HF model directory instead of building the preset."""


class DataSection(Section):
    """The prepared data (`lmforge data prepare`): train splits train, val splits validate."""

    dataset: Path | None = None
    """Prepared dataset directory (manifest.json and token shards), or raw data files (a file, directory or glob
    that `lmforge data prepare` reads), prepared on first use with `tokenizer` and cached by content."""
    datasets: dict[str, Path] = Field(default_factory=dict)
    """Several named datasets instead (prepared or raw), mixed by `mix`, e.g. {domain: runs/med, general: web.txt}."""
    tokenizer: Path | None = None
    """Tokenizer directory that prepares raw `dataset(s)` (default: model.init_from's own)."""
    mix: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    """Share of micro-batches from each of `datasets`, e.g. {domain: 0.8, general: 0.2} (replay against
    forgetting); normalised to sum to 1; empty: equal shares."""
    sampling: Literal["fixed", "offset", "shuffle"] = "shuffle"
    """How the document stream is cut into windows each epoch (clm, mlm): shuffle: documents in a fresh order
    and cut from a random offset every epoch; offset: the prepared order cut from a random offset; fixed: the
    same cuts every epoch (a small model then memorises text by position and binds no facts to names)."""
    document_mask: bool = False
    """clm: each document in a window attends only to itself, positions restarting at its start, and never
    predicts the next document's first token (intra-document masking, as Llama 3 pretrains)."""

    @model_validator(mode="after")
    def _one_source(self) -> DataSection:
        if self.dataset is not None and self.datasets:
            raise ValueError("give data.dataset or data.datasets (with data.mix), not both")
        if self.mix and set(self.mix) != set(self.datasets):
            raise ValueError(
                f"data.mix names {sorted(self.mix)} must be the data.datasets names {sorted(self.datasets)}"
            )
        if self.mix and not sum(self.mix.values()):
            raise ValueError(f"data.mix shares are all 0 ({self.mix}): give at least one a share > 0")
        return self

    def sources(self) -> dict[str, Path]:
        """Every dataset by name ("train" for a lone data.dataset)."""
        return dict(self.datasets) if self.datasets else ({"train": self.dataset} if self.dataset else {})

    def weights(self) -> dict[str, float]:
        """Each source's share of the micro-batches."""
        return dict(self.mix) if self.mix else dict.fromkeys(self.sources(), 1.0)


class PretrainConfig(StageConfig):
    """`lmforge pretrain`: model, data, loop and optimiser."""

    init_from_key: ClassVar[str | None] = "model.init_from"

    objective: Literal["clm", "mlm", "nsp", "mlm+nsp"] = "clm"
    """clm: next-token (decoders); mlm, nsp, mlm+nsp: BERT's masked-LM and next-sentence objectives (encoders)."""
    mlm_rate: float = Field(0.15, gt=0, lt=1)
    """mlm: share of tokens chosen for prediction (80% become [MASK], 10% a random token, 10% unchanged)."""
    model: ModelSection = Field(default_factory=ModelSection)
    """The model."""
    data: DataSection = Field(default_factory=DataSection)
    """The data."""
    train: LoopSection = Field(default_factory=LoopSection)
    """The training loop."""
    optim: OptimSection = Field(default_factory=OptimSection)
    """The optimiser and learning-rate schedule."""
    sample_prompt: str | None = "Once upon a time"
    """Decoders: prompt of the greedy text samples (null: none)."""
    sample_every: int = Field(0, ge=0)
    """Decoders: log a greedy sample every this many steps (0: only after training)."""

    @model_validator(mode="after")
    def _sampling_fits_objective(self) -> PretrainConfig:
        if self.data.document_mask and self.objective != "clm":
            raise ValueError(
                f"data.document_mask needs objective clm: {self.objective!r} trains BERT, whose attention "
                "has no per-document mask (set data.document_mask=false)"
            )
        if "nsp" in self.objective and self.data.sampling != "shuffle":
            raise ValueError(
                f"data.sampling={self.data.sampling!r} cannot apply to objective {self.objective!r}: NSP draws "
                "fresh sentence pairs from shuffled documents every epoch, it cuts no windows (leave "
                "data.sampling at shuffle)"
            )
        return self


# ------------------------------------------------------------------------------------------- fine-tuning


class ForgettingSection(Section):
    """Forgetting: perplexity on a reference set before and after fine-tuning."""

    reference: Path | None = None
    """Prepared dataset whose validation split is the reference; default: the base model's pretraining data
    (found through its lmforge.json lineage)."""
    batches: int = Field(8, ge=1)
    """Reference batches (of train.micro_batch_size x train.seq_len tokens) to evaluate."""
    max_increase_pct: float | None = Field(None, ge=0)
    """Fail the run when the reference perplexity rises by more than this many per cent (--max-forgetting)."""


class FinetuneData(Section):
    """The prepared fine-tuning data (`lmforge data prepare` of chat, instruction, classification or text data)."""

    dataset: Path | None = None
    """Prepared dataset directory, or raw data files (a file, directory or glob that `lmforge data prepare`
    reads), prepared on first use with `tokenizer` and cached by content; its train split trains, val validates."""
    tokenizer: Path | None = None
    """Tokenizer directory that prepares a raw `dataset` (default: the base model's own)."""
    packing: bool = True
    """Pack several samples into each row (attention isolated per sample; positions restart per sample)."""
    group_by_length: bool = True
    """task (classification): batch queries of similar length together, so few columns are padding."""


class FinetuneEval(Section):
    """What the fine-tuned model is measured on after training (and the base before, for comparison)."""

    dataset: Path | None = None
    """task (classification): a test set (prepared, or raw files prepared on first use); its accuracy is reported
    (every split of it)."""
    qa: Path | None = None
    """A question file (chat records with a `value`, or GSM8K `question`/`answer`): exact-match accuracy of
    greedy answers before and after fine-tuning, overall and per `group`."""
    qa_limit: int | None = Field(200, ge=1)
    """Questions of `qa` to ask at most, per `group` when its records have one (the first ones; null: all)."""
    qa_groups: list[str] | None = None
    """Only the questions of these groups (e.g. [A, B] of the synthetic world); null: every question."""
    max_new_tokens: int = Field(48, ge=1)
    """Tokens per generated answer at most."""


class FinetuneLoop(LoopSection):
    """The training loop, with fine-tuning's and alignment's defaults (short runs, regular validation)."""

    max_steps: int = Field(100, ge=1)
    """Optimizer steps."""
    eval_every: int = Field(50, ge=0)
    """Validate every this many steps (at steps 0, N, 2N, ... and after the last); 0 = never."""


class FinetuneOptim(OptimSection):
    """The optimiser, with fine-tuning's defaults (LoRA's usual peak learning rate, a short warmup)."""

    lr: float = Field(2e-4, gt=0)
    """Peak learning rate (full fine-tuning usually wants ~10x less than LoRA)."""
    warmup_steps: int = Field(10, ge=0)
    """Steps of linear warmup to the peak."""


class FinetuneConfig(StageConfig):
    """`lmforge finetune`: a base model + prepared data + a method → a fine-tuned model or an adapter."""

    init_from_key: ClassVar[str | None] = "model"

    kind: Literal["instruction", "chat", "task", "domain"] = "chat"
    """instruction / chat: loss on the assistant replies (and their end-of-turn); task: classification data
    trains a classification head on an encoder or decoder (generative task data such as GSM8K is trained as
    instructions); domain: every token of domain text (or domain Q&A chats)."""
    method: Literal["full", "lora", "adapter", "prompt"] = "lora"
    """full: every weight; lora; adapter (bottleneck); prompt (prompt tuning)."""
    model: Path | None = None
    """The base model: a HF directory (e.g. a `pretrain` run's model/)."""
    data: FinetuneData = Field(default_factory=FinetuneData)
    """The data."""
    lora: LoraSection = Field(default_factory=LoraSection)
    """LoRA settings (method: lora)."""
    adapter: BottleneckSection = Field(default_factory=BottleneckSection)
    """Bottleneck adapter settings (method: adapter)."""
    prompt: PromptSection = Field(default_factory=PromptSection)
    """Prompt tuning settings (method: prompt)."""
    forgetting: ForgettingSection = Field(default_factory=ForgettingSection)
    """Forgetting measurement and gate."""
    eval: FinetuneEval = Field(default_factory=FinetuneEval)
    """Evaluation before and after."""
    # Subclasses, not default factories: `--set train.seq_len=64` builds the section from its class defaults.
    train: FinetuneLoop = Field(default_factory=FinetuneLoop)
    """The training loop."""
    optim: FinetuneOptim = Field(default_factory=FinetuneOptim)
    """The optimiser and learning-rate schedule."""


# ------------------------------------------------------------------------------------------------ alignment

PREFERENCE_METHODS = ("dpo", "ipo", "hinge", "simpo", "orpo")
RL_METHODS = ("grpo", "ppo")


class AlignData(Section):
    """What alignment trains on: preference pairs (reward, dpo, ipo, hinge, simpo, orpo) or prompts (grpo, ppo)."""

    dataset: Path | None = None
    """Preference pairs: a prepared dataset or raw files (HH-RLHF transcripts, prompt/chosen/rejected records,
    the world's preferences.jsonl), prepared on first use with `tokenizer`; train split trains, val evaluates."""
    tokenizer: Path | None = None
    """Tokenizer directory that prepares a raw `dataset` (default: the model's own)."""
    prompts: Path | None = None
    """grpo, ppo: prompt records (GSM8K questions, the world's questions or medical prompts, {"prompt": ...})."""
    prompts_limit: int | None = Field(None, ge=1)
    """Prompts of `prompts` to train on at most (the first ones; null: all)."""
    prompt_groups: list[str] | None = None
    """Only the prompts of these groups (records with a `group`, e.g. [A] of the world's eval_qa.jsonl)."""


class RewardSettings(Section):
    """method reward: a Bradley–Terry scalar head on the model (a `*ForSequenceClassification`, num_labels 1)."""

    margin: float = 0.0
    """Margin m of the loss -log sigmoid(r_chosen - r_rejected - m) (Llama 2's margin term; 0: plain BT)."""


class RLSettings(Section):
    """grpo, ppo: rollouts from the policy scored by rewards, and the clipped policy update."""

    reward: list[str] = Field(default_factory=lambda: ["facts"])
    """Rewards summed per completion: built-ins (facts, gsm8k, medical, format), `module:function`, or a
    reward-model directory (a `*ForSequenceClassification` with num_labels 1)."""
    samples: int = Field(4, ge=1)
    """Completions per prompt (grpo: the group size, ≥ 2; ppo: usually 1)."""
    max_new_tokens: int = Field(32, ge=1)
    """Tokens per completion at most."""
    epochs: int = Field(1, ge=1)
    """Optimizer steps on each rollout (PPO's minibatch epochs; TRL GRPO's num_iterations)."""
    clip: float = Field(0.2, gt=0)
    """Clip range ε of the probability ratio."""
    kl_coef: float = Field(0.05, ge=0)
    """KL penalty coefficient to the reference (grpo: β of the k3 term; ppo: per-token reward penalty)."""
    value_clip: float = Field(0.2, gt=0)
    """ppo: clip range of the value update."""
    value_coef: float = Field(0.1, ge=0)
    """ppo: weight of the value loss."""
    gamma: float = Field(1.0, ge=0, le=1)
    """ppo: discount."""
    lam: float = Field(0.95, ge=0, le=1)
    """ppo: GAE λ."""


class AlignEval(Section):
    """What the aligned model is measured on, before and after."""

    prompts: Path | None = None
    """Held-out prompt records: greedy answers before and after, scored by `judge` (win rate) and, for grpo and
    ppo, by the training rewards."""
    judge: Path | None = None
    """A reward-model directory that compares the answers after training with those before (win rate)."""
    limit: int = Field(100, ge=1)
    """Prompts of `prompts` at most."""
    groups: list[str] | None = None
    """Only the prompts of these groups (e.g. [B]: people never asked about in training)."""
    max_new_tokens: int = Field(48, ge=1)
    """Tokens per greedy answer at most."""


class AlignOptim(OptimSection):
    """The optimiser, with alignment's defaults (DPO's usual small learning rate for full training)."""

    lr: float = Field(5e-5, gt=0)
    """Peak learning rate (LoRA usually wants ~10x more)."""
    warmup_steps: int = Field(5, ge=0)
    """Steps of linear warmup to the peak."""


class AlignConfig(StageConfig):
    """`lmforge align`: a model + preference pairs or prompts + a method → a reward model or an aligned policy."""

    init_from_key: ClassVar[str | None] = "model"

    method: Literal["reward", "dpo", "ipo", "hinge", "simpo", "orpo", "grpo", "ppo"] = "dpo"
    """reward: a Bradley–Terry reward model; dpo (sigmoid), ipo, hinge: against the reference; simpo, orpo:
    reference-free; grpo, ppo: RL from rewards with a KL penalty to the reference."""
    model: Path | None = None
    """The starting model: a HF directory (usually the SFT model)."""
    model_adapter: Path | None = None
    """An adapter on `model` (e.g. a LoRA SFT run's adapter/) merged into it first: the start and reference."""
    tuning: Literal["full", "lora", "adapter", "prompt"] = "lora"
    """What trains: every weight (full; the reference is a frozen copy's log-probs) or a fresh adapter (its
    reference is the same model with the adapter switched off: no second model in memory)."""
    data: AlignData = Field(default_factory=AlignData)
    """The data."""
    beta: float = Field(0.1, gt=0)
    """dpo, ipo, hinge, simpo: the inverse temperature β; orpo: λ, the weight of the odds-ratio term."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """dpo: conservative DPO's label-noise ε."""
    gamma: float = Field(0.5, ge=0)
    """simpo: the target reward margin γ."""
    reward: RewardSettings = Field(default_factory=RewardSettings)
    """Reward-model settings (method: reward)."""
    rl: RLSettings = Field(default_factory=RLSettings)
    """RL settings (method: grpo, ppo)."""
    lora: LoraSection = Field(default_factory=LoraSection)
    """LoRA settings (tuning: lora)."""
    adapter: BottleneckSection = Field(default_factory=BottleneckSection)
    """Bottleneck adapter settings (tuning: adapter)."""
    prompt: PromptSection = Field(default_factory=PromptSection)
    """Prompt tuning settings (tuning: prompt)."""
    forgetting: ForgettingSection = Field(default_factory=ForgettingSection)
    """Forgetting measurement and gate."""
    eval: AlignEval = Field(default_factory=AlignEval)
    """Evaluation before and after."""
    train: FinetuneLoop = Field(default_factory=FinetuneLoop)
    """The training loop."""
    optim: AlignOptim = Field(default_factory=AlignOptim)
    """The optimiser and learning-rate schedule."""

    @model_validator(mode="after")
    def _data_fits_method(self) -> AlignConfig:
        rl = self.method in RL_METHODS
        if rl and self.data.dataset is not None:
            raise ValueError(
                f"method {self.method} trains on data.prompts, not data.dataset (preference pairs)"
            )
        if not rl and self.data.prompts is not None:
            raise ValueError(
                f"method {self.method} trains on preference pairs (data.dataset), not data.prompts"
            )
        if self.method == "grpo" and self.rl.samples < 2:
            raise ValueError("grpo compares completions within a group: rl.samples must be at least 2")
        self._refuse_unused()
        return self

    def _refuse_unused(self) -> None:
        """A field set away from its default that this method or tuning would not read is an error, not a no-op."""
        m = self.method
        unused = {
            "label_smoothing": (m != "dpo", "only dpo smooths its labels"),
            "gamma": (m != "simpo", "only simpo has a target margin"),
            "beta": (
                m in ("reward", *RL_METHODS),
                f"{m} has no β (rl.kl_coef weighs the KL of grpo and ppo)",
            ),
            "reward": (m != "reward", "it configures method reward"),
            "rl": (m not in RL_METHODS, "it configures methods grpo and ppo"),
            "lora": (self.tuning != "lora", "it configures tuning lora"),
            "adapter": (self.tuning != "adapter", "it configures tuning adapter"),
            "prompt": (self.tuning != "prompt", "it configures tuning prompt"),
            "forgetting": (m == "reward", "a reward model has no LM head to measure forgetting with"),
            "eval": (m == "reward", "a reward model gives no answers (its held-out pairs are always scored)"),
            "data.prompt_groups": (m not in RL_METHODS, "it filters data.prompts (grpo, ppo)"),
            "data.prompts_limit": (m not in RL_METHODS, "it limits data.prompts (grpo, ppo)"),
        }
        for key, (ignored, why) in unused.items():
            if not ignored:
                continue
            *path, name = key.split(".")
            owner = self
            for part in path:
                owner = getattr(owner, part)
            value = getattr(owner, name)
            default = type(owner).model_fields[name].get_default(call_default_factory=True)
            if value != default:
                if isinstance(value, Section):  # name the field that was set
                    key += "." + next(
                        k for k in type(value).model_fields if getattr(value, k) != getattr(default, k)
                    )
                raise ValueError(
                    f"{key} is set but method {m} with tuning {self.tuning} does not read it: {why}"
                )
