"""Dataset formats: tell a record's shape from its keys; turn records into text, chat, preference or label Examples.

A record that does not fit its format is raised as an LmforgeError naming the file, the line (or record index) and
the field, or handed to `on_bad` as a BadRecord.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lmforge.data.readers import LABEL_MAP_NAMES, BadRecord, OnBad, Record, clip, field_names, reject
from lmforge.errors import LmforgeError

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
# label columns tried when label_field is left at "label"; `category` is BANKING77's
LABEL_FIELDS = ("label", "category")
# a preference pair's subset, reported apart by reward evaluation: RewardBench's `subset`, else the synthetic
# world's `rejected_kind` (wrong / terse / unsafe)
SUBSET_FIELDS = ("subset", "rejected_kind")
_DETECT_SAMPLE = 8


# Not frozen: a frozen dataclass is 3.5x slower to create, and `data prepare` makes one per document.
@dataclass(slots=True)
class Example:
    """One training or evaluation example, whatever file format it came from (treated as immutable: see `replace`)."""

    id: str
    kind: Literal["text", "chat", "preference", "classification"]
    text: str | None = None  # text and classification
    # chat: the whole conversation; preference: the shared prompt, ending with a user turn
    messages: tuple[Message, ...] | None = None
    chosen: str | None = None  # preference: the final assistant replies
    rejected: str | None = None
    label: int | None = None  # classification
    label_name: str | None = None  # and its name; preference: the pair's subset, when the record names one
    answer: str | None = None  # GSM8K's final answer (after ####), commas removed


class _Invalid(Exception):
    """Raised by a converter for a record that does not fit its format; the message says what is wrong."""


@dataclass
class _Options:
    label_map: dict[str, int] | None
    label_field: str
    beside: dict[Path, dict[str, int] | None] = field(default_factory=dict)  # label maps found by directory

    def label_map_for(self, source: str) -> dict[str, int] | None:
        """The given label map, else a categories.json/labels.json beside the input file."""
        if self.label_map is not None:
            return self.label_map
        folder = Path(source).parent
        if folder not in self.beside:
            found = [folder / name for name in LABEL_MAP_NAMES if (folder / name).is_file()]
            self.beside[folder] = load_label_map(found[0]) if found else None
        return self.beside[folder]


@dataclass(frozen=True)
class Format:
    """One record shape: the keys it reads (for messages), a test of one record, and its conversion."""

    keys: str
    detect: Callable[[dict | str], bool]
    convert: Callable[[Record, _Options], list[Example]]


# --- field helpers: each raises _Invalid with what was expected


def _obj(record: Record) -> dict:
    if not isinstance(record.data, dict):
        raise _Invalid("found a plain-text document; expected a JSON object or a table row")
    return record.data


def _id(record: Record) -> str:
    rid = record.data.get("id") if isinstance(record.data, dict) else None
    return record.where if rid is None or rid == "" else str(rid)


def _str(data: dict, key: str, *, empty_ok: bool = False) -> str:
    if key not in data or data[key] is None:
        raise _Invalid(f"missing field {key!r}")
    value = data[key]
    if not isinstance(value, str):
        raise _Invalid(f"field {key!r} is {_describe(value)}; expected a string")
    if not empty_ok and not value.strip():
        raise _Invalid(f"field {key!r} is empty; expected text")
    return value


def _messages(value: object, key: str) -> list[Message]:
    if value is None:
        raise _Invalid(f"missing field {key!r}")
    if not isinstance(value, list) or not value:
        raise _Invalid(f"field {key!r} is {_describe(value)}; expected a non-empty list of messages")
    out = []
    for k, m in enumerate(value):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if role not in ROLES:
            raise _Invalid(f"{key}[{k}] has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise _Invalid(f"{key}[{k}].content is {_describe(content)}; expected a string")
        out.append({"role": role, "content": content})
    return out


def _describe(value: object) -> str:
    return "missing" if value is None else f"{type(value).__name__} {clip(repr(value), 40)}"


def _chat(record: Record, messages: list[Message], rid: str | None = None, **extra: str) -> Example:
    if not any(m["role"] == "assistant" for m in messages):
        raise _Invalid("the conversation has no assistant turn; expected at least one assistant reply")
    return Example(id=rid or _id(record), kind="chat", messages=tuple(messages), **extra)


def _user_assistant(prompt: str, reply: str) -> list[Message]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def _preference(record: Record, prompt: list[Message], chosen: str, rejected: str) -> Example:
    if not prompt or prompt[-1]["role"] != "user":
        raise _Invalid("the prompt does not end with a user turn; expected the turns before the replies")
    if chosen == rejected:
        raise _Invalid("chosen and rejected are the same reply; expected two different replies")
    return Example(
        _id(record), "preference", messages=tuple(prompt), chosen=chosen, rejected=rejected,
        label_name=_subset(record.data),
    )  # fmt: skip


def _subset(d: dict) -> str | None:
    """The pair's subset: the first of SUBSET_FIELDS the record holds (None when it holds neither)."""
    key = next((k for k in SUBSET_FIELDS if d.get(k) is not None), None)
    if key is None:
        return None
    if not isinstance(d[key], str) or not d[key].strip():
        raise _Invalid(f"field {key!r} is {_describe(d[key])}; expected the name of the pair's subset")
    return d[key]


