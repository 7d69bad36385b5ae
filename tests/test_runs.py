"""Lineage, `lmforge runs` and `lmforge card` on a real chain: a tiny model pretrained from a preset and a LoRA
adapter fine-tuned on it. What the runner records, the runs found, the chain, its Mermaid text and PNG, warnings
when a parent's weights or a dataset change, a model card huggingface_hub parses, and bad input refused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import TINY_MODEL
from typer.testing import CliRunner

from lmforge.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    """ROOT/base (pretrained from preset:llama-14m, 12 steps) → ROOT/sft (LoRA, 4 steps), trained from inside ROOT
    with relative paths, so the records hold paths relative to ROOT, as a project's runs do."""
    from lmforge.data.prepare import PrepareConfig, iter_texts, prepare
    from lmforge.data.synthetic import WorldSizes, synthesize
    from lmforge.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("chain")
    sizes = WorldSizes.tiny().model_copy(update={"people_a": 12, "filler_docs": 6})
    world = Path(synthesize(root / "world", seed=0, sizes=sizes)["out"])
    tok = train_tokenizer(
        iter_texts([world / "pretrain.jsonl", world / "sft_a.jsonl"]), "bpe", 400, root / "tok"
    )
    for name, source in (("pretrain", "pretrain"), ("sft", "sft_a")):
        prepare(PrepareConfig(inputs=[world / f"{source}.jsonl"], tokenizer=tok, num_proc=1, val_fraction=0.1),
                root / "data" / name)  # fmt: skip
    common = ["--set", "train.seq_len=32", "--set", "train.micro_batch_size=4", "--set", "optim.warmup_steps=1",
              "--set", "train.eval_every=4", "--set", "train.eval_batches=2"]  # fmt: skip
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = runner.invoke(app, ["pretrain", "--out", "base", "--set", TINY_MODEL, *common,
                                     "--set", "data.dataset=data/pretrain", "--set", "train.max_steps=12",
                                     "--set", "sample_prompt=null"])  # fmt: skip
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, ["finetune", "--init-from", "base/model", "--out", "sft", *common,
                                     "--set", "method=lora", "--set", "data.dataset=data/sft",
                                     "--set", "train.max_steps=4", "--set", "forgetting.batches=1"])  # fmt: skip
        assert result.exit_code == 0, result.output
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def copy(chain, tmp_path) -> Path:
    """A copy of the chain to change: its records' relative paths resolve inside the copy."""
    return Path(shutil.copytree(chain, tmp_path / "project"))


