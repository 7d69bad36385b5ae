"""Chat templates: lmforge's renderer against transformers' apply_chat_template, masks, sandbox, errors."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lmforge.chat import (
    DEFAULT_CHAT_TEMPLATE,
    GENERATION_TAG,
    ensure_chat_template,
    render_chat,
    render_template,
)
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer, add_special_tokens, train_tokenizer

# The real Llama-3-8B-Instruct template.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# The same with {% generation %} blocks around each reply and its <|eot_id|>, for transformers' mask.
LLAMA3_GENERATION = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Mistral-7B-Instruct's multi-line template: system prompt folded into the first user turn, roles must alternate.
MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""
# Qwen2-Instruct's ChatML without generation blocks: a default system prompt when none is given.
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# name: (template, bos, eos, extra special tokens, what precedes each reply inside its span, end of turn)
TEMPLATES = {
    "chatml": (DEFAULT_CHAT_TEMPLATE, "<|begin_of_text|>", "<|end_of_text|>", [], "", "<|im_end|>"),
    "qwen2": (QWEN2, None, "<|im_end|>", [], "", "<|im_end|>"),
    "llama3": (
        LLAMA3,
        "<|begin_of_text|>",
        "<|eot_id|>",
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "",
        "<|eot_id|>",
    ),
    "llama3_generation": (
        LLAMA3_GENERATION,
        "<|begin_of_text|>",
        "<|eot_id|>",
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "",
        "<|eot_id|>",
    ),
    "mistral": (MISTRAL, "<s>", "</s>", ["<s>", "</s>"], " ", "</s>"),
}

SYSTEM = {"role": "system", "content": "You are a terse bard. Answer in one line."}
CONVERSATIONS = {
    "single": [
        {"role": "user", "content": "What is the moon?"},
        {"role": "assistant", "content": "A lamp of night, my lord."},
    ],
    "system_multi_turn": [
        SYSTEM,
        {"role": "user", "content": "Who goes there?"},
        {"role": "assistant", "content": "A friend to this ground."},
        {"role": "user", "content": "Naïve question: 2+2? 🤔"},
        {"role": "assistant", "content": "Four, 4 — as sure as day ☀️"},
        {"role": "user", "content": "And the sea?"},
        {"role": "assistant", "content": "Salt and deep.\nAnd cold."},
    ],
    "open": [
        SYSTEM,
        {"role": "user", "content": "Speak, friend."},
        {"role": "assistant", "content": "I speak."},
        {"role": "user", "content": "Again!"},
    ],
}
CORPUS = [
    "First Citizen: Before we proceed any further, hear me speak.",
    "What is the moon? A lamp of night. Who goes there? A friend.",
    "The sea is salt and deep and cold, my lord, as sure as day.",
] * 20


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny lmforge BPE, saved once per template with that template's special tokens."""
    root = tmp_path_factory.mktemp("chat")
    base = train_tokenizer(CORPUS, "bpe", 400, root / "base", min_frequency=1)
    out = {}
    for name, (template, bos, eos, extra, _, _) in TEMPLATES.items():
        d = root / name
        shutil.copytree(base, d)
        add_special_tokens(d, extra)
        config = json.loads((d / "tokenizer_config.json").read_text())
        config.update(bos_token=bos, eos_token=eos, chat_template=template)
        (d / "tokenizer_config.json").write_text(json.dumps(config))
        named = {"bos_token": bos, "eos_token": eos, "pad_token": "<|pad|>", "unk_token": "<|unk|>"}
        (d / "special_tokens_map.json").write_text(json.dumps({k: v for k, v in named.items() if v}))
        out[name] = d
    return out


def _expected_mask_text(name: str, messages: list[dict]) -> str:
    _, _, _, _, before, eot = TEMPLATES[name]
    return "".join(before + m["content"] + eot for m in messages if m["role"] == "assistant")


def _assert_prompt_unmasked(tok: Tokenizer, text: str, mask: list[int], messages: list[dict]) -> None:
    _, offsets = tok.encode_with_offsets(text)
    cursor = 0
    for m in messages:
        start = text.index(m["content"], cursor)
        cursor = start + len(m["content"])
        if m["role"] != "assistant":
            touching = [k for k, (s, e) in zip(mask, offsets, strict=True) if s < cursor and e > start]
            assert touching and not any(touching), f"masked token inside {m['role']} content"


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_contract_against_transformers(dirs: dict[str, Path], name: str, conversation: str) -> None:
    messages = CONVERSATIONS[conversation]
    tok = Tokenizer.from_dir(dirs[name])
    hf = AutoTokenizer.from_pretrained(dirs[name])
    for add_generation_prompt in (False, True):
        r = render_chat(tok, messages, add_generation_prompt=add_generation_prompt)
        kw = {"add_generation_prompt": add_generation_prompt}
        assert r.text == hf.apply_chat_template(messages, tokenize=False, **kw)
        assert r.ids == hf.apply_chat_template(messages, tokenize=True, **kw)["input_ids"]
        assert len(r.mask) == len(r.ids) and any(r.mask)
        assert tok.decode([i for i, m in zip(r.ids, r.mask, strict=True) if m]) == _expected_mask_text(
            name, messages
        )
        _assert_prompt_unmasked(tok, r.text, r.mask, messages)
        if GENERATION_TAG.search(TEMPLATES[name][0]):
            hf_out = hf.apply_chat_template(messages, return_assistant_tokens_mask=True, **kw)
            assert r.mask == hf_out["assistant_masks"]


