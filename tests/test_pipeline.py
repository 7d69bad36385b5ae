"""`lmforge pipeline`: a tiny recipe (world → tokenizer → data → pretrain → LoRA SFT → eval, calls and a
served probe) runs, a rerun skips every stage without touching a file, and a change reruns exactly the stages it
reaches; bad recipes fail with one clear line."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from helpers import error
from typer.testing import CliRunner

from lmforge.commands.common import make_app
from lmforge.commands.pipeline import register
from lmforge.errors import LmforgeError
from lmforge.pipeline import STATE_FILE, load_pipeline, run_pipeline

POLICY = Path(__file__).resolve().parents[1] / "recipes" / "policies" / "medical.yaml"
SIZES = (
    "{people_a: 6, people_b: 4, people_c: 4, bios_per_person: 2, filler_docs: 6, diseases: 4, drugs: 3, "
    "medical_articles_per_topic: 1, medical_qa: 18, preference_pairs: 12}"
)
# Paths are relative (out: out), so a copy of the project directory plans exactly as the original.
RECIPE = f"""\
out: out
vars: {{steps: 6}}
stages:
  - {{name: world, run: synth, with: {{seed: 0, sizes: {SIZES}}}}}
  - name: tok
    run: tokenizer
    with: {{inputs: ["${{world}}/pretrain.jsonl", "${{world}}/medical_qa.jsonl"], vocab_size: 400}}
  - name: text
    run: prepare
    with: {{inputs: ["${{world}}/pretrain.jsonl"], tokenizer: "${{tok}}", num_proc: 1, val_fraction: 0.1}}
  - name: chat
    run: prepare
    with: {{inputs: ["${{world}}/medical_qa.jsonl"], tokenizer: "${{tok}}", num_proc: 1, val_fraction: 0.1}}
  - name: base
    run: pretrain
    set:
      model.overrides: {{hidden_size: 64, intermediate_size: 128, num_hidden_layers: 1, num_attention_heads: 4}}
      data.dataset: "${{text}}"
      train.seq_len: 64
      train.micro_batch_size: 4
      train.max_steps: "${{vars.steps}}"
      train.eval_every: 0
      sample_prompt: null
  - name: sft
    run: finetune
    set: {{model: "${{base}}", data.dataset: "${{chat}}", train.seq_len: 256, train.micro_batch_size: 4,
          train.max_steps: 3, train.eval_every: 0, optim.warmup_steps: 1}}
  - name: ppl
    run: eval
    with: {{model: "${{base.model}}", adapter: "${{sft}}", task: perplexity, data: "${{world}}/pretrain.jsonl",
           limit: 8, contamination: false}}
  - name: facts
    run: call
    function: lmforge.eval.medical:fact_questions
    with: {{world: "${{world.dir}}"}}
  - name: redirect
    run: call
    function: lmforge.eval.medical:redirect_compliance
    with: {{model: "${{base}}", adapter: "${{sft}}", data: "${{world}}/medical_qa.jsonl", limit: 6,
           max_new_tokens: 8}}
  - name: serve
    run: serve
    with:
      model: "${{base}}"
      name: general
      adapters: {{medical: "${{sft.adapter}}"}}
      policy: {POLICY}
      probe: {{data: "${{world}}/medical_qa.jsonl", model: [medical, general], limit: 6}}
      max_new_tokens: 8