def lineage_json(model: Path) -> tuple[dict, str]:
    result = runner.invoke(app, ["runs", "lineage", str(model), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stderr


def test_runner_records_datasets_hashes_and_versions(chain):
    from lmforge import __version__
    from lmforge.lineage import config_hash
    from lmforge.model.hf import weights_fingerprint

    ids = {
        n: json.loads((chain / "data" / n / "manifest.json").read_text())["id"] for n in ("pretrain", "sft")
    }
    base = json.loads((chain / "base" / "model" / "lmforge.json").read_text())
    sft = json.loads((chain / "sft" / "adapter" / "lmforge.json").read_text())
    assert base["data"] == [ids["pretrain"]] and sft["data"] == [ids["sft"]]  # kept as before
    assert base["datasets"] == [{"id": ids["pretrain"], "path": "data/pretrain"}]
    assert sft["datasets"] == [{"id": ids["sft"], "path": "data/sft"}]
    assert base["parent"] == "preset:llama-14m" and "base_fingerprint" not in base  # nothing to fingerprint
    assert sft["parent"] == "base/model" and sft["base_fingerprint"] == weights_fingerprint(
        chain / "base" / "model"
    )
    for record in (base, sft):
        canonical = json.dumps(record["config"], sort_keys=True, separators=(",", ":"))
        assert (
            record["config_hash"]
            == config_hash(record["config"])
            == hashlib.sha256(canonical.encode()).hexdigest()
        )
        assert record["code_version"]["lmforge"] == __version__ and "git_commit" in record["code_version"]
        assert record["date"].endswith("+00:00")
    assert base["config_hash"] != sft["config_hash"]


def test_provenance_fingerprints_a_directory_parent_and_finds_cached_datasets(chain, tmp_path, monkeypatch):
    from lmforge.lineage import provenance
    from lmforge.model.hf import weights_fingerprint

    # A parent directory the stage did not fingerprint itself (pretrain's init_from) gets base_fingerprint.
    fields = provenance(str(chain / "base" / "model"), [], {}, {})
    assert fields["base_fingerprint"] == weights_fingerprint(chain / "base" / "model")
    assert "base_fingerprint" not in provenance(
        str(chain / "base" / "model"), [], {}, {"base_fingerprint": "x"}
    )
    # A raw source prepared into the cache: the cached copy's path, and its inputs as the source.
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    cached = shutil.copytree(chain / "data" / "sft", tmp_path / "cache" / "prepared" / "abc")
    manifest = json.loads((cached / "manifest.json").read_text())
    records = provenance(
        "preset:tiny", [manifest["id"], "prompts.jsonl"], {"data": {"dataset": "x.jsonl"}}, {}
    )
    assert records["datasets"] == [
        {"id": manifest["id"], "path": str(cached), "source": [str(p) for p in manifest["config"]["inputs"]]},
        {"id": None, "path": "prompts.jsonl"},
    ]


def test_git_commit_read_from_the_checkout_files(tmp_path):
    from lmforge.lineage import _git_commit

    package = tmp_path / "repo" / "src" / "pkg"
    package.mkdir(parents=True)
    git = tmp_path / "repo" / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    assert _git_commit(package) is None  # a branch without commits
    (git / "packed-refs").write_text(f"# pack-refs\n{'b' * 40} refs/heads/main\n")
    assert _git_commit(package) == "b" * 40
    (git / "refs" / "heads" / "main").write_text("a" * 40 + "\n")
    assert _git_commit(package) == "a" * 40  # a loose ref wins over the packed one
    (git / "HEAD").write_text("c" * 40 + "\n")
    assert _git_commit(package) == "c" * 40  # detached
    installed = tmp_path / "repo" / ".venv" / "lib" / "site-packages" / "pkg"
    installed.mkdir(parents=True)
    assert _git_commit(installed) is None  # an installed copy is not the checkout's code
    assert _git_commit(tmp_path / "elsewhere") is None


def test_runs_list_finds_both_runs(chain):
    result = runner.invoke(app, ["runs", "list", str(chain), "--json"])
    assert result.exit_code == 0, result.output
    runs = json.loads(result.stdout)["runs"]
    assert [(r["stage"], r["method"], Path(r["run"]).name, Path(r["output"]).name) for r in runs] == [
        ("pretrain", "clm", "base", "model"),
        ("finetune", "chat/lora", "sft", "adapter"),
    ]  # oldest first; checkpoints and the data directories are no runs
    assert runs[0]["result"]["name"] == "val_loss" and runs[0]["result"]["value"] > 0
    assert runs[1]["parent"] == "base/model" and runs[1]["date"] >= runs[0]["date"]
    text = runner.invoke(app, ["runs", "list", str(chain)])
    assert text.exit_code == 0 and "pretrain" in text.stdout and "finetune" in text.stdout


def test_runs_show(chain):
    result = runner.invoke(app, ["runs", "show", str(chain / "sft"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["stage"] == "finetune" and info["kind"] == "adapter" and info["parent"] == "base/model"
    assert info["datasets"][0].startswith("data/sft (") and "results.json" in info["files"]
    assert info["results"]["steps"] == 4 and info["config_hash"] and info["evals"] == {}


def test_lineage_shows_the_chain(chain):
    doc, stderr = lineage_json(chain / "sft")
    assert [Path(p).name if i < 2 else p for i, p in enumerate(doc["chain"])] == [
        "adapter", "model", "preset:llama-14m"
    ]  # fmt: skip
    nodes = doc["nodes"]
    assert [n["stage"] for n in nodes] == ["finetune", "pretrain", None]
    assert [n["parents"] for n in nodes] == [[1], [2], []]
    assert [(e["parent"], e["child"], e["status"]) for e in doc["edges"]] == [
        (1, 0, "same"),
        (2, 1, "unchecked"),
    ]
    assert [d["status"] for n in nodes for d in n["datasets"]] == ["same", "same"]
    assert doc["warnings"] == [] and "warning" not in stderr
    # Run from another directory: the relative paths recorded resolve beside the model.
    assert Path(nodes[1]["path"]).resolve() == (chain / "base" / "model").resolve()

    text = runner.invoke(app, ["runs", "lineage", str(chain / "sft")])
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert lines[0].startswith("sft/adapter") and "finetune chat/lora" in lines[0]
    assert any("base/model" in line and "pretrain clm" in line for line in lines)
    assert any("preset:llama-14m" in line for line in lines) and any(
        "data data/sft" in line for line in lines
    )


def test_lineage_mermaid_and_png(chain, tmp_path):
    result = runner.invoke(
        app, ["runs", "lineage", str(chain / "sft"), "--mermaid", "--png", str(tmp_path / "g.png")]
    )
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.startswith("graph TD\n")
    assert "  n1 --> n0" in text and "  n2 --> n1" in text  # base → adapter, preset → base
    assert 'n0["sft/adapter<br/>finetune chat/lora' in text and 'd0[("sft<br/>' in text
    assert "  d0 --> n0" in text and "  d1 --> n1" in text and "warn" not in text
    png = (tmp_path / "g.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "g.png")
    assert image.shape[0] >= 250 and image.shape[1] >= 400 and image[..., :3].std() > 0.05  # drawn, not blank


def test_changed_parent_weights_warn(copy):
    from safetensors.torch import load_file, save_file

    weights = copy / "base" / "model" / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1  # the base retrained or edited after the adapter was trained on it
    save_file(tensors, weights, metadata={"format": "pt"})

    doc, stderr = lineage_json(copy / "sft")
    assert [e["status"] for e in doc["edges"]] == ["changed", "unchecked"]
    assert len(doc["warnings"]) == 1 and "base/model changed since it was trained on it" in doc["warnings"][0]
    assert "warning: sft/adapter: its parent" in stderr
    text = runner.invoke(app, ["runs", "lineage", str(copy / "sft")])
    assert text.exit_code == 0 and "base/model changed since trained on" in " ".join(text.stdout.split())
    assert "weights changed" in runner.invoke(app, ["runs", "lineage", str(copy / "sft"), "--mermaid"]).stdout


def test_changed_dataset_warns(copy):
    file = copy / "data" / "sft" / "manifest.json"
    manifest = json.loads(file.read_text())
    old = manifest["id"]
    # Prepared again with another setting: a valid manifest with another id.
    manifest["config"]["seed"] = 1
    rest = {k: v for k, v in manifest.items() if k != "id"}
    manifest["id"] = hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()
    file.write_text(json.dumps(manifest))
    doc, stderr = lineage_json(copy / "sft")
    (dataset,) = doc["nodes"][0]["datasets"]
    assert dataset["status"] == "changed" and dataset["id"] == old and dataset["now"] == manifest["id"]
    assert doc["nodes"][1]["datasets"][0]["status"] == "same"
    assert f"manifest id {old[:12]} recorded, {manifest['id'][:12]} now" in doc["warnings"][0]
    assert "warning: sft/adapter: its dataset" in stderr

    manifest["id"] = old[::-1]  # the id edited by hand: the manifest no longer matches it
    file.write_text(json.dumps(manifest))
    doc, _ = lineage_json(copy / "sft")
    assert doc["nodes"][0]["datasets"][0]["status"] == "changed"
    assert "does not match its id" in doc["warnings"][0]

    shutil.rmtree(copy / "data" / "pretrain")  # gone: said, not taken for unchanged
    doc, _ = lineage_json(copy / "sft")
    assert doc["nodes"][1]["datasets"][0]["status"] == "missing"
    assert any("data/pretrain" in w and "is gone" in w for w in doc["warnings"])


def test_merge_has_two_parents_sharing_the_base(copy):
    result = runner.invoke(app, ["merge", str(copy / "base" / "model"), str(copy / "sft" / "adapter"),
                                 "--out", str(copy / "merged")])  # fmt: skip
    assert result.exit_code == 0, result.output
    doc, _ = lineage_json(copy / "merged")
    assert [(n["kind"], n["stage"]) for n in doc["nodes"]] == [
        ("model", "merge"), ("model", "pretrain"), ("adapter", "finetune"), ("preset", None)
    ]  # fmt: skip
    # The base is one node with two children: the merge (checked by its fingerprint) and the adapter.
    assert [(e["parent"], e["child"], e["role"], e["status"]) for e in doc["edges"]] == [
        (1, 0, "parent", "same"), (2, 0, "adapter", "unchecked"), (3, 1, "parent", "unchecked"),
        (1, 2, "parent", "same"),
    ]  # fmt: skip
    mermaid = runner.invoke(app, ["runs", "lineage", str(copy / "merged"), "--mermaid"]).stdout
    assert "  n1 --> n0" in mermaid and "  n2 --> n0" in mermaid and "  n1 --> n2" in mermaid
    listed = json.loads(runner.invoke(app, ["runs", "list", str(copy), "--json"]).stdout)["runs"]
    assert [r["stage"] for r in listed] == ["pretrain", "finetune", "merge"] and listed[2]["run"] is None


def test_missing_parent_is_reported(copy):
    shutil.rmtree(copy / "base")
    doc, stderr = lineage_json(copy / "sft")
    assert [n["kind"] for n in doc["nodes"]] == ["adapter", "missing"] and doc["edges"][0][
        "status"
    ] == "missing"
    assert "its parent base/model is not found" in doc["warnings"][0] and "warning:" in stderr


def test_card_parses_with_huggingface_hub(copy):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    adapter = copy / "sft" / "adapter"
    (adapter / "evals").mkdir()
    record = {"kind": "eval", "task": "qa", "model": "base/model", "adapter": str(adapter), "data": "world/eval_qa.jsonl",
              "n": 150, "metrics": {"exact": {"value": 0.5, "ci95": [0.42, 0.58], "n": 150}}, "seconds": 1.2,
              "lmforge_version": "0.1.0", "date": "2026-12-07T10:00:00+00:00"}  # fmt: skip
    (adapter / "evals" / "qa.json").write_text(json.dumps(record))
    empty = record | {"task": "safety", "n": 0, "metrics": {"refusal": {"value": float("nan"), "ci95": [float("nan")] * 2,
                                                                        "n": 0}}}  # fmt: skip
    (adapter / "evals" / "safety.json").write_text(
        json.dumps(empty)
    )  # nothing measured: left out of the card
    result = runner.invoke(app, ["card", str(copy / "sft"), "--license", "apache-2.0", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    path = Path(summary["card"])
    assert path == adapter / "README.md" and "qa.exact=0.5" in summary["metrics"]

    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["base_model"] == "base/model" and data["license"] == "apache-2.0"
    assert data["library_name"] == "peft" and data["pipeline_tag"] == "text-generation"
    assert data["datasets"] == ["data/sft", "data/pretrain"]  # the adapter's, then its base's
    assert {"lmforge", "finetune", "lora", "pretrain"} <= set(data["tags"])
    assert "exact" in data["metrics"] and "loss" in data["metrics"] and "refusal" not in data["metrics"]
    results = model_index_to_eval_results(data["model-index"])[1]
    exact = next(r for r in results if r.metric_type == "exact")
    assert exact.metric_value == 0.5 and exact.metric_args == {"ci95": [0.42, 0.58], "n": 150}
    assert exact.task_name == "qa" and exact.dataset_name == "world/eval_qa.jsonl"
    loss = next(r for r in results if r.metric_type == "loss")
    sft = json.loads((adapter / "lmforge.json").read_text())
    assert loss.metric_value == pytest.approx(sft["results"]["val_loss"]) and loss.dataset_split == "val"
    assert ModelCard(path.read_text()).data.to_dict() == data  # the text parses as well as the file
    body = card.text
    assert "## Lineage" in body and "## Intended use and limitations" in body and "0.42 – 0.58" in body
    assert "`base/model`" in body and "preset:llama-14m" in body

    again = runner.invoke(app, ["card", str(copy / "sft"), "--out", str(copy / "card.md")])
    assert again.exit_code == 0, again.output
    assert "license: other" in (copy / "card.md").read_text()  # no license chosen: "other", said in the body
    rewritten = runner.invoke(app, ["card", str(copy / "sft")])  # its own card is rewritten
    assert rewritten.exit_code == 0, rewritten.output


def test_card_warns_about_a_changed_parent(copy):
    from huggingface_hub import ModelCard

    (copy / "data" / "sft" / "manifest.json").write_text(
        (copy / "data" / "sft" / "manifest.json").read_text().replace('"seed": 0', '"seed": 7')
    )
    result = runner.invoke(app, ["card", str(copy / "sft")])
    assert result.exit_code == 0, result.output
    assert "warning: sft/adapter: its dataset" in result.stderr
    text = (copy / "sft" / "adapter" / "README.md").read_text()
    assert "> **Warning:** sft/adapter: its dataset" in text
    assert ModelCard(text).data.to_dict()["license"] == "other"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["runs", "lineage", "{root}/data"], "no lmforge.json (not written by an lmforge stage)"),
        (["runs", "lineage", "{root}/nope"], "no such directory"),
        (["runs", "lineage", "{root}/sft/adapter/lmforge.json"], "is a file"),
        (["runs", "show", "{root}/world"], "no lmforge.json"),
        (["card", "{root}/nope"], "no such directory"),
        (["card", "{root}/sft", "--license", "Apache 2.0"], "expected a Hugging Face license id"),
        (["card", "{root}/sft", "--out", "{root}/no/dir/README.md"], "does not exist"),
        (["runs", "list", "{root}/nope"], "no such directory"),
        (["runs", "lineage", "{root}/sft", "--png", "{root}/no/dir/g.png"], "does not exist"),
    ],
)
def test_bad_input_exits_2(chain, args, message):
    result = runner.invoke(app, [a.format(root=chain) for a in args])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in " ".join(result.stderr.split()), result.stderr


def test_card_refuses_bad_evals_and_a_foreign_readme(copy):
    adapter = copy / "sft" / "adapter"
    (adapter / "README.md").write_text("# my notes\n")
    result = runner.invoke(app, ["card", str(copy / "sft")])
    assert result.exit_code == 2 and "not written by lmforge card" in result.stderr
    assert (adapter / "README.md").read_text() == "# my notes\n"
    assert runner.invoke(app, ["card", str(copy / "sft"), "--overwrite"]).exit_code == 0
    (adapter / "evals").mkdir()
    (adapter / "evals" / "bad.json").write_text(
        json.dumps({"task": "qa", "metrics": {"exact": {"value": "high"}}})
    )
    result = runner.invoke(app, ["card", str(copy / "sft")])
    assert result.exit_code == 2 and "bad.json: metric 'exact' has no numeric 'value'" in result.stderr
    run_only = copy / "half"
    run_only.mkdir()
    (run_only / "config.yaml").write_text("train: {}\n")
    result = runner.invoke(app, ["runs", "lineage", str(run_only)])
    assert result.exit_code == 2 and "a run directory without a finished output" in result.stderr
