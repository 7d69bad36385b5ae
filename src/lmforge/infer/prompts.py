"""Prompts for the engine: a prompts file read (one per line, or JSONL records of text or chats), a prompt as
chat messages, a prompt's ids (plain text, or rendered by the chat template), and prompts fitted to the context."""

from __future__ import annotations

import codecs
import json
from collections.abc import Sequence
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.infer.engine import Engine, check_room


def read_prompts(path: Path) -> list[str | list[dict]]:
    """Prompts from a UTF-8 file: one per line, or JSONL records with "prompt" (text) or "messages" (a chat)."""
    path = Path(path)
    expected = "expected a file of prompts (one per line, or JSONL records with 'prompt' or 'messages')"
    if path.is_dir():
        raise LmforgeError(f"{path}: is a directory; {expected}")
    try:
        data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    except FileNotFoundError:
        raise LmforgeError(f"{path}: no such file; {expected}") from None
    except OSError as e:
        raise LmforgeError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise LmforgeError(
            f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); save the file as UTF-8"
        ) from None
    found: list[str | list[dict]] = []
    # Lines end at "\n" only: str.splitlines would also cut at U+2028 and the like, which JSON strings may hold.
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            found.append(line)
            continue
        try:
            record = json.loads(line)
            prompt = record["messages"] if "messages" in record else record["prompt"]
        # RecursionError: a record nested too deeply for the JSON parser
        except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
            prompt = None
        chat = isinstance(prompt, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt
        )
        if not (isinstance(prompt, str) or (chat and prompt)):
            raise LmforgeError(
                f"{path}:{number}: expected a JSON object with 'prompt' (text) or 'messages' (a list of "
                "{'role': ..., 'content': ...})"
            )
        found.append(prompt)
    if not found:
        raise LmforgeError(f"{path}: no prompts in it")
    return found


def fit_prompts(
    prompts: Sequence[Sequence[int]], context: int, max_new_tokens: int, *, truncate: bool
) -> list[list[int]]:
    """The prompts, each with room for `max_new_tokens` in `context`: with `truncate`, each cut to its last
    tokens; else an error (naming --max-new-tokens and --truncate) when the longest does not fit."""
    if not truncate:
        check_room([len(p) for p in prompts], context, max_new_tokens, flags=True)
        return [list(p) for p in prompts]
    room = context - max_new_tokens
    if room < 1:
        raise LmforgeError(
            f"max_new_tokens {max_new_tokens}: the model's context is {context} tokens, so even a prompt cut to "
            f"its last token (--truncate) leaves room for at most {context - 1} new tokens; lower --max-new-tokens"
        )
    return [list(p[-room:]) for p in prompts]


def as_messages(prompt: str | list[dict], system: str | None = None) -> list[dict]:
    """A prompt as chat messages: a text is one user turn; `system` comes first when given."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return [{"role": "system", "content": system}, *messages] if system is not None else messages


def prompt_ids(
    engine: Engine,
    prompt: str | list[dict],
    *,
    chat: bool,
    system: str | None,
    room: int | None = None,
    truncate: bool = False,
) -> list[int]:
    """A prompt's ids: plain text, or messages rendered by the chat template (as in training) with the
    assistant turn opened; given a `room`, with `truncate` only its last `room` tokens (else a longer prompt is
    an error)."""
    from lmforge.chat import render_chat

    if chat or system is not None or not isinstance(prompt, str):
        ids = render_chat(engine.tokenizer, as_messages(prompt, system), add_generation_prompt=True).ids
    else:
        ids = engine.encode(prompt)
    if room is not None and len(ids) > room:
        if room < 1:
            raise LmforgeError(
                f"max_new_tokens fills the model's context: no room for a prompt ({room} tokens)"
            )
        if not truncate:
            raise LmforgeError(
                f"a prompt of {len(ids)} tokens leaves no room for max_new_tokens in the model's context "
                f"({room} prompt tokens fit): shorten it, lower max_new_tokens, or pass --truncate"
            )
        ids = ids[-room:]
    return list(ids)
