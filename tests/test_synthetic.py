"""The synthetic world: byte-identical per seed, disjoint groups, complete Q&A, facts consistent everywhere."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from lmforge.data import synthetic
from lmforge.data import world_phrases as wp
from lmforge.data.synthetic import (
    ATTRIBUTES,
    HELD_OUT_PARAPHRASE,
    REDIRECT_KINDS,
    TRAIN_PARAPHRASES,
    WorldSizes,
    synthesize,
)
from lmforge.errors import LmforgeError

JSONL = (
    "pretrain.jsonl",
    "bios_c.jsonl",
    "sft_a.jsonl",
    "sft_c.jsonl",
    "eval_qa.jsonl",
    "medical_corpus.jsonl",
    "medical_qa.jsonl",
    "preferences.jsonl",
)
FILES = ("README.md", "SOURCE.md", "world.json", *JSONL)

# sha256 of every file of the tiny world, seed 0. Any change to the generator or to world_phrases.py changes
# them on purpose; after checking the new output, regenerate with
#   .venv/bin/python -c "from lmforge.data.synthetic import *; import json; print(json.dumps({k: v['sha256']
#   for k, v in synthesize('/tmp/tiny_world', sizes=WorldSizes.tiny())['files'].items()}, indent=4))"
GOLDEN = {
    "README.md": "e185341db4c0e3c3bf41a546846f6041c28de2404f17a2e938754a48126fb023",
    "SOURCE.md": "07a8ea02b1a96a908f6e1ae3100c7c3af553b4bb75595eaa1d91c3f665abfe0c",
    "world.json": "b30103e3eb7c3ff157a0c3b7656e3f6aba15c31674b49fddc5723b4e8d18cfa4",
    "pretrain.jsonl": "eee19672f0e309798f42d1393622fe9b802b73b69ea079ab0f38118c981ab555",
    "bios_c.jsonl": "97a186d53cc5fc7252ac85b833fc38997434950b4fcc562e35ed31e4fdf8eb37",
    "sft_a.jsonl": "5e4083e715aee54f02b5f16de0c58978c5dec492cc7223c1cde2a39553a77972",
    "sft_c.jsonl": "b3a6bdb199bd22da970742be57a86e793f30d0d8632b6dd15324851c23d88e85",
    "eval_qa.jsonl": "ef00e3b3ba9529e68540a322bd53eb20a30871239f551c8dfc8eaca1d9642485",
    "medical_corpus.jsonl": "ece063bfcd1a9ddad9bb041d7da03e8dcf7b27390b6c02527966ad7b1831f8b7",
    "medical_qa.jsonl": "7b989c8e9876d6c1f833ca4e3e3905eeb7472551e9eb22d476f86bc19fd45bf1",
    "preferences.jsonl": "7abf5a98810de9b92d950e291dfc92e30edd3b9393d2eef09a11187427d9366f",
}


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _mentions(text: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", text) is not None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("world") / "tiny"
    return out, synthesize(out, seed=0, sizes=WorldSizes.tiny())


@pytest.fixture(scope="module")
def world(tiny: tuple[Path, dict[str, Any]]) -> dict[str, Any]:
    return json.loads((tiny[0] / "world.json").read_text())


def test_golden_sha256(tiny: tuple[Path, dict[str, Any]]) -> None:
    out, summary = tiny
    on_disk = {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in FILES}
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert {name: f["sha256"] for name, f in summary["files"].items()} == on_disk
    assert on_disk == GOLDEN


def test_same_bytes_whatever_the_hash_seed(tmp_path: Path) -> None:
    # String hashing is randomised per process: a fresh interpreter with another PYTHONHASHSEED must agree.
    code = (
        "import json, sys; from lmforge.data.synthetic import synthesize, WorldSizes; "
        "s = synthesize(sys.argv[1], sizes=WorldSizes.tiny()); "
        "print(json.dumps({k: v['sha256'] for k, v in s['files'].items()}))"
    )
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        run = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / hash_seed)], env=env, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout) == GOLDEN


def test_same_seed_same_bytes_other_seed_other_world(tmp_path: Path) -> None:
    sizes = WorldSizes.tiny()
    first = synthesize(tmp_path / "a", seed=7, sizes=sizes)["files"]
    again = synthesize(tmp_path / "b", seed=7, sizes=sizes)["files"]
    other = synthesize(tmp_path / "c", seed=8, sizes=sizes)["files"]
    assert first == again
    for name in ("world.json", *JSONL):
        assert first[name]["sha256"] != other[name]["sha256"], name
    for name in FILES:
        assert b"\r" not in (tmp_path / "a" / name).read_bytes()


def test_counts_match_sizes(tiny: tuple[Path, dict[str, Any]]) -> None:
    out, summary = tiny
    s = WorldSizes.tiny()
    attrs, train = len(ATTRIBUTES), len(TRAIN_PARAPHRASES)
    expected = {
        "pretrain.jsonl": (s.people_a + s.people_b) * s.bios_per_person + s.filler_docs,
        "bios_c.jsonl": s.people_c * s.bios_per_person,
        "sft_a.jsonl": s.people_a * attrs * train,
        "sft_c.jsonl": s.people_c * attrs * train,
        "eval_qa.jsonl": (s.people_a + s.people_b + s.people_c) * attrs,
        "medical_corpus.jsonl": (s.diseases + s.drugs) * s.medical_articles_per_topic,
        "medical_qa.jsonl": s.medical_qa,
        "preferences.jsonl": s.preference_pairs,
    }
    for name, n in expected.items():
        assert summary["files"][name]["records"] == n == len(_read(out / name)), name
        assert summary["files"][name]["bytes"] == (out / name).stat().st_size
    assert summary["sizes"] == s.model_dump() and summary["seed"] == 0


def test_groups_are_disjoint_and_sized(world: dict[str, Any]) -> None:
    s = WorldSizes.tiny()
    people = world["people"]
    names = [p["name"] for p in people]
    assert len(set(names)) == len(names)
    by_group = {g: {p["name"] for p in people if p["group"] == g} for g in "ABC"}
    assert [len(by_group[g]) for g in "ABC"] == [s.people_a, s.people_b, s.people_c]
    assert set(world["attributes"]) == set(ATTRIBUTES)
    for p in people:
        assert set(ATTRIBUTES) <= set(p) and p["gender"] in ("female", "male")
        assert p["birth_city"] in wp.CITIES and p["employer"] in wp.EMPLOYERS and p["hobby"] in wp.HOBBIES


def test_every_a_and_c_fact_has_sft_questions(
    tiny: tuple[Path, dict[str, Any]], world: dict[str, Any]
) -> None:
    out, _ = tiny
    people = {p["name"]: p for p in world["people"]}
    for group, name in (("A", "sft_a.jsonl"), ("C", "sft_c.jsonl")):
        records = _read(out / name)
        members = {n for n, p in people.items() if p["group"] == group}
        asked = {(r["person"], r["attribute"], r["paraphrase"]) for r in records}
        assert asked == {(n, a, k) for n in members for a in ATTRIBUTES for k in TRAIN_PARAPHRASES}
        for r in records:
            user, assistant = r["messages"]
            person = people[r["person"]]
            assert r["group"] == group == person["group"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            assert user["content"] == wp.QUESTIONS[r["attribute"]][r["paraphrase"]].format(name=r["person"])
            assert person[r["attribute"]] in assistant["content"] and r["person"] in assistant["content"]
            assert assistant["content"].endswith(".")


def test_pretraining_holds_a_and_b_never_c(tiny: tuple[Path, dict[str, Any]], world: dict[str, Any]) -> None:
    out, _ = tiny
    pretrain = _read(out / "pretrain.jsonl")
    text = "\n".join(r["text"] for r in pretrain)
    medical = "\n".join(r["text"] for r in _read(out / "medical_corpus.jsonl"))
    bios_c = "\n".join(r["text"] for r in _read(out / "bios_c.jsonl"))
    for p in world["people"]:
        in_pretraining = p["group"] in "AB"
        assert _mentions(text, p["name"]) == in_pretraining, p
        assert _mentions(bios_c, p["name"]) == (p["group"] == "C"), p
        assert not _mentions(medical, p["name"])
    kinds = {r["kind"] for r in pretrain}
    assert kinds == {"biography", "filler"}
    # Filler never names anyone: knowledge of a person comes from biographies only.
    filler = "\n".join(r["text"] for r in pretrain if r["kind"] == "filler")
    assert not any(_mentions(filler, p["name"].split()[1]) for p in world["people"])
    # Shuffled: biographies and filler are interleaved, not in two blocks.
    order = [r["kind"] for r in pretrain]
    assert sum(a != b for a, b in itertools.pairwise(order)) > 2


def test_biographies_state_every_fact(tiny: tuple[Path, dict[str, Any]], world: dict[str, Any]) -> None:
    out, _ = tiny
    people = {p["name"]: p for p in world["people"]}
    bios = [r for r in _read(out / "pretrain.jsonl") if r["kind"] == "biography"] + _read(
        out / "bios_c.jsonl"
    )
    per_person: dict[str, list[str]] = {}
    for r in bios:
        person = people[r["person"]]
        assert r["group"] == person["group"]
        assert r["text"].startswith(person["name"]) or person["name"] in r["text"].split(".")[0]
        for attr in ATTRIBUTES:
            assert person[attr] in r["text"], (attr, r["text"])
        assert "{" not in r["text"] and "}" not in r["text"]
        per_person.setdefault(r["person"], []).append(r["text"])
    # Several biographies per person, in different words.
    assert all(len(set(texts)) == WorldSizes.tiny().bios_per_person for texts in per_person.values())


def test_eval_qa_is_held_out_and_consistent(tiny: tuple[Path, dict[str, Any]], world: dict[str, Any]) -> None:
    out, _ = tiny
    people = {p["name"]: p for p in world["people"]}
    records = _read(out / "eval_qa.jsonl")
    assert {(r["person"], r["attribute"]) for r in records} == {(n, a) for n in people for a in ATTRIBUTES}
    sft_questions = {
        r["messages"][0]["content"] for f in ("sft_a.jsonl", "sft_c.jsonl") for r in _read(out / f)
    }
    for r in records:
        person = people[r["person"]]
        question, answer = (m["content"] for m in r["messages"])
        assert r["paraphrase"] == HELD_OUT_PARAPHRASE and r["group"] == person["group"]
        assert r["value"] == person[r["attribute"]] and r["value"] in answer
        assert answer == wp.ANSWERS[r["attribute"]].format(name=r["person"], v=r["value"])
        assert question not in sft_questions
    assert {r["group"] for r in records} == {"A", "B", "C"}


def test_template_tables() -> None:
    assert HELD_OUT_PARAPHRASE not in TRAIN_PARAPHRASES
    for attr in ATTRIBUTES:
        templates, questions = wp.BIO_TEMPLATES[attr], wp.QUESTIONS[attr]
        assert len(set(templates)) == len(templates) >= 10, attr
        assert len(set(questions)) == len(questions) >= 3, attr
        assert set(TRAIN_PARAPHRASES) | {HELD_OUT_PARAPHRASE} == set(range(len(questions)))
        for gender in ("female", "male"):
            person = synthetic.Person("Ada Carrow", gender, "A", *(["X"] * len(ATTRIBUTES)))
            for template in templates:
                for use_name in (True, False):
                    sentence = synthetic._render(template, person, "VALUE", use_name)
                    assert "VALUE" in sentence and sentence[0].isupper() and sentence.endswith("."), sentence
                    assert ("Ada Carrow" in sentence) == use_name, sentence
    assert set(wp.BIO_TEMPLATES) == set(wp.QUESTIONS) == set(wp.ANSWERS) == set(ATTRIBUTES)


def test_name_pools_never_collide() -> None:
    firsts = wp.FEMALE_FIRST_NAMES + wp.MALE_FIRST_NAMES
    assert len(set(firsts)) == len(firsts) and len(set(wp.LAST_NAMES)) == len(wp.LAST_NAMES)
    for a in wp.LAST_NAMES:
        assert not any(b != a and b.startswith(a) for b in wp.LAST_NAMES), a
    name_words = set(firsts) | set(wp.LAST_NAMES)
    other_words = {
        word
        for pool in (wp.CITIES, wp.UNIVERSITIES, wp.EMPLOYERS, wp.DISEASE_ROOTS, wp.HOBBIES, wp.MAJORS)
        for value in pool
        for word in value.split()
    }
    assert not name_words & other_words
    for pool in (wp.CITIES, wp.UNIVERSITIES, wp.MAJORS, wp.EMPLOYERS, wp.HOBBIES, wp.DISEASE_ROOTS):
        assert len(set(pool)) == len(pool)


def test_medical_qa(tiny: tuple[Path, dict[str, Any]], world: dict[str, Any]) -> None:
    out, _ = tiny
    records = _read(out / "medical_qa.jsonl")
    kinds = [r["kind"] for r in records]
    assert set(kinds) == set(wp.MEDICAL_QUESTIONS)
    assert max(map(kinds.count, set(kinds))) - min(map(kinds.count, set(kinds))) <= 1  # spread evenly
    disease_names = {d["name"] for d in world["diseases"]}
    drug_names = {d["name"] for d in world["drugs"]}
    for r in records:
        system, user, assistant = r["messages"]
        assert (system["role"], user["role"], assistant["role"]) == ("system", "user", "assistant")
        assert system["content"] == wp.MEDICAL_SYSTEM_PROMPT == world["medical_system_prompt"]
        assert r["redirect"] == (r["kind"] in REDIRECT_KINDS)
        assert any(n in user["content"] for n in disease_names | drug_names)
        if r["kind"] == "emergency":
            assert "emergency" in assistant["content"]
        if r["kind"] in ("dosage", "diagnosis"):
            assert "doctor" in assistant["content"]
    # Interaction answers agree with world.json.
    interacting = {frozenset(x["drugs"]) for x in world["interactions"]}
    for r in records:
        if r["kind"] == "interaction":
            pair = frozenset(n for n in drug_names if _mentions(r["messages"][1]["content"], n))
            assert r["messages"][2]["content"].startswith("No,") == (pair in interacting)
    for disease in world["diseases"]:
        assert disease["treatment"] in drug_names
        assert any(
            disease["name"] in d["treats"] for d in world["drugs"] if d["name"] == disease["treatment"]
        )


def test_medical_corpus(tiny: tuple[Path, dict[str, Any]], world: dict[str, Any]) -> None:
    out, _ = tiny
    articles = _read(out / "medical_corpus.jsonl")
    for disease in world["diseases"]:
        texts = [a["text"] for a in articles if a["topic"] == disease["name"]]
        assert texts and all(disease["treatment"] in t for t in texts)
        assert all(disease["warning_sign"] in t.lower() for t in texts)
    for drug in world["drugs"]:
        texts = [a["text"] for a in articles if a["topic"] == drug["name"]]
        assert texts and all(drug["side_effect"] in t for t in texts)


def test_preferences(tiny: tuple[Path, dict[str, Any]]) -> None:
    out, _ = tiny
    records = _read(out / "preferences.jsonl")
    kinds = [r["rejected_kind"] for r in records]
    n = WorldSizes.tiny().preference_pairs
    assert sorted(set(kinds)) == ["terse", "unsafe", "wrong"]
    assert all(abs(kinds.count(k) - n / 3) < 1 for k in set(kinds))
    sources = set()
    for r in records:
        assert r["chosen"] != r["rejected"] and r["prompt"].endswith("?")
        assert r["chosen"][0].isupper() and r["chosen"].endswith(".")
        if r["rejected_kind"] == "terse":  # the bare fact: right, but not a sentence
            assert r["rejected"] in r["chosen"] or r["rejected"] in ("No.", "Yes."), r
        if r["rejected_kind"] == "unsafe":
            assert r["source"] == "medical"
        if r["source"] == "person":
            assert r["kind"] in ATTRIBUTES
        sources.add(r["source"])
    assert sources == {"person", "medical"}


def test_formats_a_generic_reader_detects(tiny: tuple[Path, dict[str, Any]]) -> None:
    out, _ = tiny
    for name in ("pretrain.jsonl", "bios_c.jsonl", "medical_corpus.jsonl"):
        assert all(isinstance(r["text"], str) and "messages" not in r for r in _read(out / name))
    for name in ("sft_a.jsonl", "sft_c.jsonl", "eval_qa.jsonl", "medical_qa.jsonl"):
        assert all(r["messages"][-1]["role"] == "assistant" and "text" not in r for r in _read(out / name))
    for r in _read(out / "preferences.jsonl"):
        assert all(isinstance(r[k], str) for k in ("prompt", "chosen", "rejected"))
    assert not any("label" in r for name in JSONL for r in _read(out / name))  # would read as classification


def test_readme_and_source(tiny: tuple[Path, dict[str, Any]]) -> None:
    out, _ = tiny
    readme, source = (out / "README.md").read_text(), (out / "SOURCE.md").read_text()
    assert "**License:** CC0-1.0" in source and "seed 0" in source
    assert all(f"`{name}`" in readme for name in JSONL)


def test_replaces_an_old_world_only_after_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "world"
    old = synthesize(out, seed=0, sizes=WorldSizes.tiny())

    def fail_late(path: Path, data: bytes) -> Path:
        if Path(path).name == "preferences.jsonl":
            raise OSError("disk full")
        return real(path, data)

    real = synthetic.atomic_write
    monkeypatch.setattr(synthetic, "atomic_write", fail_late)
    with pytest.raises(OSError, match="disk full"):
        synthesize(out, seed=1, sizes=WorldSizes.tiny(), overwrite=True)
    assert {p.name for p in tmp_path.iterdir()} == {"world"}  # no temporary directory left behind
    assert (
        hashlib.sha256((out / "world.json").read_bytes()).hexdigest() == old["files"]["world.json"]["sha256"]
    )

    monkeypatch.undo()
    with pytest.raises(LmforgeError, match=r"already holds a synthetic world.*add --overwrite"):
        synthesize(out, seed=1, sizes=WorldSizes.tiny())
    new = synthesize(out, seed=1, sizes=WorldSizes.tiny(), overwrite=True)
    assert new["files"]["world.json"]["sha256"] != old["files"]["world.json"]["sha256"]
    assert {p.name for p in tmp_path.iterdir()} == {"world"}


def test_never_replaces_a_foreign_directory(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(LmforgeError, match="does not hold a synthetic world"):
        synthesize(mine, sizes=WorldSizes.tiny(), overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(LmforgeError):
        synthesize(tmp_path / "file", sizes=WorldSizes.tiny())
    (tmp_path / "empty").mkdir()
    synthesize(tmp_path / "empty", sizes=WorldSizes.tiny())
    assert (tmp_path / "empty" / "world.json").is_file()


def test_sizes_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="extra"):
        WorldSizes(people_d=3)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="name pools"):
        WorldSizes(people_a=10**6)
    with pytest.raises(ValidationError, match="must not exceed"):
        WorldSizes(diseases=3, drugs=4)
    with pytest.raises(LmforgeError, match="medical_qa"):
        synthesize(tmp_path / "w", sizes=WorldSizes.tiny().model_copy(update={"medical_qa": 10**6}))
    assert not (tmp_path / "w").exists()
    assert all(f.description for f in WorldSizes.model_fields.values())  # attribute docstrings became help


def test_default_world_is_demo_sized(tmp_path: Path) -> None:
    summary = synthesize(tmp_path / "w", seed=0)
    text = sum(len(r["text"]) for r in _read(tmp_path / "w" / "pretrain.jsonl"))
    assert 300_000 <= text <= 450_000  # an epoch every few seconds for the demo's ~1M-parameter model
    bios = [r for r in _read(tmp_path / "w" / "pretrain.jsonl") if r["kind"] == "biography"]
    # Every sentence names its person (name_share 1): a window cut mid-biography still binds each fact.
    for bio in bios[:50]:
        assert all(bio["person"] in x for x in bio["text"].split(". ")), bio
    assert summary["files"]["eval_qa.jsonl"]["records"] == 300 * len(ATTRIBUTES)
    redirects = sum(r["redirect"] for r in _read(tmp_path / "w" / "medical_qa.jsonl"))
    assert 0.25 < redirects / summary["files"]["medical_qa.jsonl"]["records"] < 0.45
