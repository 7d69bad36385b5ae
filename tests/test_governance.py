"""Governance: PII scrubbing, exact/near deduplication and n-gram contamination, on hand-made and real data."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path

import pytest

from lmforge.data.governance import (
    PII_KINDS,
    Deduplicator,
    contamination,
    find_pii,
    lsh_params,
    normalize,
    scrub_pii,
)
from lmforge.errors import LmforgeError

# ----------------------------------------------------------------------------------------------- PII

PII_TEXT = """Write to john.doe+news@example.co.uk or to JANE_R@mail.example.com.
Call +1 415 555 0132, (415) 555-0198, 415-555-0143, 1-800-555-0199, +44 20 7946 0958 or 020 7946 0958.
Hosts 192.168.0.1 and 10.0.0.255, and 2001:db8::8a2e:370:7334 or ::1 on IPv6.
Cards 4111 1111 1111 1111, 378282246310005 and 5500-0000-0000-0004 (but not 4111 1111 1111 1112)."""

MASKED = """Write to <EMAIL> or to <EMAIL>.
Call <PHONE>, <PHONE>, <PHONE>, <PHONE>, <PHONE> or <PHONE>.
Hosts <IP> and <IP>, and <IP> or <IP> on IPv6.
Cards <CREDIT_CARD>, <CREDIT_CARD> and <CREDIT_CARD> (but not 4111 1111 1111 1112)."""


def test_pii_counts_and_masks_each_kind():
    masked, counts = scrub_pii(PII_TEXT, "mask")
    assert counts == Counter(email=2, phone=6, ip=4, credit_card=3)
    assert set(counts) == set(PII_KINDS)
    assert masked == MASKED


def test_pii_report_and_drop_modes():
    assert scrub_pii(PII_TEXT, "report") == (PII_TEXT, Counter(email=2, phone=6, ip=4, credit_card=3))
    assert scrub_pii(PII_TEXT, "drop") == (None, Counter(email=2, phone=6, ip=4, credit_card=3))
    clean = "Nothing to see: 3 apples cost $4.50 in 2023."
    assert scrub_pii(clean, "drop") == (clean, Counter())
    with pytest.raises(LmforgeError, match="report, mask or drop"):
        scrub_pii(clean, "redact")  # type: ignore[arg-type]


def test_luhn_and_issuer_decide_cards():
    assert scrub_pii("card 4242424242424242", "report")[1] == Counter(credit_card=1)  # Stripe's test Visa
    assert scrub_pii("card 4242424242424241", "report")[1] == Counter()  # last digit off: Luhn fails
    assert scrub_pii("order 1234567890123452", "report")[1] == Counter()  # Luhn-valid, but no issuer starts 1
    assert scrub_pii("card 4242-4242 4242-4242", "report")[1] == Counter()  # mixed separators


def test_overlapping_kinds_count_once():
    # an SMS-gateway address holds a phone number, a mapped IPv6 address an IPv4 one: the outer span wins
    assert scrub_pii("text 415-555-0143@vtext.com", "mask") == ("text <EMAIL>", Counter(email=1))
    assert find_pii("mapped ::ffff:192.0.2.1, done") == [(7, 23, "ip")]


@pytest.mark.parametrize(
    "text",
    [
        "In 1999 the price rose from $1,234.56 to $2,000,000.",
        "Born 2021-10-12, moved 12/25/2020, left 05.10.2020 and 01-02-2020.",
        "Upgrade from version 1.2.3.4.5 to 10.0.1; 256.1.1.1 is no address.",
        "ISBN 978-3-16-148410-0 and 0-306-40615-2, EAN 9783161484100.",
        "The meeting runs 10:30:00 to 11:45; see John 3:16 and C++ std::vector.",
        "Natalia sold 48+24 = 72 clips; 900+750+400+400 = 2450 and 8000 - 5400 = 2600.",
        "Ratio 3:2:1, score 21-14-7, zip 04311, lot 556737-3523, id 20231015123456789012.",
        "Coordinates @37.3362725,-121.8244116 and an @mention are not e-mails.",
    ],
)
def test_pii_tricky_negatives(text):
    # decided: a dotted quad is an IPv4 address even if it was meant as a version, but 1.2.3.4.5 is not
    assert find_pii(text) == []


def _read_texts(path: Path) -> list[str]:
    """Every text of a shared file: each string field of each JSON record, the CSV `text` column, a .txt whole."""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return [row["text"] for row in csv.DictReader(f)]
    if path.suffix == ".jsonl":
        out: list[str] = []

        def walk(x: object) -> None:
            if isinstance(x, str):
                out.append(x)
            elif isinstance(x, dict | list):
                for v in x.values() if isinstance(x, dict) else x:
                    walk(v)

        for line in path.read_text(encoding="utf-8").splitlines():
            walk(json.loads(line))
        return out
    return [path.read_text(encoding="utf-8")]


def test_pii_on_the_shared_data(shared_data):
    counts = {}
    for path in sorted(shared_data.glob("*/*")):
        if path.suffix in (".txt", ".jsonl", ".csv"):
            found = sum((scrub_pii(t, "report")[1] for t in _read_texts(path)), Counter())
            counts[f"{path.parent.name}/{path.name}"] = dict(found)
    # Inspected by eye (bench/governance.py --show). Every hit is real: HH-RLHF assistants reveal invented
    # contact details ("(647) 321-1199", "person1@email.com", "+1 (555) 555-5555", "932-682-1067"), each counted
    # in both the chosen and the rejected transcript; self-instruct task 74 is a résumé with "(123) 456-7891"
    # and "emoore@email.com" in its input and output. GSM8K's arithmetic ("48+24", "800-80-560", "$1,234"),
    # BANKING77's queries, Shakespeare and TinyStories give none; no card or IP address occurs anywhere.
    assert {k: v for k, v in counts.items() if v} == {
        "hh_rlhf/harmless_base_test.jsonl": {"email": 9, "phone": 15},
        "self_instruct_seed/seed_tasks.jsonl": {"email": 2, "phone": 2},
    }
    assert len(counts) == 9  # every shared text file was scanned


# ------------------------------------------------------------------------------------ deduplication

PARAGRAPH = (
    "The harbour town woke slowly under a grey sky while fishing boats rocked against the old stone pier. "
    "Gulls circled above the market where traders laid out crates of mackerel, crab and silver herring. "
    "Children ran between the stalls, laughing with the merchants, and an old sailor mended nets beside "
    "the lighthouse, humming a song his grandfather had taught him."
)
UNRELATED = (
    "Quantum computers exploit superposition and entanglement to explore many computational paths at once. "
    "Engineers cool superconducting qubits to a fraction of a degree above absolute zero, shielding them from "
    "vibration and stray magnetic fields, because the slightest disturbance collapses the fragile states. Error "
    "correction codes spread one logical qubit across many physical ones so calculations survive the noise."
)
THREE_WORDS = (
    PARAGRAPH.replace("grey", "pale").replace("crates", "boxes").replace("old sailor", "aged sailor")
)
ONE_PHRASE = PARAGRAPH.replace("crates of mackerel", "boxes of fresh mackerel")


def true_jaccard(a: str, b: str, shingle: str, n: int = 5) -> float:
    def shingles(text: str) -> set[tuple[str, ...]]:
        units = normalize(text).split() if shingle == "word" else list(normalize(text))
        return {tuple(units[i : i + n]) for i in range(max(1, len(units) - n + 1))}

    x, y = shingles(a), shingles(b)
    return len(x & y) / len(x | y)


def test_exact_duplicates_ignore_case_whitespace_and_punctuation():
    dedup = Deduplicator()
    assert dedup.add("a", "Hello,  World!\n How are you?") is None
    dup = dedup.add("b", "hello world how are   you")
    assert (dup.kind, dup.duplicate_of, dup.jaccard) == ("exact", "a", 1.0)
    assert dedup.add("c", "Hello World, how are we?") is None
    assert (
        dedup.add("d", "") is None and dedup.add("e", " ?! ").duplicate_of == "d"
    )  # empty after normalising
    report = dedup.report()
    assert {k: report[k] for k in ("documents", "kept", "exact", "near")} == dict(
        documents=5, kept=3, exact=2, near=0
    )
    assert report["examples"][0] == {
        "kind": "exact", "id": "b", "duplicate_of": "a", "jaccard": 1.0,
        "text": "hello world how are you", "original": "Hello, World! How are you?",
    }  # fmt: skip


def test_near_duplicate_found_and_unrelated_not():
    assert len(PARAGRAPH.split()) == 60
    # word 5-grams lose five shingles per changed word: three scattered edits leave J = 0.58, below 0.7,
    # which is why character shingles exist; an edited phrase stays above it
    assert true_jaccard(PARAGRAPH, THREE_WORDS, "word") == pytest.approx(0.58, abs=0.01)
    for shingle, edited in (("char", THREE_WORDS), ("word", ONE_PHRASE)):
        dedup = Deduplicator(threshold=0.7, shingle=shingle)
        assert dedup.add("para", PARAGRAPH) is None
        assert dedup.add("other", UNRELATED) is None
        dup = dedup.add("edited", edited)
        assert dup is not None and (dup.kind, dup.duplicate_of) == ("near", "para")
        assert dup.jaccard == pytest.approx(true_jaccard(PARAGRAPH, edited, shingle), abs=0.06)
        assert dedup.report()["near"] == 1


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9, 0.95])
def test_lsh_bands_hit_the_threshold(threshold):
    b, r = lsh_params(threshold, 128)
    assert b * r <= 128 and 128 - b * r < r  # every permutation used that fits a whole band
    p = lambda j: 1 - (1 - j**r) ** b  # noqa: E731  P(candidate | Jaccard j)
    assert p(threshold) >= 0.9 and (1 / b) ** (1 / r) < threshold  # the classic midpoint sits below
    if threshold >= 0.7:  # steep enough that dissimilar pairs rarely cost a signature check
        assert p(threshold - 0.3) < 0.1 and (1 / b) ** (1 / r) > threshold - 0.15


def test_minhash_estimates_jaccard():
    # two word sets sharing 60 of 100 distinct words: Jaccard 60/140; ngram=1 makes words the shingles
    common = [f"w{i}" for i in range(60)]
    a, b = " ".join(common + [f"a{i}" for i in range(40)]), " ".join(common + [f"b{i}" for i in range(40)])
    truth = 60 / 140
    assert true_jaccard(a, b, "word", n=1) == pytest.approx(truth)
    estimates = []
    for seed in range(8):
        dedup = Deduplicator(ngram=1, seed=seed)
        estimates.append(float((dedup.signature(a) == dedup.signature(b)).mean()))
    sigma = math.sqrt(truth * (1 - truth) / 128)  # one estimate's standard deviation
    assert all(abs(e - truth) < 4 * sigma for e in estimates)
    assert sum(estimates) / len(estimates) == pytest.approx(truth, abs=1.5 * sigma)


def test_dedup_is_deterministic_for_a_seed():
    docs = [
        (str(i), t) for i, t in enumerate([PARAGRAPH, UNRELATED, THREE_WORDS, ONE_PHRASE, PARAGRAPH.upper()])
    ]

    def run(seed: int) -> tuple[list, dict]:
        dedup = Deduplicator(threshold=0.7, seed=seed, shingle="char")
        return [dedup.add(i, t) for i, t in docs], dedup.report()

    assert run(3) == run(3)
    assert (Deduplicator(seed=1).signature(PARAGRAPH) != Deduplicator(seed=2).signature(PARAGRAPH)).any()
    results, _ = run(3)
    assert [r and (r.kind, r.duplicate_of) for r in results] == [
        None,
        None,
        ("near", "0"),
        ("near", "0"),
        ("exact", "0"),
    ]
    assert len(Deduplicator(max_examples=1).report()["examples"]) == 0


def test_short_documents_are_kept_and_their_repeats_counted():
    """Below min_chars (of normalised text) a document is never a duplicate: its repeats are kept and counted."""
    long = "All the world's a stage, and all the men and women merely players. " * 2
    for near in (False, True):
        dedup = Deduplicator(min_chars=20, near=near)
        # "gloucester" is 10 characters normalised, "σοφία σοφία" 11 (21 bytes: short by characters only)
        docs = ["GLOUCESTER:", "Gloucester", long, long.upper(), "Σοφία, Σοφία!", "σοφία σοφία", "GLOUCESTER:"]  # fmt: skip
        if not near:  # a chunk's keys, computed together, are each text's key
            assert dedup.keys(docs) == [dedup.key(t) for t in docs]
        results = [dedup.add(str(i), text) for i, text in enumerate(docs)]
        assert [r and (r.kind, r.duplicate_of) for r in results] == [None] * 3 + [("exact", "2")] + [None] * 3
        report = dedup.report()
        counts = {k: report[k] for k in ("documents", "kept", "exact", "near", "kept_short", "min_chars")}
        assert counts == dict(documents=7, kept=6, exact=1, near=0, kept_short=3, min_chars=20)
    # min_chars=0 (the default) dedups everything, as before
    dedup = Deduplicator()
    assert dedup.add("a", "GLOUCESTER:") is None and dedup.add("b", "gloucester").duplicate_of == "a"
    assert dedup.report()["kept_short"] == 0


def test_dedup_rejects_bad_settings():
    with pytest.raises(LmforgeError, match=r"threshold=1\.5"):
        Deduplicator(threshold=1.5)
    with pytest.raises(LmforgeError, match="shingle='byte'"):
        Deduplicator(shingle="byte")  # type: ignore[arg-type]
    with pytest.raises(LmforgeError, match="min_chars=-1"):
        Deduplicator(min_chars=-1)


# ------------------------------------------------------------------------------------ contamination

EVAL = "Janet has 16 eggs each day; she eats three for breakfast and bakes muffins for her friends with four more."


def test_contamination_flags_a_shared_13_gram_and_not_12():
    words = EVAL.split()
    train = [
        ("hit", "Intro text. " + " ".join(words[2:15]).upper() + " and then something else entirely."),
        ("near_miss", "Intro text. " + " ".join(words[2:14]) + " and then something else entirely."),
        ("clean", "A story about a dragon who learned to bake bread in the mountains."),
        ("hit_short", "Quiz: what is the capital of France? Paris."),
    ]
    evals = {
        "math": [("e1", EVAL), ("e2", "An unrelated question about trains.")],
        "geo": [("g1", "capital of France")],
    }
    report = contamination(train, evals, n=13)
    assert report["n"] == 13 and report["train_examples"] == 4
    assert report["drop_ids"] == ["hit", "hit_short"] and report["train_contaminated"] == 2
    math_set, geo = report["eval_sets"]["math"], report["eval_sets"]["geo"]
    assert (math_set["eval_examples"], math_set["eval_contaminated"], math_set["eval_ids"]) == (2, 1, ["e1"])
    assert (math_set["train_contaminated"], math_set["train_ids"]) == (1, ["hit"])
    # "capital of France" is shorter than 13 words, so it is matched whole
    assert (geo["eval_short"], geo["eval_ids"], geo["train_ids"]) == (1, ["g1"], ["hit_short"])

    # --decontaminate: dropping exactly those ids leaves nothing to flag
    kept = [(i, t) for i, t in train if i not in set(report["drop_ids"])]
    assert [i for i, _ in kept] == ["near_miss", "clean"]
    assert contamination(kept, evals)["train_contaminated"] == 0


def test_contamination_caps_id_lists():
    train = [(f"t{i}", EVAL) for i in range(5)]
    report = contamination(train, {"math": [("e1", EVAL)]}, max_ids=2)
    assert report["eval_sets"]["math"]["train_ids"] == ["t0", "t1"]
    assert report["eval_sets"]["math"]["train_contaminated"] == 5 and len(report["drop_ids"]) == 5
    with pytest.raises(LmforgeError, match="got 0"):
        contamination(train, {}, n=0)


# ---------------------------------------------------------------------------- golden real-data counts


def _records(path: Path) -> list[tuple[str, str]]:
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return [(f"{path.stem}:{i}", row["text"]) for i, row in enumerate(csv.DictReader(f))]
    lines = path.read_text(encoding="utf-8").splitlines()
    return [
        (f"{path.stem}:{i}", (r := json.loads(line))["question"] + "\n" + r["answer"])
        for i, line in enumerate(lines)
    ]


def test_dedup_and_contamination_golden_counts(shared_data):
    banking = _records(shared_data / "banking77/train.csv")
    gsm_train, gsm_test = (
        _records(shared_data / "gsm8k/train.jsonl"),
        _records(shared_data / "gsm8k/test.jsonl"),
    )
    golden = {"word": (11, 15), "char": (11, 134)}  # BANKING77 train, 9,003 queries: (exact, near) at 0.8
    for shingle, (exact, near) in golden.items():
        dedup = Deduplicator(shingle=shingle)
        for i, t in banking:
            dedup.add(i, t)
        report = dedup.report()
        assert (report["exact"], report["near"]) == (exact, near)
    # the exact duplicates differ only in case, spacing or punctuation, e.g. "I can't seem to be able to use my card"
    assert any(e["kind"] == "exact" and e["text"] != e["original"] for e in report["examples"])

    dedup = Deduplicator()
    assert all(dedup.add(i, t) is None for i, t in gsm_train)  # GSM8K train has no (near-)duplicate problems

    # 4 test problems share a 13-gram with 4 train problems (checked against a brute-force set intersection):
    # one shared problem statement (stamps with a snowflake design) and three stock phrases of solutions
    report = contamination(gsm_train, {"gsm8k_test": gsm_test})
    s = report["eval_sets"]["gsm8k_test"]
    assert (s["eval_examples"], s["eval_contaminated"], s["eval_short"]) == (1188, 4, 0)
    assert s["eval_ids"] == ["test:581", "test:602", "test:632", "test:806"]
    assert report["drop_ids"] == ["train:20", "train:406", "train:699", "train:1314"]


def test_pii_of_many_texts_and_ascii_normalisation_equal_the_plain_definitions():
    """find_pii_many (one scan of many texts) gives each text's find_pii; normalize's ASCII fast path gives what
    the regex definition gives; a chunk's exact-dedup keys (its ASCII texts normalised together) are each text's
    `key`."""
    import random

    from lmforge.data.governance import _PUNCT, find_pii, find_pii_many, normalize

    exact = Deduplicator(near=False)
    short = Deduplicator(near=False, min_chars=6)  # "Σοφία" (5 characters, 10 bytes) is short
    pieces = ["alice@example.com", "+44 20 7946 0958", "(555) 123-4567", "192.168.0.1", "fe80::1", "4111 1111 1111 1111",
              "call 555-123-4567.", "x@y", "10:30:00", "1.2.3.4.5", "Don't STOP!", "ΑΣ", "Σοφία", "a_b", "\x1c\x1f",
              "", "  ", "\n", "\t", "word", "3.14", "-", "...", "a@b.co\n", "::", "+1 (555) 123 4567", "\x00\x7f"]  # fmt: skip
    rng = random.Random(0)
    for _ in range(300):
        texts = [
            rng.choice(["", " ", "\n", "."]).join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
            for _ in range(rng.randint(1, 8))
        ]
        assert find_pii_many(texts) == [find_pii(t) for t in texts], texts
        for t in texts:
            assert normalize(t) == " ".join(_PUNCT.sub("", t.lower()).split()), t
        assert exact.keys(texts) == [exact.key(t) for t in texts], texts
        assert short.keys(texts) == [short.key(t) for t in texts], texts
    every_ascii = "".join(map(chr, range(128))) * 2
    assert normalize(every_ascii) == " ".join(_PUNCT.sub("", every_ascii.lower()).split())
    mixed = [every_ascii, "ΑΣ x", every_ascii[1:], ""]
    assert exact.keys(mixed) == [exact.key(t) for t in mixed]
