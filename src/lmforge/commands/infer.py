"""`lmforge generate`, `lmforge chat` and `lmforge serve`: the inference engine from the command line."""

import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from lmforge.commands.common import (
    AdapterFlag,
    CompileFlag,
    JsonFlag,
    MinScoreFlag,
    RagFlag,
    RagKFlag,
    RagModeOption,
    emit,
    open_retriever,
    reflow,
)
from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    """Add `generate`, `chat` and `serve` to the root app."""
    for command in (generate, chat, serve):
        app.command()(command)


@reflow
def generate(
    model: Annotated[Path, typer.Argument(help="A Hugging Face decoder directory (with its tokenizer).")],
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", "-p", help="A prompt (repeatable).", show_default=False)
    ] = None,
    prompts_file: Annotated[
        Path | None,
        typer.Option(
            help="A UTF-8 file of prompts, one per line; .jsonl: records with 'prompt' or 'messages'.",
            show_default=False,
        ),
    ] = None,
    system: Annotated[
        str | None, typer.Option(help="A system prompt (implies --chat).", show_default=False)
    ] = None,
    chat: Annotated[bool, typer.Option(help="Render prompts with the model's chat template.")] = False,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Tokens to generate at most.", show_default=False)
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Sample at this temperature; 0 = greedy.", show_default=False)
    ] = None,
    top_k: Annotated[
        int | None, typer.Option(help="Sample among the k most likely tokens (0 = off).", show_default=False)
    ] = None,
    top_p: Annotated[
        float | None, typer.Option(help="Nucleus sampling mass in (0, 1] (1 = off).", show_default=False)
    ] = None,
    min_p: Annotated[
        float | None,
        typer.Option(
            help="Sample among tokens above min_p x the top probability (0 = off).", show_default=False
        ),
    ] = None,
    repetition_penalty: Annotated[
        float | None, typer.Option(help="HF's repetition penalty (1 = off).", show_default=False)
    ] = None,
    frequency_penalty: Annotated[
        float | None, typer.Option(help="OpenAI's frequency penalty in [-2, 2].", show_default=False)
    ] = None,
    presence_penalty: Annotated[
        float | None, typer.Option(help="OpenAI's presence penalty in [-2, 2].", show_default=False)
    ] = None,
    no_repeat_ngram_size: Annotated[
        int | None, typer.Option(help="Never repeat an n-gram of this size.", show_default=False)
    ] = None,
    stop: Annotated[
        list[str] | None, typer.Option(help="Stop string (repeatable); not returned.", show_default=False)
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the sampling (same seed, same samples).", show_default=False)
    ] = None,
    n: Annotated[int | None, typer.Option("-n", help="Samples per prompt.", show_default=False)] = None,
    logprobs: Annotated[
        int | None,
        typer.Option(
            help="Most likely alternatives to report per token, in [0, 20] (--json).", show_default=False
        ),
    ] = None,
    speculate: Annotated[
        int | None,
        typer.Option(
            help="Greedy, one prompt: draft up to this many tokens from earlier text and check them in one "
            "forward (same output; faster when it repeats its context); decodes greedily unless a sampling flag "
            "is given. 0 = off.",
            show_default=False,
        ),
    ] = None,
    truncate: Annotated[
        bool, typer.Option(help="Keep the end of a prompt too long for the context.")
    ] = False,
    device: Annotated[
        str | None, typer.Option(help="cpu or cuda (default: cuda when available).", show_default=False)
    ] = None,
    adapter: AdapterFlag = None,
    compile: CompileFlag = False,
    rag: RagFlag = None,
    k: RagKFlag = 5,
    rag_mode: RagModeOption = None,
    min_score: MinScoreFlag = None,
    as_json: JsonFlag = False,
) -> None:
    """Generate text from a model: plain completion, or chat-templated with --chat / --system; with --rag INDEX
    each prompt gets its retrieved passages through the chat template and the answer its citations.

    Greedy by default, as transformers: the model's generation_config.json samples only if it says do_sample
    true (with its temperature, top_k, top_p; transformers' 1.0, 50, 1.0 where it leaves them out). Flags
    override it: --temperature above 0 samples, 0 is greedy; --top-k, --top-p or --min-p without --temperature
    sample at the file's temperature, else 1.0; --speculate alone decodes greedily. A single prompt streams to
    the terminal; --json prints one document with each prompt's samples: text, token ids, log-probs, each
    token's text and bytes with its top alternatives (OpenAI's logprobs.content), finish reason, time to first
    token and tokens/s.
    """
    from lmforge.infer.engine import Engine, TokenText
    from lmforge.infer.prompts import fit_prompts, prompt_ids, read_prompts
    from lmforge.infer.sampling import generation_config

    given = {k: v for k, v in locals().items() if k in GENERATION_FLAGS and v is not None}
    texts: list = list(prompt or []) + (read_prompts(prompts_file) if prompts_file else [])
    if not texts:
        raise LmforgeError("give --prompt TEXT or --prompts-file FILE")
    cfg = generation_config(given, model_dir=model)  # flags over the model's generation_config.json
    engine = Engine.from_dir(model, device=device, adapter=adapter, compile=compile)
    rags: list = [None] * len(texts)
    if rag is not None:
        from lmforge.infer.prompts import as_messages
        from lmforge.rag.prompt import rag_prompt_ids

        retriever = open_retriever(rag, k, rag_mode, min_score)
        room = engine.context - cfg.max_new_tokens
        if room < 1:
            raise LmforgeError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for the passages in the "
                               f"model's context of {engine.context} tokens: lower it")  # fmt: skip
        built = [rag_prompt_ids(engine.tokenizer, retriever, as_messages(t, system), room) for t in texts]
        ids, rags = [b[0] for b in built], [b[1] for b in built]
    else:
        ids = [prompt_ids(engine, t, chat=chat, system=system) for t in texts]
    if "max_new_tokens" not in cfg.model_fields_set:  # lmforge's default, asked for by no one: what fits
        room = engine.context - max(map(len, ids))
        if 1 <= room < cfg.max_new_tokens:
            cfg = cfg.model_copy(update={"max_new_tokens": room})
    ids = fit_prompts(ids, engine.context, cfg.max_new_tokens, truncate=truncate)
    if not as_json and len(ids) * cfg.n == 1:  # one sample: stream it
        text = ""
        for delta in engine.stream(ids, cfg):
            text += delta.text
            print(delta.text, end="", flush=True)
        print()
        if rags[0] is not None:
            _print_citations(rags[0], text)
        return
    completions = engine.generate(ids, cfg)
    if as_json:
        results = [
            {"prompt": t, "prompt_tokens": len(i), "samples": []} for t, i in zip(texts, ids, strict=True)
        ]
        token_text = TokenText(engine.tokenizer)
        for c in completions:
            results[c.prompt_index]["samples"].append({
                "text": c.text, "token_ids": c.token_ids, "logprobs": c.logprobs,
                "top_logprobs": c.top_logprobs if cfg.logprobs else None,
                "tokens": token_text.logprobs(c),  # OpenAI's logprobs.content: token text, bytes, alternatives
                "finish_reason": c.finish_reason,
                "time_to_first_token": c.time_to_first_token, "tokens_per_s": c.tokens_per_s,
            })  # fmt: skip
            if rags[c.prompt_index] is not None:
                rag_prompt = rags[c.prompt_index]
                results[c.prompt_index]["rag"] = {"note": rag_prompt.note, "dropped": rag_prompt.dropped}
                results[c.prompt_index]["samples"][-1]["citations"] = rag_prompt.citations(c.text)
        emit({"model": str(model), "config": cfg.model_dump(), "results": results}, as_json=True)
        return
    console = Console()
    for c in completions:
        console.rule(f"prompt {c.prompt_index}" + (f", sample {c.sample_index}" if cfg.n > 1 else ""))
        console.print(escape(c.text), highlight=False)
        if rags[c.prompt_index] is not None:
            _print_citations(rags[c.prompt_index], c.text)


