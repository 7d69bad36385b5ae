"""lm-evaluation-harness's `lmforge` model: any lm-eval task on an lmforge model directory (and adapter).

`--model lmforge --model_args pretrained=DIR[,adapter=DIR][,max_length=N][,dtype=T]`, with lm-eval's own
`--batch_size N` (rows per forward; "auto" takes `--max_batch_size`, else 32) and `--device D`.
Log-likelihoods (multiple choice, perplexity) go through `eval/loglik.py`, generation through the inference
engine. Strings are tokenised exactly as lm-eval's `hf` model does (its context/continuation split, BOS added
by the tokenizer unless the text already starts with it), each distinct string once, in one batch, so the
per-request log-likelihoods equal the `hf` model's on the same directory.

Importing this module registers the class (lm-eval has no plugin entry points); `lmforge lm-eval ARGS...`
imports it and runs lm-eval's own command line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from lmforge.errors import LmforgeError
from lmforge.eval.loglik import model_window, rolling_windows, score_continuations

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# gen_kwargs lm-eval tasks pass → GenerationConfig fields (do_sample, until and max_gen_toks are read apart).
GEN_KWARGS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "no_repeat_ngram_size": "no_repeat_ngram_size",
    "seed": "seed",
}


def _flag(name: str, value: bool | str) -> bool:
    """A boolean model_arg as lm-eval passes it: a bool, or the text true/false (model_args are strings)."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise LmforgeError(f"{name}={value}: expected true or false")


def _batch_size(value: int | str | None, max_batch_size: int | None) -> int:
    """`batch_size` as lm-eval passes it (an int, "N", "auto" or "auto:K"): rows per forward."""
    if value is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(value, str) and value.startswith("auto"):
        return int(max_batch_size) if max_batch_size else DEFAULT_BATCH_SIZE  # no probing: a fixed size
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1:
        raise LmforgeError(f"batch_size={value}: expected a positive integer or auto")
    return size


