"""Readers: every file type (and gzip), positions, streaming, each kind of bad input, the shared datasets' counts."""

import gzip
import json
import sys
import tracemalloc
from pathlib import Path

import pytest

from lmforge.data.readers import BadRecord, Record, iter_files, read_records
from lmforge.errors import LmforgeError

ROWS = [{"text": "first, with a comma", "label": "a"}, {"text": 'second "quoted"', "label": "b"}]


def write(path: Path, content: str | bytes) -> Path:
    """Write `content` to `path`, gzipped when the name ends in .gz."""
    data = content.encode() if isinstance(content, str) else content
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def read(path: Path, **kwargs) -> tuple[list[Record], list[BadRecord]]:
    """All records of `path` and the bad ones collected by on_bad."""
    bad: list[BadRecord] = []
    return list(read_records(path, on_bad=bad.append, **kwargs)), bad


def error(path: Path, **kwargs) -> str:
    """The LmforgeError message of reading `path` without on_bad."""
    with pytest.raises(LmforgeError) as e:
        list(read_records(path, **kwargs))
    return str(e.value)


# --- every file type gives the same rows


def write_rows(path: Path) -> Path:
    name = path.name.removesuffix(".gz")
    if name.endswith(".parquet"):
        pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        tmp = path.with_name("plain.parquet")
        pq.write_table(pa.Table.from_pylist(ROWS), tmp)
        return write(path, tmp.read_bytes())
    if name.endswith(".jsonl"):
        return write(path, "".join(json.dumps(r) + "\n" for r in ROWS))
    if name.endswith(".json"):
        return write(path, json.dumps(ROWS, indent=2))
    return write(path, 'text,label\r\n"first, with a comma",a\r\n"second ""quoted""",b\r\n')


@pytest.mark.parametrize(
    "name, wheres",
    [
        ("d.jsonl", [":1", ":2"]),
        ("d.jsonl.gz", [":1", ":2"]),
        ("d.csv", [":2", ":3"]),
        ("d.csv.gz", [":2", ":3"]),
        ("d.json", ["[#0]", "[#1]"]),
        ("d.json.gz", ["[#0]", "[#1]"]),
        ("d.parquet", ["[#0]", "[#1]"]),
        ("d.parquet.gz", ["[#0]", "[#1]"]),
    ],
)
def test_each_file_type_reads_the_same_rows(tmp_path, name, wheres):
    path = write_rows(tmp_path / name)
    records, bad = read(path)
    assert [r.data for r in records] == ROWS and not bad
    assert [r.where for r in records] == [f"{path}{w}" for w in wheres]
    assert all(r.source == str(path) for r in records)


def test_jsonl_skips_blank_lines_and_numbers_lines_from_one(tmp_path):
    path = write(tmp_path / "d.jsonl", '\n{"a": 1}\r\n   \n{"a": 2}\n')
    assert [(r.line, r.data) for r in read_records(path)] == [(2, {"a": 1}), (4, {"a": 2})]


def test_json_object_holding_one_list_and_json_lines_named_json(tmp_path):
    wrapped = write(tmp_path / "w.json", json.dumps({"version": 1, "data": ROWS}))
    assert [r.data for r in read_records(wrapped)] == ROWS
    lines = write(tmp_path / "l.json", "".join(json.dumps(r) + "\n" for r in ROWS))  # as Dataset.to_json
    assert [r.where for r in read_records(lines)] == [f"{lines}:1", f"{lines}:2"]


def test_csv_rows_are_numbered_by_their_first_line(tmp_path):
    path = write(tmp_path / "d.csv", '\ufefftext,label\n"two\nlines",a\n\nnext,b\n')  # with a byte-order mark
    records = list(read_records(path))
    assert [r.line for r in records] == [2, 5]
    assert [r.data for r in records] == [{"text": "two\nlines", "label": "a"}, {"text": "next", "label": "b"}]


# --- text documents


def test_text_splits_on_blank_lines_and_strips(tmp_path):
    path = write(tmp_path / "t.txt.gz", "\n  Doc one\nline two  \n\n \n\nDoc two\r\n\n\n")
    assert [(r.line, r.data) for r in read_records(path)] == [(2, "Doc one\nline two"), (7, "Doc two")]
    assert next(iter(read_records(path))).where == f"{path}:2"


