"""Fuzz: every reader and format detector, the config loader and `--set`, the chat-template renderer and
`generate`'s arguments, on generated input (hypothesis).

Each case ends in success or in one clear error, never a traceback, and leaves its input files byte-identical:
- a library call returns, or raises LmforgeError (pydantic's ValidationError where the API documents it) with a
  message;
- a CLI call exits 0, or 2 with stderr one `error: ...` line (or Click's own usage error, also exit 2), never 1.

The profile is bounded and reproducible (derandomized, no example database written); LMFORGE_FUZZ_EXAMPLES=5
runs five times the cases. The number of cases each target ran is printed at the end of the module.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import json
import math
import os
import re
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

# Hypothesis caches Unicode tables under .hypothesis/ even without an example database: not in the checkout.
os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "lmforge-hypothesis")
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from typer.testing import CliRunner

from lmforge.chat import DEFAULT_CHAT_TEMPLATE, render_chat, render_template
from lmforge.cli import app
from lmforge.config import config_fields, load_config
from lmforge.data.formats import FORMATS, detect_format, to_examples
from lmforge.data.prepare import PrepareConfig
from lmforge.data.readers import decode_chunk, iter_files, read_records, text_chunks, text_split
from lmforge.errors import LmforgeError
from lmforge.infer.prompts import read_prompts
from lmforge.infer.sampling import GenerationConfig, generation_config
from lmforge.model.configs import preset
from lmforge.model.hf import build_model, save_model
from lmforge.stages.configs import FinetuneConfig, PretrainConfig
from lmforge.tokenizer import Tokenizer, train_tokenizer

SCALE = float(os.environ.get("LMFORGE_FUZZ_EXAMPLES", "1"))
CASES: Counter[str] = Counter()  # cases run per target, printed when the module ends
ERRORS: Counter[str] = Counter()  # of those, the ones that ended in a clean error
runner = CliRunner()

settings.register_profile(
    "lmforge-fuzz",
    deadline=None,  # CLI cases take a second or so, and the first of each pays for imports
    derandomize=True,  # the same cases on every run: a CI failure reproduces
    database=None,  # no .hypothesis/ directory in the checkout
    suppress_health_check=list(HealthCheck),  # slow cases and module fixtures are intended
    print_blob=True,
)


def fuzz(n: int) -> settings:
    """The module's profile with `n` cases (times LMFORGE_FUZZ_EXAMPLES)."""
    return settings(settings.get_profile("lmforge-fuzz"), max_examples=max(1, round(n * SCALE)))


@pytest.fixture(scope="module", autouse=True)
def _report_cases(request):
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and CASES:  # None under xdist's workers, whose output is not shown
        counts = "\n".join(
            f"  {k}: {v} ({ERRORS[k]} ended in a clean error)" for k, v in sorted(CASES.items())
        )
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.write_line(f"\nfuzz cases run: {sum(CASES.values())}\n{counts}")


