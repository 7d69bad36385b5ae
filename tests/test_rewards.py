"""Rewards for `align`: prompt sets read from the synthetic world and GSM8K, each programmatic reward on true
and false answers taken from real records, `load_reward`, and reward models scored as transformers does."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from lmforge.data.synthetic import REDIRECT_KINDS, WorldSizes, synthesize
from lmforge.errors import LmforgeError
from lmforge.eval.rewards import (
    REWARDS,
    PromptItem,
    RewardModel,
    batched,
    facts_reward,
    format_reward,
    gsm8k_reward,
    is_redirect,
    load_reward,
    medical_reward,
    read_prompts,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny synthetic world (milliseconds to build)."""
    out = tmp_path_factory.mktemp("world") / "w"
    synthesize(out, seed=3, sizes=WorldSizes.tiny())
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def reply(item: PromptItem) -> str:
    return item.record["messages"][-1]["content"]


# ------------------------------------------------------------------------------------------ read_prompts


def test_reads_world_questions_with_their_values(world):
    path = world / "eval_qa.jsonl"
    items = read_prompts(path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(items) == len(records)
    first = items[0]
    assert first.messages == tuple(records[0]["messages"][:-1]) and first.messages[-1]["role"] == "user"
    assert first.answer == records[0]["value"] and first.group == records[0]["group"]
    assert first.id == f"{path}:1" and first.record == records[0] and first.kind is None
    assert read_prompts(path, limit=5) == items[:5]


def test_reads_medical_questions_with_system_prompt_and_kind(world):
    items = read_prompts(world / "medical_qa.jsonl")
    assert all([m["role"] for m in it.messages] == ["system", "user"] for it in items)
    assert all(it.answer is None and it.kind == it.record["kind"] for it in items)
    assert {is_redirect(it) for it in items} == {True, False}
    assert all(is_redirect(it) == (it.kind in REDIRECT_KINDS) for it in items)
    # preference prompts have no redirect flag: the kind decides
    prefs = read_prompts(world / "preferences.jsonl")
    assert all(len(it.messages) == 1 and it.messages[0]["content"] == it.record["prompt"] for it in prefs)
    assert all(is_redirect(it) == (it.kind in REDIRECT_KINDS) for it in prefs)


def test_reads_gsm8k_and_prompt_only_records(tmp_path):
    gsm = {"question": "How many?", "answer": "2 * 600 = 1200\n#### 1,200"}
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        gsm,
        {"prompt": "Say hi.", "id": "hello"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]},
        {"messages": [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "1"},
                      {"role": "user", "content": "Two?"}], "kind": "count", "group": "g"},
        {"prompt": "Q?", "completion": "A."},
        {"chosen": "\n\nHuman: Hello?\n\nAssistant: Hi.", "rejected": "\n\nHuman: Hello?\n\nAssistant: Go."},
    ])  # fmt: skip
    items = read_prompts(path)
    assert items[0].messages == ({"role": "user", "content": "How many?"},) and items[0].answer == "1200"
    assert items[1].id == "hello" and items[1].messages == ({"role": "user", "content": "Say hi."},)
    assert [m["role"] for m in items[2].messages] == ["system", "user"]
    assert len(items[3].messages) == 3 and (items[3].kind, items[3].group) == ("count", "g")
    assert items[4].messages == ({"role": "user", "content": "Q?"},)
    assert items[5].messages == ({"role": "user", "content": "Hello?"},)
    assert all(it.id == f"{path}:{n}" for n, it in enumerate(items, 1) if n != 2)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"question": "How many?", "answer": "two"}, "'#### N'"),
        ({"text": "a document"}, "fields text; expected a prompt"),
        ({"messages": [{"role": "assistant", "content": "Hi."}]}, "do not end with a user turn"),
        ({"messages": [{"role": "user", "content": "Hi?"}, {"role": "system", "content": "x"}]},
         "last turn of 'messages' is 'system'"),
        ({"prompt": [{"role": "bot", "content": "Hi?"}]}, r"prompt\[0\]"),
        ({"prompt": ""}, "field 'prompt': expected text"),
    ],
)  # fmt: skip
def test_bad_records_name_file_line_and_expectation(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, record])
    with pytest.raises(LmforgeError, match=message) as e:
        read_prompts(path)
    assert str(e.value).startswith(f"{path}:2: ")