# --- converters, one per format


def _text(record: Record, opts: _Options) -> list[Example]:
    text = (record.data if isinstance(record.data, str) else _str(record.data, "text")).strip()
    if not text:
        raise _Invalid("the text is empty; expected a document")
    return [Example(_id(record), "text", text)]


def _prompt_completion(record: Record, opts: _Options) -> list[Example]:
    d = _obj(record)
    return [_chat(record, [*_prompt(d, "prompt"), _reply_message(d, "completion")])]


def _alpaca(record: Record, opts: _Options) -> list[Example]:
    d = _obj(record)
    instruction, given = _str(d, "instruction"), _str(d, "input", empty_ok=True) if "input" in d else ""
    prompt = f"{instruction}\n\n{given}" if given.strip() else instruction
    return [_chat(record, _user_assistant(prompt, _str(d, "output")))]


def _self_instruct(record: Record, opts: _Options) -> list[Example]:
    d = _obj(record)
    instruction, instances = _str(d, "instruction"), d.get("instances")
    if not isinstance(instances, list) or not instances:
        raise _Invalid(f"field 'instances' is {_describe(instances)}; expected a list of {{input, output}}")
    out = []
    for k, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise _Invalid(f"instances[{k}] is {_describe(inst)}; expected an object with input and output")
        try:
            given, output = _str(inst, "input", empty_ok=True), _str(inst, "output")
        except _Invalid as e:
            raise _Invalid(f"instances[{k}]: {e}") from None
        prompt = f"{instruction}\n\n{given}" if given.strip() else instruction
        out.append(_chat(record, _user_assistant(prompt, output), rid=f"{_id(record)}#{k}"))
    return out


def _openai_messages(record: Record, opts: _Options) -> list[Example]:
    return [_chat(record, _messages(_obj(record).get("messages"), "messages"))]


_SHAREGPT_ROLES = dict(human="user", user="user", gpt="assistant", assistant="assistant", system="system")


def _sharegpt(record: Record, opts: _Options) -> list[Example]:
    turns = _obj(record).get("conversations")
    if not isinstance(turns, list) or not turns:
        raise _Invalid(f"field 'conversations' is {_describe(turns)}; expected a list of {{from, value}}")
    messages = []
    for k, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if not isinstance(speaker, str) or speaker not in _SHAREGPT_ROLES:  # a list or dict is not hashable
            expected = ", ".join(_SHAREGPT_ROLES)
            raise _Invalid(f"conversations[{k}].from is {speaker!r}; expected one of {expected}")
        messages.append({"role": _SHAREGPT_ROLES[speaker], "content": turn.get("value")})
    return [_chat(record, _messages(messages, "conversations"))]


def _prompt(d: dict, key: str) -> list[Message]:
    """A prompt given as a string (one user turn) or as messages."""
    value = d.get(key)
    return [{"role": "user", "content": _str(d, key)}] if isinstance(value, str) else _messages(value, key)


def _reply_message(d: dict, key: str) -> Message:
    """A reply given as a string or as messages whose last turn is the assistant's reply."""
    if isinstance(d.get(key), str):
        return {"role": "assistant", "content": _str(d, key, empty_ok=True)}
    last = _messages(d.get(key), key)[-1]
    if last["role"] != "assistant":
        raise _Invalid(f"the last turn of {key!r} is {last['role']!r}; expected the assistant's reply")
    return last