def digest(root: Path) -> dict[str, str]:
    """Every file under `root` with the sha256 of its bytes."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


_errored: set[str] = set()  # targets whose current case has ended in an error already


def start(target: str) -> None:
    """Count one case of `target`."""
    CASES[target] += 1
    _errored.discard(target)


def clean_error(e: BaseException, target: str) -> None:
    """`e` is a clean error: a message that says something."""
    if target not in _errored:
        ERRORS[target] += 1
        _errored.add(target)
    assert str(e).strip(), f"{type(e).__name__} with an empty message"
    assert "\n" not in str(e), f"a message of several lines (the CLI prints one): {e}"


def cli_ok(result, target: str, inputs: Path | None = None, before: dict | None = None) -> None:
    """A CLI call ended in success or one clean error line (exit 2), and left its inputs unchanged."""
    detail = f"exit {result.exit_code}\nstdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-3000:]}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(detail) from result.exception
    assert result.exit_code in (0, 2), detail
    assert "Traceback" not in result.stderr, detail
    if result.exit_code == 2:
        ERRORS[target] += 1
        lines = result.stderr.strip().split("\n")  # a terminal ends lines at \n only, not at U+2028
        usage = any(line.startswith("Usage:") for line in lines)  # Click's own: a bad flag value or option
        errors = [line for line in lines if line.startswith("error: ")]
        assert usage or (len(errors) == 1 and lines[-1].startswith("error: ")), detail
        assert usage or len(lines[-1]) > len("error: "), detail
    if inputs is not None:
        assert digest(inputs) == before, "the input files changed"


# --------------------------------------------------------------------------------- strategies

FIELD_NAMES = ["messages", "conversations", "prompt", "completion", "chosen", "rejected", "text", "label",
               "category", "instruction", "input", "output", "instances", "question", "answer", "id", "from",
               "value", "role", "content"]  # fmt: skip
ODD_TEXT = st.sampled_from(
    ["", " ", "\x00", "\ufeff", "\u2028", "\r", "\r\n", "<|endoftext|>", "#### 42", "\n\nHuman: hi",
     "\n\nAssistant: yo", "é", "𝔘", "\U0010ffff", "1", "-1", "null", "NaN"]
)  # fmt: skip
TEXT = st.one_of(st.text(max_size=30), ODD_TEXT)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
)
JSONISH = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
ROLE = st.one_of(
    st.sampled_from(["system", "user", "assistant", "tool", "", "USER", "human", "gpt"]), JSONISH
)
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": TEXT}),
    st.fixed_dictionaries({"role": ROLE, "content": st.one_of(TEXT, JSONISH)}),
    st.fixed_dictionaries({"from": ROLE, "value": st.one_of(TEXT, JSONISH)}),
    st.dictionaries(st.sampled_from(FIELD_NAMES), JSONISH, max_size=3),
    JSONISH,
)
MESSAGES = st.one_of(st.lists(MESSAGE, max_size=5), JSONISH)
FIELD_VALUE = st.one_of(TEXT, MESSAGES, JSONISH, st.integers(-3, 3))
RECORD = st.one_of(
    st.dictionaries(st.sampled_from(FIELD_NAMES), FIELD_VALUE, max_size=5),
    st.dictionaries(TEXT, JSONISH, max_size=3),
)


WORDS = st.text(alphabet="the cat sat on mat a dog ran hello world 123 é\n", min_size=1, max_size=40).filter(
    str.strip
)


@st.composite
def valid_record(draw, fmt: str) -> dict:
    """A record that fits `fmt` (as `data prepare` reads it), with words the test tokenizer knows."""
    w = lambda: draw(WORDS)  # noqa: E731
    chat = [{"role": "user", "content": w()}, {"role": "assistant", "content": w()}]
    if draw(st.booleans()):
        chat.insert(0, {"role": "system", "content": w()})
    one, two, human = w(), w() + "!", w()
    return {
        "text": lambda: {"text": w()},
        "messages": lambda: {"messages": chat},
        "sharegpt": lambda: {
            "conversations": [{"from": "human", "value": w()}, {"from": "gpt", "value": w()}]
        },
        "self_instruct": lambda: {"instruction": w(), "instances": [{"input": "", "output": w()}]},
        "alpaca": lambda: {"instruction": w(), "input": draw(st.sampled_from(["", w()])), "output": w()},
        "preference": lambda: {"prompt": w(), "chosen": one, "rejected": two},
        "hh_rlhf": lambda: {
            f: f"\n\nHuman: {human}\n\nAssistant: {reply}"
            for f, reply in [("chosen", one), ("rejected", two)]
        },
        "prompt_completion": lambda: {"prompt": w(), "completion": w()},
        "gsm8k": lambda: {"question": w(), "answer": f"{w()} #### {draw(st.integers(0, 10**6))}"},
        "classification": lambda: {"text": w(), "label": draw(st.integers(0, 3))},
    }[fmt]()


@st.composite
def valid_file(draw) -> tuple[str, bytes]:
    """(file name, bytes) of a file of one format, maybe with a stray record or line mixed in."""
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    records = draw(st.lists(valid_record(fmt), min_size=1, max_size=8))
    if draw(st.integers(0, 2)) == 0:
        records.insert(draw(st.integers(0, len(records))), draw(RECORD))
    flat = all(isinstance(v, str | int) for r in records for v in r.values())
    ext = draw(st.sampled_from([".jsonl", ".json", ".txt"] + ([".csv", ".parquet"] if flat else [])))
    if ext == ".jsonl":
        data = "".join(_dump(r) + draw(st.sampled_from(["\n", "\r\n", "\n\n"])) for r in records).encode()
    elif ext == ".json":
        doc = records if draw(st.booleans()) else {"data": records}
        data = _dump(doc).encode("utf-8", "surrogatepass")
    elif ext == ".txt":
        sep = draw(st.sampled_from(["\n\n", "\n<|endoftext|>\n"]))
        data = sep.join(str(r.get("text", r)) for r in records).encode("utf-8", "surrogatepass")
    elif ext == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in records for k in r)))
        writer.writeheader()
        writer.writerows(records)
        data = buf.getvalue().encode("utf-8", "surrogatepass")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        try:
            pq.write_table(pa.Table.from_pylist(records), buf)
        except (pa.ArrowException, TypeError, ValueError):  # mixed column types: pyarrow refuses, not lmforge
            pq.write_table(pa.table({"text": ["a"]}), buf)
        data = buf.getvalue()
    if draw(st.integers(0, 4)) == 0:
        return f"in{ext}.gz", gzip.compress(data)
    return f"in{ext}", data


def _dump(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


@st.composite
def jsonl_bytes(draw) -> bytes:
    """Near-valid JSON Lines: records mixed with broken lines, non-objects, odd bytes and line ends."""
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.integers(0, 9))
        if kind <= 4:
            line = _dump(draw(RECORD)).encode("utf-8", "surrogatepass")
        elif kind == 5:
            line = _dump(draw(RECORD)).encode("utf-8", "surrogatepass")
            line = line[: draw(st.integers(0, max(0, len(line) - 1)))]  # cut short
        elif kind == 6:
            line = _dump(draw(JSONISH)).encode("utf-8", "surrogatepass")
        elif kind == 7:
            line = draw(st.binary(max_size=20))
        elif kind == 8:
            line = draw(st.sampled_from([b"", b"   ", b"\x00", b"\xef\xbb\xbf{}", b'{"text": "a\x00b"}',
                                         b'{"text": 1e999}', b'{"text": ' + b"[" * 3000 + b"]" * 3000 + b"}",
                                         b'{"text": "x", "text": 2}', b"\xff\xfe{}"]))  # fmt: skip
        else:
            line = draw(TEXT).encode("utf-8", "surrogatepass")
        lines.append(line)
    end = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    data = end.join(lines) + draw(st.sampled_from([b"", end]))
    return (b"\xef\xbb\xbf" if draw(st.booleans()) and draw(st.booleans()) else b"") + data


@st.composite
def json_bytes(draw) -> bytes:
    doc = draw(
        st.one_of(
            st.lists(RECORD, max_size=6),
            st.dictionaries(TEXT, st.lists(RECORD, max_size=4), max_size=3),
            JSONISH,
        )
    )
    data = _dump(doc).encode("utf-8", "surrogatepass")
    how = draw(st.integers(0, 5))
    if how == 0:
        data = data[: draw(st.integers(0, len(data)))]
    elif how == 1:
        data = b"\n".join(
            _dump(r).encode("utf-8", "surrogatepass") for r in draw(st.lists(RECORD, max_size=4))
        )
    elif how == 2:
        data += draw(st.binary(max_size=8))
    return data


@st.composite
def csv_bytes(draw) -> bytes:
    """CSV with a header, ragged rows, quotes, embedded newlines and odd cells."""
    cell = st.one_of(
        TEXT, st.sampled_from(['"', '""', 'a"b', '"open', "a,b", "x\ny", "\x00", "1", "label", "text"])
    )
    header = draw(st.lists(st.one_of(st.sampled_from(FIELD_NAMES), TEXT), max_size=4))
    rows = [header, *draw(st.lists(st.lists(cell, max_size=5), max_size=6))]
    if draw(st.booleans()):  # through the csv writer: well-quoted
        buf = io.StringIO()
        csv.writer(buf).writerows(rows)
        text = buf.getvalue()
    else:  # by hand: quotes left open, fields unquoted
        text = "\n".join(",".join(r) for r in rows)
    return text.encode("utf-8", "surrogatepass") + draw(st.sampled_from([b"", b"\n", b"\xff", b'"']))


@st.composite
def txt_bytes(draw) -> bytes:
    parts = draw(
        st.lists(
            st.one_of(
                TEXT, st.sampled_from(["\n", "\n\n", "<|endoftext|>\n", "  <|endoftext|> \n", "\r\n\r\n"])
            ),
            max_size=12,
        )
    )
    data = "".join(parts).encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    return data


@st.composite
def parquet_bytes(draw) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=64))
    rows = draw(st.lists(st.dictionaries(st.sampled_from(FIELD_NAMES), st.one_of(TEXT, st.integers(-5, 5)),
                                         max_size=3), max_size=5))  # fmt: skip
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowException, TypeError, ValueError):  # mixed column types: pyarrow refuses, not lmforge
        table = pa.table({"text": ["a"]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    return data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data


CONTENTS = {".jsonl": jsonl_bytes(), ".json": json_bytes(), ".csv": csv_bytes(), ".txt": txt_bytes(),
            ".parquet": parquet_bytes()}  # fmt: skip


@st.composite
def data_file(draw) -> tuple[str, bytes]:
    """(file name, bytes) of a data file of any supported type, maybe gzipped (whole or cut short): half of
    them files of one format with a stray record at most, half near-valid or broken ones."""
    if draw(st.booleans()):
        return draw(valid_file())
    ext = draw(st.sampled_from(sorted(CONTENTS)))
    data = draw(
        st.one_of(CONTENTS[ext], st.binary(max_size=64)) if draw(st.integers(0, 5)) == 0 else CONTENTS[ext]
    )
    if draw(st.integers(0, 3)) == 0:
        data = gzip.compress(data)
        if draw(st.booleans()):
            data = data[: draw(st.integers(0, len(data)))]
        return f"in{ext}.gz", data
    return f"in{ext}", data


@contextlib.contextmanager
def folder():
    with tempfile.TemporaryDirectory(prefix="lmforge-fuzz-") as d:
        yield Path(d)


# ------------------------------------------------------------------------ readers and formats


def _read_everything(path: Path, on_bad) -> None:
    records = list(read_records(path, on_bad=on_bad))
    if records:
        fmt = detect_format(records)
        assert fmt in FORMATS
        list(to_examples(records, fmt, on_bad=on_bad))


LABEL_MAPS = st.one_of(
    st.none(),
    st.lists(WORDS, max_size=4).map(_dump),
    st.dictionaries(WORDS, st.integers(-1, 5), max_size=3).map(_dump),
    JSONISH.map(_dump),
    st.sampled_from(["", "{", "[" * 3000, '{"0": "a", "1": "b"}', '["a", "a"]']),
)


@fuzz(250)
@given(data_file(), st.sampled_from(sorted(FORMATS)), st.booleans(), LABEL_MAPS)
def test_readers_and_formats(file, other_format, skip_bad, label_map):
    """read_records, detect_format and to_examples (the detected format and another) on generated files."""
    start("readers+formats")
    name, data = file
    bad = []
    on_bad = bad.append if skip_bad else None
    with folder() as d:
        path = d / name
        path.write_bytes(data)
        if label_map is not None:  # read by the classification format
            (d / "categories.json").write_text(label_map, encoding="utf-8", errors="surrogatepass")
        before = digest(d)
        try:
            _read_everything(path, on_bad)
        except LmforgeError as e:
            clean_error(e, "readers+formats")
        try:
            list(to_examples(read_records(path, on_bad=on_bad), other_format, on_bad=on_bad))
        except LmforgeError as e:
            clean_error(e, "readers+formats")
        assert digest(d) == before
    for b in bad:
        assert b.reason.strip() and b.where.startswith(str(d))


@fuzz(80)
@given(txt_bytes(), st.one_of(st.none(), st.sampled_from(["", "---", "<|endoftext|>", " x "])),
       st.integers(1, 64), st.booleans())  # fmt: skip
def test_text_chunks_read_as_read_records(data, separator, size, gz):
    """`data prepare`'s path for text (text_chunks + decode_chunk in workers) gives read_records' documents."""
    start("text chunks")
    with folder() as d:
        path = d / ("in.txt.gz" if gz else "in.txt")
        path.write_bytes(gzip.compress(data) if gz else data)
        bad_direct, bad_chunks = [], []
        try:
            direct = [(r.line, r.data) for r in read_records(path, on_bad=bad_direct.append,
                                                                text_separator=separator)]  # fmt: skip
        except LmforgeError as e:
            clean_error(e, "text chunks")
            return
        split = text_split(path, separator)
        chunked = [doc for chunk in text_chunks(path, split, size)
                   for doc in decode_chunk(str(path), chunk, split, bad_chunks.append)]  # fmt: skip
    assert chunked == direct
    assert [b.where for b in bad_chunks] == [b.where for b in bad_direct if b.where != str(path)]


@fuzz(30)
@given(st.lists(st.tuples(st.sampled_from(["a", "b/c", ".hidden", "b/.h", "d/e/f"]), data_file(),
                          st.sampled_from(["", ".bin", ".md"])), max_size=4),
       st.sampled_from(["manifest.json", "state.json", "config.json", "categories.json", None]))  # fmt: skip
def test_iter_files_on_trees(files, marker):
    """iter_files over a generated directory tree, then every file it finds read."""
    start("iter_files")
    with folder() as d:
        root = d / "root"
        root.mkdir()
        for where, (name, data), suffix in files:
            path = root / where / (name + suffix)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        if marker:
            (root / marker).write_text("{}")
        before = digest(d)
        try:
            for path in iter_files([root]):
                try:
                    _read_everything(path, None)
                except LmforgeError as e:
                    clean_error(e, "iter_files")
        except LmforgeError as e:
            clean_error(e, "iter_files")
        assert digest(d) == before


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz-tok")
    train_tokenizer(["the cat sat on the mat", "a dog ran", "hello world 1 2 3"] * 40, "bpe", 300, path)
    return path


@fuzz(40)
@given(st.lists(st.one_of(valid_file(), valid_file(), data_file()), min_size=1, max_size=2),
       st.lists(st.sampled_from(["--skip-bad", "--skip-bad", "--format=text", "--format=messages", "--set=dedup=off",
                                 "--set=pii=mask", "--set=text_separator=", "--set=val_fraction=0.5",
                                 "--set=label_field=category"]), max_size=2, unique=True))  # fmt: skip
def test_data_prepare_cli(tokenizer_dir, files, flags):
    """`lmforge data prepare` on generated files: a dataset, or one error line; the inputs unchanged."""
    start("data prepare CLI")
    with folder() as d:
        inputs = d / "in"
        inputs.mkdir()
        paths = []
        for i, (name, data) in enumerate(files):
            paths.append(inputs / f"{i}{name}")
            paths[-1].write_bytes(data)
        before = digest(inputs)
        args = ["data", "prepare", *map(str, paths), "--tokenizer", str(tokenizer_dir), "--out", str(d / "out"),
                "--set", "num_proc=1", *flags]  # fmt: skip
        cli_ok(runner.invoke(app, args), "data prepare CLI", inputs, before)


# -------------------------------------------------------------------------- config and --set

CONFIGS = [PretrainConfig, FinetuneConfig, PrepareConfig]
FIELDS = {cls: {row.key: row for row in config_fields(cls)} for cls in CONFIGS}
KEYS = sorted({key for fields in FIELDS.values() for key in fields})


def typed_value(type_text: str) -> st.SearchStrategy[str]:
    """`--set` text of a value of a field's type (from config_fields), in range or near it."""
    if type_text.startswith("Literal["):
        return st.sampled_from(re.findall(r"'([^']*)'", type_text))
    if type_text.startswith(("int", "float")):
        number = st.integers(-2, 1000) if type_text.startswith("int") else st.floats(-1, 10, allow_nan=False)
        return number.map(str) | (st.just("null") if "None" in type_text else st.nothing())
    if type_text == "bool":
        return st.sampled_from(["true", "false", "yes", "0"])
    if type_text.startswith("tuple[float"):
        return st.tuples(st.floats(0, 1), st.floats(0, 1)).map(lambda t: f"[{t[0]}, {t[1]}]")
    if type_text.startswith("dict"):
        return st.sampled_from(["{}", "{a: 1}", "{a: [x.txt]}", "{num_hidden_layers: 2}", "{a: -1}"])
    if type_text.startswith("list"):
        return st.sampled_from(["[]", "[a, b]", "[x.txt]", "[tensorboard]", "null"])
    return WORDS


