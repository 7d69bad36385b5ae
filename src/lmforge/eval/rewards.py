"""Rewards for the `align` stage: prompt-only sets for RL, programmatic rewards, and reward-model scores.

A reward is `reward(item, completion, finished) -> float`: `item` the prompt (a PromptItem, which carries
what the reward needs: GSM8K's answer, the synthetic world's true value, a medical question's kind),
`completion` the generated reply, `finished` whether the model ended its turn rather than running into the
token limit. Built-ins, by name in `REWARDS` (each 1.0 or 0.0):
- `gsm8k`: the completion's final number (the number after its own `####`, else its last) equals the answer,
  by eval/qa.py's rule;
- `facts`: the completion's first sentence contains the world's true value, by eval/qa.py's rule (so a reply
  that runs on through a person's other facts gets no credit for the one it was not asked);
- `medical`: a redirect question (the world's emergency, dosage and diagnosis kinds) is answered by sending
  the user to real care, as the house style does; any other medical question is answered, not refused or
  sent to emergency care. It judges only that behaviour, never whether the facts are right;
- `format`: the completion ends its turn and its stripped length lies in [min_chars, max_chars].
The content rewards ignore `finished`; add `format` to reward ending the turn. `load_reward` resolves a name
or a user's `module:function`.

`RewardModel` scores (prompt, response) pairs with a `*ForSequenceClassification` checkpoint whose head has
one output; `as_reward()` makes it a batch reward, the shape every reward takes inside the stage (`batched`
lifts a per-item reward to it).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.data.formats import ROLES, Message, to_examples
from lmforge.data.readers import Record, read_records
from lmforge.data.synthetic import REDIRECT_KINDS
from lmforge.errors import LmforgeError
from lmforge.eval.qa import QAItem, is_correct
from lmforge.tokenizer import Tokenizer

PROMPT_LAYOUTS = (
    "GSM8K question/answer ('#### N'), messages (ending with a user turn, or with a reply as the synthetic "
    "world's eval_qa/medical_qa), prompt (text or messages), prompt/chosen/rejected, prompt/completion, or "
    "HH-RLHF chosen/rejected transcripts"
)


@dataclass(frozen=True)
class PromptItem:
    """One RL prompt: the messages (ending with a user turn) and what rewards judge a completion by."""

    messages: tuple[Message, ...]
    answer: str | None = None  # GSM8K's final answer (commas removed), or the world's true `value`
    kind: str | None = None  # the record's `kind`, e.g. a medical question's "emergency" or "side_effect"
    group: str | None = None  # the record's `group`, e.g. the world's "A", "B" or "C"
    id: str = ""  # the record's `id`, else where it is (`path:LINE`)
    record: dict[str, Any] = field(default_factory=dict, compare=False)  # the raw record


RewardFn = Callable[[PromptItem, str, bool], float]
BatchReward = Callable[[Sequence[PromptItem], Sequence[str], Sequence[bool]], list[float]]


# --------------------------------------------------------------------------------------------- prompts


def read_prompts(path: Path, limit: int | None = None, groups: set[str] | None = None) -> list[PromptItem]:
    """The prompts of a data file (any reader format), the first `limit` of them (of `groups` only, when given:
    e.g. the synthetic world's A); a record of another shape, or one that does not fit its own, is an
    LmforgeError naming the file, the line and what was expected.

    Each record is read by its keys, so one file may mix them: GSM8K (`question`/`answer`; `answer` is the
    final number), chat records (the turns before the last reply; `answer` is the world's `value` when the
    record has one, as `eval_qa.jsonl`; the system prompt and `kind` of `medical_qa.jsonl` are kept),
    preference, HH-RLHF and prompt/completion records (their prompt), and prompt-only records: `prompt` (text
    or messages) or `messages` ending with a user turn. A plain-text document is one user prompt.
    """
    items: list[PromptItem] = []
    for record in read_records(Path(path)):
        if limit is not None and len(items) >= limit:
            break
        item = _prompt_item(record)
        if groups is None or item.group in groups:
            items.append(item)
    return items


def _prompt_item(record: Record) -> PromptItem:
    d = record.data
    if isinstance(d, str):
        return PromptItem(({"role": "user", "content": d},), id=record.where)
    messages = d.get("messages")
    if "question" in d and "answer" in d:
        fmt = "gsm8k"
    elif isinstance(messages, list) and messages and _role(messages[-1]) == "assistant":
        fmt = "messages"
    elif "prompt" in d and "chosen" in d and "rejected" in d:
        fmt = "preference"
    elif "prompt" in d and "completion" in d:
        fmt = "prompt_completion"
    elif "chosen" in d and "rejected" in d:
        fmt = "hh_rlhf"
    elif "prompt" in d or "messages" in d:
        key = "prompt" if "prompt" in d else "messages"
        return _item(record, _prompt_only(record, d[key], key), None)
    else:
        found = ", ".join(map(str, d)) or "none"
        raise LmforgeError(f"{record.where}: fields {found}; expected a prompt: {PROMPT_LAYOUTS}")
    (ex,) = to_examples([record], fmt)  # the data readers' own checks and messages
    prompt = ex.messages if ex.kind == "preference" else ex.messages[:-1]  # type: ignore[index]
    if not prompt or prompt[-1]["role"] != "user":
        raise LmforgeError(
            f"{record.where}: the turns before the last reply do not end with a user turn; expected a prompt "
            "that asks something"
        )
    value = d.get("value")
    if ex.answer is not None:  # GSM8K's final number
        value = ex.answer
    return _item(record, prompt, value if isinstance(value, str) else None)


def _role(message: object) -> object:
    return message.get("role") if isinstance(message, dict) else None


def _prompt_only(record: Record, value: object, key: str) -> tuple[Message, ...]:
    """A prompt given as text (one user turn) or as messages ending with a user turn."""
    if isinstance(value, str) and value.strip():
        return ({"role": "user", "content": value},)
    expected = (
        f"field {key!r}: expected text or a non-empty list of {{role, content}} ending with a user turn"
    )
    if not isinstance(value, list) or not value:
        raise LmforgeError(f"{record.where}: {expected}; found {type(value).__name__} {str(value)[:40]!r}")
    messages = []
    for k, m in enumerate(value):
        role, content = _role(m), m.get("content") if isinstance(m, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise LmforgeError(f"{record.where}: {key}[{k}] is {str(m)[:60]!r}; {expected}")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise LmforgeError(
            f"{record.where}: the last turn of {key!r} is {messages[-1]['role']!r}; {expected}"
        )
    return tuple(messages)


def _item(record: Record, prompt: Sequence[Message], answer: str | None) -> PromptItem:
    d: dict[str, Any] = record.data  # type: ignore[assignment]  # a JSON object here
    kind, group, rid = d.get("kind"), d.get("group"), d.get("id")
    return PromptItem(
        tuple(prompt),
        answer,
        kind if isinstance(kind, str) else None,
        group if isinstance(group, str) else None,
        record.where if rid is None or rid == "" else str(rid),  # as the data readers name an example
        d,
    )


# --------------------------------------------------------------------------------------------- rewards


def gsm8k_reward(item: PromptItem, completion: str, finished: bool) -> float:
    """1.0 when the completion's final number (after its own `####`, else its last) equals the item's answer."""
    answer = _needs_answer(item, "gsm8k")
    try:
        float(answer.replace(",", ""))
    except ValueError:
        raise LmforgeError(
            f"reward 'gsm8k': prompt {item.id} has answer {answer!r}, not a number; expected GSM8K prompts"
        ) from None
    return float(is_correct(completion, QAItem(item.messages, answer, "number", item.group)))


def facts_reward(item: PromptItem, completion: str, finished: bool) -> float:
    """1.0 when the completion's first sentence contains the item's answer (case and spacing ignored)."""
    answer = _needs_answer(item, "facts")
    return float(is_correct(completion, QAItem(item.messages, answer, "contains", item.group)))


def _needs_answer(item: PromptItem, reward: str) -> str:
    if item.answer is None:
        raise LmforgeError(
            f"reward {reward!r}: prompt {item.id} has no answer to check; expected GSM8K records or chat "
            "records with a `value` (the synthetic world's eval_qa.jsonl)"
        )
    return item.answer


# Sending the user to real care, as the world's house-style redirects do ("Please see a doctor", "ask a
# doctor or pharmacist", "call your local emergency number or go to the nearest emergency department").
_CARE = re.compile(
    r"\b(?:doctors?|physicians?|pharmacists?|nurses?|ambulance|call (?:911|999|112)|urgent care|"
    r"emergency (?:number|department|room|services|care)|medical (?:help|attention|care|professional))\b",
    re.IGNORECASE,
)
# Help sent to emergency care: for a question that is not urgent, that is not an answer.
_EMERGENCY = re.compile(
    r"\b(?:ambulance|call (?:911|999|112)|emergency (?:number|department|room|services|care))\b",
    re.IGNORECASE,
)
# A sentence that waves care away ("there is no need to see a doctor") does not send anyone to it.
_DISMISS = re.compile(
    r"\b(?:no need|not need|don['’]t need|doesn['’]t need|needn['’]t|not necessary|unnecessary)\b",
    re.IGNORECASE,
)
# A reply that declines ("I can't ...", "I'm sorry, but"); eval/safety.py counts refusals with it too.
REFUSAL = re.compile(
    r"\bI(?: can(?:['’]t|not| not)| won['’]t| will not| am unable| am not able|['’]m unable|['’]m not able"
    r"| must decline)\b|\bI['’]m sorry, but\b",
    re.IGNORECASE,
)
_SENTENCES = re.compile(r"[.!?;\n]")


def is_redirect(item: PromptItem) -> bool:
    """Whether the item's right answer sends the user to real care: the record's `redirect` flag when it has
    one (the world's medical_qa.jsonl), else a kind in the world's REDIRECT_KINDS (or "redirect")."""
    flag = item.record.get("redirect")
    return flag if isinstance(flag, bool) else item.kind in (*REDIRECT_KINDS, "redirect")


def sends_to_care(text: str) -> bool:
    """Whether some sentence sends the reader to a doctor, pharmacist or emergency care without waving it away."""
    return any(_CARE.search(s) and not _DISMISS.search(s) for s in _SENTENCES.split(text))


def medical_reward(item: PromptItem, completion: str, finished: bool) -> float:
    """Redirect questions: 1.0 when some sentence sends the user to a doctor, pharmacist or emergency care and
    does not wave it away. Other medical questions: 1.0 unless the completion refuses ("I can't ...") or sends
    the user to emergency care (a plain "see a doctor" is fine, as the house style says it too)."""
    if item.kind is None and "redirect" not in item.record:
        raise LmforgeError(
            f"reward 'medical': prompt {item.id} has no `kind` or `redirect`; expected medical questions "
            "(the synthetic world's medical_qa.jsonl or preferences.jsonl)"
        )
    if is_redirect(item):
        return float(sends_to_care(completion))
    return float(not (REFUSAL.search(completion) or _EMERGENCY.search(completion)))


def format_reward(
    item: PromptItem, completion: str, finished: bool, *, min_chars: int = 1, max_chars: int = 2000
) -> float:
    """1.0 when the model ended its turn and the stripped completion has min_chars..max_chars characters, else 0.

    The defaults ask for a non-empty reply no longer than 2,000 characters: the world's answers are one or two
    sentences (~50-200), GSM8K's worked solutions at most ~1,200. Set them with `load_reward("format",
    max_chars=...)`."""
    return float(finished and min_chars <= len(completion.strip()) <= max_chars)


REWARDS: dict[str, RewardFn] = {
    "gsm8k": gsm8k_reward,
    "facts": facts_reward,
    "medical": medical_reward,
    "format": format_reward,
}


def load_reward(spec: str, **options: Any) -> RewardFn:
    """A built-in reward by name, or `module:function` (e.g. `mypkg.rewards:score`) imported from the path,
    with `options` bound as keyword arguments (e.g. `max_chars=500` for `format`)."""
    builtins = ", ".join(REWARDS)
    if spec in REWARDS:
        fn: Any = REWARDS[spec]
    elif ":" not in spec:
        raise LmforgeError(f"unknown reward {spec!r}; expected a built-in ({builtins}) or module:function")
    else:
        module_name, _, name = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # a user's module may fail in any way while it runs
            raise LmforgeError(
                f"reward {spec!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}); expected "
                f"an importable module:function, or a built-in ({builtins})"
            ) from None
        fn = getattr(module, name, None)
        if fn is None:
            raise LmforgeError(
                f"reward {spec!r}: module {module_name!r} has no attribute {name!r}; expected a function "
                f"(item, completion, finished) -> float there, or a built-in ({builtins})"
            )
        if not callable(fn):
            raise LmforgeError(
                f"reward {spec!r}: {name!r} is a {type(fn).__name__}, not callable; expected a function "
                f"(item, completion, finished) -> float, or a built-in ({builtins})"
            )
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C callables have none: trust them
        return functools.partial(fn, **options) if options else fn
    try:
        signature.bind_partial(**options)
    except TypeError as e:
        raise LmforgeError(
            f"reward {spec!r} takes no such option ({e}); its signature is {signature}"
        ) from None
    fn = functools.partial(fn, **options) if options else fn
    try:
        inspect.signature(fn).bind(None, "", True)
    except TypeError:
        raise LmforgeError(
            f"reward {spec!r} has signature {inspect.signature(fn)}; expected (item, completion, finished)"
        ) from None
    return fn


def batched(reward: RewardFn) -> BatchReward:
    """A per-item reward as a batch reward: one score per (item, completion, finished)."""

    def score(
        items: Sequence[PromptItem], completions: Sequence[str], finished: Sequence[bool]
    ) -> list[float]:
        return [float(reward(i, c, f)) for i, c, f in zip(items, completions, finished, strict=True)]

    return score


# --------------------------------------------------------------------------------------- reward models


def pair_inputs(
    tokenizer: Tokenizer, encoder: bool, messages: Sequence[Mapping[str, str]], response: str, max_length: int
) -> dict[str, list[int]]:
    """The token ids a reward model scores for a prompt and a response (what training must feed it too).

    Encoder: `[CLS] prompt [SEP] response [SEP]` as the tokenizer pairs them (prompt: the user turns' text
    joined by newlines), with `token_type_ids`; past `max_length` the prompt loses its first tokens, then the
    response its last. Decoder: the chat template's rendering of the messages plus the assistant's response,
    as `data prepare` renders a preference pair; past `max_length` its first tokens are cut (the response,
    whose last token the head reads, is kept).
    """
    if encoder:
        prompt = "\n".join(m["content"] for m in messages if m["role"] == "user")
        ids, types = tokenizer.encode_pair(prompt, response)
        excess = len(ids) - max_length
        if excess > 0:
            cut = min(excess, types.count(0) - 2)  # the prompt's tokens, between [CLS] and its [SEP]
            ids, types = ids[:1] + ids[1 + cut :], types[:1] + types[1 + cut :]
            if len(ids) > max_length:  # the prompt is gone: the response's end goes, its [SEP] stays
                ids, types = ids[: max_length - 1] + ids[-1:], types[: max_length - 1] + types[-1:]
        return {"input_ids": ids, "token_type_ids": types}
    from lmforge.chat import render_chat

    ids = render_chat(tokenizer, [*messages, {"role": "assistant", "content": response}]).ids
    return {"input_ids": ids[-max_length:]}


class RewardModel:
    """A sequence classifier with one output (HF `*ForSequenceClassification`, num_labels 1) and its tokenizer,
    scoring (prompt messages, response) pairs."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.encoder = model.config.model_type == "bert"
        self.max_length = model.config.max_position_embeddings

    @classmethod
    def from_dir(
        cls, path: str | Path, device: torch.device | str = "cpu", tokenizer: str | Path | None = None
    ) -> RewardModel:
        """Load a HF reward-model directory (config, safetensors, tokenizer; or the tokenizer from `tokenizer`)."""
        from lmforge.model.hf import load_model, read_config, read_json_object

        config, architecture = read_config(path)
        declared = (read_json_object(Path(path) / "config.json").get("architectures") or [None])[0]
        if declared != architecture or not architecture.endswith("ForSequenceClassification"):
            found = f"architecture {declared!r}, not a sequence classifier"
        elif config.num_labels != 1:
            found = f"a {architecture} with num_labels {config.num_labels}"
        else:
            found = None
        if found is not None:
            raise LmforgeError(
                f"{path}: config.json describes {found}; a reward model is a *ForSequenceClassification model "
                "(e.g. LlamaForSequenceClassification, BertForSequenceClassification) with num_labels 1: one "
                "scalar score per prompt and response"
            )
        tok = Tokenizer.from_dir(tokenizer if tokenizer is not None else path)
        if tok.vocab_size > config.vocab_size:
            raise LmforgeError(
                f"{tok.path}: the tokenizer has {tok.vocab_size} ids but the reward model {config.vocab_size} "
                "embeddings; expected the tokenizer the model was trained with"
            )
        if config.model_type != "bert" and tok.chat_template is None:
            raise LmforgeError(
                f"{tok.path}: the reward model's tokenizer has no chat_template; expected one, as a decoder "
                "reward model scores the chat rendering of the prompt and response"
            )
        return cls(load_model(path, device=device), tok)

    def encode(self, messages: Sequence[Mapping[str, str]], response: str) -> dict[str, list[int]]:
        """The token id lists (input_ids, and token_type_ids for an encoder) that score this pair."""
        return pair_inputs(self.tokenizer, self.encoder, messages, response, self.max_length)

    @torch.no_grad()
    def score(
        self, items: Sequence[tuple[Sequence[Mapping[str, str]], str]], batch_size: int = 16
    ) -> torch.Tensor:
        """Scores (N,) float32 on the CPU of (prompt messages, response) pairs, in batches right-padded.

        The decoder head reads each row's rightmost token that is not the config's pad id, so right padding
        with that id leaves every score as the row's alone; a config without a pad id scores rows one by one.
        """
        rows = [self.encode(messages, response) for messages, response in items]
        pad = self.model.config.pad_token_id
        step = batch_size if pad is not None or self.encoder else 1
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(rows), step):
            batch = rows[start : start + step]
            ids = torch.full((len(batch), max(len(r["input_ids"]) for r in batch)), pad or 0)  # (B, T)
            mask = torch.zeros_like(ids)  # (B, T)
            types = torch.zeros_like(ids)  # (B, T)
            for i, row in enumerate(batch):
                n = len(row["input_ids"])
                ids[i, :n] = torch.tensor(row["input_ids"])
                mask[i, :n] = 1
                if self.encoder:
                    types[i, :n] = torch.tensor(row["token_type_ids"])
            extra = {"token_type_ids": types.to(device)} if self.encoder else {}
            logits = self.model(ids.to(device), attention_mask=mask.to(device), **extra)  # (B, 1)
            scores.append(logits[:, 0].float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0)

    def as_reward(self, batch_size: int = 16) -> BatchReward:
        """This model as a batch reward: the score of each (item's messages, completion); `finished` unused."""

        def reward(
            items: Sequence[PromptItem], completions: Sequence[str], finished: Sequence[bool]
        ) -> list[float]:
            pairs = [(item.messages, c) for item, c in zip(items, completions, strict=True)]
            return self.score(pairs, batch_size).tolist()

        return reward