# ------------------------------------------------------------------------------------------------ rewards


def test_facts_reward_judges_the_first_sentence(world):
    items = read_prompts(world / "eval_qa.jsonl")
    for item in items:
        assert facts_reward(item, reply(item), True) == 1.0
        assert facts_reward(item, item.answer.upper(), False) == 1.0  # case ignored; `finished` is not judged
        assert facts_reward(item, f"I am not sure. Maybe {item.answer}.", True) == 0.0
    # another person's value of the same attribute, in the house sentence
    first = items[0]
    other = next(
        it
        for it in items
        if it.record["attribute"] == first.record["attribute"] and it.answer not in first.answer
    )
    assert facts_reward(first, reply(first).replace(first.answer, other.answer), True) == 0.0
    with pytest.raises(LmforgeError, match="no answer to check"):
        facts_reward(PromptItem(({"role": "user", "content": "Hi?"},)), "Hello.", True)


def test_medical_reward_on_house_answers_and_unsafe_ones(world):
    items = read_prompts(world / "medical_qa.jsonl")
    redirects = [it for it in items if is_redirect(it)]
    answers = [it for it in items if not is_redirect(it)]
    assert redirects and answers
    assert all(medical_reward(it, reply(it), True) == 1.0 for it in items)  # the house style passes
    for it in answers:  # a redirect given to a question that has an answer is a refusal
        assert all(medical_reward(it, reply(r), True) == 0.0 for r in redirects)
    for it in redirects:  # an answer that sends no one to care fails a redirect
        assert medical_reward(it, "It is certainly that, so there is no need to see a doctor.", True) == 0.0
        assert medical_reward(it, "Just rest at home and wait for it to pass.", True) == 0.0
    unsafe = [
        it for it in read_prompts(world / "preferences.jsonl") if it.record["rejected_kind"] == "unsafe"
    ]
    unsafe = [it for it in unsafe if is_redirect(it)]
    assert unsafe
    for it in unsafe:
        assert medical_reward(it, it.record["chosen"], True) == 1.0
        assert medical_reward(it, it.record["rejected"], True) == 0.0
    redirect = PromptItem(({"role": "user", "content": "Help?"},), kind="redirect")  # a user's own label
    assert medical_reward(redirect, "Please see a doctor.", True) == 1.0
    assert medical_reward(redirect, "Take two pills.", True) == 0.0
    cause = PromptItem(({"role": "user", "content": "What causes it?"},), kind="cause")
    assert medical_reward(cause, "I can't answer that.", True) == 0.0
    with pytest.raises(LmforgeError, match="no `kind` or `redirect`"):
        medical_reward(PromptItem(({"role": "user", "content": "Hi?"},)), "Hello.", True)


def test_gsm8k_reward_on_real_answers(shared_data):
    items = read_prompts(shared_data / "gsm8k" / "test.jsonl", limit=20)
    for item in items:
        gold = item.record["answer"]
        assert gsm8k_reward(item, gold, True) == 1.0
        assert gsm8k_reward(item, f"So the answer is {item.answer}.", False) == 1.0
        head, _, n = gold.rpartition("#### ")
        wrong = str(int(float(n.replace(",", ""))) + 1)
        assert gsm8k_reward(item, f"{head}#### {wrong}", True) == 0.0
        assert gsm8k_reward(item, f"The answer is {item.answer}, I think, or {wrong}.", True) == 0.0
    with pytest.raises(LmforgeError, match="not a number"):
        gsm8k_reward(PromptItem(({"role": "user", "content": "Q?"},), answer="Paris"), "Paris", True)


def test_gsm8k_reward_reads_commas_and_own_marker():
    item = PromptItem(({"role": "user", "content": "How many?"},), answer="1200")
    assert gsm8k_reward(item, "600 * 2 = 1,200", True) == 1.0
    assert gsm8k_reward(item, "600 * 2 = 1200 apples\n#### 1200 apples", True) == 1.0
    assert gsm8k_reward(item, "I first got 1200.\n#### 1199", True) == 0.0  # its own marker wins
    assert gsm8k_reward(item, "No idea.", True) == 0.0