@st.composite
def set_text(draw, cls: type) -> str:
    """A `--set KEY=VALUE` text for `cls`: a key of it with a value of its type (most), or either mutated."""
    keys = sorted(FIELDS[cls])
    if draw(st.integers(0, 3)):
        key = draw(st.sampled_from(keys))
        return f"{key}={draw(typed_value(FIELDS[cls][key].type))}"
    return f"{draw(mutated_key(keys))}={draw(SET_VALUE)}"


@st.composite
def mutated_key(draw, keys: list[str] = KEYS) -> str:
    key = draw(st.sampled_from(keys))
    how = draw(st.integers(0, 6))
    if how == 1:
        key = key.upper()
    elif how == 2:
        key = key + "." + draw(TEXT)
    elif how == 3:
        key = key.rsplit(".", 1)[0]
    elif how == 4 and key:
        at = draw(st.integers(0, len(key) - 1))
        key = key[:at] + draw(st.text(max_size=2)) + key[at + 1 :]
    elif how == 5:
        key = draw(TEXT)
    elif how == 6:
        key = ".".join(
            draw(st.lists(st.sampled_from(["model", "overrides", "train", "x", "", "mix"]), max_size=4))
        )
    return key


SET_VALUE = st.one_of(
    TEXT,
    st.sampled_from(
        [
            "1",
            "-1",
            "0",
            "1e-3",
            "3e-4",
            ".nan",
            ".inf",
            "-.inf",
            "nan",
            "inf",
            "true",
            "null",
            "~",
            "[1, 2]",
            "[",
            "{a: 1}",
            "{",
            "2**64",
            str(2**64),
            str(2**200),
            "!!python/object:os.system",
            "&a [*a]",
            "*a",
            "'x'",
            "- 1\n- 2",
            "a: b: c",
            "[" * 3000 + "]" * 3000,
        ]
    ),
)