def test_prefix_derived_mask_equals_generation_blocks(dirs: dict[str, Path]) -> None:
    """Llama-3 without generation blocks (prefix rendering) masks what transformers masks with them."""
    messages = CONVERSATIONS["system_multi_turn"]
    hf = AutoTokenizer.from_pretrained(dirs["llama3"])
    expected = hf.apply_chat_template(
        messages, chat_template=LLAMA3_GENERATION, return_assistant_tokens_mask=True
    )
    r = render_chat(Tokenizer.from_dir(dirs["llama3"]), messages)
    assert r.ids == expected["input_ids"] and r.mask == expected["assistant_masks"]
    # and lmforge's default template masks the same tokens either way
    plain = DEFAULT_CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    chatml = Tokenizer.from_dir(dirs["chatml"])
    assert render_chat(chatml, messages).mask == render_chat(chatml, messages, template=plain).mask


def test_generation_spans_are_replies_with_end_of_turn() -> None:
    text, spans = render_template(DEFAULT_CHAT_TEMPLATE, CONVERSATIONS["system_multi_turn"])
    replies = [m["content"] for m in CONVERSATIONS["system_multi_turn"] if m["role"] == "assistant"]
    assert [text[s:e] for s, e in spans] == [r + "<|im_end|>" for r in replies]


FEATURES = """{% set ns = namespace(n=0) %}
{% for m in messages %}
  {% if m.role == 'user' %}
    {% set ns.n = ns.n + 1 %}
U{{ ns.n }}: {{ m.content }}
  {% elif m.role == 'assistant' %}
A: {{ m.content }}{{ eos_token }}
  {% endif %}
  {% if loop.index >= 4 %}{% break %}{% endif %}
{% endfor %}
json: {{ {'q': '<b> & "é"', 'n': [1, 2]} | tojson }} {{ {'b': 1, 'a': 2} | tojson(indent=2, sort_keys=True) }}
names: {{ bos_token }} {{ pad_token }} {{ unk_token }}{{ ' ' + (tools is none) | string }}
"""


def test_environment_features_match_transformers(dirs: dict[str, Path]) -> None:
    """trim_blocks/lstrip_blocks, namespace, loop controls, tojson, special tokens by name: same text as HF."""
    messages = CONVERSATIONS["system_multi_turn"]
    hf = AutoTokenizer.from_pretrained(dirs["chatml"])
    expected = hf.apply_chat_template(messages, chat_template=FEATURES, tokenize=False)
    special = Tokenizer.from_dir(dirs["chatml"]).special_tokens
    text, _ = render_template(FEATURES, messages, special_tokens=special)
    assert text == expected
    assert '{"q": "<b> & \\"é\\"", "n": [1, 2]}' in text and "<|pad|> <|unk|> True" in text
    year = render_template("{{ strftime_now('%Y') }}", [])[0]
    assert year == str(datetime.now().year)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ messages.append({'role': 'user'}) }}",
        "{{ ().__class__.__base__.__subclasses__() }}",
    ],
)
def test_sandbox_blocks_python_internals(template: str) -> None:
    with pytest.raises(LmforgeError, match="chat template failed"):
        render_template(template, [{"role": "user", "content": "hi"}])


def test_errors_name_the_problem(dirs: dict[str, Path]) -> None:
    tok = Tokenizer.from_dir(dirs["chatml"])
    user_only = [{"role": "user", "content": "hi"}]
    with pytest.raises(LmforgeError, match="no assistant turn"):
        render_chat(tok, user_only, require_assistant=True)
    assert render_chat(tok, user_only).mask == [0] * len(render_chat(tok, user_only).ids)
    with pytest.raises(LmforgeError, match="role tool is not one of system, user, assistant"):
        render_chat(tok, [*user_only, {"role": "tool", "content": "42"}])
    with pytest.raises(LmforgeError, match="raised: roles must alternate"):
        render_chat(tok, user_only, template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(LmforgeError, match="does not parse"):
        render_chat(tok, user_only, template="{% for m in messages %}")
    with pytest.raises(LmforgeError, match="'role'"):
        render_chat(tok, [{"content": "no role"}])
    mistral = Tokenizer.from_dir(dirs["mistral"])
    bad_order = [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(LmforgeError, match="must alternate user/assistant"):
        render_chat(mistral, bad_order)
    with pytest.raises(LmforgeError, match="Only user and assistant roles"):
        render_chat(mistral, [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])
    # a template whose rendering of a longer conversation rewrites the earlier text: spans cannot be derived
    newest_first = "{% for m in messages | reverse %}{{ m.role + ': ' + m.content + '\n' }}{% endfor %}"
    messages = [*user_only, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    with pytest.raises(LmforgeError, match="prefix by prefix"):
        render_chat(tok, messages, template=newest_first)


def test_ensure_chat_template(tmp_path: Path) -> None:
    """A transformers-saved tokenizer without a template or ChatML tokens gets both; transformers agrees."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS, trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(tmp_path)
    before = Tokenizer.from_dir(tmp_path)
    assert before.chat_template is None and before.token_to_id("<|im_end|>") is None

    assert ensure_chat_template(tmp_path) is True
    assert ensure_chat_template(tmp_path) is False
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert tok.vocab_size == before.vocab_size + 2
    assert tok.token_to_id("<|im_end|>") in tok.eot_ids and tok.eos_id in tok.eot_ids
    messages = CONVERSATIONS["system_multi_turn"]
    r = render_chat(tok, messages, require_assistant=True)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    out = hf.apply_chat_template(messages, return_assistant_tokens_mask=True)
    assert r.ids == out["input_ids"] and r.mask == out["assistant_masks"]
    assert r.ids.count(tok.token_to_id("<|im_end|>")) == len(messages)
    assert tok.decode([i for i, m in zip(r.ids, r.mask, strict=True) if m]) == _expected_mask_text(
        "chatml", messages
    )
