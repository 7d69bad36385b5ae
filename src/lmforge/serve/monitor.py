"""`lmforge monitor`: what a server's request log says about its traffic, its inputs' drift from the training
data, and how users rate each variant.

The log is JSON lines the server appends (rotated as LOG, LOG.1, LOG.2 ..., LOG.1 the newer of the old ones):
`request` entries (one per answered request: variant, token counts, latencies, policy actions and a 64-bucket
histogram of the prompt's token ids) and `feedback` entries (a rating of one response, by its id).

Drift compares live prompts with a prepared dataset's documents. For chat data a prepared document is the whole
rendered conversation (prompt and answer) while a logged prompt holds no answer: the reference lengths are used
as they are, so a chat model's live prompts read somewhat shorter than its training documents. Token buckets are
only comparable when the server's tokenizer is the dataset's (the buckets are `id * 64 // vocab_size`).
"""

from __future__ import annotations

import io
import itertools
import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.serve.traffic import BUCKETS, bucket_counts, log_files, read_log

EPS = 1e-4
"""Floor of a bin's fraction in PSI and KL: an empty bin on one side would otherwise make them infinite."""
PERCENTILES = (50, 90, 99)


def _requests(entries: list[dict]) -> list[dict]:
    return [e for e in entries if e["type"] == "request"]


def _percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99 by numpy's default (linear) interpolation; None with no values."""
    if not values:
        return {f"p{q}": None for q in PERCENTILES}
    found = np.percentile(np.asarray(values, dtype=np.float64), PERCENTILES)
    return {f"p{q}": float(v) for q, v in zip(PERCENTILES, found, strict=True)}


def _summary(requests: list[dict]) -> dict[str, Any]:
    """Counts, token totals, latency percentiles, finish reasons and policy actions of some requests."""
    return {
        "requests": len(requests),
        "prompt_tokens": sum(int(r["prompt_tokens"]) for r in requests),
        "completion_tokens": sum(int(r["completion_tokens"]) for r in requests),
        "ttft_s": _percentiles([r["ttft_s"] for r in requests if r["ttft_s"] is not None]),
        "latency_s": _percentiles([r["latency_s"] for r in requests if r["latency_s"] is not None]),
        "finish_reasons": dict(Counter(str(r.get("finish_reason")) for r in requests)),
        "policy_actions": sum(len(r.get("policy") or []) for r in requests),
    }


def traffic(entries: list[dict]) -> dict[str, Any]:
    """Traffic summary of a log's requests: overall, and by variant (the model or adapter that answered)."""
    requests = _requests(entries)
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for r in requests:
        by_variant[str(r["variant"])].append(r)
    times = [r["time"] for r in requests if r.get("time")]
    return {
        **_summary(requests),
        "first": min(times, default=None),
        "last": max(times, default=None),
        "by_variant": {name: _summary(rs) for name, rs in sorted(by_variant.items())},
    }


def reference_profile(dataset_dir: str | Path) -> dict[str, Any]:
    """A prepared dataset's train documents as drift needs them: length deciles and the token-bucket histogram.

    Each document counts whole (a chat conversation with its answer; a preference pair's chosen side)."""
    from lmforge.data.dataset import PreparedDataset

    ds = PreparedDataset(dataset_dir)
    vocab_size = int(ds.manifest["tokenizer"]["vocab_size"])
    column = ds.columns()[0]
    lengths = ds.lengths("train", column)
    if len(lengths) == 0:
        raise LmforgeError(f"{dataset_dir}: its train split has no documents to compare prompts with")
    hist = np.zeros(BUCKETS, dtype=np.int64)
    for doc in ds.documents("train", column):
        hist += bucket_counts(doc.ids, vocab_size)
    # Interior decile edges; discrete lengths can repeat an edge, and a repeated edge would be an empty bin.
    edges = np.unique(np.quantile(lengths, np.linspace(0.1, 0.9, 9)))
    return {
        "dataset": str(Path(dataset_dir)),
        "dataset_id": ds.id,
        "vocab_size": vocab_size,
        "documents": len(lengths),
        "length_edges": [float(e) for e in edges],
        "length_counts": _bin_lengths(lengths, edges).tolist(),
        "token_hist": hist.tolist(),
    }