def test_text_splits_on_endoftext_lines_when_present(tmp_path):
    story = "Once upon a time.\n\nA second paragraph."
    path = write(tmp_path / "t.txt", f"\n{story}\n<|endoftext|>\nThe end.\n<|endoftext|>\n\n")
    assert [(r.line, r.data) for r in read_records(path)] == [(2, story), (6, "The end.")]


def test_text_separator_option(tmp_path):
    path = write(tmp_path / "t.txt", "a\n\nb\n---\nc\n")
    assert [r.data for r in read_records(path, text_separator="---")] == ["a\n\nb", "c"]
    assert [r.data for r in read_records(path, text_separator="")] == ["a", "b\n---\nc"]


def _reference_documents(data: bytes, separator: str | None) -> tuple[list[tuple[int, str]], list[int]]:
    """The plain line-by-line definition the block reader must match: (line, document) pairs and bad lines."""
    lines, bad = [], []
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            lines.append((n, raw.decode("utf-8-sig" if n == 1 else "utf-8")))
        except UnicodeDecodeError:
            bad.append(n)
    if lines and lines[-1][1] == "":  # the empty piece after a final newline is not a line
        lines.pop()
    marker = "<|endoftext|>" if separator is None else separator.strip()
    blank_ends = separator == "" or (separator is None and all(t.strip() != marker for _, t in lines))
    docs, doc, first = [], [], 0
    for n, text in lines:
        if (marker and text.strip() == marker) or (blank_ends and not text.strip()):
            if doc and (joined := "\n".join(doc).strip()):
                docs.append((first, joined))
            doc = []
        elif doc or text.strip():
            first = first if doc else n
            doc.append(text.rstrip("\r\n"))
    if doc and (joined := "\n".join(doc).strip()):
        docs.append((first, joined))
    return docs, bad


@pytest.mark.parametrize("block_bytes", [5, 64, 1 << 18])
def test_text_documents_match_the_line_by_line_definition(tmp_path, monkeypatch, block_bytes):
    """Random files of blank, space-only, CRLF, marker, BOM and non-UTF-8 lines, read in blocks of any size."""
    import random

    from lmforge.data import readers

    monkeypatch.setattr(readers, "_BLOCK_BYTES", block_bytes)
    pieces = [b"word", b" two words ", b"", b"  ", b"\t", b"\r", b"<|endoftext|>", b" <|endoftext|> ", b"---",
              b"caf\xc3\xa9", b"bad \xff byte", b"\xef\xbb\xbfbom", b"a\rb", b"\xe2\x80\xa8", b"\x0c"]  # fmt: skip
    rng = random.Random(block_bytes)
    for trial in range(150):
        data = b"\n".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))) + rng.choice([b"", b"\n"])
        path = tmp_path / f"t{trial}.txt"
        path.write_bytes(data)
        for separator in (None, "", "---"):
            docs, bad_lines = _reference_documents(data, separator)
            if not docs and not bad_lines:
                continue  # an empty input is an error, tested elsewhere
            records, bad = read(path, text_separator=separator)
            assert [(r.line, r.data) for r in records] == docs, (data, separator)
            assert [b.where for b in bad if "not UTF-8" in b.reason] == [f"{path}:{n}" for n in bad_lines]
            # What `data prepare` does: whole-document byte chunks cut here, decoded and split in workers.
            split = readers.text_split(path, separator)
            from_chunks = [
                document
                for chunk in readers.text_chunks(path, split, size=block_bytes)
                for document in readers.decode_chunk(str(path), chunk, split, on_bad=lambda bad: None)
            ]
            assert from_chunks == docs, (data, separator)


# --- datasets dirs and optional dependencies


def test_datasets_dir_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "ds")
    records, _ = read(tmp_path / "ds")
    assert [r.data for r in records] == ROWS and records[1].where == f"{tmp_path / 'ds'}[#1]"
    splits = {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "dd")
    wheres = [r.where for r in read_records(tmp_path / "dd")]
    assert sorted(wheres) == sorted(
        f"{tmp_path / 'dd' / s}[#{i}]" for s, n in [("train", 2), ("test", 1)] for i in range(n)
    )
    assert iter_files([tmp_path]) == [tmp_path / "dd", tmp_path / "ds"]


