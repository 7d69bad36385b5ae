"""Raw data prepared on first use: the same shards as `data prepare`, cached by its fingerprint, reused, refused
clearly without a tokenizer or a cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import invoke

from lmforge.data import auto
from lmforge.data.auto import ensure_prepared
from lmforge.data.dataset import PreparedDataset
from lmforge.data.prepare import PrepareConfig, prepare
from lmforge.errors import LmforgeError
from lmforge.tokenizer import train_tokenizer

TOPICS = ["the tide", "a kettle", "the moon", "an old map", "the orchard", "a violin", "a fern", "a comet"]


def chats(n: int, salt: str = "") -> list[dict]:
    return [
        {"messages": [
            {"role": "user", "content": f"Tell me about {TOPICS[i % 8]}, please ({i}{salt})."},
            {"role": "assistant", "content": f"Here is fact {i}{salt} about {TOPICS[i % 8]}: it is lovely."},
        ]}
        for i in range(n)
    ]  # fmt: skip


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    """A small byte-level BPE with lmforge's chat template."""
    texts = [m["content"] for r in chats(40) for m in r["messages"]]
    return train_tokenizer(texts, "bpe", 300, tmp_path_factory.mktemp("tok"))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def columns(path: Path) -> list[tuple[list[int], list[int] | None]]:
    ds = PreparedDataset(path)
    return [
        (d.ids.tolist(), None if d.mask is None else d.mask.tolist())
        for split in ("train", "val")
        for d in ds.documents(split)
    ]


def test_a_raw_chat_file_becomes_what_data_prepare_writes(tmp_path, tok, cache, caplog):
    src = write_jsonl(tmp_path / "raw" / "chat.jsonl", chats(30))
    with caplog.at_level("INFO", logger="lmforge"):
        out = ensure_prepared(src, tokenizer=tok)
    assert out.parent == cache / "prepared" and any(str(out) in r.getMessage() for r in caplog.records)

    result = invoke("data", "prepare", src, "--tokenizer", tok, "--out", tmp_path / "cli")
    assert result.exit_code == 0, result.output
    ref = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    manifest = PreparedDataset(out).manifest
    # the cache key is the fingerprint `data prepare` computes, with its default settings
    assert out.name == manifest["fingerprint"] == ref["fingerprint"] and manifest["id"] == ref["id"]
    assert manifest["kind"] == "chat" and manifest["splits"]["train"]["documents"] > 0
    assert columns(out) == columns(tmp_path / "cli")
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no staging leftovers


def test_a_second_call_reuses_the_cache_and_a_changed_file_gets_a_new_key(
    tmp_path, tok, cache, monkeypatch, caplog
):
    src = write_jsonl(tmp_path / "chat.jsonl", chats(12))
    first = ensure_prepared(src, tokenizer=tok, num_proc=1)
    written = (first / "manifest.json").stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("prepared again")

    monkeypatch.setattr(auto, "prepare", refuse)
    with caplog.at_level("INFO", logger="lmforge"):
        assert ensure_prepared(str(src), tokenizer=tok, num_proc=1) == first
    assert "using cached prepared data" in caplog.text
    assert (first / "manifest.json").stat().st_mtime_ns == written

    monkeypatch.setattr(auto, "prepare", prepare)
    write_jsonl(src, chats(12, salt="b"))
    second = ensure_prepared(src, tokenizer=tok, num_proc=1)
    assert second != first and second.parent == first.parent and first.is_dir()
    # other settings are another dataset too
    assert ensure_prepared(src, tokenizer=tok, num_proc=1, val_fraction=0.5) not in (first, second)


def test_a_damaged_cached_copy_is_prepared_again(tmp_path, tok, cache):
    src = write_jsonl(tmp_path / "chat.jsonl", chats(12))
    out = ensure_prepared(src, tokenizer=tok, num_proc=1)
    shard = next((out / "train").glob("*.tokens.bin"))
    shard.write_bytes(shard.read_bytes()[:-2])
    assert ensure_prepared(src, tokenizer=tok, num_proc=1) == out
    PreparedDataset(out, verify=True)


def test_a_glob_of_files_is_one_dataset(tmp_path, tok, cache):
    write_jsonl(tmp_path / "a.jsonl", chats(10))
    write_jsonl(tmp_path / "b.jsonl", chats(10, salt="b"))
    out = ensure_prepared(tmp_path / "*.jsonl", tokenizer=tok, num_proc=1, val_fraction=0.0)
    manifest = PreparedDataset(out).manifest
    assert [Path(i["path"]).name for i in manifest["inputs"]] == ["a.jsonl", "b.jsonl"]
    assert manifest["splits"]["train"]["documents"] == 20 and manifest["splits"]["val"]["documents"] == 0
    with pytest.raises(LmforgeError, match=r"data\.dataset .*\*\.txt: no files match"):
        ensure_prepared(tmp_path / "*.txt", tokenizer=tok)


def test_a_prepared_dataset_passes_through(tmp_path, tok, cache):
    src = write_jsonl(tmp_path / "chat.jsonl", chats(8))
    prepare(PrepareConfig(inputs=[src], tokenizer=tok, num_proc=1), tmp_path / "ds")
    assert ensure_prepared(tmp_path / "ds", tokenizer=None) == tmp_path / "ds"
    assert ensure_prepared(str(tmp_path / "ds"), tokenizer=tok) == tmp_path / "ds"
    assert not cache.exists()


def test_without_a_tokenizer_or_a_cache_it_says_what_to_do(tmp_path, tok, cache, monkeypatch):
    src = write_jsonl(tmp_path / "chat.jsonl", chats(8))
    with pytest.raises(LmforgeError) as e:
        ensure_prepared(src, tokenizer=None, purpose="data.dataset")
    message = str(e.value)
    assert message.startswith(f"data.dataset {src} is not a prepared dataset")
    assert "give data.tokenizer" in message and "lmforge data prepare" in message

    monkeypatch.setenv("LMFORGE_CACHE", "off")
    with pytest.raises(LmforgeError, match=r"LMFORGE_CACHE=off.*lmforge data prepare.*enable the cache"):
        ensure_prepared(src, tokenizer=tok)
    with pytest.raises(LmforgeError, match=r"data\.dataset: .*missing\.jsonl: no such file"):
        ensure_prepared(tmp_path / "missing.jsonl", tokenizer=tok)
    assert not cache.exists()


def test_a_bad_record_gives_data_prepares_error_and_leaves_nothing(tmp_path, tok, cache):
    good = chats(6)
    src = write_jsonl(tmp_path / "chat.jsonl", [*good[:3], {"messages": "hello"}, *good[3:]])
    with pytest.raises(LmforgeError) as expected:
        prepare(PrepareConfig(inputs=[src], tokenizer=tok.resolve(), num_proc=1), tmp_path / "ref")
    assert f"{src}:4" in str(expected.value)
    with pytest.raises(LmforgeError) as e:
        ensure_prepared(src, tokenizer=tok, num_proc=1)
    assert str(e.value) == str(expected.value)
    assert not any((cache / "prepared").iterdir())


def test_options_are_prepare_config_fields(tmp_path, tok, cache):
    src = write_jsonl(tmp_path / "chat.jsonl", chats(8))
    with pytest.raises(LmforgeError, match="val_fraction"):
        ensure_prepared(src, tokenizer=tok, val_fraction=2.0)
    with pytest.raises(LmforgeError, match="val_fractoin"):
        ensure_prepared(src, tokenizer=tok, val_fractoin=0.1)
    assert np.all(PreparedDataset(ensure_prepared(src, tokenizer=tok, num_proc=1)).lengths() > 0)