def _bin_lengths(lengths: Any, edges: Any) -> np.ndarray:
    """(len(edges) + 1,) counts: bin i holds edges[i-1] < length <= edges[i]."""
    index = np.searchsorted(
        np.asarray(edges, dtype=np.float64), np.asarray(lengths, dtype=np.float64), "left"
    )
    return np.bincount(index, minlength=len(edges) + 1)


def _fractions(counts: Any) -> np.ndarray:
    """Counts as fractions floored at EPS and renormalised (so logs stay finite)."""
    c = np.asarray(counts, dtype=np.float64)
    p = np.clip(c / max(c.sum(), 1.0), EPS, None)
    return p / p.sum()


def psi(reference: Any, live: Any) -> float:
    """Population stability index of two histograms: Σ (live - ref) ln(live / ref) over bins."""
    p, q = _fractions(reference), _fractions(live)
    return float(np.sum((q - p) * np.log(q / p)))


def kl(reference: Any, live: Any) -> float:
    """KL(live ‖ reference) of two histograms, in nats."""
    p, q = _fractions(reference), _fractions(live)
    return float(np.sum(q * np.log(q / p)))


def drift(
    entries: list[dict], profile: dict[str, Any], threshold_psi: float = 0.2, out: str | Path | None = None
) -> dict[str, Any]:
    """PSI and KL of live prompt lengths (in the reference's decile bins) and token buckets against a reference
    profile; `flagged` when either PSI exceeds the threshold. With `out`, also write out/drift.png."""
    requests = _requests(entries)
    edges, ref_len = profile["length_edges"], profile["length_counts"]
    live_len = _bin_lengths([r["prompt_tokens"] for r in requests], edges)
    hists = [r["prompt_token_hist"] for r in requests if r.get("prompt_token_hist") is not None]
    live_tok = np.sum(np.asarray(hists, dtype=np.int64), axis=0) if hists else np.zeros(BUCKETS, np.int64)
    ref_tok = np.asarray(profile["token_hist"], dtype=np.int64)

    length = None
    if requests:
        length = {"psi": psi(ref_len, live_len), "kl": kl(ref_len, live_len), "requests": len(requests),
                  "edges": edges, "reference": _fractions(ref_len).round(4).tolist(),
                  "live": _fractions(live_len).round(4).tolist()}  # fmt: skip
    tokens = None
    if live_tok.sum() > 0:
        share = (_fractions(live_tok) - _fractions(ref_tok)) * np.log(
            _fractions(live_tok) / _fractions(ref_tok)
        )
        tokens = {"psi": psi(ref_tok, live_tok), "kl": kl(ref_tok, live_tok), "requests": len(hists),
                  "tokens": int(live_tok.sum()),
                  "most_shifted_buckets": [int(b) for b in np.argsort(-share)[:3]]}  # fmt: skip
    reasons = [f"{name} PSI {part['psi']:.3f} > {threshold_psi}"
               for name, part in (("prompt length", length), ("token", tokens))
               if part is not None and part["psi"] > threshold_psi]  # fmt: skip
    result: dict[str, Any] = {
        "reference": profile["dataset"],
        "reference_id": profile["dataset_id"],
        "threshold_psi": threshold_psi,
        "flagged": bool(reasons),
        "reasons": reasons,
        "length": length,
        "tokens": tokens,
    }
    if out is not None and requests:
        result["plot"] = str(_plot(Path(out) / "drift.png", ref_len, live_len, edges, ref_tok, live_tok))
    return result


