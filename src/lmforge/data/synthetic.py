"""The synthetic world behind `lmforge data synth`: a seeded, fictional world whose splits make the seeds'
claims measurable (DESIGN.md, "The embedded default: a synthetic world").

People of three disjoint groups have six attributes each. Group A is in the pretraining biographies and in
SFT Q&A, group B only in pretraining (knowledge that pretraining alone gave), group C never in pretraining
(facts taught by SFT only, or retrieved from `bios_c.jsonl`). Each person gets several biographies, each a
fresh pick of paraphrase templates in a random sentence order: the "knowledge augmentation" that Allen-Zhu
and Li (Physics of Language Models, part 3.1) found necessary for facts to become extractable by questions.
A fictional medical domain (articles, and chat Q&A under a safety system prompt) mirrors the seeds'
medical-chatbot example, and preference pairs in a house style feed reward modelling and DPO.

Everything comes from `random.Random` streams seeded by (seed, part), never the global RNG, set order or
time: the same seed and sizes give byte-identical files. Each part has its own stream (each person's
biographies too), so resizing one part leaves the others' text unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmforge.data import world_phrases as wp
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write, staging_dir
from lmforge.paths import check_output

log = logging.getLogger(__name__)
T = TypeVar("T")

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "hobby")
TRAIN_PARAPHRASES = (0, 1, 2, 3)
"""Question paraphrases used in SFT (`sft_a.jsonl`, `sft_c.jsonl`) and in preference prompts."""
HELD_OUT_PARAPHRASE = 4
"""The question paraphrase kept out of training and used only in `eval_qa.jsonl`."""
REDIRECT_KINDS = ("emergency", "dosage", "diagnosis")
"""Medical question kinds whose answer declines and sends the user to real care."""
GENERATOR = "lmforge.data.synthetic"
FORMAT_VERSION = 1

_VALUE_POOLS = {
    "birth_city": wp.CITIES,
    "university": wp.UNIVERSITIES,
    "major": wp.MAJORS,
    "employer": wp.EMPLOYERS,
    "hobby": wp.HOBBIES,
}
_N_NAMES = (len(wp.FEMALE_FIRST_NAMES) + len(wp.MALE_FIRST_NAMES)) * len(wp.LAST_NAMES)
_PRONOUNS = {"female": ("she", "her", "her"), "male": ("he", "his", "him")}  # subject, possessive, object


class WorldSizes(BaseModel):
    """How big the synthetic world is; every count is exact.

    Defaults, the demo's knowledge recipe (docs/benchmarks.md, "Knowledge"): 200 pretraining people x 5
    biographies (~300 characters, ~60 tokens each) + 100 filler paragraphs are ~70k tokens with the demo's
    2,048-id BPE. A 1.1M-parameter Llama trains ~14k tokens/s on 2 CPU cores, an epoch every 5 seconds, so a
    few minutes show each fact hundreds of times; fewer people store faster than many, and the facts are a few
    tens of kilobits. Every sentence names its person in full (a window that starts mid-biography still binds
    each fact to a name). 100 people in B and in C give 600 held-out questions per group, so a group's
    accuracy is known to about +-4 points (95%).
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    people_a: int = Field(100, ge=1)
    """People of group A: in pretraining and in SFT Q&A."""
    people_b: int = Field(100, ge=0)
    """People of group B: in pretraining only; after SFT on A, answers about B can only come from pretraining."""
    people_c: int = Field(100, ge=0)
    """People of group C: never in pretraining; taught only by SFT Q&A or retrieved from bios_c.jsonl (RAG)."""
    bios_per_person: int = Field(5, ge=1)
    """Biographies per person, each a fresh pick of paraphrases in a fresh sentence order."""
    name_share: float = Field(1.0, ge=0, le=1)
    """Share of a biography's later sentences that name the person in full (the rest use a pronoun; the first
    always names them). 1: every sentence binds its fact to the name, even in a window that starts mid-biography."""
    filler_docs: int = Field(100, ge=0)
    """Everyday-life paragraphs mixed into pretraining, for general language."""
    diseases: int = Field(30, ge=1, le=len(wp.DISEASE_ROOTS))
    """Invented diseases of the medical domain."""
    drugs: int = Field(20, ge=2, le=len(wp.DRUG_PREFIXES))
    """Invented drugs (at most `diseases`: each drug treats at least one disease)."""
    medical_articles_per_topic: int = Field(6, ge=1)
    """Articles about each disease and each drug in medical_corpus.jsonl, in different words."""
    medical_qa: int = Field(800, ge=0)
    """Medical chat records, spread over the question kinds as evenly as the world allows (each fact kind
    has only 3 paraphrases per disease or drug; at the default about a third are redirects)."""
    preference_pairs: int = Field(1500, ge=0)
    """Preference pairs, a third each with a wrong, a terse and an unsafe rejected answer."""

    @model_validator(mode="after")
    def _check_fits(self) -> WorldSizes:
        people = self.people_a + self.people_b + self.people_c
        if people > _N_NAMES:
            raise ValueError(f"{people} people asked for, but the name pools give only {_N_NAMES} full names")
        if self.drugs > self.diseases:
            raise ValueError(f"drugs ({self.drugs}) must not exceed diseases ({self.diseases})")
        return self

    @classmethod
    def tiny(cls) -> WorldSizes:
        """A world small enough for unit tests (a few kB, milliseconds to build)."""
        return cls(
            people_a=6,
            people_b=4,
            people_c=4,
            bios_per_person=2,
            filler_docs=6,
            diseases=4,
            drugs=3,
            medical_articles_per_topic=1,
            medical_qa=18,
            preference_pairs=12,
        )


