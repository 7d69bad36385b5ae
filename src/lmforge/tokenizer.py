"""Tokenizers: train byte-level BPE or WordPiece, load any HF `tokenizer.json` directory, measure one.

lmforge's BPE special tokens take the first ids, in this order: `<|pad|>` 0, `<|unk|>` 1, `<|begin_of_text|>` 2
(bos), `<|end_of_text|>` 3 (eos), `<|im_start|>` 4, `<|im_end|>` 5. Byte-level BPE never emits `<|unk|>`; it
exists because HF configs and stats expect an unk token. WordPiece (BERT) uses `[PAD]` 0, `[UNK]` 1, `[CLS]` 2,
`[SEP]` 3, `[MASK]` 4. Pad is never eos, so padding can never hide the token that teaches a model to stop.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write, staging_dir
from lmforge.paths import check_output, require_dir

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.txt",
    "tokenizer.model",
)
"""The files of a HF tokenizer that travel with a model directory."""


def copy_tokenizer(source: Path, model_dir: Path) -> list[str]:
    """Copy the tokenizer files of `source` beside a model's weights in `model_dir`; returns their names."""
    import shutil

    copied = [name for name in TOKENIZER_FILES if (Path(source) / name).exists()]
    for name in copied:
        shutil.copy2(Path(source) / name, Path(model_dir) / name)
    return copied


BPE_SPECIAL = {
    "pad_token": "<|pad|>",
    "unk_token": "<|unk|>",
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|end_of_text|>",
}
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
WORDPIECE_SPECIAL = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
MAX_LENGTH = {"bpe": 2048, "wordpiece": 512}
# The GPT-4 / Llama-3 split: digits in groups of at most three, case-insensitive contractions, newlines apart.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eot|>", "<|end|>", "<end_of_turn>")
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
HASHED_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _bpe_backend() -> Backend:
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    bos = BPE_SPECIAL["bos_token"]
    # No ByteLevel post-processor: offsets stay untrimmed, so chat spans map onto tokens whitespace included.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, 2)]
    )
    return tok