def _plot(path: Path, ref_len: Any, live_len: Any, edges: list, ref_tok: Any, live_tok: Any) -> Path:
    """Reference vs live bars: prompt length by decile bin, and the token-bucket distribution."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a server or CI runs this
    import matplotlib.pyplot as plt

    from lmforge.fileio import replace_atomically

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6))
    labels = [f"≤{edges[0]:g}"] + [f"{a:g}–{b:g}" for a, b in itertools.pairwise(edges)] + [f">{edges[-1]:g}"]
    x = np.arange(len(labels))
    top.bar(x - 0.2, _fractions(ref_len), 0.4, label="reference")
    top.bar(x + 0.2, _fractions(live_len), 0.4, label="live")
    top.set_xticks(x, labels, fontsize=7)
    top.set_title("prompt length (tokens), by the reference's deciles")
    top.legend()
    b = np.arange(BUCKETS)
    bottom.step(b, _fractions(ref_tok), where="mid", label="reference")
    bottom.step(b, _fractions(live_tok), where="mid", label="live")
    bottom.set_title(f"token ids, {BUCKETS} buckets")
    bottom.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return replace_atomically(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))


def two_proportion_z(up_a: int, n_a: int, up_b: int, n_b: int) -> tuple[float, float]:
    """(z, two-sided p) of the pooled two-proportion z-test of up_a/n_a against up_b/n_b."""
    pooled = (up_a + up_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:  # both all up or all down: no evidence of a difference
        return 0.0, 1.0
    z = (up_a / n_a - up_b / n_b) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


def ratings(entries: list[dict], alpha: float = 0.05) -> dict[str, Any]:
    """Up/down ratings per variant with 95% Wilson intervals; with two or more, the best and whether it beats the
    runner-up significantly (two-proportion z-test, p < alpha). A response rated twice counts its last rating."""
    from lmforge.eval.stats import wilson

    variant_of = {r["id"]: str(r["variant"]) for r in _requests(entries)}
    last: dict[str, str] = {}
    unmatched = 0
    for e in entries:
        if e["type"] != "feedback":
            continue
        if e["response_id"] in variant_of:
            last[e["response_id"]] = e["rating"]
        else:
            unmatched += 1  # its request is in a rotated file already deleted, or the id is wrong
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for rid, rating in last.items():
        counts[variant_of[rid]][rating] += 1
    variants = {}
    for name, c in sorted(counts.items()):
        w = wilson(c["up"], c["up"] + c["down"])
        variants[name] = {
            "up": c["up"],
            "down": c["down"],
            "n": w["n"],
            "rate": w["accuracy"],
            "ci95": w["ci95"],
        }
    result: dict[str, Any] = {"rated": len(last), "unmatched": unmatched, "variants": variants}
    if len(variants) >= 2:
        best, runner_up = sorted(
            variants, key=lambda v: (variants[v]["rate"], variants[v]["n"]), reverse=True
        )[:2]
        a, b = variants[best], variants[runner_up]
        z, p = two_proportion_z(a["up"], a["n"], b["up"], b["n"])
        result["comparison"] = {"best": best, "runner_up": runner_up, "difference": a["rate"] - b["rate"],
                                "z": z, "p": p, "significant": p < alpha}  # fmt: skip
    return result


def monitor(
    log: str | Path,
    reference: str | Path | None = None,
    out: str | Path | None = None,
    threshold_psi: float = 0.2,
) -> dict[str, Any]:
    """Traffic, ratings and (with a reference dataset) drift of a request log; `out` gets monitor.json and
    drift.png."""
    from lmforge.fileio import atomic_write

    entries = read_log(log)
    if out is not None:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise LmforgeError(f"--out {out} is a file; expected a directory for monitor.json and drift.png")
        out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "log": str(log),
        "files": [str(f) for f in log_files(log)],
        "entries": len(entries),
        "traffic": traffic(entries),
        "ratings": ratings(entries),
        "drift": None
        if reference is None
        else drift(entries, reference_profile(reference), threshold_psi, out),
    }
    if out is not None:
        result["output"] = str(out / "monitor.json")
        atomic_write(out / "monitor.json", json.dumps(result, indent=2, default=str) + "\n")
    return result