@dataclass(frozen=True)
class Person:
    """One person of the world; the six attributes are the facts the model should learn."""

    name: str
    gender: str  # "female" | "male": picks the pronouns of the biographies
    group: str  # "A" | "B" | "C"
    birth_date: str
    birth_city: str
    university: str
    major: str
    employer: str
    hobby: str


@dataclass(frozen=True)
class Disease:
    """An invented disease; `treatment` names a drug."""

    name: str
    cause: str
    affected: str
    symptoms: tuple[str, ...]
    treatment: str
    outlook: str
    warning_sign: str


@dataclass(frozen=True)
class Drug:
    """An invented drug; `treats` lists disease names."""

    name: str
    drug_class: str
    form: str
    side_effect: str
    treats: tuple[str, ...]


@dataclass(frozen=True)
class Interaction:
    """Two drugs that must not be taken together, and what they cause."""

    drugs: tuple[str, str]
    effect: str


@dataclass(frozen=True)
class _Item:
    """One question with its house-style answer and the rejected answers it supports (None: not this kind)."""

    kind: str
    question: str
    answer: str
    wrong: str | None = None
    terse: str | None = None
    unsafe: str | None = None


def _rng(seed: int, part: str) -> random.Random:
    # A string seed goes through sha512, independent of PYTHONHASHSEED and stable across Python versions.
    return random.Random(f"lmforge-world/{seed}/{part}")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _join(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# --- people, biographies, questions ------------------------------------------------------------------


def _birth_date(rng: random.Random) -> str:
    lo, hi = date(1950, 1, 1).toordinal(), date(2004, 12, 31).toordinal()
    day = date.fromordinal(rng.randint(lo, hi))
    return f"{wp.MONTHS[day.month - 1]} {day.day}, {day.year}"


def _make_people(rng: random.Random, sizes: WorldSizes) -> list[Person]:
    pools = (("female", wp.FEMALE_FIRST_NAMES), ("male", wp.MALE_FIRST_NAMES))
    names = [
        (f"{first} {last}", gender) for gender, firsts in pools for first in firsts for last in wp.LAST_NAMES
    ]
    groups = ["A"] * sizes.people_a + ["B"] * sizes.people_b + ["C"] * sizes.people_c
    people = []
    for (name, gender), group in zip(rng.sample(names, len(groups)), groups, strict=True):
        values = {attr: rng.choice(pool) for attr, pool in _VALUE_POOLS.items()}
        people.append(Person(name, gender, group, birth_date=_birth_date(rng), **values))
    return people


def _render(template: str, person: Person, value: str, use_name: bool) -> str:
    """One biography sentence, the person referred to by full name or by pronoun."""
    sp, pp, op = _PRONOUNS[person.gender]
    name = person.name
    slots = {
        "S": name if use_name else _cap(sp),
        "s": name if use_name else sp,
        "P": f"{name}'s" if use_name else _cap(pp),
        "p": f"{name}'s" if use_name else pp,
        "o": name if use_name else op,
        "sp": sp,
        "pp": pp,
        "v": value,
    }
    return _cap(template.format(**slots))


def _biography(rng: random.Random, person: Person, name_share: float) -> str:
    """One biography: every attribute once, in a random order, each with a random paraphrase."""
    sentences = []
    for i, attr in enumerate(rng.sample(ATTRIBUTES, len(ATTRIBUTES))):
        # The first sentence introduces the person by name; later ones use it `name_share` of the time, so
        # the model links the name to facts both directly and through pronouns.
        use_name = i == 0 or rng.random() < name_share
        sentences.append(_render(rng.choice(wp.BIO_TEMPLATES[attr]), person, getattr(person, attr), use_name))
    return " ".join(sentences)


def _answer(attr: str, person: Person, value: str | None = None) -> str:
    return wp.ANSWERS[attr].format(name=person.name, v=getattr(person, attr) if value is None else value)


def _chat(question: str, answer: str, system: str | None = None) -> list[dict[str, str]]:
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return [{"role": "system", "content": system}, *turns] if system else turns


def _qa_record(person: Person, attr: str, paraphrase: int) -> dict[str, Any]:
    question = wp.QUESTIONS[attr][paraphrase].format(name=person.name)
    return {
        "messages": _chat(question, _answer(attr, person)),
        "person": person.name,
        "attribute": attr,
        "group": person.group,
        "paraphrase": paraphrase,
        "value": getattr(person, attr),  # the fact the answer states: what --cite looks for in passages
    }


def _person_items(rng: random.Random, people: Iterable[Person]) -> list[_Item]:
    """Preference material: each training question about each person, with a wrong and a terse answer."""
    items = []
    for person in people:
        for attr in ATTRIBUTES:
            value = getattr(person, attr)
            if attr == "birth_date":
                wrong = value
                while wrong == value:
                    wrong = _birth_date(rng)
            else:
                wrong = rng.choice([v for v in _VALUE_POOLS[attr] if v != value])
            for paraphrase in TRAIN_PARAPHRASES:
                question = wp.QUESTIONS[attr][paraphrase].format(name=person.name)
                items.append(
                    _Item(attr, question, _answer(attr, person), _answer(attr, person, wrong), value)
                )
    return items


# --- filler ------------------------------------------------------------------------------------------


def _filler_paragraph(rng: random.Random) -> tuple[str, str]:
    """An everyday scene of 4-7 sentences from a small grammar; returns (topic, text)."""
    topic, agent = rng.choice(wp.FILLER_TOPICS), rng.choice(wp.AGENTS)
    actions = rng.sample(topic.actions, len(topic.actions))
    details = rng.sample(topic.details, len(topic.details))
    named = False

    def who() -> str:
        # "the small girl" on the first mention after the opening, then mostly "she", as people write.
        nonlocal named
        noun = not named or rng.random() < 0.3
        named = True
        return agent.definite if noun else agent.pronoun

    def act(sentence_start: str | None) -> str:
        action = actions.pop()
        if len(actions) >= 1 and rng.random() < 0.4:
            action += f", and then {agent.pronoun} {actions.pop()}"
        if sentence_start is None:
            return f"{_cap(who())} {action}."
        return f"{sentence_start}, {who()} {action}."

    sentences = [f"{rng.choice(wp.TIMES)}, {agent.indefinite} {rng.choice(topic.openings)}."]
    felt = False
    for _ in range(rng.randint(3, 5)):
        r = rng.random()
        if r < 0.15 and not felt:
            felt = True
            feeling, reason = rng.choice(wp.FEELINGS), rng.choice(topic.reasons)
            if rng.random() < 0.5:
                sentences.append(f"{_cap(who())} felt {feeling}, because {reason}.")
            else:
                sentences.append(f"Because {reason}, {who()} felt {feeling}.")
        elif (r < 0.4 or not actions) and details:
            sentences.append(details.pop())
        elif actions:
            sentences.append(act(rng.choice(wp.CONNECTIVES) if rng.random() < 0.35 else None))
    if rng.random() < 0.75:
        sentences.append(rng.choice(topic.closings))
    return topic.name, " ".join(sentences)


# --- the medical domain ----------------------------------------------------------------------------------


def _make_medical(
    rng: random.Random, sizes: WorldSizes
) -> tuple[list[Disease], list[Drug], list[Interaction]]:
    classes = tuple(wp.CAUSES_BY_CLASS)
    specs = [
        (prefix + rng.choice(wp.DRUG_MIDDLES) + rng.choice(wp.DRUG_SUFFIXES), rng.choice(classes))
        for prefix in rng.sample(wp.DRUG_PREFIXES, sizes.drugs)
    ]
    # Every drug treats at least one disease; the remaining diseases pick a drug at random.
    treatment = list(range(sizes.drugs)) + [
        rng.randrange(sizes.drugs) for _ in range(sizes.diseases - sizes.drugs)
    ]
    rng.shuffle(treatment)
    diseases = []
    for root, drug_index in zip(rng.sample(wp.DISEASE_ROOTS, sizes.diseases), treatment, strict=True):
        drug_name, drug_class = specs[drug_index]
        diseases.append(
            Disease(
                name=f"{root} {rng.choice(wp.DISEASE_KINDS)}",
                cause=rng.choice(wp.CAUSES_BY_CLASS[drug_class]),
                affected=rng.choice(wp.AFFECTED),
                symptoms=tuple(rng.sample(wp.SYMPTOMS, 3)),
                treatment=drug_name,
                outlook=rng.choice(wp.OUTLOOKS),
                warning_sign=rng.choice(wp.WARNING_SIGNS),
            )
        )
    drugs = [
        Drug(
            name=name,
            drug_class=drug_class,
            form=rng.choice(wp.DRUG_FORMS),
            side_effect=rng.choice(wp.SIDE_EFFECTS),
            treats=tuple(d.name for d in diseases if d.treatment == name),
        )
        for name, drug_class in specs
    ]
    pairs = [(a.name, b.name) for i, a in enumerate(drugs) for b in drugs[i + 1 :]]
    # About two interactions per drug: enough to matter, few enough that most pairs are safe.
    interactions = [
        Interaction(pair, rng.choice(wp.INTERACTION_EFFECTS))
        for pair in rng.sample(pairs, min(len(pairs), sizes.drugs))
    ]
    return diseases, drugs, interactions


def _disease_facts(disease: Disease, drug: Drug) -> dict[str, str]:
    return {
        "d": disease.name,
        "D": _cap(disease.name),
        "cause": disease.cause,
        "affected": disease.affected,
        "symptoms": _join(disease.symptoms),
        "drug": drug.name,
        "cls": drug.drug_class,
        "form": drug.form,
        "outlook": disease.outlook,
        "warning": disease.warning_sign,
        "Warning": _cap(disease.warning_sign),
    }


def _drug_facts(drug: Drug) -> dict[str, str]:
    return {
        "drug": drug.name,
        "Drug": _cap(drug.name),
        "cls": drug.drug_class,
        "form": drug.form,
        "treats": _join(drug.treats),
        "side_effect": drug.side_effect,
    }


def _medical_articles(
    rng: random.Random,
    sizes: WorldSizes,
    diseases: list[Disease],
    drugs: list[Drug],
    interactions: list[Interaction],
) -> list[dict[str, Any]]:
    by_name = {drug.name: drug for drug in drugs}
    records = []
    for _ in range(sizes.medical_articles_per_topic):
        for disease in diseases:
            facts = _disease_facts(disease, by_name[disease.treatment])
            parts = ["intro", *rng.sample(["affected", "symptoms", "treatment", "outlook"], 4), "warning"]
            text = " ".join(_cap(rng.choice(wp.DISEASE_ARTICLE[p]).format(**facts)) for p in parts)
            records.append({"text": text, "kind": "disease", "topic": disease.name})
        for drug in drugs:
            facts = _drug_facts(drug)
            sentences = [
                rng.choice(wp.DRUG_ARTICLE[p]).format(**facts) for p in ("uses", "side_effect", "advice")
            ]
            for x in interactions:
                if drug.name in x.drugs:
                    other = x.drugs[1] if x.drugs[0] == drug.name else x.drugs[0]
                    sentences.append(
                        rng.choice(wp.DRUG_ARTICLE["interaction"]).format(
                            **facts, other=other, effect=x.effect
                        )
                    )
            rng.shuffle(sentences)
            intro = rng.choice(wp.DRUG_ARTICLE["intro"]).format(**facts)
            records.append(
                {"text": " ".join(map(_cap, [intro, *sentences])), "kind": "drug", "topic": drug.name}
            )
    rng.shuffle(records)
    return records


def _medical_items(
    rng: random.Random, diseases: list[Disease], drugs: list[Drug], interactions: list[Interaction]
) -> dict[str, list[_Item]]:
    """Every medical question the world can ask, by kind, each with its answer and rejected variants."""
    by_name = {drug.name: drug for drug in drugs}
    items: dict[str, list[_Item]] = {kind: [] for kind in wp.MEDICAL_QUESTIONS}

    def add(
        kind: str,
        facts: dict[str, str],
        answer: str | None = None,
        wrong: dict[str, str] | None = None,
        terse: str | None = None,
        unsafe: str | None = None,
    ) -> None:
        # One item per question paraphrase. `wrong` replaces some facts: the same sentence, but false.
        template = wp.MEDICAL_ANSWERS[answer or kind]
        wrong_answer = template.format(**{**facts, **wrong}) if wrong else None
        for question in wp.MEDICAL_QUESTIONS[kind]:
            items[kind].append(
                _Item(kind, question.format(**facts), template.format(**facts), wrong_answer, terse, unsafe)
            )

    def unsafe(kind: str, facts: dict[str, str]) -> str:
        return rng.choice(wp.UNSAFE_ANSWERS[kind]).format(**facts)

    all_causes = [cause for causes in wp.CAUSES_BY_CLASS.values() for cause in causes]
    for disease in diseases:
        drug = by_name[disease.treatment]
        facts = _disease_facts(disease, drug)
        others = [d for d in diseases if d.symptoms != disease.symptoms]
        wrong_symptoms = {"symptoms": _join(rng.choice(others).symptoms)} if others else None
        add("symptoms", facts, wrong=wrong_symptoms, terse=facts["symptoms"])
        wrong_cause = {"cause": rng.choice([c for c in all_causes if c != disease.cause])}
        add("cause", facts, wrong=wrong_cause, terse=disease.cause)
        other_drug = rng.choice([d for d in drugs if d.name != drug.name])
        add("treatment", facts, wrong=_disease_facts(disease, other_drug), terse=drug.name)
        for who, now in wp.RELATIVES:
            add("emergency", {**facts, "who": who, "now": now}, unsafe=unsafe("emergency", facts))
        s1, s2 = rng.sample(disease.symptoms, 2)
        add("diagnosis", {**facts, "s1": s1, "s2": s2}, unsafe=unsafe("diagnosis", facts))
    for drug in drugs:
        facts = _drug_facts(drug)
        others = [d for d in drugs if d.treats != drug.treats]
        wrong_treats = {"treats": _join(rng.choice(others).treats)} if others else None
        add("drug_use", facts, wrong=wrong_treats, terse=facts["treats"])
        wrong_side = {"side_effect": rng.choice([s for s in wp.SIDE_EFFECTS if s != drug.side_effect])}
        add("side_effect", facts, wrong=wrong_side, terse=drug.side_effect)
        for whom, whom_answer in wp.DOSE_FOR:
            add("dosage", {**facts, "whom": whom, "whom_answer": whom_answer}, unsafe=unsafe("dosage", facts))
    # As many safe pairs as interacting ones, so "no" is not the answer to every interaction question.
    interacting = {x.drugs: x.effect for x in interactions}
    safe = [
        (x.name, y.name)
        for i, x in enumerate(drugs)
        for y in drugs[i + 1 :]
        if (x.name, y.name) not in interacting
    ]
    for pair in [*interacting, *rng.sample(safe, min(len(safe), len(interacting)))]:
        first, second = rng.sample(pair, 2)
        facts = {"drug": first, "other": second, "effect": interacting.get(pair, "")}
        if pair in interacting:
            add("interaction", facts, "interaction_yes", terse="No.", unsafe=unsafe("interaction", facts))
        else:
            add("interaction", facts, "interaction_no", terse="Yes.")
    return items


def _take_balanced(rng: random.Random, pools: Sequence[Sequence[T]], n: int, what: str) -> list[T]:
    """`n` items spread evenly over the pools (round robin through each shuffled pool), then shuffled."""
    available = sum(map(len, pools))
    if n > available:
        raise LmforgeError(
            f"{what}: {n} asked for, but this world has only {available}; ask for fewer or grow it"
        )
    shuffled = [rng.sample(list(pool), len(pool)) for pool in pools]
    taken: list[T] = []
    for i in range(max(map(len, pools), default=0)):
        taken.extend(pool[i] for pool in shuffled if i < len(pool))
        if len(taken) >= n:
            break
    taken = taken[:n]
    rng.shuffle(taken)
    return taken


def _preferences(
    rng: random.Random, n: int, person_items: list[_Item], medical: dict[str, list[_Item]]
) -> list[dict[str, Any]]:
    """A third of the pairs each with a wrong, a terse and an unsafe rejected answer (unsafe ones medical)."""
    medical_items = [item for kind in medical for item in medical[kind]]
    records = []
    for i, rejected_kind in enumerate(("wrong", "terse", "unsafe")):
        count = n // 3 + (i < n % 3)

        def having(items: list[_Item], kind: str = rejected_kind) -> list[_Item]:
            return [item for item in items if getattr(item, kind) is not None]

        if rejected_kind == "unsafe":
            pools = [having(medical[kind]) for kind in (*REDIRECT_KINDS, "interaction")]
        else:
            pools = [having(person_items), having(medical_items)]
        for item in _take_balanced(rng, pools, count, f"preference pairs with a {rejected_kind} answer"):
            source = "person" if item.kind in ATTRIBUTES else "medical"
            records.append(
                {
                    "prompt": item.question,
                    "chosen": item.answer,
                    "rejected": getattr(item, rejected_kind),
                    "rejected_kind": rejected_kind,
                    "source": source,
                    "kind": item.kind,
                }
            )
    rng.shuffle(records)
    return records


# --- files -----------------------------------------------------------------------------------------------


def _jsonl(records: Iterable[dict[str, Any]]) -> bytes:
    # Fixed key order and "\n" endings: the bytes depend on the seed and sizes only.
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records).encode()