def _wordpiece_backend() -> Backend:
    tok = Backend(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return tok


def train_tokenizer(
    texts: Iterable[str],
    kind: Literal["bpe", "wordpiece"],
    vocab_size: int,
    out: Path,
    *,
    min_frequency: int = 2,
    model_max_length: int | None = None,
    show_progress: bool = False,
    inputs: Sequence[Path | str] = (),
    overwrite: bool = False,
) -> Path:
    """Train a byte-level BPE (decoders) or WordPiece (BERT) tokenizer on `texts` and save an HF directory.

    `inputs` are the files `texts` come from (`out` must lie apart from them); a tokenizer already in `out` is
    replaced only with `overwrite`, once the new one is written whole.
    """
    from lmforge.chat import DEFAULT_CHAT_TEMPLATE  # chat.py imports this module

    out = Path(out)
    check_output(out, "tokenizer", inputs=inputs, overwrite=overwrite)  # before reading a single text

    common = {"vocab_size": vocab_size, "min_frequency": min_frequency, "show_progress": show_progress}
    if kind == "bpe":
        named, tokens, tok = BPE_SPECIAL, [*BPE_SPECIAL.values(), *CHAT_TOKENS], _bpe_backend()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(special_tokens=tokens, initial_alphabet=alphabet, **common)
        smallest = len(tokens) + len(alphabet)
    elif kind == "wordpiece":
        named, tokens, tok = WORDPIECE_SPECIAL, list(WORDPIECE_SPECIAL.values()), _wordpiece_backend()
        trainer = trainers.WordPieceTrainer(special_tokens=tokens, **common)
        smallest = len(tokens) + 1
    else:
        raise LmforgeError(f"tokenizer kind {kind!r}: expected 'bpe' or 'wordpiece'")
    if vocab_size < smallest:
        raise LmforgeError(f"vocab size {vocab_size} for {kind}: expected at least {smallest}")

    texts = iter(texts)
    first = next((text for text in texts if text), None)  # fail before training, not after
    if first is None:
        raise LmforgeError("tokenizer training text is empty: expected at least one non-empty document")
    corpus: Counter[str] = Counter()  # documents and characters, for the warning of a short vocabulary
    tok.train_from_iterator(_counted(itertools.chain([first], texts), corpus), trainer=trainer)
    assert tok.token_to_id(named["pad_token"]) != tok.token_to_id(named.get("eos_token", "")), "pad is eos"
    if tok.get_vocab_size() < vocab_size:
        log.warning(_short_vocabulary(tok.get_vocab_size(), vocab_size, min_frequency, corpus))

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "model_max_length": model_max_length or MAX_LENGTH[kind],
        "clean_up_tokenization_spaces": False,
    }
    if kind == "bpe":
        config["chat_template"] = DEFAULT_CHAT_TEMPLATE
    else:  # BERT's segment ids, which transformers returns only for the inputs a config names
        config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    with staging_dir(out) as tmp:
        atomic_write(tmp / "tokenizer.json", tok.to_str(pretty=True))
        atomic_write(tmp / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        atomic_write(tmp / "special_tokens_map.json", json.dumps(named, indent=2) + "\n")
    log.info("trained %s tokenizer: %d ids -> %s", kind, tok.get_vocab_size(), out)
    return out


def _counted(texts: Iterator[str], corpus: Counter[str]) -> Iterator[str]:
    for text in texts:
        corpus["documents"] += 1
        corpus["characters"] += len(text)
        yield text


def _short_vocabulary(got: int, asked: int, min_frequency: int, corpus: Counter[str]) -> str:
    """Why training stopped short of `asked` ids: no pair of adjacent tokens left that occurs `min_frequency` times
    (with 1, none left at all: every word of the corpus is a single token)."""
    size = f"{corpus['documents']:,} documents, {corpus['characters']:,} characters"
    if min_frequency <= 1:
        cause = f"every pair of adjacent tokens is merged: the corpus ({size}) is too small for {asked} ids"
        advice = "give more text or ask for a smaller --vocab-size"
    else:
        cause = (
            f"no pair of adjacent tokens is left that occurs at least {min_frequency} times (min_frequency) "
            f"in the corpus ({size}): it is too small for {asked} ids at this min_frequency"
        )
        advice = "give more text, ask for a smaller --vocab-size, or lower --min-frequency"
    return f"the tokenizer has {got} ids, fewer than the {asked} asked for: {cause}; {advice}"


def read_lines(files: Sequence[Path | str]) -> Iterator[str]:
    """Stream the lines (newline kept) of UTF-8 text files; a bad file is an LmforgeError naming it."""
    for file in map(Path, files):
        if not file.is_file():
            raise LmforgeError(f"{file}: no such file (expected a UTF-8 text file)")
        with open(file, "rb") as f:  # bytes, decoded per line, so a bad byte is reported on its own line
            for line_no, raw in enumerate(f, start=1):
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise LmforgeError(f"{file}: line {line_no} is not valid UTF-8 ({e.reason})") from None


def train_tokenizer_files(
    files: Sequence[Path | str], kind: Literal["bpe", "wordpiece"], vocab_size: int, out: Path, **kwargs: Any
) -> Path:
    """`train_tokenizer` on plain-text files read line by line (JSONL etc.: pass `read_records` texts instead)."""
    return train_tokenizer(read_lines(files), kind, vocab_size, out, **kwargs)


def _token_content(value: Any) -> str | None:
    # Configs store a special token as a string or as a serialised AddedToken ({"content": ...}).
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path}: not valid JSON ({e})") from None