"""
ORDER = ["world", "tok", "text", "chat", "base", "sft", "ppl", "facts", "redirect", "serve"]


def actions(result: dict) -> dict[str, str]:
    return {s["name"]: s["action"] for s in result["stages"]}


def reasons(result: dict) -> dict[str, str]:
    return {s["name"]: s["reason"] for s in result["stages"]}


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the models are tiny, and beside other work on the cores torch's threads wait for
    each other (the SFT stage took 8 s with two threads, 0.5 s with one)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, dict]:
    """The recipe run once in a fresh project directory: (the directory, the result)."""
    root = tmp_path_factory.mktemp("pipeline")
    (root / "p.yaml").write_text(RECIPE)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        result = run_pipeline(Path("p.yaml"))
    return root, result


@pytest.fixture
def project(first_run, tmp_path, monkeypatch) -> Path:
    """A copy of the finished project to change (the working directory inside the test)."""
    root = tmp_path / "project"
    shutil.copytree(first_run[0], root)
    monkeypatch.chdir(root)
    return root


def test_first_run_runs_every_stage_and_records_it(first_run):
    root, result = first_run
    assert [s["name"] for s in result["stages"]] == ORDER
    assert set(actions(result).values()) == {"ran"} and set(reasons(result).values()) == {"not run before"}
    out = root / "out"
    outputs = {s["name"]: s["output"] for s in result["stages"]}
    assert outputs["base"] == "out/base/model" and outputs["sft"] == "out/sft/adapter"  # primary outputs
    assert (out / "sft" / "adapter" / "adapter_config.json").is_file()
    ppl = json.loads((out / "ppl" / "result.json").read_text())
    assert ppl["task"] == "perplexity" and ppl["adapter"] == "out/sft/adapter"
    assert ppl["metrics"]["perplexity"]["value"] > 1
    facts = json.loads((out / "facts" / "result.json").read_text())  # the function got the stage's folder
    assert facts["questions"] == "out/facts/questions.jsonl" and facts["count"] == 4 * 3 + 3 * 2
    redirect = json.loads((out / "redirect" / "result.json").read_text())
    assert redirect["questions"] == 6 and redirect["adapter"] == "out/sft/adapter"
    assert redirect["redirect_referred"]["n"] + redirect["other_not_refused"]["n"] == 6
    state = json.loads((out / STATE_FILE).read_text())
    assert list(state["stages"]) == ORDER
    sft = state["stages"]["sft"]
    assert set(sft["upstream"]) == {"base", "chat"} and sft["outputs"]["adapter"] == "out/sft/adapter"
    assert state["stages"]["base"]["config"]["train"]["max_steps"] == 6  # "${vars.steps}" stayed an int


def test_serve_probe_answers_under_the_medical_policy(first_run):
    root, _ = first_run
    command = (root / "out" / "serve" / "command.txt").read_text().split()
    assert command[:3] == ["lmforge", "serve", "out/base/model"] and "medical=out/sft/adapter" in command
    probe = json.loads((root / "out" / "serve" / "result.json").read_text())
    medical, general = probe["models"]["medical"], probe["models"]["general"]
    assert medical["asked"] == general["asked"] == 6 and medical["errors"] == general["errors"] == 0
    assert medical["redirect_questions"] >= 1
    # The medical name gets the policy's system prompt on every request, and a referral where the tiny model
    # sends nobody to care; the general name is under the default policy (PII only), which had nothing to do.
    assert medical["policy_acted"] == 6 and medical["rules"]["system_prompt:replaced"] == 6
    assert medical["redirect_referred"] == medical["redirect_questions"]
    assert general["policy_acted"] == 0
    replies = probe["replies"]
    assert all(isinstance(r["policy"], list) and isinstance(r["reply"], str) for r in replies)


def test_second_run_skips_every_stage_and_touches_nothing(project):
    before = mtimes(project)
    result = run_pipeline(Path("p.yaml"))
    assert set(actions(result).values()) == {"skipped"} and set(reasons(result).values()) == {"up to date"}
    assert mtimes(project) == before


def test_a_changed_set_reruns_that_stage_and_the_stages_after_it(project):
    (project / "p.yaml").write_text(RECIPE.replace("train.max_steps: 3", "train.max_steps: 2"))
    base_files = mtimes(project / "out" / "base")
    result = run_pipeline(Path("p.yaml"))
    ran = {name for name, action in actions(result).items() if action == "ran"}
    assert ran == {"sft", "ppl", "redirect", "serve"}  # facts reads only the world
    assert reasons(result)["sft"] == "changed config (train.max_steps)"
    assert reasons(result)["ppl"] == "upstream 'sft' reruns"
    assert mtimes(project / "out" / "base") == base_files
    state = json.loads((project / "out" / STATE_FILE).read_text())
    assert state["stages"]["sft"]["config"]["train"]["max_steps"] == 2


def test_a_var_override_is_planned_by_dry_run_which_writes_nothing(project):
    before = mtimes(project)
    result = run_pipeline(Path("p.yaml"), sets=["vars.steps=5"], dry_run=True)
    reruns = ("base", "sft", "ppl", "redirect", "serve")
    assert actions(result) == {n: "run" if n in reruns else "skip" for n in ORDER}
    assert reasons(result)["base"] == "changed config (train.max_steps)"
    assert mtimes(project) == before


def test_from_reruns_that_stage_and_every_later_one(project):
    result = run_pipeline(Path("p.yaml"), start="ppl")
    later = ("ppl", "facts", "redirect", "serve")
    assert actions(result) == {n: "ran" if n in later else "skipped" for n in ORDER}
    assert reasons(result)["facts"] == "forced by --from ppl"


def test_a_missing_output_or_a_foreign_lineage_reruns_the_stage(project):
    (project / "out" / "ppl" / "result.json").unlink()
    lineage = project / "out" / "sft" / "adapter" / "lmforge.json"
    record = json.loads(lineage.read_text())
    lineage.write_text(json.dumps({**record, "config_hash": "0" * 64}))  # another run's output in its place
    plan = run_pipeline(Path("p.yaml"), dry_run=True)
    assert reasons(plan)["sft"] == "lineage: out/sft/adapter/lmforge.json records another config"
    result = run_pipeline(Path("p.yaml"))
    assert {n for n, a in actions(result).items() if a == "ran"} == {"sft", "ppl", "redirect", "serve"}
    (project / "out" / "ppl" / "result.json").unlink()
    result = run_pipeline(Path("p.yaml"))
    assert {n for n, a in actions(result).items() if a == "ran"} == {"ppl"}
    assert reasons(result)["ppl"] == "no output (out/ppl/result.json)"


def test_a_failure_keeps_the_finished_stages_and_the_next_run_resumes(project):
    bad = RECIPE + '  - {name: late, run: eval, with: {model: "${base}", data: "${world}/nothing.jsonl"}}\n'
    (project / "p.yaml").write_text(bad)
    with pytest.raises(LmforgeError, match=r"nothing\.jsonl: no such file"):
        run_pipeline(Path("p.yaml"))
    assert list(json.loads((project / "out" / STATE_FILE).read_text())["stages"]) == ORDER
    (project / "p.yaml").write_text(bad.replace("nothing.jsonl", "pretrain.jsonl"))
    result = run_pipeline(Path("p.yaml"))
    assert {n for n, a in actions(result).items() if a == "ran"} == {"late"}
    assert reasons(result)["late"] == "not run before"  # a stage is recorded only once it finishes


def test_the_medical_recipe_plans(tmp_path, monkeypatch):
    """recipes/pipelines/medical.yaml resolves: every reference, stage config, `with` and call (a dry run)."""
    monkeypatch.chdir(POLICY.parents[2])  # its paths are relative to the repository root
    result = run_pipeline(Path("recipes/pipelines/medical.yaml"), out=tmp_path / "medical", dry_run=True)
    assert len(result["stages"]) == 22 and set(actions(result).values()) == {"run"}
    assert not (tmp_path / "medical").exists()
    outputs = {s["name"]: Path(s["output"]).relative_to(tmp_path / "medical") for s in result["stages"]}
    assert outputs["sft"] == Path("sft/adapter") and outputs["dpo"] == Path("dpo/model")


def test_the_knowledge_levers_recipe_plans(tmp_path, monkeypatch):
    """recipes/pipelines/knowledge-levers.yaml (the demo's section (g)) resolves: three bases, three SFT runs."""
    monkeypatch.chdir(POLICY.parents[2])
    result = run_pipeline(
        Path("recipes/pipelines/knowledge-levers.yaml"), out=tmp_path / "levers", dry_run=True
    )
    kinds = [s["kind"] for s in result["stages"]]
    assert kinds.count("pretrain") == 3 and kinds.count("finetune") == 3 and kinds[-1] == "call"


# ------------------------------------------------------------------------------------------ bad recipes


def recipe_error(tmp_path: Path, text: str, **kwargs) -> str:
    """The error of planning `text` (nothing runs: a dry run)."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(LmforgeError) as e:
        run_pipeline(path, out=tmp_path / "out", dry_run=True, **kwargs)
    return str(e.value)


HEAD = "vars: {steps: 3}\nstages:\n  - {name: world, run: synth}\n"


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        ('{name: tok, run: tokenizer, with: {inputs: ["${wrld}/pretrain.jsonl"]}}',
         "stage 'tok' with.inputs[0]: ${wrld}: no stage 'wrld'; did you mean 'world'?"),
        ('{name: tok, run: tokenizer, with: {inputs: ["${later}/x"]}}\n  - {name: later, run: synth}',
         "stage 'tok' with.inputs[0]: ${later}: stage 'later' runs later (stage 3 of 3)"),
        ('{name: tok, run: tokenizer, with: {inputs: ["${tok}/x"]}}', "stage 'tok' is this stage"),
        ('{name: tok, run: tokenizer, with: {inputs: ["${world}"], vocab_size: "${vars.step}"}}',
         "stage 'tok' with.vocab_size: ${vars.step}: no var 'step'; did you mean 'steps'?"),
        ('{name: tok, run: tokenizer, with: {inputs: ["${world.model}"]}}',
         "stage 'world' (synth) has no output 'model' (its outputs: dir)"),
        ("{name: tok, run: tokenizer, wiht: {}}", "stage 'tok': unknown key 'wiht'; did you mean 'with'?"),
        ("{name: tok, run: tokeniser}", "unknown kind run: 'tokeniser'; did you mean 'tokenizer'?"),
        ('{name: tok, run: tokenizer, with: {inputs: ["${world}"], vocab: 300}}',
         "stage 'tok' (tokenizer): unknown config key 'vocab' (from stage 'tok' with); did you mean "
         "'vocab_size'?"),
        ("{name: b, run: pretrain, set: {train.max_stepz: 3}}",
         "stage 'b' (pretrain): unknown config key 'train.max_stepz' (from set: train.max_stepz=3); did you mean "
         "'train.max_steps'?"),
        ("{name: b, run: pretrain, with: {seed: 1}}", "stage 'b' (pretrain) takes recipe and set, not with"),
        ("{name: c, run: call, function: 'os:getcwd'}", "function 'os:getcwd' is outside the lmforge package"),
        ("{name: c, run: call, function: 'lmforge.eval.medical:fact_question'}",
         "lmforge.eval.medical has no 'fact_question'"),
        ("{name: c, run: call, function: 'lmforge.eval.medical:fact_questions', with: {wrld: x}}",
         "with.wrld: the function takes no 'wrld'; did you mean 'world'?"),
        ("{name: world, run: synth}", "stage 'world': the name is used twice"),
    ],
)  # fmt: skip
def test_bad_stages_are_refused_with_a_clear_message(tmp_path, stage, expected):
    assert expected in recipe_error(tmp_path, HEAD + f"  - {stage}\n")


def test_a_model_reference_to_an_adapter_run_suggests_the_adapter(tmp_path):
    text = HEAD + (
        '  - {name: sft, run: finetune, set: {model: "${world}/m", data.dataset: "${world}/sft_a.jsonl"}}\n'
        '  - {name: e, run: eval, with: {model: "${sft.model}"}}\n'
    )
    assert (
        "${sft.model}: stage 'sft' (finetune) writes no model; did you mean ${sft.adapter}?"
        in recipe_error(tmp_path, text)
    )


def test_unknown_from_and_unknown_var_override_suggest_the_name(tmp_path):
    assert "--from wrld: no such stage; did you mean 'world'?" in recipe_error(tmp_path, HEAD, start="wrld")
    assert "the recipe has no var 'step'; did you mean 'steps'?" in recipe_error(
        tmp_path, HEAD, sets=["vars.step=2"]
    )
    assert "unknown config key 'stage'" in recipe_error(tmp_path, "stage: []\n")


def test_an_output_root_holding_other_files_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert "holds no pipeline.json" in recipe_error(tmp_path, HEAD)
    assert load_pipeline(tmp_path / "bad.yaml", out=tmp_path / "elsewhere").out == tmp_path / "elsewhere"


# ------------------------------------------------------------------------------------------ the command


@pytest.fixture
def cli() -> typer.Typer:
    app = make_app()
    register(app)
    return app


def test_cli_plans_runs_and_explains(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("p.yaml").write_text(
        "out: o\nstages:\n  - {name: world, run: synth, with: {sizes: " + SIZES + "}}\n"
    )
    runner = CliRunner()
    help_text = runner.invoke(cli, ["pipeline", "--help"]).output
    assert "docs/pipelines.md" in help_text and "${NAME.adapter}" in help_text
    dry = runner.invoke(cli, ["pipeline", "p.yaml", "--dry-run"])
    assert dry.exit_code == 0 and "not run before" in dry.output and not Path("o").exists()
    ran = runner.invoke(cli, ["pipeline", "p.yaml", "--json"])
    assert ran.exit_code == 0, ran.output
    assert json.loads(ran.stdout)["stages"][0] | {"seconds": None} == {
        "name": "world", "kind": "synth", "action": "ran", "reason": "not run before", "seconds": None,
        "output": "o/world"}  # fmt: skip
    again = runner.invoke(cli, ["pipeline", "p.yaml"])
    assert again.exit_code == 0 and "skipped" in again.stdout and "up to date" in again.stdout
    assert "cannot read pipeline recipe" in error(runner.invoke(cli, ["pipeline", "missing.yaml"]))
    Path("broken.yaml").write_text("stages: [\n")
    assert "invalid YAML" in error(runner.invoke(cli, ["pipeline", "broken.yaml"]))
    assert "expected vars.NAME=VALUE" in error(runner.invoke(cli, ["pipeline", "p.yaml", "--set", "steps=3"]))
