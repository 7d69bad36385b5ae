"""`data prepare`: shards that decode back to the inputs, masks, labels, manifest, cache, atomicity, governance."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from lmforge.data.dataset import PreparedDataset, inspect_dataset, mask_segments
from lmforge.data.governance import normalize
from lmforge.data.prepare import PrepareConfig, prepare
from lmforge.data.readers import read_records
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer, train_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "All that glitters is not gold; all who wander are not lost.",
    "Write to alice@example.com or call +44 20 7946 0958 for details.",
] * 20


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE with lmforge's chat template, trained on the test corpus."""
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(CORPUS, "bpe", 400, out)
    return out


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


def run(
    tmp_path: Path, tokenizer_dir: Path, inputs: list[Path], name: str = "out", **kw
) -> tuple[dict, Path]:
    cfg = PrepareConfig(inputs=inputs, tokenizer=tokenizer_dir, **{"num_proc": 1, **kw})
    return prepare(cfg, tmp_path / name, overwrite=True), tmp_path / name  # tests rebuild in place


def decoded_docs(out: Path, tok: Tokenizer, column: str = "tokens") -> list[str]:
    ds = PreparedDataset(out)
    return [tok.decode(d.ids.tolist()) for split in ("train", "val") for d in ds.documents(split, column)]


def test_text_shards_decode_back_to_the_documents(tmp_path, tokenizer_dir):
    docs = [f"Document number {i}. " + CORPUS[i % 4] for i in range(200)]
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(docs) + "\n")
    (tmp_path / "LICENSE").write_text("MIT License\n\nCopyright ...\n")
    manifest, out = run(tmp_path, tokenizer_dir, [src], val_fraction=0.2, pii="off", dedup="off")
    tok = Tokenizer.from_dir(tokenizer_dir)

    assert manifest["kind"] == "text" and manifest["dtype"] == "uint16" and not manifest["cache_hit"]
    (info,) = manifest["inputs"]
    assert info["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert (info["format"], info["records"], info["examples"], info["licence"]) == (
        "text",
        200,
        200,
        "MIT License",
    )
    assert manifest["tokenizer"]["hash"] == tok.hash
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["documents"] + val["documents"] == 200 and 20 <= val["documents"] <= 60

    eos = tok.decode([tok.eos_id])
    assert sorted(d.removesuffix(eos) for d in decoded_docs(out, tok)) == sorted(docs)
    for split in ("train", "val"):
        ds = PreparedDataset(out)
        assert ds.lengths(split).sum() == manifest["splits"][split]["tokens"]
        for shard in manifest["splits"][split]["shards"]:
            for name, digest in shard["files"].items():
                assert hashlib.sha256((out / split / name).read_bytes()).hexdigest() == digest

    # Same inputs and config: reused. Another config: rebuilt, with another id.
    again, _ = run(tmp_path, tokenizer_dir, [src], val_fraction=0.2, pii="off", dedup="off")
    assert again["cache_hit"] and again["id"] == manifest["id"]
    other, _ = run(tmp_path, tokenizer_dir, [src], val_fraction=0.3, pii="off", dedup="off")
    assert not other["cache_hit"] and other["id"] != manifest["id"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dirs left


def test_shards_end_after_the_document_that_reaches_shard_tokens(tmp_path, tokenizer_dir):
    docs = [f"Document {i}. " + " ".join(CORPUS[: 1 + i % 4]) for i in range(120)]
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(docs) + "\n")
    manifest, out = run(
        tmp_path, tokenizer_dir, [src], val_fraction=0.0, pii="off", dedup="off", shard_tokens=300
    )
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 5
    tok = Tokenizer.from_dir(tokenizer_dir)
    seen = []
    for shard in shards:
        stem = next(iter(shard["files"])).split(".")[0]
        offsets = np.load(out / "train" / f"{stem}.tokens.docs.npy")
        ids = np.fromfile(out / "train" / f"{stem}.tokens.bin", dtype=np.uint16)
        assert len(offsets) == shard["documents"] + 1 and offsets[-1] == len(ids)
        if shard is not shards[-1]:
            assert offsets[-1] >= 300 > offsets[-2]  # whole documents, cut after the one that reaches the cap
        seen += [tok.decode(ids[a:b].tolist()) for a, b in itertools.pairwise(offsets)]
    assert [d.removesuffix(tok.decode([tok.eos_id])) for d in seen] == docs  # in input order