def config_or_clean_error(cls: type, path: Path | None, overrides: list[str], target: str) -> None:
    """load_config's oracle: a `cls` config, or an LmforgeError that is one clean line."""
    try:
        cfg = load_config(cls, path, overrides)
    except LmforgeError as e:
        clean_error(e, target)
    else:
        assert isinstance(cfg, cls)


@fuzz(150)
@given(st.sampled_from(CONFIGS).flatmap(lambda cls: st.tuples(st.just(cls), st.lists(
    st.one_of(set_text(cls), TEXT) if cls is PrepareConfig else set_text(cls), max_size=3))))  # fmt: skip
def test_set_overrides(case):
    """load_config with generated `--set` strings: a config, or an LmforgeError naming the problem."""
    start("--set")
    cls, overrides = case
    config_or_clean_error(cls, None, overrides, "--set")


@st.composite
def recipe_text(draw, cls: type) -> str:
    how = draw(st.integers(0, 5))
    if how == 0:
        return draw(st.text(max_size=80))
    if how == 1:  # broken YAML
        return draw(st.sampled_from(["a: [", "a: {b", "\t- x", "key: 'open", "- a\nb: c", "a: b: c", "%YAML 9",
                                     "!!python/object/apply:os.system ['true']", "&a [*a]", "a: *b", "---\n---",
                                     "\x00", "\ufeffa: 1", "? [a]\n: 1", "a: " + "[" * 3000]))  # fmt: skip
    data = {}
    keys = sorted(FIELDS[cls])
    for key in draw(
        st.lists(st.one_of(st.sampled_from(keys), st.sampled_from(keys), mutated_key(keys)), max_size=4)
    ):
        node = data
        *sections, leaf = key.split(".")
        for part in sections:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        if key in FIELDS[cls] and draw(st.integers(0, 3)):
            node[leaf] = yaml.safe_load(draw(typed_value(FIELDS[cls][key].type)))
        else:
            node[leaf] = draw(st.one_of(JSONISH, SET_VALUE))
    if how == 2:
        return yaml.safe_dump(data, allow_unicode=True)
    return json.dumps(data)  # JSON is YAML