@register_model("lmforge")
class LmforgeLM(TemplateLM):
    """An lmforge model directory (+ adapter) as an lm-eval model: loglikelihood, loglikelihood_rolling and
    generate_until, batched."""

    def __init__(
        self,
        pretrained: str | Path | None = None,
        adapter: str | Path | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_batch_size: int | None = None,
        device: str | None = None,
        max_length: int | None = None,
        dtype: str | None = None,
        compile: bool | str = False,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise LmforgeError(
                f"model_args {', '.join(sorted(unknown))}: not understood by the lmforge model; expected "
                "pretrained=DIR, adapter=DIR, batch_size, device, max_length, dtype, compile"
            )
        if pretrained is None or str(pretrained) == "":
            raise LmforgeError(
                "model_args: pretrained=DIR is required (a Hugging Face model directory lmforge can load)"
            )
        if dtype in (None, "auto"):
            torch_dtype = None
        elif str(dtype).removeprefix("torch.") in DTYPES:
            torch_dtype = DTYPES[str(dtype).removeprefix("torch.")]
        else:
            raise LmforgeError(f"dtype={dtype}: expected auto, {', '.join(DTYPES)}")
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line passes cuda:0 by default; its `hf` model falls back to the CPU too.
            log.info("device %s: CUDA is not available, using the CPU", device)
            device = "cpu"
        from lmforge.infer.engine import Engine

        self.engine = Engine.from_dir(
            Path(pretrained),
            device=device,
            dtype=torch_dtype,
            adapter=Path(adapter) if adapter else None,
            compile=_flag("compile", compile),
        )
        self.model, self.tokenizer = self.engine.model, self.engine.tokenizer
        self._device = self.engine.device
        self._batch_size = _batch_size(batch_size, max_batch_size)
        window = model_window(self.model)
        if max_length is not None and not 1 <= int(max_length) <= window:
            raise LmforgeError(f"max_length={max_length}: expected 1 to {window} (the model's context)")
        self._max_length = int(max_length) if max_length is not None else window
        self._name = Path(pretrained).name + (f"+{Path(adapter).name}" if adapter else "")
        if self.tokenizer.eos_id is None and self.tokenizer.bos_id is None:
            raise LmforgeError(f"{pretrained}: the tokenizer has no BOS or EOS token to condition on")

    # ------------------------------------------------------------------------------------------ properties

    @property
    def eot_token_id(self) -> int:
        """EOS: what lm-eval's `hf` model uses as end of text."""
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context (and a rolling document's first token) is conditioned on: BOS, else EOS."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        """Tokens one forward holds: the model's context, or `max_length` when given."""
        return self._max_length

    @property
    def batch_size(self) -> int:
        """Rows per forward."""
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        """Names the tokenizer in lm-eval's request-cache keys (with the chat template)."""
        return f"lmforge-{self._name}-{self.tokenizer.hash[:12]}"

    # ------------------------------------------------------------------------------------------ tokenising

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Ids of `string` as lm-eval's `hf` model encodes them: the tokenizer's specials (BOS) added unless
        the text already starts with the BOS token."""
        return self._encode_all([string], add_special_tokens)[0]

    def _encode_all(self, strings: Sequence[str], add_special_tokens: bool | None = None) -> list[list[int]]:
        """`tok_encode` of each string, each distinct one encoded once, all in one batch per kind."""
        bos = self.tokenizer.bos_token
        unique = list(dict.fromkeys(strings))
        special = [
            add_special_tokens if add_special_tokens is not None else not (bos and s.startswith(bos))
            for s in unique
        ]
        ids: dict[str, list[int]] = {}
        for flag in (True, False):
            texts = [s for s, f in zip(unique, special, strict=True) if f is flag]
            if texts:
                ids.update(
                    zip(texts, self.tokenizer.encode_batch(texts, add_special_tokens=flag), strict=True)
                )
        return [ids[s] for s in strings]

    def _encode_requests(self, args: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """(context ids, continuation ids) of each (context, continuation) as TemplateLM.loglikelihood splits
        them: the context's trailing spaces go to the continuation, the whole is encoded and the context's ids
        cut off; an empty context becomes the prefix token."""
        wholes, contexts, bare = [], [], []
        for context, continuation in args:
            if context == "":
                bare.append(continuation)
                continue
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            contexts.append(context)
            wholes.append(context + continuation)
        encoded = iter(self._encode_all([*contexts, *wholes]))
        context_ids = [next(encoded) for _ in contexts]
        whole_ids = list(encoded)
        bare_ids = iter(self._encode_all(bare, add_special_tokens=False))
        pairs: list[tuple[list[int], list[int]]] = []
        split = iter(zip(context_ids, whole_ids, strict=True))
        for context, _ in args:
            if context == "":
                cont = next(bare_ids)
                prefix = self.prefix_token_id
                pairs.append(([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:]))
            else:
                ctx, whole = next(split)
                pairs.append((ctx, whole[len(ctx) :]))
        return pairs

    # ------------------------------------------------------------------------------------------ scoring

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is greedy) of each request."""
        args = [req.args for req in requests]
        pairs = self._encode_requests(args)
        return self._loglikelihood_tokens(
            [(a, c, k) for a, (c, k) in zip(args, pairs, strict=True)], disable_tqdm=disable_tqdm
        )

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **_: Any,
    ) -> list[tuple[float, bool]]:
        """Score (request strings, context ids, continuation ids) triples, cut to `max_length` like `hf`."""
        pairs = [self._fit(context, continuation) for _, context, continuation in requests]
        scored = score_continuations(self.model, pairs, batch_size=self.batch_size)
        answers = [(s.logprob, s.greedy) for s in scored]
        for (strings, _, _), answer in zip(requests, answers, strict=True):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return answers

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Context and continuation cut from the left to `max_length` + 1 tokens (the last is only predicted)."""
        if not continuation:
            raise LmforgeError("a loglikelihood request's continuation encodes to no tokens")
        if len(continuation) > self.max_length:
            raise LmforgeError(
                f"a continuation of {len(continuation)} tokens does not fit max_length {self.max_length}"
            )
        keep = self.max_length + 1 - len(continuation)  # >= 1 context token
        return context[-keep:], continuation

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """log p(document) of each request over disjoint windows of `max_length` tokens (lm-eval's rolling
        scheme), every document's windows batched together."""
        strings = [req.args[0] for req in requests]
        pairs, owners = [], []
        for i, ids in enumerate(self._encode_all(strings)):
            windows = rolling_windows(ids, context=self.max_length, prefix_token=self.prefix_token_id)
            pairs += windows
            owners += [i] * len(windows)
        totals = [0.0] * len(requests)
        for owner, scored in zip(
            owners, score_continuations(self.model, pairs, batch_size=self.batch_size), strict=True
        ):
            totals[owner] += scored.logprob
        for string, total in zip(strings, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return totals

    # ------------------------------------------------------------------------------------------ generation

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Each request's generated text, cut at its first stop string (`until`, and EOS's text), through the
        inference engine: batches of requests with the same gen_kwargs, longest prompt first."""
        from lmforge.infer.sampling import GenerationConfig

        results: list[str | None] = [None] * len(requests)
        prompts = self._encode_all([req.args[0] for req in requests])
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        eos = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        for members in groups.values():
            cfg_args, until, max_gen = self._generation_settings(requests[members[0]].args[1])
            stops = [*until, *([eos] if eos and eos not in until else [])]
            cfg = GenerationConfig(**cfg_args, max_new_tokens=max_gen, stop=[s for s in stops if s])
            room = self.max_length - max_gen
            if room < 1:
                raise LmforgeError(
                    f"max_gen_toks {max_gen}: leaves no room for a prompt in max_length {self.max_length}"
                )
            members.sort(key=lambda i: -len(prompts[i]))
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                completions = self.engine.generate([prompts[i][-room:] for i in batch], cfg)
                for i, completion in zip(batch, completions, strict=True):
                    results[i] = completion.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, completion.text)
        return [r if r is not None else "" for r in results]

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str], int]:
        """(GenerationConfig fields, stop strings, max new tokens) of a request's gen_kwargs, as lm-eval's
        `hf` model reads them: greedy unless do_sample (then temperature defaults to 1)."""
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        if not all(isinstance(s, str) for s in until):
            raise LmforgeError(f"gen_kwargs until={until!r}: expected a string or a list of strings")
        max_gen = 256
        for alias in ("max_completion_tokens", "max_tokens", "max_new_tokens", "max_gen_toks"):  # last wins
            if (value := kwargs.pop(alias, None)) is not None:
                max_gen = int(value)
        do_sample = kwargs.pop("do_sample", None)
        kwargs.pop("max_length", None)  # prompt + generation: max_gen_toks already bounds the generation
        unknown = sorted(set(kwargs) - set(GEN_KWARGS))
        if unknown:
            raise LmforgeError(
                f"gen_kwargs {', '.join(unknown)}: not supported by the lmforge model; expected until, "
                f"max_gen_toks, do_sample, {', '.join(GEN_KWARGS)}"
            )
        asked = {GEN_KWARGS[k]: v for k, v in kwargs.items() if v is not None}
        temperature = float(asked.get("temperature", 0.0))
        if do_sample is None:
            do_sample = temperature > 0
        # The model's generation_config.json settings under the request's, as `hf`'s model.generate reads them.
        cfg = {**self.engine.file_settings, **asked}
        if not do_sample:  # greedy: the filters that only act when sampling are dropped
            cfg = {k: v for k, v in cfg.items() if k not in ("top_k", "top_p", "min_p")}
            cfg["temperature"] = 0.0
        elif float(cfg.get("temperature", 0.0)) == 0.0:
            cfg["temperature"] = 1.0  # transformers' default when sampling
        return cfg, until, max_gen

    # ------------------------------------------------------------------------------------------ chat

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The tokenizer's chat template (lmforge keeps one per tokenizer), or None when not asked for."""
        if chat_template is False or chat_template is None:
            return None
        if self.tokenizer.chat_template is None:
            raise LmforgeError(f"{self.tokenizer.path}: the tokenizer has no chat template to apply")
        return self.tokenizer.chat_template

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation rendered by the tokenizer's chat template (lmforge's sandboxed renderer); without
        `add_generation_prompt`, cut after the last message's content so the model continues it (transformers'
        `continue_final_message`)."""
        from lmforge.chat import render_template

        template = self.chat_template(True)
        text, _ = render_template(
            template,
            chat_history,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.tokenizer.special_tokens,
            source=f"the chat template of {self.tokenizer.path}",
        )
        if add_generation_prompt or not chat_history:
            return text
        final = chat_history[-1]["content"]
        at = text.rfind(final.strip())
        if at < 0:
            raise LmforgeError("the chat template does not render the last message's content verbatim")
        keep = (
            len(final.lstrip())
            if text[at : at + len(final.lstrip())] == final.lstrip()
            else len(final.strip())
        )
        return text[: at + keep]

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records about the model in its results."""
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(next(self.model.parameters()).dtype),
            "model_name": self._name,
        }
