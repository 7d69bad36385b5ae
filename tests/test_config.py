"""Config resolution: YAML recipe + `--set` overrides, typed values, one-line errors, the saved config.yaml."""

import os
from pathlib import Path
from typing import Literal

import pytest
import yaml
from pydantic import Field

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