@pytest.mark.parametrize("module, name", [("pyarrow", "d.parquet"), ("datasets", "ds")])
def test_missing_optional_package_says_how_to_install(tmp_path, monkeypatch, module, name):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / name
    if name == "ds":
        path.mkdir()
        (path / "state.json").write_text("{}")
    else:
        path.write_bytes(b"PAR1")
    assert f"pip install {module}" in error(path)


# --- streaming: the first record costs memory for one record, not for the file


@pytest.mark.parametrize("name", ["big.jsonl", "big.txt", "big.csv", "big.jsonl.gz"])
def test_first_record_does_not_read_the_whole_file(tmp_path, name):
    if name.endswith(".csv"):
        body = "text,label\n" + "some words here,1\n" * 3_000_000
    elif name.endswith(".txt"):
        body = "A line of a document that goes on.\nAnother line.\n\n" * 1_000_000
    else:
        body = '{"text": "a record of a few words"}\n' * 1_500_000
    data = body.encode()
    assert len(data) > 45_000_000
    path = tmp_path / name
    path.write_bytes(gzip.compress(data, compresslevel=1) if name.endswith(".gz") else data)
    tracemalloc.start()
    first = next(iter(read_records(path)))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert first.line in (1, 2)
    assert peak < 5_000_000, f"{peak:,} bytes allocated to read one record of a {len(data):,}-byte file"


# --- bad input: without on_bad an error naming file, line and what was expected; with on_bad, go on


def test_malformed_jsonl_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"a": 1}\n{"a": 2,,}\n{"a": 3}\n')
    message = error(path)
    assert message.startswith(f"{path}:2: malformed JSON") and "expected one JSON object per line" in message
    records, bad = read(path)
    assert [r.data["a"] for r in records] == [1, 3]
    assert [(b.where, b.raw, b.source) for b in bad] == [(f"{path}:2", '{"a": 2,,}', str(path))]


def test_malformed_jsonl_names_the_column_on_its_line(tmp_path):
    cut = '{"text": "' + "a" * 62 + '", "n": '  # cut off after 80 characters: a value expected at column 81
    unterminated = '{"text": "' + "a" * 70  # the string opened at column 10 never closes
    path = write(tmp_path / "d.jsonl", f'{{"a": 1}}\n{cut}\n{unterminated}\r\n')
    assert len(cut) == 80
    assert (
        error(path)
        == f"{path}:2: malformed JSON (Expecting value at column 81); expected one JSON object per line"
    )
    _, bad = read(path)
    assert [b.reason.split(";")[0] for b in bad] == [
        "malformed JSON (Expecting value at column 81)",
        "malformed JSON (Unterminated string starting at column 10)",
    ]
    assert [b.raw for b in bad] == [cut, unterminated]


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"a": 1}\n[1, 2]\n"text"\n')
    assert error(path) == f"{path}:2: found a JSON list; expected one JSON object per line"
    records, bad = read(path)
    assert len(records) == 1 and [b.where for b in bad] == [f"{path}:2", f"{path}:3"]


@pytest.mark.parametrize("name", ["d.jsonl", "d.txt", "d.csv.gz"])
def test_non_utf8_byte_names_the_line(tmp_path, name):
    head = "text,label\n" if name.startswith("d.csv") else ""
    lines = [
        '{"text": "ok", "label": "x"}',
        '{"text": "caf\xe9", "label": "x"}',
        '{"text": "fine", "label": "y"}',
    ]
    if name.startswith("d.csv"):
        lines = ["ok,x", "caf\xe9,x", "fine,y"]
    body = head.encode() + b"\n".join(line.encode("latin-1") for line in lines) + b"\n"
    path = write(tmp_path / name, body)
    bad_line = 3 if head else 2
    message = error(path)
    assert message.startswith(f"{path}:{bad_line}: byte 0xe9") and "expected UTF-8 text" in message
    records, bad = read(path)
    assert [b.where for b in bad] == [f"{path}:{bad_line}"] and "caf\ufffd" in bad[0].raw
    assert len(records) == (1 if name.endswith("txt") else 2)  # the text document goes on without the line