class Tokenizer:
    """A loaded HF tokenizer directory: the Rust backend plus its special tokens and chat template.

    Attributes: `vocab_size` (ids, added tokens included: the embedding rows a model needs), `bos_id`,
    `eos_id`, `pad_id`, `unk_id`, `bos_token`, `eos_token` (None when absent), `eot_ids` (ids that end an
    assistant turn: eos plus `<|im_end|>`, `<|eot_id|>`, ... when present), `special_tokens` (name -> text,
    what chat templates see), `chat_template`, `hash` (sha256 of the files that define the ids).
    """

    def __init__(
        self, backend: Backend, config: dict[str, Any], path: Path | None = None, hash: str = ""
    ) -> None:
        self.backend, self.config, self.path, self.hash = backend, config, path, hash
        backend.no_truncation()  # some tokenizer.json files ship fixed truncation/padding (MiniLM: 128)
        backend.no_padding()
        self.special_tokens: dict[str, str] = {}
        for name in NAMED_TOKENS:
            if (content := _token_content(config.get(name))) is not None:
                self.special_tokens[name] = content
        token = self.special_tokens.get
        self.bos_token, self.eos_token = token("bos_token"), token("eos_token")
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (
            None if token(name) is None else backend.token_to_id(token(name))
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        )
        eot = {self.eos_id, *(backend.token_to_id(t) for t in END_OF_TURN_TOKENS)}
        self.eot_ids: list[int] = sorted(i for i in eot if i is not None)
        self.vocab_size: int = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        template = config.get("chat_template")
        if isinstance(template, list):  # the older multi-template layout: [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in template}.get("default")
        self.chat_template: str | None = template
        if self.pad_id is not None and self.pad_id == self.eos_id:
            log.warning("%s: pad is the eos token; lmforge masks padding by length, not by pad id", path)
        added = [t.content for t in backend.get_added_tokens_decoder().values()]
        # Texts that spell an added token are left to the backend, which matches added tokens before the BPE.
        self._added_re = re.compile("|".join(map(re.escape, added))) if added else None
        # The bulk encoders (fast_bpe.fastokens_encoder, fast_bpe.cached_tiktoken_encoding): ... = not loaded yet.
        self._bulk: Any = None if path is None else ...
        self._fast: Any = None if path is None else ...

    @classmethod
    def from_dir(cls, path: Path | str) -> Tokenizer:
        """Load `tokenizer.json` (+ `tokenizer_config.json`, `special_tokens_map.json`, `chat_template.jinja`)."""
        path = require_dir(path, "a Hugging Face tokenizer directory (with tokenizer.json)", "tokenizer.json")
        try:
            backend = Backend.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the Rust loader raises a bare Exception
            raise LmforgeError(f"{path / 'tokenizer.json'}: not a valid tokenizers file ({e})") from None
        config = _read_json(path / "tokenizer_config.json")
        if "added_tokens_decoder" not in config:  # as transformers: the legacy map then overrides the config
            config.update(_read_json(path / "special_tokens_map.json"))
        if (path / "chat_template.jinja").is_file():  # what transformers 5 saves; it wins over the config's
            config["chat_template"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
        h = hashlib.sha256()
        for name in HASHED_FILES:
            if (path / name).is_file():
                h.update(f"{name}\0".encode() + (path / name).read_bytes() + b"\0")
        return cls(backend, config, path, h.hexdigest())

    def token_to_id(self, token: str) -> int | None:
        """The id of `token`, or None when it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` (what `transformers` gives with the same `add_special_tokens`)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_pair(self, a: str, b: str) -> tuple[list[int], list[int]]:
        """(ids, token type ids) of a sentence pair with the post-processor's specials (BERT: [CLS] A [SEP] B [SEP])."""
        enc = self.backend.encode(a, b, add_special_tokens=True)
        return enc.ids, enc.type_ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of many texts (as `encode` of each): see `encode_many`."""
        ids, offsets = self.encode_many(texts, add_special_tokens)
        flat, ends = ids.tolist(), offsets.tolist()
        return [flat[a:b] for a, b in itertools.pairwise(ends)]

    def encode_many(
        self, texts: Sequence[str], add_special_tokens: bool = False, end_id: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of many texts as one integer array (uint32 or int64) and int64 offsets: text i is
        ids[offsets[i]:offsets[i + 1]], with `end_id` (e.g. EOS) appended to each when given.

        The hot path of `data prepare`, through the fastest engine that gives exactly the backend's ids (each
        checked when loaded, see `fast_bpe`): fastokens' flat batch; else tiktoken's BPE on all the texts joined by
        a special token in one call (tiktoken splits at special tokens before its regex, so each text is encoded
        alone; one call instead of one per text saves a third of the time on short documents; joined by `end_id`'s
        own token, its output is the answer as it comes); else the Rust backend's batch."""
        if (bulk := self._bulk_encoder()) is not None:
            from lmforge.fast_bpe import flat_batch

            ids, offsets = flat_batch(bulk, texts, add_special_tokens)
            return (ids, offsets) if end_id is None else insert_each(ids, offsets, end_id, at_end=True)
        fast = None if add_special_tokens else self._fast_encoding()
        special = self._added_re
        tail = [] if end_id is None else [end_id]
        if fast is None:
            encoded = self.backend.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)
            return flat_ids([e.ids + tail for e in encoded])
        specials = {fast.encode_single_token(t): t for t in fast.special_tokens_set}
        if texts and specials and not (special is not None and special.search("\n".join(texts))):
            sep_id = end_id if end_id in specials else min(specials)
            sep = specials[sep_id]
            joined = sep.join(texts) + sep
            ids = fast.encode_to_numpy(joined, allowed_special={sep}, disallowed_special=())  # uint32
            # One separator per text, as ordinary BPE never yields a special token's id; else (a text ending in a
            # part of `sep` that made another special token) the texts are encoded one by one below.
            ends = np.flatnonzero(ids == sep_id)
            if len(ends) == len(texts):
                offsets = np.zeros(len(texts) + 1, dtype=np.int64)
                if end_id is not None:  # each separator becomes the end id, unless it already is
                    if sep_id != end_id:
                        ids = ids.copy()  # tiktoken's array is a read-only view
                        ids[ends] = end_id
                    offsets[1:] = ends + 1
                    return ids, offsets
                offsets[1:] = ends - np.arange(len(texts))  # text i ends at ends[i], after i separators
                return np.delete(ids, ends), offsets
        # Texts that spell an added token are left to the backend, which matches added tokens before the BPE.
        lists = [
            self.encode(t) if special is not None and special.search(t) else fast.encode_ordinary(t)
            for t in texts
        ]
        return flat_ids([ids + tail for ids in lists])

    def _bulk_encoder(self) -> Any:
        if self._bulk is ...:
            from lmforge.fast_bpe import fastokens_encoder

            self._bulk = fastokens_encoder(self.path / "tokenizer.json", self.backend)
        return self._bulk

    def _fast_encoding(self) -> Any:
        if self._fast is ...:
            from lmforge.fast_bpe import cached_tiktoken_encoding

            self._fast = cached_tiktoken_encoding(self.path / "tokenizer.json", self.backend)
        return self._fast

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's (start, end) character span in `text`, without special tokens."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