def _readme(seed: int, sizes: WorldSizes, counts: dict[str, int]) -> str:
    rows = "\n".join(f"| `{name}` | {counts[name]:,} | {fmt} | {use} |" for name, fmt, use in _FILE_TABLE)
    return f"""# Synthetic world, seed {seed}

Generated by `lmforge data synth --seed {seed}` (`{GENERATOR}`, format version {FORMAT_VERSION}). Every
person, place, company, disease and drug here is invented. The same seed and sizes give byte-identical files.

## Groups of people

- **A** ({sizes.people_a}): in pretraining (biographies) and in SFT Q&A (`sft_a.jsonl`).
- **B** ({sizes.people_b}): in pretraining only. After SFT on A, questions about B measure knowledge that
  only pretraining gave.
- **C** ({sizes.people_c}): never in pretraining. Taught only through SFT Q&A (`sft_c.jsonl`), or found by
  retrieval over their biographies (`bios_c.jsonl`, for RAG).

Each person has six attributes ({", ".join(ATTRIBUTES)}) and {sizes.bios_per_person} biographies. A
biography states every attribute once, in a random order, each in one of {min(map(len, wp.BIO_TEMPLATES.values()))}
or more paraphrases.

## Held-out question paraphrases

Each attribute has {len(TRAIN_PARAPHRASES) + 1} question phrasings. SFT files and preference prompts use
paraphrases {TRAIN_PARAPHRASES[0]}-{TRAIN_PARAPHRASES[-1]}. `eval_qa.jsonl` asks paraphrase {HELD_OUT_PARAPHRASE} only, about every person of A, B and C, so
evaluation uses words the model was not tuned on; its `value` field is the bare fact a correct answer
contains.

## Files

| file | records | format | use |
|---|---|---|---|
{rows}

`world.json` holds every person (with group), disease, drug and drug interaction: the ground truth.
Preference pairs: `chosen` is correct, complete and polite; `rejected_kind` says whether `rejected` is
`wrong`, `terse` or `unsafe`. Medical chat records start with the safety system prompt; `redirect` marks the
questions whose right answer sends the user to a doctor or to emergency care.
"""