@fuzz(100)
@given(st.sampled_from(CONFIGS).flatmap(
    lambda cls: st.tuples(st.just(cls), recipe_text(cls), st.lists(set_text(cls), max_size=2))))  # fmt: skip
def test_yaml_recipes(case):
    """load_config on generated YAML recipes (then a few `--set`): a config or an LmforgeError; recipe kept."""
    start("recipes")
    cls, text, overrides = case
    with folder() as d:
        path = d / "recipe.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        before = digest(d)
        config_or_clean_error(cls, path, overrides, "recipes")
        assert digest(d) == before


# ----------------------------------------------------------------------------------- chat templates

TEMPLATES = st.one_of(
    st.just(DEFAULT_CHAT_TEMPLATE),
    st.sampled_from(
        [
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
            "{{ messages[0]['content'] }}",
            "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}",
            "{{ raise_exception('no') }}",
            "{{ messages | tojson }}",
            "{% for m in messages %}{{ m.content | upper }}{% endfor %}{% if add_generation_prompt %}>{% endif %}",
            "{% for m in messages %}{{ m.content[::-1] }}{% endfor %}",
            # Not bounded: `m.content * 10**9` builds a GBs string, two nested range(10**5) loops run 10**10 times:
            # Jinja's sandbox limits ranges but neither memory nor time (nor does transformers').
            "{% for m in messages %}{{ (m.content * 1000)|length }}{% endfor %}",
            "{{ range(10**9) | list | length }}",
            "{% for i in range(10**6) %}{% endfor %}x",
            "{{ ''.__class__.__mro__ }}",
            "{{ messages.append(1) }}",
            "{% for m in messages %}{{ m.content + 1 }}{% endfor %}",
            "{{ strftime_now('%Y') }}",
            "{{ 1 / 0 }}",
            "{% generation %}{% generation %}x{% endgeneration %}{% endgeneration %}",
            "{% for %}",
            "{{",
            "{% generation %}",
            "{% endfor %}",
            "{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}",
            "{% break %}",
            "{{ bos_token }}{{ eos_token }}{{ nothing.there }}",
        ]
    ),
    st.text(max_size=40),
)