def _explicit_preference(record: Record, opts: _Options) -> list[Example]:
    d = _obj(record)
    chosen, rejected = _reply_message(d, "chosen"), _reply_message(d, "rejected")
    return [_preference(record, _prompt(d, "prompt"), chosen["content"], rejected["content"])]


_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")


def _hh_turns(d: dict, key: str) -> list[Message]:
    """A transcript's turns; a list of messages (implicit-prompt pairs) is taken as it is."""
    if isinstance(d.get(key), list):
        return _messages(d[key], key)
    parts = _HH_MARKER.split(_str(d, key))
    if parts[0].strip() or len(parts) == 1:
        raise _Invalid(f"field {key!r} does not start with a turn; expected '\\n\\nHuman: ...' transcripts")
    turns: list[Message] = []
    for speaker, body in zip(parts[1::2], parts[2::2], strict=True):
        role = "user" if speaker == "Human" else "assistant"
        if turns and turns[-1]["role"] == role:
            # a repeated marker is text the model wrote inside its reply (seen in harmless-base): keep it there
            turns[-1]["content"] += f"\n\n{speaker}:{body}"
        else:
            turns.append({"role": role, "content": body})
    return [{"role": t["role"], "content": t["content"].strip()} for t in turns]


def _hh_rlhf(record: Record, opts: _Options) -> list[Example]:
    d = _obj(record)
    chosen, rejected = _hh_turns(d, "chosen"), _hh_turns(d, "rejected")
    i = 0  # the shared prompt is the longest common prefix of turns
    while i < min(len(chosen), len(rejected)) and chosen[i] == rejected[i]:
        i += 1
    last = i == len(chosen) - 1 == len(rejected) - 1
    if not (last and chosen[i]["role"] == rejected[i]["role"] == "assistant"):
        where = "nowhere" if i == max(len(chosen), len(rejected)) else f"at turn {i + 1}"
        raise _Invalid(
            f"the transcripts diverge {where} ({len(chosen)} and {len(rejected)} turns); "
            "expected them to differ only in the final assistant turn"
        )
    return [_preference(record, chosen[:i], chosen[i]["content"], rejected[i]["content"])]


def _classification(record: Record, opts: _Options) -> list[Example]:
    d = _obj(record)
    text, key = _str(d, "text").strip(), opts.label_field  # a few BANKING77 texts are quoted with newlines
    if key not in d and key == LABEL_FIELDS[0]:
        key = next((k for k in LABEL_FIELDS if k in d), key)
    if d.get(key) is None:
        raise _Invalid(f"missing label field {key!r} (fields: {field_names(d)}); pass label_field to name it")
    raw, label_map = d[key], opts.label_map_for(record.source) or {}
    if isinstance(raw, str) and raw not in label_map and raw.strip().isdigit():
        raw = int(raw)  # CSV cells are strings
    names = {i: name for name, i in label_map.items()}
    label = label_map.get(raw) if isinstance(raw, str) else raw
    if type(label) is not int or label < 0 or (label_map and label not in names):  # bool is not a label
        beside = "/".join(LABEL_MAP_NAMES)
        expected = f"a name or id from the label map ({len(names)} labels)"
        if not label_map:
            expected = f"an id ≥ 0, or a name and a label map (given, or {beside} beside the file)"
        raise _Invalid(f"label {raw!r} is not valid; expected {expected}")
    return [Example(_id(record), "classification", text=text, label=label, label_name=names.get(label))]


def _gsm8k(record: Record, opts: _Options) -> list[Example]:
    d = _obj(record)
    question, answer = _str(d, "question"), _str(d, "answer")
    final = answer.rpartition("####")[2].strip().replace(",", "") if "####" in answer else ""
    if not final:
        raise _Invalid("field 'answer' has no '#### N' final answer; expected GSM8K's answer layout")
    return [_chat(record, _user_assistant(question, answer), answer=final)]


def _has(*keys: str, without: tuple[str, ...] = ()) -> Callable[[dict | str], bool]:
    return lambda d: isinstance(d, dict) and all(k in d for k in keys) and not any(k in d for k in without)