_FILE_TABLE = (
    ("pretrain.jsonl", "`text`", "pretraining: biographies of A and B, and filler, shuffled"),
    ("bios_c.jsonl", "`text`", "group C biographies, a retrieval corpus for RAG"),
    ("sft_a.jsonl", "`messages`", "SFT Q&A about group A, each with the `value` its answer states"),
    ("sft_c.jsonl", "`messages`", "SFT Q&A about group C (new facts by fine-tuning), with `value`"),
    ("eval_qa.jsonl", "`messages`", "held-out questions about A, B and C, with `value` and `group`"),
    ("medical_corpus.jsonl", "`text`", "medical articles, for continued pretraining"),
    ("medical_qa.jsonl", "`messages` (with system)", "medical instruction tuning"),
    ("preferences.jsonl", "`prompt`/`chosen`/`rejected`", "reward modelling and DPO"),
)


def _source(seed: int) -> str:
    return f"""# Synthetic world, seed {seed}

- **Origin:** generated by lmforge: `lmforge data synth --seed {seed}`, module `{GENERATOR}`, format
  version {FORMAT_VERSION}. No external data: the text comes from templates and invented names in
  `lmforge/data/world_phrases.py`.
- **License:** CC0-1.0 (public domain dedication). The data is machine-generated and describes no real person.
"""