@fuzz(150)
@given(st.one_of(st.lists(MESSAGE, max_size=5), valid_record("messages").map(lambda r: r["messages"])),
       TEMPLATES, st.booleans(), st.booleans())  # fmt: skip
def test_render_chat(tokenizer_dir, messages, template, add_generation_prompt, require_assistant):
    """render_chat on generated conversations and templates: a rendering with a mask, or an LmforgeError."""
    start("chat templates")
    tok = _tokenizer(tokenizer_dir)
    try:
        rendered = render_chat(tok, messages, add_generation_prompt=add_generation_prompt, template=template,
                               require_assistant=require_assistant)  # fmt: skip
    except LmforgeError as e:
        clean_error(e, "chat templates")
    else:
        assert len(rendered.ids) == len(rendered.mask) and set(rendered.mask) <= {0, 1}
    try:
        render_template(template, messages)
    except LmforgeError as e:
        clean_error(e, "chat templates")


_TOKENIZERS: dict[Path, Tokenizer] = {}


def _tokenizer(path: Path) -> Tokenizer:
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = Tokenizer.from_dir(path)
    return _TOKENIZERS[path]


# ---------------------------------------------------------------------------------- generate

NUMBERS = st.one_of(
    st.integers(-3, 300),
    st.integers(-(2**70), 2**70),
    st.floats(),  # NaN and ±inf included
    st.sampled_from([0, 1, -1, 0.5, 1e-300, 2**64 - 1, 2**64, 20, 21, 64, 65]),
    TEXT,
    st.none(),
    st.booleans(),
)
GEN_FIELDS = [k for k in GenerationConfig.model_fields if k != "logit_bias"]


