"""CLI conventions: --version, stage commands (--config/--set/--out/--json, --help listing), exit codes."""

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from pydantic import Field
from typer.testing import CliRunner

import lmforge
from lmforge.cli import add_stage_command, app, make_app
from lmforge.config import Section, StageConfig, config_fields
from lmforge.paths import check_run_dir, start_run

LMFORGE = Path(sys.executable).parent / "lmforge"
runner = CliRunner()


class Optim(Section):
    lr: float = 1e-3
    """Peak learning rate."""
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.95])
    """AdamW's betas [beta1, beta2], as a list."""


class ToyConfig(StageConfig):
    optim: Optim = Field(default_factory=Optim)
    """Optimizer."""


def toy_run(cfg: ToyConfig, out: Path, overwrite: bool) -> dict:
    logging.getLogger("lmforge.toy").debug("toy: debug detail")
    replace = check_run_dir(out, cfg, overwrite)  # what every stage does before it reads its inputs
    if cfg.train.seed == 13:
        raise RuntimeError("the work failed")
    run_dir = start_run(out, cfg, replace)  # ... and once they are checked
    run_dir.done()
    return {"loss": 0.5, "max_steps": cfg.train.max_steps, "lr": cfg.optim.lr, "out": out}


@pytest.fixture(autouse=True)
def restore_logging():
    """Each CLI run installs its log handler on the `lmforge` logger; leave it as it was for other tests."""
    logger = logging.getLogger("lmforge")
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


@pytest.fixture
def toy() -> typer.Typer:
    new = make_app()
    add_stage_command(new, "toy", ToyConfig, toy_run, help="Run the toy stage.")
    return new


