"""Preference pairs keep their subset (`subset`, else `rejected_kind`) as a label per pair, named in the manifest;
pairs without one are prepared exactly as before."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from lmforge.data.dataset import PreparedDataset
from lmforge.data.prepare import PrepareConfig, prepare
from lmforge.data.synthetic import WorldSizes, synthesize
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny synthetic world's preferences.jsonl, and a small BPE trained on it."""
    root = tmp_path_factory.mktemp("world")
    prefs = Path(synthesize(root / "world", sizes=WorldSizes.tiny())["out"]) / "preferences.jsonl"
    records = [json.loads(line) for line in prefs.read_text().splitlines()]
    texts = [r[k] for r in records for k in ("prompt", "chosen", "rejected")]
    return prefs, train_tokenizer(texts, "bpe", 400, root / "tok")


def run(src: Path, tok: Path, out: Path, **kw) -> dict:
    return prepare(
        PrepareConfig(inputs=[src], tokenizer=tok, **{"num_proc": 1, "val_fraction": 0.3, **kw}), out
    )


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_the_worlds_pairs_keep_their_rejected_kind(tmp_path, world):
    prefs, tok_dir = world
    records = [json.loads(line) for line in prefs.read_text().splitlines()]
    # shards of ~3 pairs: labels of several shards are renumbered to the sorted ids
    manifest = run(prefs, tok_dir, tmp_path / "out", shard_tokens=300)
    assert manifest["subsets"] == {"0": "terse", "1": "unsafe", "2": "wrong"} and manifest["labels"] is None
    assert len(manifest["splits"]["train"]["shards"]) > 1

    ds, tok = PreparedDataset(tmp_path / "out", verify=True), Tokenizer.from_dir(tok_dir)
    seen: Counter[str] = Counter()
    for split in ("train", "val"):
        chosen, rejected = ds.documents(split, "chosen"), ds.documents(split, "rejected")
        for c, r in zip(chosen, rejected, strict=True):
            assert c.label == r.label is not None
            name = manifest["subsets"][str(c.label)]
            text_c, text_r = tok.decode(c.ids.tolist()), tok.decode(r.ids.tolist())
            (record,) = [x for x in records if x["chosen"] in text_c and x["rejected"] in text_r]
            assert name == record["rejected_kind"]  # each pair's own subset, not just the right counts
            seen[name] += 1
    assert seen == Counter(r["rejected_kind"] for r in records)


def test_pairs_without_a_subset_are_prepared_as_before(tmp_path, world):
    prefs, tok_dir = world
    records = [json.loads(line) for line in prefs.read_text().splitlines()]
    plain = write_jsonl(tmp_path / "plain" / "preferences.jsonl",
                        [{k: v for k, v in r.items() if k != "rejected_kind"} for r in records])  # fmt: skip
    with_subsets = run(prefs, tok_dir, tmp_path / "subsets")
    without = run(plain, tok_dir, tmp_path / "plain_out")
    assert "subsets" not in without and without["labels"] is None
    assert not list((tmp_path / "plain_out").rglob("*.labels.npy"))
    assert all(d.label is None for d in PreparedDataset(tmp_path / "plain_out").documents("train", "chosen"))
    # the chosen and rejected columns are byte for byte the same with or without subsets
    for split in ("train", "val"):
        for a, b in zip(
            with_subsets["splits"][split]["shards"], without["splits"][split]["shards"], strict=True
        ):
            assert {k: v for k, v in a["files"].items() if not k.endswith(".labels.npy")} == b["files"]
            assert any(k.endswith(".labels.npy") for k in a["files"])


def test_subset_wins_over_rejected_kind_and_is_checked(tmp_path, world):
    _, tok_dir = world
    pair = {"prompt": "Is the sky blue?", "chosen": "Yes, on a clear day.", "rejected": "No."}
    src = write_jsonl(tmp_path / "a" / "p.jsonl", [
        {**pair, "subset": "zeta", "rejected_kind": "terse"},
        {**pair, "prompt": "Is grass green?", "subset": "alpha"},
        {**pair, "prompt": "Is snow white?", "subset": None, "rejected_kind": "terse"},
    ])  # fmt: skip
    manifest = run(src, tok_dir, tmp_path / "out", val_fraction=0.0)
    assert manifest["subsets"] == {"0": "alpha", "1": "terse", "2": "zeta"}
    labels = [d.label for d in PreparedDataset(tmp_path / "out").documents("train", "rejected")]
    assert labels == [2, 0, 1]

    bad = write_jsonl(tmp_path / "b" / "p.jsonl", [{**pair, "subset": 3}])
    with pytest.raises(LmforgeError, match=rf"{bad}:1: field 'subset' is int 3; expected the name"):
        run(bad, tok_dir, tmp_path / "bad")
    mixed = write_jsonl(tmp_path / "c" / "p.jsonl", [{**pair, "subset": "x"}, {**pair, "prompt": "Why?"}])
    with pytest.raises(LmforgeError, match=r"names no subset \(subset or rejected_kind\) but pair .* does"):
        run(mixed, tok_dir, tmp_path / "mixed")
    second = write_jsonl(tmp_path / "d" / "p.jsonl", [{**pair, "prompt": "Why?"}])
    with pytest.raises(LmforgeError, match=rf"{second}: some preference pairs name their subset"):
        prepare(PrepareConfig(inputs=[src, second], tokenizer=tok_dir, num_proc=1), tmp_path / "two")