def test_split_is_deterministic_and_worker_count_does_not_matter(tmp_path, tokenizer_dir):
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"Line {i}?"},
                {"role": "assistant", "content": CORPUS[i % 4]},
            ]
        }
        for i in range(1500)
    ]
    src = write(tmp_path / "c.jsonl", chats)
    one, _ = run(tmp_path, tokenizer_dir, [src], "one", pii="off")
    two, _ = run(tmp_path, tokenizer_dir, [src], "two", pii="off", num_proc=2)
    assert one["splits"] == two["splits"]  # same shards, same sha256s
    assert 0 < one["splits"]["val"]["documents"] < 150
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"Line {i}: {CORPUS[i % 4]}" for i in range(1500)))
    one, _ = run(tmp_path, tokenizer_dir, [text], "t1", num_proc=1, dedup="near")
    two, _ = run(tmp_path, tokenizer_dir, [text], "t2", num_proc=2, dedup="near")
    assert one["splits"] == two["splits"] and one["governance"] == two["governance"]


def test_in_val_is_the_salted_hash_split_text_by_text():
    """The batched split equals its definition: text i is in validation when blake2b(text, salt=seed) / 2**64 <
    fraction (also at fractions 0 and 1, and at a fraction equal to one text's own hash value)."""
    from lmforge.data.workers import in_val

    texts = [f"doc {i} " + "é" * (i % 7) for i in range(500)] + ["", "same", "same"]

    def definition(text: str, fraction: float, seed: int) -> bool:
        digest = hashlib.blake2b(text.encode(), digest_size=8, salt=seed.to_bytes(8, "little")).digest()
        return int.from_bytes(digest, "little") / 2**64 < fraction

    edge = int.from_bytes(hashlib.blake2b(b"doc 7 ", digest_size=8, salt=bytes(8)).digest(), "little") / 2**64
    for fraction, seed in [(0.0, 0), (1.0, 0), (0.1, 0), (0.37, 12345), (edge, 0)]:
        got = in_val(texts, fraction, seed)
        assert got.dtype == bool and got.tolist() == [definition(t, fraction, seed) for t in texts]
    assert in_val([], 0.5, 0).shape == (0,)


def test_chat_masks_cover_exactly_the_assistant_replies(tmp_path, tokenizer_dir):
    chats = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Say {i}."},
                {"role": "assistant", "content": f"Number {i}."},
            ]
        }
        for i in range(30)
    ]
    manifest, out = run(tmp_path, tokenizer_dir, [write(tmp_path / "chat.jsonl", chats)], val_fraction=0.0)
    assert manifest["kind"] == "chat" and manifest["inputs"][0]["format"] == "messages"
    tok = Tokenizer.from_dir(tokenizer_dir)
    replies = []
    for doc in PreparedDataset(out).documents("train"):
        assert doc.mask is not None and doc.mask.sum() > 0
        replies.append("".join(text for text, trained in mask_segments(tok, doc.ids, doc.mask) if trained))
    assert sorted(replies) == sorted(f"Number {i}.<|im_end|>" for i in range(30))
    assert manifest["splits"]["train"]["masked_tokens"] == sum(len(tok.encode(r)) for r in replies)