@pytest.mark.parametrize(
    "name, content",
    [("e.jsonl", ""), ("e.txt", "\n  \n\n"), ("e.csv", "text,label\n"), ("e.json", "[]"), ("e.txt.gz", "")],
)
def test_empty_input(tmp_path, name, content):
    path = write(tmp_path / name, content)
    assert (
        error(path)
        == f"{path}: no records (empty, or only blank lines or a header); expected at least one record"
    )
    records, bad = read(path)
    assert records == [] and [b.where for b in bad] == [str(path)]


def test_csv_row_with_the_wrong_number_of_fields(tmp_path):
    path = write(tmp_path / "d.csv", 'text,label\n"multi\nline",a\nx,y,z\nok,b\n')
    assert error(path) == f"{path}:4: found 3 fields; expected 2 (text, label)"
    records, bad = read(path)
    assert [r.line for r in records] == [2, 5] and bad[0].raw == "x,y,z"


def test_malformed_json_document_and_non_object_items(tmp_path):
    path = write(tmp_path / "d.json", '[\n  {"a": 1},\n  {"a": 2\n]')
    message = error(path)
    assert message.startswith(f"{path}:4: malformed JSON") and "expected a JSON array of objects" in message
    items = write(tmp_path / "i.json", '[{"a": 1}, 7, {"a": 3}]')
    assert error(items) == f"{items}[#1]: found a JSON int; expected an object"
    records, bad = read(items)
    assert [r.where for r in records] == [f"{items}[#0]", f"{items}[#2]"] and bad[0].raw == "7"
    two_lists = write(tmp_path / "o.json", '{"a": [], "b": []}')
    assert "found a JSON dict with keys ['a', 'b']; expected a JSON array" in error(two_lists)