def insert_each(
    ids: np.ndarray, offsets: np.ndarray, token: int, at_end: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, offsets) of many texts with `token` added to each, at its end or its start (one array operation)."""
    where = offsets[1:] if at_end else offsets[:-1]
    return np.insert(ids, where, token), offsets + np.arange(len(offsets))


def flat_ids(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids as one int64 array and offsets (list i is ids[offsets[i]:offsets[i + 1]])."""
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum([len(ids) for ids in lists], out=offsets[1:])
    return np.fromiter(itertools.chain.from_iterable(lists), np.int64, int(offsets[-1])), offsets


def tokenizer_stats(tokenizer: Tokenizer, texts: Iterable[str], batch_size: int = 1024) -> dict[str, Any]:
    """Bytes per token, tokens per word, unknown-token rate and vocabulary use of `tokenizer` on `texts`."""
    n_docs = n_bytes = n_words = n_tokens = n_unk = 0
    seen: set[int] = set()
    unk = tokenizer.unk_id

    def count(batch: list[str]) -> None:
        nonlocal n_tokens, n_unk
        for ids in tokenizer.encode_batch(batch):
            n_tokens += len(ids)
            n_unk += ids.count(unk) if unk is not None else 0
            seen.update(ids)

    batch: list[str] = []
    for text in texts:
        n_docs += 1
        n_bytes += len(text.encode("utf-8"))
        n_words += len(text.split())
        batch.append(text)
        if len(batch) == batch_size:
            count(batch)
            batch = []
    count(batch)
    return {
        "documents": n_docs,
        "bytes": n_bytes,
        "words": n_words,
        "tokens": n_tokens,
        "bytes_per_token": n_bytes / n_tokens if n_tokens else 0.0,
        "tokens_per_word": n_tokens / n_words if n_words else 0.0,
        "unknown_tokens": n_unk,
        "unknown_rate": n_unk / n_tokens if n_tokens else 0.0,
        "vocab_size": tokenizer.vocab_size,
        "vocab_used": len(seen),
        "vocab_use": len(seen) / tokenizer.vocab_size,
    }


def add_special_tokens(tokenizer_dir: Path, tokens: Sequence[str]) -> list[str]:
    """Add `tokens` missing from the vocabulary as special tokens to `tokenizer.json`; return those added.

    The vocabulary grows by the number added: a model trained with the old size needs its embeddings resized.
    """
    path = Path(tokenizer_dir) / "tokenizer.json"
    tok = Tokenizer.from_dir(tokenizer_dir)
    missing = [t for t in tokens if tok.token_to_id(t) is None]
    if missing:
        backend = Backend.from_file(str(path))  # as saved: keep the file's own padding/truncation settings
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        atomic_write(path, backend.to_str(pretty=True))
        log.warning(
            "%s: added special tokens %s (now %d ids)", tokenizer_dir, missing, backend.get_vocab_size()
        )
    return missing
