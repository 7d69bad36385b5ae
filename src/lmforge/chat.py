"""Chat templates: render HF `chat_template` strings in a Jinja sandbox, with an assistant-only loss mask.

The environment mirrors transformers' (`utils/chat_template_utils.py`): an `ImmutableSandboxedEnvironment`
with `trim_blocks`/`lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, a `tojson` that does
not HTML-escape, the special tokens by name, and `{% generation %}` blocks that record the character spans
of what the assistant generates. One renderer serves training data, inference and serving.

The mask of a rendered chat covers each assistant reply and the end-of-turn token the template writes right
after it, never a header, system or user token:
- templates with `{% generation %}` blocks: the blocks' spans, exactly as transformers'
  `return_assistant_tokens_mask=True`;
- other templates (Llama-3, Mistral, ...): for assistant message i, the text between
  `render(messages[:i], add_generation_prompt=True)` and `render(messages[:i+1])`, trailing whitespace dropped.
A token is masked when its character span overlaps an assistant span.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write
from lmforge.tokenizer import CHAT_TOKENS, Tokenizer, add_special_tokens

# ChatML; `{% generation %}` wraps each reply and its <|im_end|>, the newline after it stays outside.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('lmforge chat template: role ' + message['role'] + ' is not one of system, user, assistant') }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

Span = tuple[int, int]
# (chunks rendered so far, spans recorded) while a render is in progress.
_tracking: ContextVar[tuple[list[str], list[Span]] | None] = ContextVar("lmforge_generation", default=None)


class _TemplateRaised(jinja2.TemplateError):
    """What `raise_exception(msg)` raises inside a template."""


class GenerationTracker(Extension):
    """`{% generation %}...{% endgeneration %}`: records the character span the block renders to."""

    tags = {"generation"}  # noqa: RUF012 - jinja's Extension API

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        """Parse the block body up to `{% endgeneration %}` into a call of `_record`."""
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_record"), [], [], body).set_lineno(lineno)

    def _record(self, caller: jinja2.runtime.Macro) -> str:
        text = caller()
        if (state := _tracking.get()) is not None:
            # `generate()` is lazy, so every chunk before this block has already been collected.
            chunks, spans = state
            start = sum(map(len, chunks))
            spans.append((start, start + len(text)))
        return text


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # transformers' semantics: plain json.dumps, no HTML escaping (Jinja's own filter escapes < > & ').
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTracker, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


@lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    return _environment().from_string(template)


def render_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    special_tokens: Mapping[str, str] | None = None,
    source: str = "chat template",
) -> tuple[str, list[Span]]:
    """Render `template` in the sandbox; return the text and the character spans of its generation blocks."""
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise LmforgeError(f"{source} does not parse: {e.message} (template line {e.lineno})") from None
    # Jinja checks some errors only in the Python it compiles to: `{% break %}` outside a loop
    except Exception as e:
        raise LmforgeError(f"{source} does not compile: {type(e).__name__}: {e}") from None
    chunks: list[str] = []
    spans: list[Span] = []
    token = _tracking.set((chunks, spans))
    try:
        # Same variables as transformers' apply_chat_template: special tokens by name, tools/documents None.
        for chunk in compiled.generate(
            **(special_tokens or {}),
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
        ):
            chunks.append(chunk)
    except _TemplateRaised as e:
        raise LmforgeError(f"{source} raised: {e.message}") from None
    except jinja2.TemplateError as e:  # sandbox violations, undefined attribute access, ...
        raise LmforgeError(f"{source} failed: {type(e).__name__}: {e.message}") from None
    except Exception as e:  # a template is untrusted input: any error it raises is bad input
        raise LmforgeError(f"{source} failed: {type(e).__name__}: {e}") from None
    finally:
        _tracking.reset(token)
    return "".join(chunks), spans


@dataclass(frozen=True)
class RenderedChat:
    """A rendered conversation: its text, token ids and loss mask (1 = trained on)."""

    text: str
    ids: list[int]
    mask: list[int]


def _normalise(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise LmforgeError(
                f"chat message {i}: expected a mapping with a string 'role', got {message!r:.80}"
            )
        out.append({k: v for k, v in message.items() if v is not None})  # as transformers: None means absent
    return out


def _prefix_spans(template: str, messages: list[dict[str, Any]], text: str, **render: Any) -> list[Span]:
    """Assistant spans of a template without generation blocks, by rendering each reply's prefixes."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, _ = render_template(template, messages[:i], add_generation_prompt=True, **render)
        turn, _ = render_template(template, messages[: i + 1], **render)
        if not (turn.startswith(prompt) and text.startswith(turn)):
            raise LmforgeError(
                f"{render['source']}: rendering message {i} changes the text before it, so its assistant span "
                "cannot be found; expected a template that renders a conversation prefix by prefix, "
                "or one with {% generation %} blocks around assistant replies"
            )
        end = len(turn.rstrip())  # the reply and its end-of-turn token, not the newline after it
        if end > len(prompt):
            spans.append((len(prompt), end))
    return spans


def _token_mask(offsets: Sequence[Span], spans: Sequence[Span]) -> list[int]:
    # A token is masked when its characters overlap a span (transformers' rule); both lists are sorted.
    mask, k = [0] * len(offsets), 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        mask[t] = int(end > spans[k][0])
    return mask


def render_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    template: str | None = None,
    require_assistant: bool = False,
) -> RenderedChat:
    """Render `messages` with the tokenizer's (or the given) chat template into text, ids and an assistant mask."""
    source = "the given chat template" if template is not None else f"the chat template of {tokenizer.path}"
    template = template if template is not None else tokenizer.chat_template
    if template is None:
        raise LmforgeError(
            f"{tokenizer.path}: the tokenizer has no chat_template (expected one in tokenizer_config.json or "
            "chat_template.jinja; `ensure_chat_template` writes lmforge's default)"
        )
    messages = _normalise(messages)
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    if require_assistant and n_assistant == 0:
        roles = [m["role"] for m in messages]
        raise LmforgeError(f"conversation with roles {roles} has no assistant turn: expected one to train on")
    render = {"special_tokens": tokenizer.special_tokens, "source": source}
    text, spans = render_template(template, messages, add_generation_prompt=add_generation_prompt, **render)
    if not GENERATION_TAG.search(template):
        spans = _prefix_spans(template, messages, text, **render)
    ids, offsets = tokenizer.encode_with_offsets(text)
    mask = _token_mask(offsets, spans)
    if require_assistant and not any(mask):
        raise LmforgeError(
            f"{source} rendered {n_assistant} assistant turn(s) but no assistant span to train on"
        )
    return RenderedChat(text, ids, mask)


def ensure_chat_template(tokenizer_dir: Path) -> bool:
    """Write DEFAULT_CHAT_TEMPLATE into `tokenizer_config.json` when the tokenizer has none; True if it wrote.

    `<|im_start|>`/`<|im_end|>` missing from the vocabulary are added to `tokenizer.json` as special tokens,
    so each is one id the model can learn to emit (and generation can stop on): the vocabulary grows by up
    to 2, and a model sized for the old vocabulary needs its embeddings resized.
    """
    tokenizer_dir = Path(tokenizer_dir)
    if Tokenizer.from_dir(tokenizer_dir).chat_template is not None:
        return False
    add_special_tokens(tokenizer_dir, CHAT_TOKENS)
    config_path = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config["chat_template"] = DEFAULT_CHAT_TEMPLATE
    atomic_write(config_path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return True