def _print_citations(rag: Any, answer: str) -> None:
    """The passages an answer was given, marked where it cites them, and RAG's note."""
    console = Console()
    for c in rag.citations(answer):
        mark = "cited" if c["cited"] else "given"
        console.print(f"  [{c['index']}] {escape(c['doc_id'])} chars {c['span'][0]}-{c['span'][1]} "
                      f"({mark}, score {c['score']:.3g})", highlight=False, style="dim")  # fmt: skip
    if rag.note:
        console.print(f"  ({rag.note})", style="dim", highlight=False)


@reflow
def chat(
    model: Annotated[Path, typer.Argument(help="A Hugging Face decoder directory with a chat template.")],
    system: Annotated[str | None, typer.Option(help="The system prompt.", show_default=False)] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Tokens per answer at most.", show_default=False)
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Sample at this temperature; 0 = greedy.", show_default=False)
    ] = None,
    top_p: Annotated[
        float | None, typer.Option(help="Nucleus sampling mass in (0, 1] (1 = off).", show_default=False)
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the sampling.", show_default=False)] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu or cuda (default: cuda when available).", show_default=False)
    ] = None,
    adapter: AdapterFlag = None,
    compile: CompileFlag = False,
    rag: RagFlag = None,
    k: RagKFlag = 5,
    rag_mode: RagModeOption = None,
    min_score: MinScoreFlag = None,
) -> None:
    """Chat with a model in the terminal, streamed as it decodes.

    The history goes through the model's chat template (the one training used). Type /reset to clear it,
    /system TEXT to change the system prompt, /set temperature 0.7 (any sampling setting), /exit to leave.
    Greedy by default unless the model's generation_config.json says do_sample true, as `generate`. With --rag
    INDEX each message gets its retrieved passages and the answer is followed by its sources.
    """
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import generation_config
    from lmforge.infer.session import ChatSession, run_chat

    given = {k: v for k, v in locals().items() if k in GENERATION_FLAGS and v is not None}
    cfg = generation_config(given, model_dir=model)
    engine = Engine.from_dir(model, device=device, adapter=adapter, compile=compile)
    if engine.tokenizer.chat_template is None:
        raise LmforgeError(
            f"{model}: its tokenizer has no chat template; use `lmforge generate` for plain text"
        )
    if cfg.max_new_tokens >= engine.context:
        raise LmforgeError(
            f"max_new_tokens {cfg.max_new_tokens}: the model's context is {engine.context} tokens, so at most "
            f"{engine.context - 1} new tokens fit, fewer the longer the conversation; lower --max-new-tokens"
        )
    retriever = open_retriever(rag, k, rag_mode, min_score) if rag is not None else None
    run_chat(ChatSession(engine, cfg, system, retriever))