def test_format_reward_needs_an_ended_turn_within_bounds():
    item = PromptItem(({"role": "user", "content": "Hi?"},))
    assert format_reward(item, "Hello.", True) == 1.0
    assert format_reward(item, "Hello.", False) == 0.0  # ran into the token limit
    assert format_reward(item, "  \n", True) == 0.0
    assert format_reward(item, "x" * 2001, True) == 0.0
    short = load_reward("format", max_chars=5)
    assert short(item, "Hi.", True) == 1.0 and short(item, "Hello.", True) == 0.0
    assert batched(short)([item, item], ["Hi.", "Hello."], [True, True]) == [1.0, 0.0]


def test_load_reward_builtins_and_user_functions(tmp_path, monkeypatch):
    assert all(load_reward(name) is fn for name, fn in REWARDS.items())
    (tmp_path / "my_rewards.py").write_text(
        "def length(item, completion, finished):\n    return float(len(completion))\n"
        "NOT_CALLABLE = 3\n"
        "def two_args(item, completion):\n    return 0.0\n"
    )
    (tmp_path / "broken_rewards.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    item = PromptItem(({"role": "user", "content": "Hi?"},))
    assert load_reward("my_rewards:length")(item, "abc", True) == 3.0
    for spec, message in [
        ("nope", "unknown reward 'nope'; expected a built-in \\(gsm8k, facts, medical, format\\)"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz' \\(ModuleNotFoundError"),
        ("broken_rewards:f", "cannot import module 'broken_rewards' \\(RuntimeError: boom"),
        ("my_rewards:missing", "has no attribute 'missing'.*built-in \\(gsm8k"),
        ("my_rewards:NOT_CALLABLE", "is a int, not callable.*built-in \\(gsm8k"),
        ("my_rewards:two_args", "expected \\(item, completion, finished\\)"),
    ]:
        with pytest.raises(LmforgeError, match=message):
            load_reward(spec)
    with pytest.raises(LmforgeError, match="takes no such option"):
        load_reward("format", max_words=3)
    sys.modules.pop("my_rewards", None)


# ---------------------------------------------------------------------------------------------- reward models


@pytest.fixture(scope="module")
def transformers():
    """transformers, the reference these tests score against (the reward tests above run without it)."""
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on busy shared cores they spin: 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_tokenizer(world, kind, out):
    from lmforge.tokenizer import train_tokenizer

    texts = [m["content"] for path in ("eval_qa.jsonl", "medical_qa.jsonl")
             for line in (world / path).read_text().splitlines() for m in json.loads(line)["messages"]]  # fmt: skip
    return train_tokenizer(texts, kind, 400 if kind == "bpe" else 300, out)


def save_classifier(transformers, hf_config, tok_dir, out):
    """A seeded random transformers classifier (eager, `randomize_`d), saved with the tokenizer beside it."""
    from helpers import randomize_

    from lmforge.tokenizer import copy_tokenizer

    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(
        hf_config, attn_implementation="eager"
    )
    randomize_(model)
    model.save_pretrained(out)
    copy_tokenizer(tok_dir, out)
    return out


@pytest.fixture(scope="module")
def pairs(world):
    """(prompt messages, response) pairs of various lengths: medical ones with a system prompt, fact ones."""
    items = read_prompts(world / "medical_qa.jsonl", limit=5) + read_prompts(world / "eval_qa.jsonl", limit=4)
    return [(it.messages, reply(it)) for it in items] + [(items[-1].messages, "")]


@pytest.fixture(scope="module")
def llama_rm(world, tmp_path_factory, transformers):
    from lmforge.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("llama-rm")
    tok = Tokenizer.from_dir(tiny_tokenizer(world, "bpe", root / "tok"))
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, num_labels=1,
        pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
    )  # fmt: skip
    return save_classifier(transformers, config, root / "tok", root / "rm")


@pytest.fixture(scope="module")
def bert_dirs(world, tmp_path_factory, transformers):
    """A BERT reward model (num_labels 1) and a two-label BERT classifier."""
    from lmforge.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("bert-rm")
    tok = Tokenizer.from_dir(tiny_tokenizer(world, "wordpiece", root / "tok"))
    common = dict(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512, pad_token_id=tok.pad_id,
    )  # fmt: skip
    rm = save_classifier(
        transformers, transformers.BertConfig(**common, num_labels=1), root / "tok", root / "rm"
    )
    two = save_classifier(
        transformers, transformers.BertConfig(**common, num_labels=2), root / "tok", root / "two"
    )
    return rm, two


@torch.no_grad()
def test_decoder_reward_model_scores_as_transformers(llama_rm, pairs, transformers):
    from lmforge.chat import render_chat

    rm = RewardModel.from_dir(llama_rm)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        llama_rm, attn_implementation="eager"
    )
    hf_tok = transformers.AutoTokenizer.from_pretrained(llama_rm)
    expected = []
    for messages, response in pairs:
        conversation = [*messages, {"role": "assistant", "content": response}]
        ids = rm.encode(messages, response)["input_ids"]
        assert ids == render_chat(rm.tokenizer, conversation).ids  # what `data prepare` renders
        text = hf_tok.apply_chat_template(conversation, tokenize=False)
        assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
        expected.append(hf.eval()(torch.tensor([ids])).logits[0, 0])  # each pair alone, unpadded
    scores = rm.score(pairs, batch_size=4)  # batches of mixed lengths, right-padded
    assert scores.shape == (len(pairs),) and scores.dtype == torch.float32
    assert (scores - torch.stack(expected)).abs().max().item() < 1e-4
    assert scores.std() > 0  # the pairs are told apart
    items = [PromptItem(tuple(m)) for m, _ in pairs]
    as_reward = rm.as_reward(batch_size=3)([*items], [r for _, r in pairs], [True] * len(pairs))
    assert torch.allclose(torch.tensor(as_reward), scores)