def _is_hh(d: dict | str) -> bool:
    if not _has("chosen", "rejected", without=("prompt",))(d):
        return False
    chosen = d["chosen"]  # type: ignore[index]
    return (isinstance(chosen, str) and "\n\nHuman:" in chosen) or isinstance(chosen, list)


def _is_text(d: dict | str) -> bool:
    return isinstance(d, str) or _has("text", without=LABEL_FIELDS)(d)


# In detection order: every shape is tested before plain text, which takes any record with a `text` field.
FORMATS: dict[str, Format] = {
    "messages": Format("messages [{role, content}]", _has("messages"), _openai_messages),
    "sharegpt": Format("conversations [{from, value}]", _has("conversations"), _sharegpt),
    "self_instruct": Format(
        "instruction, instances [{input, output}]", _has("instruction", "instances"), _self_instruct
    ),
    "alpaca": Format("instruction, input (optional), output", _has("instruction", "output"), _alpaca),
    "preference": Format(
        "prompt, chosen, rejected, subset (optional)",
        _has("prompt", "chosen", "rejected"),
        _explicit_preference,
    ),
    "hh_rlhf": Format("chosen, rejected ('\\n\\nHuman:' transcripts)", _is_hh, _hh_rlhf),
    "prompt_completion": Format("prompt, completion", _has("prompt", "completion"), _prompt_completion),
    "gsm8k": Format("question, answer (ending '#### N')", _has("question", "answer"), _gsm8k),
    "classification": Format(
        "text, label (or category)", lambda d: _has("text")(d) and not _is_text(d), _classification
    ),
    "text": Format("text (or a plain-text document)", _is_text, _text),
}


def detect_format(records: Sequence[Record]) -> str:
    """The format most of the first records fit (in FORMATS order on ties); LmforgeError when none does."""
    sample = list(records[:_DETECT_SAMPLE])
    if not sample:
        raise LmforgeError("cannot detect the format: no records; expected at least one")
    votes = {name: sum(fmt.detect(r.data) for r in sample) for name, fmt in FORMATS.items()}
    best = max(votes, key=votes.__getitem__)  # the first of equals, in FORMATS order
    if votes[best] * 2 > len(sample):
        return best
    keys = sorted({k for r in sample if isinstance(r.data, dict) for k in r.data})
    known = "; ".join(f"{name} ({fmt.keys})" for name, fmt in FORMATS.items())
    raise LmforgeError(
        f"{sample[0].source}: cannot detect the format of the first {len(sample)} records "
        f"(keys seen: {field_names(keys) or 'none'}); expected one of: {known}. Name one with --format"
    )


def to_examples(
    records: Iterable[Record],
    fmt: str,
    *,
    label_map: dict[str, int] | None = None,
    label_field: str = "label",
    on_bad: OnBad | None = None,
) -> Iterator[Example]:
    """Convert records in format `fmt`; a record that does not fit raises LmforgeError or goes to `on_bad`."""
    if fmt not in FORMATS:
        raise LmforgeError(f"unknown format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    spec, opts = FORMATS[fmt], _Options(label_map, label_field)
    for record in records:
        try:
            examples = spec.convert(record, opts)  # a whole list, so a bad record yields nothing
        except _Invalid as e:
            raw = record.data if isinstance(record.data, str) else json.dumps(record.data, ensure_ascii=False)
            reason = f"{e} (format {fmt!r} reads {spec.keys})"
            reject(on_bad, BadRecord(record.source, record.where, reason, clip(raw)))
            continue
        yield from examples


def load_label_map(path: Path) -> dict[str, int]:
    """Label name → id from a JSON list (index = id, as BANKING77's categories.json) or a mapping."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(f"{path}: no such label map; expected a JSON list or mapping of labels") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise LmforgeError(f"{path}: not valid JSON ({e}); expected a list or mapping of labels") from None
    if isinstance(doc, list) and all(isinstance(n, str) for n in doc) and len(set(doc)) == len(doc):
        return {name: i for i, name in enumerate(doc)}
    if isinstance(doc, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in doc.values()):
        return {str(k): v for k, v in doc.items()}
    if isinstance(doc, dict) and all(isinstance(v, str) and str(k).isdigit() for k, v in doc.items()):
        return {v: int(k) for k, v in doc.items()}  # id → name, as transformers' id2label
    raise LmforgeError(
        f"{path}: expected a JSON list of distinct label names, or a mapping name → id or id → name"
    )