def test_classification_labels_follow_the_label_map(tmp_path, tokenizer_dir):
    (tmp_path / "categories.json").write_text(json.dumps(["greeting", "farewell"]))
    src = tmp_path / "train.csv"
    src.write_text("text,category\n" + "".join(f"hello {i},greeting\nbye {i},farewell\n" for i in range(10)))
    manifest, out = run(tmp_path, tokenizer_dir, [src], val_fraction=0.0)
    assert manifest["kind"] == "classification"
    tok = Tokenizer.from_dir(tokenizer_dir)
    pairs = {
        (tok.decode(d.ids.tolist(), skip_special_tokens=True).strip(), d.label)
        for d in PreparedDataset(out).documents("train")
    }
    assert ("hello 3", 0) in pairs and ("bye 7", 1) in pairs and len(pairs) == 20


def test_bad_record_names_file_and_line_and_leaves_nothing(tmp_path, tokenizer_dir):
    good = {"text": "fine"}
    src = write(tmp_path / "bad.jsonl", [good, good, "{not json", good])
    with pytest.raises(LmforgeError, match=r"bad\.jsonl.*3"):
        run(tmp_path, tokenizer_dir, [src])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no output, no temp dir

    manifest, out = run(tmp_path, tokenizer_dir, [src], skip_bad=True, dedup="off", val_fraction=0.0)
    assert manifest["rejected"] == 1 and manifest["splits"]["train"]["documents"] == 3
    (reject,) = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert reject["raw"].startswith("{not json") and "3" in reject["where"]


@pytest.mark.parametrize("num_proc", [1, 2])
def test_empty_text_file_is_named_and_leaves_nothing(tmp_path, tokenizer_dir, num_proc):
    good = tmp_path / "good.txt"
    good.write_text("a document\n\nanother\n")
    for name, content in [("empty.txt", ""), ("blank.txt", "\n  \n\t\n")]:
        (tmp_path / name).write_text(content)
        with pytest.raises(LmforgeError, match=rf"{name}: no records \(empty file\?\)"):
            run(tmp_path, tokenizer_dir, [good, tmp_path / name], num_proc=num_proc)
        assert not (tmp_path / "out").exists()


