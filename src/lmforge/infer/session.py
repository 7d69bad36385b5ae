"""`lmforge chat`: an interactive conversation through the model's chat template, streamed as it decodes.

The history is a list of messages rendered by the same `render_chat` as training data, so the model sees
at inference exactly the format it was trained on. Commands: /reset, /system TEXT, /set NAME VALUE (any
`GenerationConfig` field, validated; turning on top_k, top_p or min_p while greedy samples at temperature 1),
/exit. When the history no longer fits the context, the oldest turns are dropped (the system prompt is kept)
and a note says so.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, TextIO

import yaml

from lmforge.chat import render_chat
from lmforge.errors import LmforgeError
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import GenerationConfig, asks_to_sample, generation_config

HELP = "commands: /reset, /system TEXT, /set NAME VALUE (e.g. /set temperature 0.7), /exit"


class ChatSession:
    """One conversation: its messages, system prompt and sampling settings."""

    def __init__(
        self, engine: Engine, cfg: GenerationConfig, system: str | None = None, retriever: Any = None
    ) -> None:
        self.engine, self.cfg, self.system = engine, cfg, system
        self.retriever = retriever  # lmforge.rag.prompt.Retriever: passages for each message
        self.turns: list[dict[str, str]] = []

    def messages(self) -> list[dict[str, str]]:
        """The history as the chat template receives it."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def reply(self, text: str) -> Iterator[str]:
        """Stream the assistant's answer to `text`; the exchange joins the history once it is complete."""
        self.turns.append({"role": "user", "content": text})
        context, new = self.engine.context, self.cfg.max_new_tokens
        ids, rag = self._render()
        while len(ids) + new > context and len(self.turns) > 1:
            self.turns = self.turns[2:] if len(self.turns) > 2 else self.turns[1:]  # oldest exchange first
            ids, rag = self._render()
            yield "[older turns dropped to fit the context]\n"
        if len(ids) + new > context:
            self.turns.pop()
            if len(ids) >= context:
                raise LmforgeError(
                    f"the message takes {len(ids)} tokens with the chat template, the model's whole context of "
                    f"{context} tokens; send a shorter one"
                )
            raise LmforgeError(
                f"max_new_tokens {new}: the model's context is {context} tokens and the message takes "
                f"{len(ids)} with the chat template, leaving room for at most {context - len(ids)} new tokens; "
                f"/set max_new_tokens {context - len(ids)} or less, or send a shorter message"
            )
        answer = []
        for delta in self.engine.stream([ids], self.cfg.model_copy(update={"n": 1})):
            answer.append(delta.text)
            yield delta.text
        self.turns.append({"role": "assistant", "content": "".join(answer)})
        if rag is not None:  # the passages it was given, after the answer
            cited = rag.citations(self.turns[-1]["content"])
            sources = ", ".join(f"[{c['index']}]{'*' if c['cited'] else ''} {c['doc_id']}" for c in cited)
            yield f"\n[{rag.note or 'passages: ' + sources}{' (* cited)' if any(c['cited'] for c in cited) else ''}]"

    def _render(self) -> tuple[list[int], Any]:
        """The history's ids, with the last message's passages when retrieving (their RagPrompt, else None)."""
        if self.retriever is None:
            return render_chat(self.engine.tokenizer, self.messages(), add_generation_prompt=True).ids, None
        from lmforge.rag.prompt import rag_prompt_ids

        room = self.engine.context - self.cfg.max_new_tokens
        try:
            return rag_prompt_ids(self.engine.tokenizer, self.retriever, self.messages(), room)
        except (
            LmforgeError
        ):  # not even one passage fits: report the plain prompt's length, the loop drops turns
            return render_chat(self.engine.tokenizer, self.messages(), add_generation_prompt=True).ids, None

    def command(self, line: str) -> str:
        """Run a /command; return what to print. Raises EOFError on /exit."""
        name, _, arg = line[1:].strip().partition(" ")
        if name in ("exit", "quit"):
            raise EOFError
        if name == "reset":
            self.turns = []
            return "history cleared"
        if name == "system":
            self.system, self.turns = arg.strip() or None, []
            return f"system prompt {'set' if self.system else 'removed'}; history cleared"
        if name == "set":
            key, _, value = arg.strip().partition(" ")
            if key not in GenerationConfig.model_fields:
                raise LmforgeError(
                    f"/set: unknown setting {key!r}; one of {', '.join(GenerationConfig.model_fields)}"
                )
            setting = {key: yaml.safe_load(value)}
            settings = {**self.cfg.model_dump(), **setting}
            if key != "temperature" and self.cfg.temperature == 0 and asks_to_sample(setting):
                del settings["temperature"]  # turning on a sampling filter asks to sample (at 1.0)
            self.cfg = generation_config(settings, origin="from /set")
            note = " (sampling at temperature 1.0)" if "temperature" not in settings else ""
            return f"{key} = {getattr(self.cfg, key)!r}{note}"
        raise LmforgeError(f"unknown command /{name}; {HELP}")


def run_chat(session: ChatSession, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
    """Read lines from `stdin` until EOF or /exit; answer each message, streaming to `stdout` (default: the
    process's streams at call time, not at import, which a test runner swaps)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    print(f"lmforge chat — {HELP}", file=stdout)
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                print(session.command(line), file=stdout)
                continue
            print("assistant> ", end="", file=stdout, flush=True)
            for piece in session.reply(line):
                print(piece, end="", file=stdout, flush=True)
            print(file=stdout)
        except EOFError:
            break
        except LmforgeError as e:
            print(f"error: {e}", file=stdout)