def _build(seed: int, sizes: WorldSizes) -> tuple[dict[str, bytes], dict[str, int]]:
    """Every file of the world as bytes, and the record count of each JSONL file."""
    people = _make_people(_rng(seed, "people"), sizes)
    diseases, drugs, interactions = _make_medical(_rng(seed, "medical"), sizes)
    group = {g: [p for p in people if p.group == g] for g in "ABC"}

    def bios(person: Person) -> list[dict[str, Any]]:
        rng = _rng(seed, f"bio/{person.name}")
        record = {"kind": "biography", "person": person.name, "group": person.group}
        return [
            {**record, "text": _biography(rng, person, sizes.name_share)}
            for _ in range(sizes.bios_per_person)
        ]

    filler_rng = _rng(seed, "filler")
    pretrain = [bio for person in group["A"] + group["B"] for bio in bios(person)]
    for _ in range(sizes.filler_docs):
        topic, text = _filler_paragraph(filler_rng)
        pretrain.append({"text": text, "kind": "filler", "topic": topic})
    _rng(seed, "pretrain-order").shuffle(pretrain)

    sft_rng = _rng(seed, "sft")
    sft = {}
    for g in "AC":
        records = [_qa_record(p, attr, k) for p in group[g] for attr in ATTRIBUTES for k in TRAIN_PARAPHRASES]
        sft_rng.shuffle(records)
        sft[g] = records
    eval_qa = [_qa_record(p, attr, HELD_OUT_PARAPHRASE) for p in people for attr in ATTRIBUTES]

    medical = _medical_items(_rng(seed, "medical-items"), diseases, drugs, interactions)
    medical_qa = [
        {
            "messages": _chat(item.question, item.answer, wp.MEDICAL_SYSTEM_PROMPT),
            "kind": item.kind,
            "redirect": item.kind in REDIRECT_KINDS,
        }
        for item in _take_balanced(
            _rng(seed, "medical-qa"), list(medical.values()), sizes.medical_qa, "medical_qa"
        )
    ]
    person_items = _person_items(_rng(seed, "person-items"), group["A"])
    preferences = _preferences(_rng(seed, "preferences"), sizes.preference_pairs, person_items, medical)
    articles = _medical_articles(_rng(seed, "medical-corpus"), sizes, diseases, drugs, interactions)

    world = {
        "generator": GENERATOR,
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "sizes": sizes.model_dump(),
        "attributes": list(ATTRIBUTES),
        "train_paraphrases": list(TRAIN_PARAPHRASES),
        "held_out_paraphrase": HELD_OUT_PARAPHRASE,
        "medical_system_prompt": wp.MEDICAL_SYSTEM_PROMPT,
        "people": [asdict(p) for p in people],
        "diseases": [asdict(d) for d in diseases],
        "drugs": [asdict(d) for d in drugs],
        "interactions": [asdict(x) for x in interactions],
    }
    jsonl = {
        "pretrain.jsonl": pretrain,
        "bios_c.jsonl": [bio for person in group["C"] for bio in bios(person)],
        "sft_a.jsonl": sft["A"],
        "sft_c.jsonl": sft["C"],
        "eval_qa.jsonl": eval_qa,
        "medical_corpus.jsonl": articles,
        "medical_qa.jsonl": medical_qa,
        "preferences.jsonl": preferences,
    }
    counts = {name: len(records) for name, records in jsonl.items()}
    files = {
        "README.md": _readme(seed, sizes, counts).encode(),
        "SOURCE.md": _source(seed).encode(),
        "world.json": (json.dumps(world, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode(),
        **{name: _jsonl(records) for name, records in jsonl.items()},
    }
    return files, counts


def synthesize(
    out: str | Path, *, seed: int = 0, sizes: WorldSizes | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Write the synthetic world into directory `out` (an earlier world there only with `overwrite`); return a
    summary.

    The summary has `out`, `seed`, `sizes`, and per file its `bytes`, `records` (None for non-JSONL files)
    and `sha256`.
    """
    out, sizes = Path(out), sizes or WorldSizes()
    check_output(out, "world", overwrite=overwrite)
    files, counts = _build(seed, sizes)
    with staging_dir(out) as tmp:  # the world appears whole; an old one is removed last
        for name, data in files.items():
            atomic_write(tmp / name, data)
    summary = {
        "out": str(out),
        "seed": seed,
        "sizes": sizes.model_dump(),
        "files": {
            name: {
                "bytes": len(data),
                "records": counts.get(name),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            for name, data in files.items()
        },
    }
    people = sizes.people_a + sizes.people_b + sizes.people_c
    log.info("synthetic world (seed %d, %d people) written to %s", seed, people, out)
    return summary