def test_failed_prepare_keeps_the_previous_output(tmp_path, tokenizer_dir):
    src = write(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    first, out = run(tmp_path, tokenizer_dir, [src])
    write(src, [{"text": "one"}, "{broken"])
    with pytest.raises(LmforgeError):
        run(tmp_path, tokenizer_dir, [src])
    assert PreparedDataset(out).id == first["id"]


def test_governance_pii_dedup_and_contamination(tmp_path, tokenizer_dir):
    docs = [{"text": t} for t in CORPUS[:4]] + [{"text": "the QUICK brown  fox jumps over the lazy dog."}]
    docs += [{"text": "Unrelated words that appear in the benchmark question about apples and pears today."}]
    src = write(tmp_path / "train.jsonl", docs)
    evals = write(
        tmp_path / "eval.jsonl",
        [{"text": "Q: words that appear in the benchmark question about apples and pears today?"}],
    )
    # dedup_min_chars=0: the duplicate here is a short one, which the default would keep
    manifest, out = run(
        tmp_path, tokenizer_dir, [src], pii="mask", dedup="exact", val_fraction=0.0, dedup_min_chars=0,
        eval_sets={"bench": [evals]}, contamination_ngram=8, decontaminate=True,
    )  # fmt: skip
    gov = manifest["governance"]
    assert gov["pii"]["found"] == {"email": 1, "phone": 1}
    assert gov["dedup"]["dropped"] == {"exact": 1}
    assert gov["contamination"]["decontaminated"] is True
    texts = decoded_docs(out, Tokenizer.from_dir(tokenizer_dir))
    assert manifest["splits"]["train"]["documents"] == 4 == len(texts)
    assert any("<EMAIL>" in t and "<PHONE>" in t for t in texts)
    assert not any("alice@example.com" in t or "apples" in t for t in texts)


@pytest.mark.parametrize("dedup", ["exact", "near"])
def test_short_duplicates_are_kept_and_counted(tmp_path, tokenizer_dir, dedup):
    long = "A journey of a thousand miles begins with a single step, then another step, and another after it, all day."
    assert len(normalize(long)) >= 100 > len(normalize("GLOUCESTER:"))  # the default dedup_min_chars
    docs = ["GLOUCESTER:", long, *CORPUS[:3], "Gloucester", long.upper(), "GLOUCESTER:"]
    src = write(tmp_path / "play.jsonl", [{"text": t} for t in docs])
    manifest, out = run(tmp_path, tokenizer_dir, [src], dedup=dedup, val_fraction=0.0, pii="off")
    report = manifest["governance"]["dedup"]
    assert report["dropped"] == {"exact": 1} and report["kept_short"] == 2
    assert report["report"]["min_chars"] == 100 and report["report"]["kept"] == 7
    texts = decoded_docs(out, Tokenizer.from_dir(tokenizer_dir))
    assert [t.removesuffix("<|end_of_text|>") for t in texts] == docs[:6] + docs[7:]
    # 0 dedups every document, the short ones too
    kw = {"dedup": dedup, "val_fraction": 0.0, "pii": "off", "dedup_min_chars": 0}
    report = run(tmp_path, tokenizer_dir, [src], **kw)[0]["governance"]["dedup"]
    assert report["dropped"] == {"exact": 3} and report["kept_short"] == 0


def test_prepare_config_ranges():
    PrepareConfig(seed=2**64 - 1, dedup_min_chars=0)
    for field, value in [("seed", -1), ("seed", 2**64), ("dedup_min_chars", -1)]:
        with pytest.raises(ValidationError, match=field):
            PrepareConfig(**{field: value})


def test_inspect_dataset_summary_and_samples(tmp_path, tokenizer_dir):
    src = write(tmp_path / "t.jsonl", [{"text": f"Sample text {i}."} for i in range(12)])
    manifest, out = run(tmp_path, tokenizer_dir, [src], val_fraction=0.0)
    info = inspect_dataset(out, samples=2)
    assert info["id"] == manifest["id"] and info["splits"]["train"]["documents"] == 12
    assert sum(b["documents"] for b in info["length_histogram"]) == 12
    assert len(info["samples"]) == 2 and info["samples"][0]["segments"][0][1] is True


def test_every_shared_dataset_prepares(tmp_path, shared_data, tokenizer_dir):
    cases = {
        "tinyshakespeare/input.txt": "text",
        "self_instruct_seed/seed_tasks.jsonl": "chat",
        "gsm8k/test.jsonl": "chat",
        "banking77/test.csv": "classification",
        "hh_rlhf/harmless_base_test.jsonl": "preference",
    }
    for rel, kind in cases.items():
        manifest, out = run(tmp_path, tokenizer_dir, [shared_data / rel], rel.split("/")[0], num_proc=2)
        assert manifest["kind"] == kind, rel
        if kind == "text":  # TinyShakespeare's 69 repeated speeches ("GLOUCESTER:") are short: all kept
            dedup = manifest["governance"]["dedup"]
            assert dedup["dropped"] == {} and dedup["kept_short"] == 69
        assert manifest["inputs"][0]["licence"], rel
        ds = PreparedDataset(out)
        n_docs = sum(manifest["splits"][s]["documents"] for s in ("train", "val"))
        assert n_docs == sum(1 for s in ("train", "val") for _ in ds.documents(s, ds.columns()[0])) > 0
        if kind == "preference":
            assert len(ds.lengths("train", "chosen")) == len(ds.lengths("train", "rejected"))
    records = sum(1 for _ in read_records(shared_data / "banking77/test.csv"))
    assert records == 2772
    assert np.dtype(PreparedDataset(tmp_path / "banking77").manifest["dtype"]) == np.uint16
