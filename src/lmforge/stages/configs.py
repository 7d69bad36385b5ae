"""Stage configs (pydantic only, no torch: the CLI imports them to build `--help`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

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
    """Prepared dataset directory (manifest.json and token shards)."""
    datasets: dict[str, Path] = Field(default_factory=dict)
    """Several named prepared datasets instead, mixed by `mix`, e.g. {domain: runs/med, general: runs/web}."""
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

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                        "query", "key", "value", r"attention\.output\.dense", r"intermediate\.dense",
                        r"output\.dense"]  # fmt: skip


class LoraSection(Section):
    """LoRA: W x + (alpha / r) B A x on the chosen Linear layers, B zero at the start (PEFT's layout and keys)."""

    r: int = Field(8, ge=1)
    """Rank of the update B A."""
    alpha: float = Field(16.0, gt=0)
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA branch's input during training."""
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    """Regular expressions; a Linear is adapted when one matches the end of its qualified name
    (default: the attention and MLP projections of the decoders and BERT)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    dora: bool = False
    """DoRA: also learn each output row's magnitude of the updated weight."""


class BottleneckSection(Section):
    """Houlsby bottleneck adapters after each block's attention and MLP: x + up(act(down(x))), up zero at start."""

    size: int = Field(32, ge=1)
    """Bottleneck width."""
    activation: Literal["relu", "gelu", "silu"] = "gelu"
    """Non-linearity between the down and up projections."""


class PromptSection(Section):
    """Prompt tuning: learned virtual-token embeddings prepended to every input (PEFT's PROMPT_TUNING)."""

    num_virtual_tokens: int = Field(16, ge=1)
    """Number of learned vectors."""
    init_text: str | None = None
    """Initialise the vectors from this text's token embeddings (repeated to length); null: random tokens'."""


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
    """Prepared dataset directory; its train split trains, its val split validates."""
    packing: bool = True
    """Pack several samples into each row (attention isolated per sample; positions restart per sample)."""
    group_by_length: bool = True
    """task (classification): batch queries of similar length together, so few columns are padding."""


class FinetuneEval(Section):
    """What the fine-tuned model is measured on after training (and the base before, for comparison)."""

    dataset: Path | None = None
    """task (classification): a prepared test set; its accuracy is reported (every split of it)."""
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
    """The training loop, with fine-tuning's defaults (short runs, regular validation)."""

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