# Each flag with the values it allows (a strategy), for half the cases; the other half anything of its type.
FLAGS = {
    "--top-k": st.integers(0, 400), "--no-repeat-ngram-size": st.integers(0, 4),
    "--seed": st.integers(0, 2**64 - 1), "-n": st.integers(1, 3), "--logprobs": st.integers(0, 20),
    "--speculate": st.integers(0, 64), "--temperature": st.floats(0, 5), "--top-p": st.floats(0.01, 1),
    "--min-p": st.floats(0, 0.99), "--repetition-penalty": st.floats(0.1, 3),
    "--frequency-penalty": st.floats(-2, 2), "--presence-penalty": st.floats(-2, 2),
}  # fmt: skip
INTS = st.one_of(st.integers(-3, 70), st.sampled_from([2**63, 2**64 - 1, 2**64, -(2**64)]))
FLOATS = st.one_of(st.floats(-3, 3), st.sampled_from(["nan", "inf", "-inf", "1e308", "-0", "1e-320"]))


VALID_GEN = {flag.lstrip("-").replace("-", "_"): values for flag, values in FLAGS.items()} | {
    "max_new_tokens": st.integers(1, 100), "stop": st.lists(WORDS, max_size=2),
    "logit_bias": st.dictionaries(st.integers(0, 299), st.floats(-100, 100), max_size=2)}  # fmt: skip


@fuzz(200)
@given(st.one_of(st.fixed_dictionaries({}, optional=VALID_GEN), st.dictionaries(
           st.sampled_from([*GEN_FIELDS, "logit_bias", "max_length", "do_sample"]),
                       st.one_of(NUMBERS, st.lists(TEXT, max_size=2),
                                 st.dictionaries(st.one_of(st.integers(-2, 10**6), TEXT), NUMBERS, max_size=2)),
                       max_size=5)),
       st.one_of(st.none(), st.dictionaries(st.sampled_from([*GEN_FIELDS, "do_sample"]), NUMBERS, max_size=4),
                 JSONISH, st.sampled_from(["[" * 3000, "{", "", "\xff"])))  # fmt: skip
def test_generation_config(overrides, file_doc):
    """generation_config with generated overrides over a generated generation_config.json."""
    start("generation_config")
    with folder() as d:
        if file_doc is not None:
            text = file_doc if isinstance(file_doc, str) else json.dumps(file_doc, allow_nan=True)
            (d / "generation_config.json").write_text(text, encoding="utf-8", errors="surrogatepass")
        before = digest(d)
        try:
            cfg = generation_config(overrides, d)
        except LmforgeError as e:
            clean_error(e, "generation_config")
        else:
            assert math.isfinite(cfg.temperature) and cfg.max_new_tokens >= 1 and 0 < cfg.top_p <= 1
        assert digest(d) == before


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz-model")
    train_tokenizer(["the cat sat on the mat", "a dog ran"] * 40, "bpe", 300, path)
    torch.manual_seed(0)
    save_model(build_model(preset("tiny-llama", vocab_size=300, eos_token_id=3, pad_token_id=0)), path)
    return path


@st.composite
def generate_args(draw) -> list[str]:
    args = []
    for flag in draw(st.lists(st.sampled_from(sorted(FLAGS)), max_size=4, unique=True)):
        ints = isinstance(draw(FLAGS[flag]), int)
        value = str(draw(FLAGS[flag] if draw(st.integers(0, 3)) else INTS if ints else FLOATS))
        if flag == "-n" and value.lstrip("-").isdigit() and int(value) > 8:
            value = "8"  # n is samples to run: a huge n is a big job, not bad input
        args.append(f"{flag}={value}" if flag.startswith("--") else f"-n{value}")
    max_new = st.sampled_from(["-1", "0", "1", "3", "127", "128", "1000", str(2**64)])
    args.append(f"--max-new-tokens={draw(st.one_of(st.integers(1, 6).map(str), max_new))}")
    for _ in range(draw(st.integers(0, 2))):
        args.append(f"--stop={draw(TEXT)}")
    prompt = draw(st.one_of(WORDS, TEXT, st.text(min_size=200, max_size=2000), st.just("the cat " * 200)))
    args.append(f"--prompt={prompt}")
    args += draw(st.lists(st.sampled_from(["--chat", "--json", "--truncate", "--system=be brief", "--system="]),
                          max_size=2, unique=True))  # fmt: skip
    return args


@fuzz(80)
@given(generate_args())
def test_generate_cli(model_dir, args):
    """`lmforge generate MODEL` with generated flag values and prompts: text, or one error line."""
    start("generate CLI")
    before = digest(model_dir)
    cli_ok(runner.invoke(app, ["generate", str(model_dir), *args]), "generate CLI", model_dir, before)


@fuzz(60)
@given(st.sampled_from([".txt", ".jsonl", ""]), st.one_of(jsonl_bytes(), txt_bytes()))
def test_read_prompts(suffix, data):
    """read_prompts (`generate --prompts-file`) on generated files: prompts, or an LmforgeError."""
    start("prompts file")
    with folder() as d:
        path = d / f"prompts{suffix}"
        path.write_bytes(data)
        before = digest(d)
        try:
            prompts = read_prompts(path)
        except LmforgeError as e:
            clean_error(e, "prompts file")
        else:
            assert all(isinstance(p, str | list) for p in prompts)
        assert digest(d) == before


