"""Formats: detection and conversion of every format, bad records, and every shared dataset loading as its format."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from lmforge.data.formats import FORMATS, Example, detect_format, load_label_map, to_examples
from lmforge.data.readers import BadRecord, Record, read_records
from lmforge.errors import LmforgeError


def jsonl(tmp_path: Path, rows: list, name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def convert(path: Path, fmt: str | None = None, **kwargs) -> tuple[list[Example], list[BadRecord]]:
    """Read `path`, detect its format (it must be `fmt` when given) and convert, collecting bad records."""
    records = list(read_records(path))
    detected = detect_format(records)
    assert fmt is None or detected == fmt
    bad: list[BadRecord] = []
    return list(to_examples(records, fmt or detected, on_bad=bad.append, **kwargs)), bad


def rejects(tmp_path: Path, fmt: str, row: dict, **kwargs) -> str:
    """The error message for one bad row in format `fmt` (the record is at line 1)."""
    path = jsonl(tmp_path, [row], "bad.jsonl")
    with pytest.raises(LmforgeError) as e:
        list(to_examples(read_records(path), fmt, **kwargs))
    message = str(e.value)
    assert message.startswith(f"{path}:1: ") and f"(format {fmt!r} reads {FORMATS[fmt].keys})" in message
    return message


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# --- each format


def test_text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("One.\n\nTwo.\n")
    examples, _ = convert(path, "text")
    assert [(e.kind, e.text, e.id) for e in examples] == [
        ("text", "One.", f"{path}:1"),
        ("text", "Two.", f"{path}:3"),
    ]
    examples, _ = convert(
        jsonl(tmp_path, [{"text": " Doc. ", "id": 7}, {"text": "More.", "meta": {"url": "x"}}]), "text"
    )
    assert [(e.text, e.id) for e in examples] == [("Doc.", "7"), ("More.", f"{tmp_path / 'd.jsonl'}:2")]
    assert "field 'text' is empty" in rejects(tmp_path, "text", {"text": "  "})


def test_prompt_completion(tmp_path):
    rows = [
        {"prompt": "2+2?", "completion": "4"},
        {"prompt": [user("Hi")], "completion": [assistant("Hello")]},
    ]
    examples, _ = convert(jsonl(tmp_path, rows), "prompt_completion")
    assert [e.messages for e in examples] == [
        (user("2+2?"), assistant("4")),
        (user("Hi"), assistant("Hello")),
    ]
    assert {e.kind for e in examples} == {"chat"}
    assert "missing field 'completion'" in rejects(tmp_path, "prompt_completion", {"prompt": "x"})


def test_alpaca_appends_the_input_after_a_blank_line(tmp_path):
    rows = [
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},
        {"instruction": "Say hi.", "input": "", "output": "Hi"},
        {"instruction": "Say bye.", "output": "Bye"},
    ]
    examples, _ = convert(jsonl(tmp_path, rows), "alpaca")
    assert [e.messages for e in examples] == [
        (user("Translate.\n\nBonjour"), assistant("Hello")),
        (user("Say hi."), assistant("Hi")),
        (user("Say bye."), assistant("Bye")),
    ]
    message = rejects(tmp_path, "alpaca", {"instruction": "x", "output": 3})
    assert "field 'output' is int 3; expected a string" in message


def test_self_instruct_gives_one_example_per_instance(tmp_path):
    rows = [
        {
            "id": "t1",
            "instruction": "Add.",
            "instances": [{"input": "1 2", "output": "3"}, {"input": "", "output": "0"}],
        }
    ]
    examples, _ = convert(jsonl(tmp_path, rows), "self_instruct")
    assert [(e.id, e.messages) for e in examples] == [
        ("t1#0", (user("Add.\n\n1 2"), assistant("3"))),
        ("t1#1", (user("Add."), assistant("0"))),
    ]
    message = rejects(tmp_path, "self_instruct", {"instruction": "x", "instances": [{"input": "a"}]})
    assert "instances[0]: missing field 'output'" in message


def test_messages_roles_are_validated(tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello"), user("Bye")]
    examples, _ = convert(jsonl(tmp_path, [{"messages": chat, "id": "c1"}]), "messages")
    assert examples == [Example(id="c1", kind="chat", messages=tuple(chat))]
    message = rejects(tmp_path, "messages", {"messages": [user("Hi"), {"role": "bot", "content": "x"}]})
    assert "messages[1] has role 'bot'; expected one of system, user, assistant" in message
    assert "messages[0].content is missing" in rejects(tmp_path, "messages", {"messages": [{"role": "user"}]})


def test_chat_with_no_assistant_turn_is_bad(tmp_path):
    path = jsonl(tmp_path, [{"messages": [user("Hi")]}, {"messages": [user("Hi"), assistant("Yo")]}])
    examples, bad = convert(path, "messages")
    assert len(examples) == 1 and [b.where for b in bad] == [f"{path}:1"]
    assert "the conversation has no assistant turn; expected at least one assistant reply" in bad[0].reason
    assert "no assistant turn" in rejects(tmp_path, "messages", {"messages": [user("Hi")]})


def test_sharegpt(tmp_path):
    turns = [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "Q"},
        {"from": "gpt", "value": "A"},
        {"from": "user", "value": "Q2"},
        {"from": "assistant", "value": "A2"},
    ]
    examples, _ = convert(jsonl(tmp_path, [{"conversations": turns}]), "sharegpt")
    roles = [m["role"] for m in examples[0].messages]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in examples[0].messages] == ["S", "Q", "A", "Q2", "A2"]
    message = rejects(tmp_path, "sharegpt", {"conversations": [{"from": "bard", "value": "x"}]})
    assert "conversations[0].from is 'bard'; expected one of human, user, gpt, assistant, system" in message


def test_explicit_preference(tmp_path):
    rows = [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
        {
            "prompt": [user("Hi"), assistant("Hello"), user("Capital?")],
            "chosen": [assistant("Paris.")],
            "rejected": [user("Capital?"), assistant("No idea.")],
        },
    ]
    examples, _ = convert(jsonl(tmp_path, rows), "preference")
    assert [(e.kind, e.messages, e.chosen, e.rejected) for e in examples] == [
        ("preference", (user("Capital of France?"),), "Paris.", "Lyon."),
        ("preference", (user("Hi"), assistant("Hello"), user("Capital?")), "Paris.", "No idea."),
    ]
    bad_reply = {"prompt": "x", "chosen": [user("y")], "rejected": "z"}
    assert "the last turn of 'chosen' is 'user'; expected the assistant's reply" in rejects(
        tmp_path, "preference", bad_reply
    )
    bad_prompt = {"prompt": [user("x"), assistant("y")], "chosen": "a", "rejected": "b"}
    assert "the prompt does not end with a user turn" in rejects(tmp_path, "preference", bad_prompt)
    assert "chosen and rejected are the same reply" in rejects(
        tmp_path, "preference", {"prompt": "x", "chosen": "a", "rejected": "a"}
    )


HH_PROMPT = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2+2?"


def test_hh_rlhf_splits_a_multi_turn_pair_at_the_shared_prefix(tmp_path):
    rows = [
        {"chosen": HH_PROMPT + "\n\nAssistant: It is 4.", "rejected": HH_PROMPT + "\n\nAssistant: Go away."},
        # a reply holding a second "\n\nAssistant:" marker (as 5 harmless-base pairs do) stays one reply
        {
            "chosen": HH_PROMPT + "\n\nAssistant: 4.\n\nAssistant: Sure.",
            "rejected": HH_PROMPT + "\n\nAssistant: 5.",
        },
    ]
    examples, bad = convert(jsonl(tmp_path, rows), "hh_rlhf")
    prompt = (user("Hi there"), assistant("Hello! How can I help?"), user("What is 2+2?"))
    assert not bad
    assert [(e.kind, e.messages, e.chosen, e.rejected) for e in examples] == [
        ("preference", prompt, "It is 4.", "Go away."),
        ("preference", prompt, "4.\n\nAssistant: Sure.", "5."),
    ]


def test_hh_rlhf_pairs_that_do_not_diverge_at_the_final_assistant_turn_are_bad(tmp_path):
    ends = [
        (HH_PROMPT + "\n\nAssistant: A", HH_PROMPT.replace("2+2", "3+3") + "\n\nAssistant: A", "at turn 3"),
        (HH_PROMPT + "\n\nAssistant: A", HH_PROMPT + "\n\nAssistant: A", "nowhere"),
        (HH_PROMPT + "\n\nAssistant: A\n\nHuman: More?", HH_PROMPT + "\n\nAssistant: B", "at turn 4"),
    ]
    for chosen, rejected, where in ends:
        message = rejects(tmp_path, "hh_rlhf", {"chosen": chosen, "rejected": rejected})
        assert f"the transcripts diverge {where}" in message
        assert "expected them to differ only in the final assistant turn" in message
    assert "does not start with a turn" in rejects(tmp_path, "hh_rlhf", {"chosen": "hello", "rejected": "x"})


def test_classification_labels(tmp_path):
    rows = [{"text": "good", "label": 1}, {"text": "bad", "label": "0"}, {"text": "meh", "label": "neutral"}]
    label_map = {"neg": 0, "pos": 1, "neutral": 2}
    examples, _ = convert(jsonl(tmp_path, rows), "classification", label_map=label_map)
    assert [(e.kind, e.text, e.label, e.label_name) for e in examples] == [
        ("classification", "good", 1, "pos"),
        ("classification", "bad", 0, "neg"),
        ("classification", "meh", 2, "neutral"),
    ]
    examples, _ = convert(jsonl(tmp_path, rows[:2]), "classification")  # ids, no map: no names
    assert [(e.label, e.label_name) for e in examples] == [(1, None), (0, None)]
    message = rejects(tmp_path, "classification", {"text": "x", "label": "neutral"})
    assert (
        "label 'neutral' is not valid; expected an id ≥ 0, or a name and a label map (given, or categories.json/"
        in message
    )
    assert "label 7 is not valid; expected a name or id from the label map (2 labels)" in rejects(
        tmp_path, "classification", {"text": "x", "label": 7}, label_map={"a": 0, "b": 1}
    )


def test_classification_category_column_label_field_and_a_label_map_beside_the_file(tmp_path):
    (tmp_path / "d.csv").write_text(
        "text,category\r\nwhere is my card?,card_arrival\r\nrate?,exchange_rate\r\n"
    )
    (tmp_path / "categories.json").write_text(json.dumps(["card_arrival", "card_linking", "exchange_rate"]))
    examples, _ = convert(tmp_path / "d.csv", "classification")
    assert [(e.text, e.label, e.label_name) for e in examples] == [
        ("where is my card?", 0, "card_arrival"),
        ("rate?", 2, "exchange_rate"),
    ]
    rows = [{"text": "x", "intent": 1, "label": "ignored"}]
    examples, _ = convert(jsonl(tmp_path, rows), "classification", label_field="intent")
    assert (examples[0].label, examples[0].label_name) == (1, "card_linking")


def test_csv_without_the_label_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,score\nhello,3\nbye,4\n")
    assert detect_format(list(read_records(path))) == "text"  # nothing names a label: it is text
    with pytest.raises(LmforgeError) as e:
        list(to_examples(read_records(path), "classification"))
    assert str(e.value).startswith(f"{path}:2: missing label field 'label' (fields: text, score)")
    bad: list[BadRecord] = []
    assert list(to_examples(read_records(path), "classification", on_bad=bad.append)) == []
    assert [b.where for b in bad] == [f"{path}:2", f"{path}:3"] and bad[
        0
    ].raw == '{"text": "hello", "score": "3"}'


def test_gsm8k_final_answer(tmp_path):
    answer = "Half of 2,468 is <<2468/2=1234>>1,234.\n#### 1,234"
    examples, _ = convert(jsonl(tmp_path, [{"question": "Half of 2,468?", "answer": answer}]), "gsm8k")
    assert examples[0].messages == (user("Half of 2,468?"), assistant(answer))
    assert examples[0].answer == "1234" and examples[0].kind == "chat"
    message = rejects(tmp_path, "gsm8k", {"question": "q", "answer": "It is 4."})
    assert "field 'answer' has no '#### N' final answer" in message


# --- detection, errors, label maps


def test_detect_format_from_keys():
    def records(*rows):
        return [Record("f.jsonl", i + 1, row) for i, row in enumerate(rows)]

    assert detect_format(records("a doc", "another")) == "text"
    assert detect_format(records({"instruction": "i", "instances": []})) == "self_instruct"
    assert detect_format(records({"prompt": "p", "chosen": "c", "rejected": "r"})) == "preference"
    assert detect_format(records({"chosen": "\n\nHuman: x", "rejected": "\n\nHuman: y"})) == "hh_rlhf"
    assert detect_format(records({"text": "t", "category": "c"})) == "classification"
    # most of the first records decide, so one odd record does not
    assert (
        detect_format(
            records({"question": "q", "answer": "a"}, {"question": "q"}, {"question": "q", "answer": "a"})
        )
        == "gsm8k"
    )
    with pytest.raises(LmforgeError) as e:
        detect_format(records({"foo": 1, "bar": 2}))
    message = str(e.value)
    assert message.startswith(
        "f.jsonl: cannot detect the format of the first 1 records (keys seen: bar, foo)"
    )
    assert all(name in message for name in FORMATS) and "--format" in message
    with pytest.raises(LmforgeError, match="no records"):
        detect_format([])


def test_unknown_format_and_plain_text_given_to_an_object_format():
    with pytest.raises(LmforgeError, match="unknown format 'dolly'; expected one of: messages, sharegpt"):
        list(to_examples([], "dolly"))
    with pytest.raises(LmforgeError, match=r"f\.txt:3: found a plain-text document; expected a JSON object"):
        list(to_examples([Record("f.txt", 3, "a doc")], "alpaca"))


def test_load_label_map(tmp_path):
    def write(content) -> Path:
        (tmp_path / "labels.json").write_text(json.dumps(content))
        return tmp_path / "labels.json"

    assert load_label_map(write(["a", "b"])) == {"a": 0, "b": 1}
    assert load_label_map(write({"a": 1, "b": 0})) == {"a": 1, "b": 0}
    assert load_label_map(write({"0": "a", "1": "b"})) == {"a": 0, "b": 1}  # transformers' id2label
    with pytest.raises(LmforgeError, match="expected a JSON list of distinct label names"):
        load_label_map(write(["a", "a"]))
    (tmp_path / "labels.json").write_text("[oops")
    with pytest.raises(LmforgeError, match=r"labels\.json: not valid JSON"):
        load_label_map(tmp_path / "labels.json")


# --- every shared dataset: detected format and example counts (record counts from each SOURCE.md)


@pytest.mark.parametrize(
    "rel, fmt, count, kind",
    [
        ("tinyshakespeare/input.txt", "text", 6_377, "text"),
        ("tinystories/tinystories_val_sample.txt", "text", 3_791, "text"),
        ("tinystories/tinystories_v2_endoftext_sample.txt", "text", 5, "text"),
        ("self_instruct_seed/seed_tasks.jsonl", "self_instruct", 158, "chat"),  # 1 instance per task
        ("hh_rlhf/harmless_base_test.jsonl", "hh_rlhf", 2_081, "preference"),
        ("gsm8k/train.jsonl", "gsm8k", 3_000, "chat"),
        ("gsm8k/test.jsonl", "gsm8k", 1_188, "chat"),
        ("banking77/train.csv", "classification", 9_003, "classification"),
        ("banking77/test.csv", "classification", 2_772, "classification"),
    ],
)
def test_shared_datasets_load_as_their_format(shared_data, rel, fmt, count, kind):
    examples, bad = convert(shared_data / rel, fmt)
    assert not bad, bad[:3]
    assert len(examples) == count and {e.kind for e in examples} == {kind}
    assert len({e.id for e in examples}) == count


def test_shared_hh_rlhf_pairs(shared_data):
    examples, _ = convert(shared_data / "hh_rlhf/harmless_base_test.jsonl", "hh_rlhf")
    assert all(
        m["role"] == ("user" if i % 2 == 0 else "assistant")
        for e in examples
        for i, m in enumerate(e.messages)
    )
    assert all(e.chosen != e.rejected for e in examples)
    # four pairs prefer an empty reply to a harmful one (lines 87, 517, 926, 1104); kept, they are the signal
    assert [e.id.rsplit(":", 1)[1] for e in examples if not e.chosen] == ["87", "517", "926", "1104"]
    # five replies repeat the "\n\nAssistant:" marker inside themselves; they stay whole
    merged = [e.id.rsplit(":", 1)[1] for e in examples if "\n\nAssistant:" in e.chosen + e.rejected]
    assert merged == ["1255", "1689", "1951", "1953", "2037"]
    assert Counter(len(e.messages) for e in examples).most_common(1) == [(1, 599)]


def test_shared_gsm8k_answers_and_banking77_labels(shared_data):
    examples, _ = convert(shared_data / "gsm8k/train.jsonl")
    assert examples[0].answer == "72" and all(re.fullmatch(r"-?\d+", e.answer) for e in examples)
    assert sum("," in e.messages[1]["content"].rpartition("####")[2] for e in examples) == 34
    categories = json.loads((shared_data / "banking77/categories.json").read_text())
    for split in ("train", "test"):
        examples, _ = convert(shared_data / f"banking77/{split}.csv")
        assert {e.label for e in examples} == set(range(77))  # SOURCE.md: all 77 labels in every split
        assert all(categories[e.label] == e.label_name for e in examples)
    seeds, _ = convert(shared_data / "self_instruct_seed/seed_tasks.jsonl")
    assert [e.id for e in seeds[:2]] == ["seed_task_0#0", "seed_task_1#0"]
    assert (
        seeds[1].messages[0]["content"]
        == "What is the relation between the given pairs?\n\nNight : Day :: Right : Left"
    )