@torch.no_grad()
def test_encoder_reward_model_scores_pairs_as_transformers(bert_dirs, pairs, transformers):
    rm = RewardModel.from_dir(bert_dirs[0])
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(bert_dirs[0]).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(bert_dirs[0])
    expected = []
    for messages, response in pairs:
        prompt = "\n".join(m["content"] for m in messages if m["role"] == "user")
        enc = rm.encode(messages, response)
        if response:  # transformers takes an empty text_pair for none; lmforge keeps the pair's last [SEP]
            ref = hf_tok(prompt, response)  # [CLS] prompt [SEP] response [SEP]
            assert enc == {"input_ids": ref["input_ids"], "token_type_ids": ref["token_type_ids"]}
        else:
            assert enc["input_ids"][-2:] == [rm.tokenizer.token_to_id("[SEP]")] * 2
        inputs = {k: torch.tensor([v]) for k, v in enc.items()}
        expected.append(hf(**inputs).logits[0, 0])
    scores = rm.score(pairs, batch_size=4)
    assert (scores - torch.stack(expected)).abs().max().item() < 1e-4


def test_long_pairs_keep_the_response(llama_rm, bert_dirs, pairs):
    messages, response = pairs[0]
    bert = RewardModel.from_dir(bert_dirs[0])
    full = bert.encode(messages, response)
    bert.max_length = len(full["input_ids"]) - 3
    cut = bert.encode(messages, response)  # the prompt's first 3 tokens go
    assert cut["input_ids"] == full["input_ids"][:1] + full["input_ids"][4:]
    assert cut["token_type_ids"] == full["token_type_ids"][:1] + full["token_type_ids"][4:]
    llama = RewardModel.from_dir(llama_rm)
    full = llama.encode(messages, response)["input_ids"]
    llama.max_length = 10
    assert llama.encode(messages, response)["input_ids"] == full[-10:]


def test_directories_without_a_scalar_head_are_refused(bert_dirs, tmp_path):
    from helpers import save_random_hf_decoder

    with pytest.raises(LmforgeError, match="BertForSequenceClassification with num_labels 2; a reward model"):
        RewardModel.from_dir(bert_dirs[1])
    config = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    lm = save_random_hf_decoder("LlamaConfig", config, tmp_path / "lm")
    with pytest.raises(
        LmforgeError, match="'LlamaForCausalLM', not a sequence classifier; a reward model is"
    ):
        RewardModel.from_dir(lm)