def test_validation_error_is_documented_only_for_models():
    """GenerationConfig(...) itself raises pydantic's ValidationError (documented); generation_config wraps it."""
    with pytest.raises(ValidationError):
        GenerationConfig(temperature=float("nan"))
    with pytest.raises(LmforgeError, match="temperature"):
        generation_config({"temperature": float("nan")})


# ----------------------------------------------------------------- regressions the fuzz found


def test_sharegpt_speaker_that_is_a_list_is_a_bad_record(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text('{"conversations": [{"from": ["human"], "value": "hi"}]}\n')
    with pytest.raises(
        LmforgeError, match=r"chats.jsonl:1: conversations\[0\].from is \['human'\]; expected one of"
    ):
        list(to_examples(read_records(path), "sharegpt"))


def test_json_nested_too_deeply_is_a_bad_record(tmp_path):
    deep = "[" * 5000 + "]" * 5000
    (tmp_path / "a.jsonl").write_text(f'{{"text": "ok"}}\n{{"text": {deep}}}\n')
    bad = []
    assert [r.data for r in read_records(tmp_path / "a.jsonl", on_bad=bad.append)] == [{"text": "ok"}]
    assert bad[0].where.endswith("a.jsonl:2") and "nested too deeply" in bad[0].reason
    (tmp_path / "a.json").write_text(deep)
    with pytest.raises(LmforgeError, match=r"a.json:1: JSON nested too deeply to read"):
        list(read_records(tmp_path / "a.json"))
    (tmp_path / "p.jsonl").write_text(f'{{"prompt": {deep}}}\n')
    with pytest.raises(LmforgeError, match=r"p.jsonl:1: expected a JSON object with 'prompt'"):
        read_prompts(tmp_path / "p.jsonl")
    (tmp_path / "generation_config.json").write_text(deep)
    with pytest.raises(LmforgeError, match=r"cannot read .*generation_config\.json"):
        generation_config({}, tmp_path)


def test_recipe_nested_too_deeply_is_invalid_yaml(tmp_path):
    (tmp_path / "r.yaml").write_text("train: " + "[" * 3000)
    with pytest.raises(LmforgeError, match=r"r.yaml: invalid YAML: nested too deeply"):
        load_config(PretrainConfig, tmp_path / "r.yaml")
    with pytest.raises(LmforgeError, match=r"train.max_steps: expected an integer, got '\[\[\["):
        load_config(PretrainConfig, None, ["train.max_steps=" + "[" * 3000 + "]" * 3000])


def test_template_that_compiles_to_bad_python_is_an_error():
    with pytest.raises(
        LmforgeError, match="the template does not compile: SyntaxError: 'break' outside loop"
    ):
        render_template("{% break %}", [], source="the template")


def test_stray_state_json_is_not_a_datasets_dir(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "state.json").write_text("{}")
    with pytest.raises(LmforgeError, match=r"cannot load it as a `datasets` directory \(FileNotFoundError"):
        list(read_records(data))
    (data / "dataset_info.json").write_text("{}")  # a damaged save: datasets raises KeyError
    result = runner.invoke(app, ["tokenizer", "train", str(data), "--out", str(tmp_path / "tok")])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "KeyError" in result.stderr


def test_subnormal_temperature_is_refused_not_a_nan_crash(model_dir):
    for flag, message in [
        ("--temperature=2.2e-309", "temperature: expected 0 (greedy) or a value >= 1e-05"),
        ("--repetition-penalty=1e-300", "repetition_penalty: expected a value >= 1e-05"),
    ]:
        result = runner.invoke(app, ["generate", str(model_dir), "-p", "the cat", "--max-new-tokens=2", flag])
        assert result.exit_code == 2 and message in result.stderr, result.stderr


def test_csv_header_with_a_line_break_gives_one_error_line(tmp_path, tokenizer_dir):
    (tmp_path / "in.csv").write_bytes(b'messages,"\n"\r\n""\r\n')
    args = ["data", "prepare", str(tmp_path / "in.csv"), "--tokenizer", str(tokenizer_dir), "--format=text"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and result.stderr == (
        f"error: {tmp_path / 'in.csv'}:3: found 1 fields; expected 2 (messages, '\\n')\n"
    )


def test_config_errors_are_one_line(tmp_path):
    with pytest.raises(
        LmforgeError, match=r"^unknown config key 'trian\.seed' \(from --set trian\.seed=1\\n2\)"
    ):
        load_config(PretrainConfig, None, ["trian.seed=1\n2"])
    (tmp_path / "r.yaml").write_text("\x1f")
    with pytest.raises(
        LmforgeError, match=r"r.yaml: invalid YAML: unacceptable character #x001f: special [^\n]*$"
    ):
        load_config(PretrainConfig, tmp_path / "r.yaml")