@reflow
def serve(
    model: Annotated[Path, typer.Argument(help="A Hugging Face decoder directory (with its tokenizer).")],
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=DIR: a LoRA adapter served as model NAME beside the base, sharing its batches (repeat "
            "for more). A bare DIR (any adapter kind) is applied to the base itself.",
            show_default=False,
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="LMFORGE_API_KEY",
            help="Key every /v1 and /admin request must send as 'Authorization: Bearer KEY' (or LMFORGE_API_KEY).",
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="The base model's name in requests (default: the directory's name).")
    ] = None,
    rag: Annotated[
        list[str] | None,
        typer.Option(
            help='[NAME=]INDEX: a RAG index a chat request uses with "rag": true (the first) or "rag": '
            "NAME; the response carries its citations (repeatable).",
            show_default=False,
        ),
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option(
            help="A guardrails policy (YAML): PII redaction both ways, blocked topics, a required system prompt, "
            "length caps, per served name; the rules that acted come back in each response's 'policy'.",
            show_default=False,
        ),
    ] = None,
    route: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=VARIANT:SHARE,VARIANT:SHARE: a request for NAME goes to one variant (the base's name or an "
            "adapter's), the same one for the same 'user' (repeatable).",
            show_default=False,
        ),
    ] = None,
    log_file: Annotated[
        Path | None,
        typer.Option(
            "--log",
            help="A request log (JSON lines, rotated at 10 MB): tokens, TTFT, latency, variant, policy actions, "
            "and POST /v1/feedback ratings; read by lmforge monitor.",
            show_default=False,
        ),
    ] = None,
    log_text: Annotated[
        bool, typer.Option(help="Also log each prompt and completion (for lmforge feedback export).")
    ] = False,
    max_batch: Annotated[int, typer.Option(min=1, help="Samples decoded together at most.")] = 32,
    max_queue: Annotated[
        int, typer.Option(min=0, help="Requests waiting at most; past it a request gets 429 and Retry-After.")
    ] = 256,
    timeout: Annotated[
        float, typer.Option(min=0, help="Seconds a request may take before it ends with a 504 (0: no limit).")
    ] = 600.0,
    device: Annotated[
        str | None, typer.Option(help="cpu or cuda (default: cuda when available).", show_default=False)
    ] = None,
    compile: CompileFlag = True,
) -> None:
    """Serve a model over OpenAI's API, with continuous batching and LoRA adapters chosen per request.

    A decoder serves POST /v1/chat/completions and /v1/completions (streamed as server-sent events or not), an
    encoder (e.g. all-MiniLM-L6-v2) POST /v1/embeddings; both GET /v1/models, /health, /metrics (Prometheus)
    and a chat page at /. A request's "model" names the base or an adapter; with a key, POST /admin/adapters
    {"name", "path"} loads one and DELETE /admin/adapters/NAME unloads it.

    Any OpenAI client works: base_url http://HOST:PORT/v1. Without --api-key the server listens on 127.0.0.1
    only.
    """
    import uvicorn

    from lmforge.infer.embed import Embedder
    from lmforge.infer.engine import Engine
    from lmforge.model.configs import EncoderConfig
    from lmforge.model.hf import read_config
    from lmforge.serve.app import create_app
    from lmforge.serve.policy import load_policy
    from lmforge.serve.traffic import RequestLog, Route

    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        raise LmforgeError(
            f"--host {host} without --api-key (or LMFORGE_API_KEY) would serve anyone: give a key"
        )
    named: dict[str, Path] = {}
    applied: Path | None = None
    for value in adapter or []:
        key, sep, path = value.partition("=")
        if not sep:
            if applied is not None:
                raise LmforgeError(
                    f"--adapter {value}: one bare DIR at most is applied to the base; name others NAME=DIR"
                )
            applied = Path(value)
        elif not key or not path or key in named:
            raise LmforgeError(f"--adapter {value}: expected NAME=DIR with a name used once")
        else:
            named[key] = Path(path)
    if isinstance(read_config(model)[0], EncoderConfig):  # an encoder serves embeddings
        if adapter:
            raise LmforgeError("--adapter: an encoder is served for embeddings, without adapters")
        served_model: Engine | Embedder = Embedder(model, device=device or "cpu")
    else:
        served_model = Engine.from_dir(model, device=device, adapter=applied, compile=compile)
        if compile:
            log.info("compiling the decode step for batch 1 and for larger batches (--no-compile skips it)")
            served_model.warm_up()
    served = name or Path(model).resolve().name
    indexes: dict[str, Path] = {}
    for value in rag or []:
        key, sep, path = value.rpartition("=")
        key = key if sep else "default"
        if not path or key in indexes:
            raise LmforgeError(f"--rag {value}: expected [NAME=]INDEX with a name used once")
        indexes[key] = Path(path)
    served_app = create_app(served_model, served, adapters=named, base_dir=model, api_key=api_key,
                            max_batch=max_batch, max_queue=max_queue, timeout=timeout or None, rag=indexes,
                            policy=load_policy(policy) if policy is not None else None,
                            routes=[Route.parse(r) for r in route or []],
                            request_log=RequestLog(log_file, text=log_text) if log_file is not None else None)  # fmt: skip
    if api_key is None:
        log.info("no API key: listening on %s only", host)
    log.info("serving %s as %r%s on http://%s:%d/v1", model, served,
             "".join(f", {a!r}" for a in named), host, port)  # fmt: skip
    uvicorn.run(served_app, host=host, port=port, log_level="warning")


GENERATION_FLAGS = (
    "max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
    "presence_penalty", "no_repeat_ngram_size", "stop", "seed", "n", "logprobs", "speculate",
)  # fmt: skip