def plain(text: str) -> str:
    """The text without ANSI styles (in case the environment forces colors)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def assert_one_error_line(result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = plain(result.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""
    return lines[0]


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"lmforge {lmforge.__version__}\n"


def test_console_script_and_module_run():
    for command in ([str(LMFORGE)], [sys.executable, "-m", "lmforge"]):
        done = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"lmforge {lmforge.__version__}\n"


def test_no_arguments_shows_help(toy):
    result = runner.invoke(toy, [])
    assert result.exit_code == 2  # click treats a bare group call as a usage error
    assert "Usage:" in plain(result.output) and "toy" in plain(result.output)


def test_stage_help_lists_every_config_field(toy):
    result = runner.invoke(toy, ["toy", "--help"])
    assert result.exit_code == 0
    text = plain(result.stdout)
    flat = " ".join(text.split())
    for option in ("--config", "--set", "--out", "--json"):
        assert option in text
    for row in config_fields(ToyConfig):
        assert row.key in text
        assert row.description in flat  # wrapped onto several lines at most, never reflowed into another
    assert "train.max_steps: int = 1000" in text
    assert "optim.lr: float = 0.001" in text
    assert "optim.betas: list[float] = [0.9, 0.95]" in text  # the brackets are not eaten as rich markup
    # One field per line: every key starts its own line.
    starts = [line.split()[0] for line in text.splitlines() if line.strip()]
    assert all(f"{row.key}:" in starts for row in config_fields(ToyConfig))


def test_stage_runs_with_recipe_and_overrides(toy, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  max_steps: 10\n  seed: 3\noptim:\n  lr: 1e-2\n")
    out = tmp_path / "run"
    result = runner.invoke(
        toy, ["toy", "--config", str(recipe), "--set", "train.max_steps=20", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved == {
        "train": {"max_steps": 20, "seed": 3, "resume": False},
        "optim": {"lr": 0.01, "betas": [0.9, 0.95]},
    }
    assert "max_steps" in result.stdout and "20" in result.stdout  # the human summary
    assert "config written" in result.stderr  # logs go to stderr


def test_run_directory_flags(toy, tmp_path):
    out = tmp_path / "run"
    first = runner.invoke(toy, ["toy", "--set", "train.max_steps=7", "--out", str(out), "--json"])
    assert first.exit_code == 0, first.output
    (out / "results.json").write_text("{}")  # what a run leaves

    refused = runner.invoke(toy, ["toy", "--out", str(out)])
    assert refused.exit_code == 2
    assert (
        f"--out {out} holds a run: use --resume {out} to continue it, --overwrite to replace"
        in refused.stderr
    )

    # --resume reads the run's config.yaml, sets train.resume and still takes --set.
    resumed = runner.invoke(toy, ["toy", "--resume", str(out), "--set", "optim.lr=0.5", "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout) == {"loss": 0.5, "max_steps": 7, "lr": 0.5, "out": str(out)}
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["resume"] is True
    assert (out / "results.json").exists()

    replaced = runner.invoke(toy, ["toy", "--out", str(out), "--overwrite", "--json"])
    assert replaced.exit_code == 0, replaced.output
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]  # the old run is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no hidden leftover either

    for args, message in [
        (["--resume", str(tmp_path / "nothing")], "not a run directory (no config.yaml)"),
        (["--resume", str(out), "--overwrite"], "give one of them"),
        (["--resume", str(out), "--out", str(tmp_path / "x")], "continues in its own directory"),
        ([], "give --out DIR for a new run"),
        (["--out", str(tmp_path / "y"), "--init-from", str(tmp_path)], "toy starts from no model"),
    ]:
        result = runner.invoke(toy, ["toy", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)


def test_json_output_is_one_document(toy, tmp_path):
    args = ["toy", "--set", "optim.lr=3e-4", "--set", "train.max_steps=5", "--out", str(tmp_path), "--json"]
    result = runner.invoke(toy, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"loss": 0.5, "max_steps": 5, "lr": 3e-4, "out": str(tmp_path)}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--set", "optim.lrr=1"],
            "unknown config key 'optim.lrr' (from --set optim.lrr=1); did you mean 'optim.lr'?",
        ),
        (["--set", "train.max_steps=ten"], "train.max_steps: expected an integer, got 'ten'"),
        (["--set", "train.max_steps"], "expected KEY=VALUE"),
        (["--config", "no/such/recipe.yaml"], "cannot read recipe no/such/recipe.yaml: No such file"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(toy, tmp_path, args, message):
    result = runner.invoke(toy, ["toy", *args, "--out", str(tmp_path / "run")])
    assert message in assert_one_error_line(result, 2)
    assert not (tmp_path / "run").exists()  # nothing written for a config that does not resolve


def test_debug_shows_the_traceback(toy, tmp_path):
    result = runner.invoke(toy, ["--debug", "toy", "--set", "optim.lrr=1", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert plain(result.stderr).strip().splitlines()[-1].startswith("error: unknown config key 'optim.lrr'")


def test_failed_work_exits_1_with_a_hint(toy, tmp_path):
    result = runner.invoke(toy, ["toy", "--set", "train.seed=13", "--out", str(tmp_path)])
    assert result.exit_code == 1
    errors = [line for line in plain(result.stderr).splitlines() if line.startswith("error:")]
    assert errors == [
        "error: the work failed (RuntimeError; rerun with `lmforge --debug ...` for the traceback)"
    ]
    assert "Traceback" not in result.output
    result = runner.invoke(toy, ["--debug", "toy", "--set", "train.seed=13", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "Traceback (most recent call last)" in result.stderr


def test_usage_errors_exit_2(toy, tmp_path):
    assert runner.invoke(toy, ["toy", "--bogus", "--out", str(tmp_path)]).exit_code == 2
    assert runner.invoke(toy, ["toy"]).exit_code == 2  # --out is required
    assert runner.invoke(toy, ["nope"]).exit_code == 2


def test_console_script_usage_error_and_no_arguments():
    done = subprocess.run([str(LMFORGE), "--bogus"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "No such option" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([str(LMFORGE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Usage: lmforge" in plain(done.stdout + done.stderr)


def test_debug_turns_on_debug_logs(toy, tmp_path):
    args = ["toy", "--out", str(tmp_path)]
    assert "toy: debug detail" not in runner.invoke(toy, args).stderr
    assert "toy: debug detail" in runner.invoke(toy, ["--debug", *args]).stderr


def _commands(group, prefix=()) -> list[tuple[str, ...]]:
    """Every command path of a click group: ("pretrain",), ("data", "prepare"), ..."""
    found = []
    for name, command in group.commands.items():
        path = (*prefix, name)
        found += _commands(command, path) if hasattr(command, "commands") else [path]
    return found


def test_every_help_reads_in_80_columns():
    import typer.main

    commands = [(), ("data",), ("tokenizer",), *_commands(typer.main.get_command(app))]
    assert ("data", "prepare") in commands and ("pretrain",) in commands
    for path in commands:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
        assert result.exit_code == 0, (path, result.output)
        text = plain(result.stdout)
        for line in text.splitlines():
            assert len(line) <= 80, (path, line)
        assert "…" not in text and "<bool>" not in text, (path, text)