def test_corrupt_gzip_and_parquet(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    assert error(path).startswith(f"{path}:1: cannot decompress") and "expected gzip data" in error(path)
    data = gzip.compress(b"".join(b'{"n": %d}\n' % i for i in range(20_000)))
    for name in ("d.jsonl.gz", "d.json.gz"):
        (tmp_path / name).write_bytes(data[: len(data) // 2])  # a download cut short
        assert "cannot decompress" in error(tmp_path / name) and "expected gzip data" in error(
            tmp_path / name
        )
    pytest.importorskip("pyarrow")
    path = write(tmp_path / "d.parquet", "not parquet")
    assert error(path).startswith(f"{path}[#0]: cannot read") and "expected a Parquet file" in error(path)


def test_missing_file_and_unsupported_type_list_the_supported_ones(tmp_path):
    assert error(tmp_path / "nope.jsonl").startswith(
        f"{tmp_path / 'nope.jsonl'}: no such file; expected .txt, .jsonl"
    )
    doc = write(tmp_path / "d.docx", "x")
    assert ".parquet (each maybe .gz), or a datasets.save_to_disk directory" in error(doc)
    with pytest.raises(LmforgeError, match="unsupported file type"):
        iter_files([doc])


def test_iter_files_expands_directories(tmp_path):
    data = ["a.txt", "b/a.csv.gz", "b/c/deep.parquet", "b/labels.jsonl", "b/z.jsonl"]
    for rel in [*data, "b/categories.json", "b/labels.json", "b/SOURCE.md", ".hidden.txt", ".git/x.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        write(tmp_path / rel, "x")
    single = tmp_path / "b" / "z.jsonl"
    assert iter_files([tmp_path, single]) == [*(tmp_path / p for p in data), single]
    with pytest.raises(LmforgeError, match="no such file or directory"):
        iter_files([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match="holds no data files"):
        iter_files([tmp_path / "empty"])


def lmforge_outputs(root: Path) -> dict[str, str]:
    """Fake lmforge outputs under `root`, each with the files that tell its kind: {dir: what the message says}."""
    files = {
        "data/manifest.json": json.dumps({"splits": {}}), "data/train/00000.tokens.bin": "", "data/rejects.jsonl": "{}",
        "model/config.json": "{}", "model/model.safetensors": "", "tok/tokenizer.json": "{}",
        "run/config.yaml": "", "run/metrics.jsonl": '{"step": 1}', "run/checkpoints/step-1/COMPLETE": "",
        "step-2/train_state/state.json": "{}", "step-2/model/config.json": "{}",
    }  # fmt: skip
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write(root / rel, content)
    return {
        "data": "a prepared dataset (manifest.json)", "model": "a model (config.json + weights)",
        "tok": "a tokenizer (tokenizer.json)", "run": "a run (config.yaml)", "step-2": "a checkpoint (train_state/)",
    }  # fmt: skip


def test_iter_files_skips_lmforge_outputs_inside_a_directory(tmp_path, caplog):
    outputs = lmforge_outputs(tmp_path)
    data = ["a.jsonl", "recipe/b.txt", "world/pretrain.jsonl"]
    for rel in data:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        write(tmp_path / rel, '{"text": "x"}\n')
    write(tmp_path / "x.bin", b"\0\1")  # binary files are never read as text
    write(tmp_path / "x.npy", b"\x93NUMPY")
    write(tmp_path / "recipe/config.yaml", "seed: 1\n")  # a recipe beside data, not a run
    write(tmp_path / "world/world.json", json.dumps({"generator": "lmforge"}))  # `data synth`'s metadata
    with caplog.at_level("WARNING", logger="lmforge"):
        assert iter_files([tmp_path]) == [tmp_path / rel for rel in data]
    warnings = sorted(r.getMessage() for r in caplog.records)
    assert warnings == [
        f"skipping {tmp_path / d}: it is {what}, not input data" for d, what in sorted(outputs.items())
    ]
    caplog.clear()
    iter_files([tmp_path], warn=False)
    assert not caplog.records


def test_lmforge_output_given_as_input_is_refused(tmp_path):
    lmforge_outputs(tmp_path)
    with pytest.raises(LmforgeError) as e:
        iter_files([tmp_path / "data"])
    assert str(e.value).startswith(
        f"{tmp_path / 'data'} is a prepared dataset (manifest.json), not input data; give the text/JSONL files it "
        "was prepared from (.txt, .jsonl"
    )
    with pytest.raises(LmforgeError, match=r"is a model \(config.json \+ weights\), not input data"):
        iter_files([tmp_path / "model"])


# --- the shared datasets: counts from their SOURCE.md


@pytest.mark.parametrize(
    "rel, count",
    [
        ("banking77/train.csv", 9_003),
        ("banking77/test.csv", 2_772),
        ("gsm8k/train.jsonl", 3_000),
        ("gsm8k/test.jsonl", 1_188),
        ("hh_rlhf/harmless_base_test.jsonl", 2_081),
        ("self_instruct_seed/seed_tasks.jsonl", 158),
    ],
)
def test_shared_record_counts(shared_data, rel, count):
    records, bad = read(shared_data / rel)
    assert len(records) == count and not bad


@pytest.mark.parametrize(
    "rel, n_lines, n_docs",
    [
        # lines: SOURCE.md; documents: blank-line-separated blocks (TinyStories val has 2 whitespace-only lines
        # that `awk 'BEGIN{RS=""}'` does not count as blank: it finds 3,789) or the 5 `<|endoftext|>` stories
        ("tinyshakespeare/input.txt", 35_982, 6_377),
        ("tinystories/tinystories_val_sample.txt", 7_634, 3_791),
        ("tinystories/tinystories_v2_endoftext_sample.txt", 25, 5),
    ],
)
def test_shared_text_documents_keep_every_line(shared_data, rel, n_lines, n_docs):
    path = shared_data / rel
    docs = list(read_records(path))
    assert len(docs) == n_docs
    lines = path.read_text().splitlines()
    skipped = sum(1 for line in lines if line.strip() in ("", "<|endoftext|>"))
    assert sum(d.data.count("\n") + 1 for d in docs) + skipped == len(lines) == n_lines
    assert all(lines[d.line - 1].strip() == d.data.splitlines()[0].strip() for d in docs)
