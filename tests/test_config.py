"""Config resolution: YAML recipe + `--set` overrides, typed values, one-line errors, the saved config.yaml."""

import os
import re
from pathlib import Path
from typing import Literal

import pytest
import yaml
from pydantic import Field, ValidationError
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.config import (
    Section,
    StageConfig,
    TrainSection,
    config_fields,
    config_help,
    load_config,
    save_config,
)
from lmforge.errors import LmforgeError
from lmforge.model.configs import DecoderConfig, EncoderConfig, preset
from lmforge.stages.configs import FinetuneConfig, PretrainConfig


class Lora(Section):
    rank: int = 8
    """Rank of the low-rank update."""
    enabled: bool = False
    """Train LoRA adapters instead of the full model."""
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names that get an adapter."""


class Model(Section):
    preset: str = "tiny-llama"
    """Model preset to start from."""
    lora: Lora = Field(default_factory=Lora)
    """LoRA settings."""


class Optim(Section):
    lr: float = 1e-3
    """Peak learning rate."""
    clip: float | None = 1.0
    """Gradient-norm clipping; null disables it."""


class Data(Section):
    path: Path | None = None
    """Directory of token shards."""
    kind: Literal["text", "chat"] = "text"
    """How records are rendered."""
    name: str = "world"
    """Name of the data set."""


class Toy(StageConfig):
    train: TrainSection = Field(default_factory=lambda: TrainSection(max_steps=50))
    """Training loop."""
    model: Model = Field(default_factory=Model)
    """Model."""
    optim: Optim = Field(default_factory=Optim)
    """Optimizer."""
    data: Data = Field(default_factory=Data)
    """Data."""


def recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def error(cls: type, path: Path | None, overrides: list[str]) -> str:
    with pytest.raises(LmforgeError) as info:
        load_config(cls, path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_without_recipe():
    cfg = load_config(Toy, None, [])
    assert cfg == Toy()
    assert cfg.train.max_steps == 50 and cfg.train.seed == 0


def test_yaml_and_overrides_are_typed(tmp_path):
    path = recipe(tmp_path, "train:\n  max_steps: 10\noptim:\n  lr: 3e-4\nmodel:\n  lora:\n    rank: 4\n")
    cfg = load_config(
        Toy,
        path,
        [
            "optim.clip=null",
            "model.lora.enabled=true",
            "model.lora.targets=[q_proj, k_proj, o_proj]",
            "data.name=123",  # a str field keeps the text, even if YAML would read a number
            "data.path=/data/shards",
            "data.kind=chat",
            "train.seed=7",
        ],
    )
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads "3e-4" as a string
    assert cfg.train.max_steps == 10 and cfg.train.seed == 7
    assert cfg.optim.clip is None
    assert cfg.model.lora.enabled is True and cfg.model.lora.rank == 4
    assert cfg.model.lora.targets == ["q_proj", "k_proj", "o_proj"]
    assert cfg.data.name == "123" and cfg.data.path == Path("/data/shards") and cfg.data.kind == "chat"


def test_float_override_from_exponent_and_int():
    cfg = load_config(Toy, None, ["optim.lr=3e-4", "train.max_steps=20"])
    assert cfg.optim.lr == pytest.approx(3e-4) and type(cfg.optim.lr) is float
    assert cfg.train.max_steps == 20 and type(cfg.train.max_steps) is int


def test_later_override_wins(tmp_path):
    path = recipe(tmp_path, "train:\n  max_steps: 10\n")
    assert load_config(Toy, path, []).train.max_steps == 10
    assert load_config(Toy, path, ["train.max_steps=20"]).train.max_steps == 20
    assert load_config(Toy, path, ["train.max_steps=20", "train.max_steps=30"]).train.max_steps == 30


def test_empty_recipe_gives_defaults(tmp_path):
    assert load_config(Toy, recipe(tmp_path, ""), []) == Toy()


@pytest.mark.parametrize(
    ("override", "key", "suggestion"),
    [
        ("optim.lrr=1e-3", "optim.lrr", "optim.lr"),
        ("trian.max_steps=3", "trian.max_steps", "train.max_steps"),
        ("model.lora.rnk=4", "model.lora.rnk", "model.lora.rank"),
        ("max_steps=3", "max_steps", "train.max_steps"),  # a key given without its section
        ("optim.seed=3", "optim.seed", "train.seed"),  # a key in the wrong section
        ("train.max_steps.x=1", "train.max_steps.x", "train.max_steps"),  # a value is not a section
    ],
)
def test_unknown_override_key_suggests(override, key, suggestion):
    message = error(Toy, None, [override])
    assert message == f"unknown config key '{key}' (from --set {override}); did you mean '{suggestion}'?"


def test_unknown_key_without_close_match_has_no_suggestion():
    message = error(Toy, None, ["zzzz=1"])
    assert message == "unknown config key 'zzzz' (from --set zzzz=1)"


def test_unknown_yaml_keys_at_every_depth(tmp_path):
    path = recipe(tmp_path, "trian: {}\noptim:\n  lrr: 1\nmodel:\n  lora:\n    rnk: 4\n")
    message = error(Toy, path, [])
    assert f"unknown config key 'trian' (from {path}); did you mean 'train'?" in message
    assert f"unknown config key 'optim.lrr' (from {path}); did you mean 'optim.lr'?" in message
    assert f"unknown config key 'model.lora.rnk' (from {path}); did you mean 'model.lora.rank'?" in message
    assert message.count("; did you mean") == 3


def test_invalid_values_name_field_type_and_source(tmp_path):
    path = recipe(tmp_path, "train:\n  max_steps: ten\n")
    assert error(Toy, path, []) == f"train.max_steps: expected an integer, got 'ten' (from {path})"
    message = error(Toy, path, ["train.max_steps=5", "optim.lr=fast", "model.lora.enabled=maybe"])
    assert message == (  # every error, in field order
        "model.lora.enabled: expected true or false, got 'maybe' (from --set model.lora.enabled=maybe); "
        "optim.lr: expected a number, got 'fast' (from --set optim.lr=fast)"
    )
    message = error(Toy, None, ["data.kind=html"])
    assert message == "data.kind: expected 'text' or 'chat', got 'html' (from --set data.kind=html)"
    message = error(Toy, None, ["model.lora.targets=q_proj"])
    assert message.startswith("model.lora.targets: expected a list, got 'q_proj'")


def test_recipe_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    assert str(missing) in error(Toy, missing, [])
    broken = recipe(tmp_path, "train:\n  max_steps: 5\n  seed: [1, 2\n")
    message = error(Toy, broken, [])
    assert message.startswith(f"{broken}, line ") and "invalid YAML" in message
    assert str(recipe(tmp_path, "- train\n")) in error(Toy, tmp_path / "recipe.yaml", [])


@pytest.mark.parametrize("override", ["train.max_steps", "=3", "train.max_steps 3"])
def test_override_without_equals(override):
    message = error(Toy, None, [override])
    assert "expected KEY=VALUE" in message and "--set train.max_steps=20" in message


def test_save_config_round_trips(tmp_path):
    cfg = load_config(
        Toy, None, ["optim.lr=3e-4", "optim.clip=null", "data.path=/x", "model.lora.enabled=true"]
    )
    path = save_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    assert load_config(Toy, path, []) == cfg
    assert list(yaml.safe_load(path.read_text())) == ["train", "model", "optim", "data"]  # field order
    assert list(yaml.safe_load(path.read_text())["model"]["lora"]) == ["rank", "enabled", "targets"]
    assert os.listdir(path.parent) == ["config.yaml"]  # no temp file left behind


def test_save_config_is_atomic(tmp_path, monkeypatch):
    path = save_config(Toy(), tmp_path)
    before = path.read_text()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_config(load_config(Toy, None, ["train.max_steps=1"]), tmp_path)
    assert path.read_text() == before  # the old config is intact
    assert os.listdir(tmp_path) == ["config.yaml"]  # and the temp file is gone


def test_config_fields_flatten_sections_with_stage_defaults():
    rows = {row.key: row for row in config_fields(Toy)}
    assert list(rows) == [
        "train.max_steps", "train.seed", "train.resume", "model.preset", "model.lora.rank", "model.lora.enabled",
        "model.lora.targets", "optim.lr", "optim.clip", "data.path", "data.kind", "data.name",
    ]  # fmt: skip
    assert rows["train.max_steps"].default == 50  # the stage's default, not TrainSection's
    assert rows["optim.clip"].type == "float | None"
    assert rows["model.lora.targets"].type == "list[str]"
    assert rows["data.path"].description == "Directory of token shards."


def test_config_help_lists_every_field_with_default_and_description():
    text = config_help(Toy, width=80)
    flat = " ".join(text.split())
    assert all(len(line) <= 80 for line in text.splitlines())
    for row in config_fields(Toy):
        assert row.description and row.description in flat
    for shown in [
        "train.max_steps: int = 50",
        "optim.lr: float = 0.001",
        "optim.clip: float | None = 1.0",
        "data.path: Path | None = null",
        "data.kind: Literal['text', 'chat'] = text",
        'model.lora.targets: list[str] = ["q_proj", "v_proj"]',
        "model.lora.enabled: bool = false",
    ]:
        assert shown in text


# ------------------------------------------------------------------------------- ranges of counts, rates, ...


@pytest.mark.parametrize(
    ("cls", "override", "expected"),
    [
        (Toy, "train.max_steps=-5", "train.max_steps: expected a value >= 1, got -5"),
        (PretrainConfig, "train.max_steps=-5", "train.max_steps: expected a value >= 1, got -5"),
        (FinetuneConfig, "train.max_steps=0", "train.max_steps: expected a value >= 1, got 0"),
        (PretrainConfig, "train.seed=-1", "train.seed: expected a value >= 0, got -1"),
        (PretrainConfig, "optim.lr=0", "optim.lr: expected a value > 0, got 0"),
        (PretrainConfig, "optim.min_lr_ratio=1.5", "optim.min_lr_ratio: expected a value in [0, 1], got 1.5"),
        (PretrainConfig, "mlm_rate=1", "mlm_rate: expected a value in (0, 1), got 1"),
        (FinetuneConfig, "lora.dropout=1.5", "lora.dropout: expected a value in [0, 1), got 1.5"),
        (PretrainConfig, "optim.betas=[0.9, 1.0]", "optim.betas: expected each value in [0, 1), got 1.0"),
        (PretrainConfig, "optim.lr=.nan", "optim.lr: expected a finite number, got nan"),
        (PretrainConfig, "data.mix={a: -1}", "data.mix: expected each value >= 0, got -1"),
    ],
)
def test_out_of_range_values_name_field_range_value_and_source(cls, override, expected):
    assert error(cls, None, [override]) == f"{expected} (from --set {override})"


def test_every_number_in_the_stage_configs_has_a_range():
    for cls in (PretrainConfig, FinetuneConfig):
        for row in config_fields(cls):
            if re.search(r"\b(int|float)\b", row.type):
                assert row.range, f"{cls.__name__}: {row.key} ({row.type}) has no range"


def test_model_config_ranges():
    for bad in ({"hidden_size": 0}, {"num_key_value_heads": 0}, {"rms_norm_eps": 0.0}, {"sliding_window": 0}):
        with pytest.raises(ValidationError, match="greater than"):
            DecoderConfig(**bad)
    for bad in ({"hidden_dropout_prob": 1.5}, {"classifier_dropout": -0.1}, {"layer_norm_eps": 0.0}):
        with pytest.raises(ValidationError):
            EncoderConfig(**bad)
    # Real HF values stay valid: no dropout, dropout null, huge rope bases, long windows.
    EncoderConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=None)
    DecoderConfig(rope_theta=1e6, sliding_window=131072, initializer_range=0.0, pad_token_id=-1)
    # A bad preset override is one clear error, with the field, its range and a close key.
    with pytest.raises(LmforgeError) as info:
        preset("tiny-bert", hidden_dropout_prob=1.5)
    assert str(info.value) == (
        "hidden_dropout_prob: expected a value in [0, 1], got 1.5 (overriding preset tiny-bert)"
    )
    with pytest.raises(LmforgeError, match="did you mean 'num_hidden_layers'"):
        preset("tiny-llama", num_hiden_layers=2)


def test_config_help_shows_each_range_within_the_width():
    text = config_help(Toy, width=80)
    assert "train.max_steps: int = 50 (>= 1)" in text
    assert (
        "optim.lr: float = 0.001 " in text and "optim.lr: float = 0.001 (" not in text
    )  # no range, none shown
    text = config_help(PretrainConfig, width=100)
    assert all(len(line) <= 100 for line in text.splitlines())
    for shown in [
        "train.max_steps: int = 1000 (>= 1)",
        "optim.lr: float = 0.0006 (> 0)",
        "optim.min_lr_ratio: float = 0.1 (in [0, 1])",
        "mlm_rate: float = 0.15 (in (0, 1))",
        "optim.betas: tuple[float, float] = [0.9, 0.95] (each in [0, 1))",
        "data.mix: dict[str, float] = {} (each >= 0)",
    ]:
        assert shown in text


def test_pretrain_cli_help_shows_ranges_and_refuses_a_negative_step_count(tmp_path):
    result = CliRunner().invoke(app, ["pretrain", "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0
    assert "train.max_steps: int = 1000 (>= 1)" in result.stdout
    assert "optim.min_lr_ratio: float = 0.1 (in [0, 1])" in result.stdout
    result = CliRunner().invoke(
        app, ["pretrain", "--set", "train.max_steps=-5", "--out", str(tmp_path / "run")]
    )
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: train.max_steps: expected a value >= 1, got -5 (from --set train.max_steps=-5)"
    )
    assert not (tmp_path / "run" / "model").exists()  # nothing trained, nothing saved


# ------------------------------------------------------------------------------------ keys inside dict fields


def test_dotted_key_sets_one_entry_of_a_dict_field_and_keeps_the_rest(tmp_path):
    path = recipe(tmp_path, "model:\n  overrides: {a: 1, b: 2, rope: {kind: llama3, factor: 8}}\n")
    assert load_config(PretrainConfig, path, ["model.overrides.b=3"]).model.overrides == {
        "a": 1, "b": 3, "rope": {"kind": "llama3", "factor": 8},
    }  # fmt: skip
    cfg = load_config(PretrainConfig, path, ["model.overrides.rope.factor=4", "model.overrides.c.d.e=[1, 2]"])
    assert cfg.model.overrides == {
        "a": 1, "b": 2, "rope": {"kind": "llama3", "factor": 4}, "c": {"d": {"e": [1, 2]}},
    }  # fmt: skip
    # The whole-dict form still replaces the dict, as it says; no recipe: the default {} gets the key.
    assert load_config(PretrainConfig, path, ["model.overrides={c: 1}"]).model.overrides == {"c": 1}
    cfg = load_config(PretrainConfig, None, ["model.overrides.num_hidden_layers=2"])
    assert cfg.model.overrides == {"num_hidden_layers": 2}
    message = error(PretrainConfig, path, ["model.overrides.a.x=1"])
    assert message == "--set model.overrides.a.x=1: model.overrides.a is 1, not a mapping to set a key in"


def test_dotted_key_of_a_typed_dict_is_typed_and_validated(tmp_path):
    path = recipe(tmp_path, "data:\n  datasets: {x: runs/x, y: runs/y}\n  mix: {x: 1, y: 2}\n")
    cfg = load_config(PretrainConfig, path, ["data.datasets.y=007", "data.mix.y=0.5"])
    assert cfg.data.datasets == {"x": Path("runs/x"), "y": Path("007")}  # a Path keeps its text
    assert cfg.data.mix == {"x": 1.0, "y": 0.5}
    message = error(PretrainConfig, path, ["data.mix.y=-2"])
    assert message == "data.mix: expected each value >= 0, got -2 (from --set data.mix.y=-2)"


def test_a_model_key_in_the_model_section_suggests_the_dotted_override():
    message = error(PretrainConfig, None, ["model.num_hidden_layers=2"])
    assert message.endswith("did you mean 'model.overrides.num_hidden_layers'?")
    # A misspelt key of the section, or the exact name of a key elsewhere, is still that key.
    assert error(PretrainConfig, None, ["model.prest=x"]).endswith("did you mean 'model.preset'?")
    assert error(PretrainConfig, None, ["model.seed=1"]).endswith("did you mean 'train.seed'?")


@pytest.mark.parametrize(
    ("cls", "key", "suggestion"),
    [
        (PretrainConfig, "optim.learning_rate", "optim.lr"),
        (PretrainConfig, "learning_rate", "optim.lr"),
        (FinetuneConfig, "train.learning_rate", "optim.lr"),
        (PretrainConfig, "num_train_epochs", "train.max_steps"),
        (FinetuneConfig, "train.per_device_train_batch_size", "train.micro_batch_size"),
        (PretrainConfig, "optim.warmup_ratio", "optim.warmup_steps"),
        (PretrainConfig, "train.warmup_steps", "optim.warmup_steps"),
        (PretrainConfig, "gradient_accumulation_steps", "train.grad_accum_steps"),
        (PretrainConfig, "optim.max_grad_norm", "optim.grad_clip"),
        (PretrainConfig, "lr_scheduler_type", "optim.schedule"),
        (FinetuneConfig, "max_seq_length", "train.seq_len"),
        (FinetuneConfig, "gradient_checkpointing", "train.activation_checkpointing"),
        (FinetuneConfig, "lora.lora_alpha", "lora.alpha"),
        (FinetuneConfig, "model_name_or_path", "model"),
        (PretrainConfig, "model_name_or_path", "model.init_from"),
    ],
)
def test_other_trainers_names_suggest_lmforges_key(cls, key, suggestion):
    message = error(cls, None, [f"{key}=1"])
    assert message == f"unknown config key '{key}' (from --set {key}=1); did you mean '{suggestion}'?"
