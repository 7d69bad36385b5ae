"""`lmforge report`: two real runs (a tiny pretrain and a LoRA fine-tune of it, which measures forgetting), an
eval result found in the adapter's evals/, a hand-made eval JSON and a comparison JSON make one page; its HTML
holds every section with its plots (PNG data URIs) and intervals and names no external URL, and headless
Chromium (Debian's `chromium` and `chromium-driver`) shows every section with no console error. Bad input and an
existing --out are refused with exit status 2."""

from __future__ import annotations

import base64
import json
import struct
from html.parser import HTMLParser
from pathlib import Path

import pytest
from helpers import TINY_MODEL, error, invoke

from lmforge.report import SECTIONS

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1000,800")  # fmt: skip
PNG = b"\x89PNG\r\n\x1a\n"

# What `lmforge eval ... --json` writes (the extra key and the bare-number metric below must not matter).
EVAL = {
    "kind": "eval", "task": "qa", "model": "base-model", "adapter": None, "data": "eval_qa.jsonl", "n": 150,
    "metrics": {"exact": {"value": 0.5, "ci95": [0.4213, 0.5787], "n": 150},
                "contains": {"value": 0.61, "ci95": [0.5311, 0.6842], "n": 150}},
    "contamination": {"flagged": 1, "items": [{"question": "Where was Ada born?", "overlap": 0.93}]},
    "seconds": 1.2, "lmforge_version": "0.1.0", "date": "2025-01-02T03:04:05", "unknown_key": [1, 2],
}  # fmt: skip
SPARSE_EVAL = {"kind": "eval", "task": "gsm8k", "model": "m", "metrics": {"final_number": 0.0625}}
COMPARE = {
    "kind": "compare",
    "base": {"model": "base-model", "adapter": None},
    "tuned": {"model": "base-model", "adapter": "sft-adapter"},
    "probes": [
        {"name": "fact_qa", "family": "knowledge", "metric": "accuracy", "n": 150,
         "base": {"value": 0.3, "ci95": [0.23, 0.38]}, "tuned": {"value": 0.31, "ci95": [0.24, 0.39]},
         "delta": {"value": 0.01, "ci95": [-0.05, 0.07]}},
        {"name": "ends_turn", "family": "behaviour", "metric": "rate", "n": 150,
         "base": {"value": 0.1, "ci95": [0.06, 0.16]}, "tuned": {"value": 0.72, "ci95": [0.64, 0.79]},
         "delta": {"value": 0.62, "ci95": [0.53, 0.7]}},
        {"name": "format", "family": "behaviour", "metric": "rate", "n": 80,  # no delta: tuned − base, no CI
         "base": {"value": 0.2}, "tuned": {"value": 0.45}},
    ],
    "reading": "knowledge unchanged within CI, behaviour +62 points",
}  # fmt: skip


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def runs(story_dataset, tmp_path_factory) -> dict[str, Path]:
    """A 12-step pretrain of a tiny Llama on the story dataset and a 6-step LoRA domain fine-tune of its model."""
    root = tmp_path_factory.mktemp("report-runs")
    common = (f"data.dataset={story_dataset}", "train.seq_len=32", "train.micro_batch_size=8")
    pre = invoke("pretrain", "--out", root / "pre", "--json", *sets(TINY_MODEL, *common, "train.max_steps=12",
                 "train.eval_every=4", "optim.lr=1e-2", "optim.warmup_steps=2", "sample_prompt=null"))  # fmt: skip
    assert pre.exit_code == 0, pre.output
    ft = invoke("finetune", "--init-from", root / "pre" / "model", "--out", root / "ft", "--json",
                *sets(*common, "kind=domain", "method=lora", "train.max_steps=6", "train.eval_every=3",
                      "optim.lr=3e-3", "optim.warmup_steps=1"))  # fmt: skip
    assert ft.exit_code == 0, ft.output
    (root / "ft" / "adapter" / "evals").mkdir()
    (root / "ft" / "adapter" / "evals" / "qa.json").write_text(json.dumps(EVAL))
    (root / "compare.json").write_text(json.dumps(COMPARE))
    (root / "sparse.json").write_text(json.dumps(SPARSE_EVAL))
    return {"root": root, "pre": root / "pre", "ft": root / "ft"}


class Page(HTMLParser):
    """What the tests read of the page: each section's heading, text and image sources; every src and href;
    the tags used."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: dict[str, dict] = {}
        self.links: list[str] = []
        self.tags: set[str] = set()
        self._section: str | None = None
        self._in_h2 = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.add(tag)
        self.links += [v for k, v in attrs if k in ("src", "href") and v is not None]
        if tag == "section":
            self._section = a["id"]
            self.sections[a["id"]] = {"h2": "", "text": "", "images": []}
        elif tag == "h2":
            self._in_h2 = True
        elif tag == "img" and self._section:
            self.sections[self._section]["images"].append(a["src"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._section = None
        elif tag == "h2":
            self._in_h2 = False

    def handle_data(self, data: str) -> None:
        if self._section:
            self.sections[self._section]["h2" if self._in_h2 else "text"] += data


@pytest.fixture(scope="module")
def report(runs) -> tuple[Path, dict, str]:
    """The page of both runs, the comparison and the sparse eval (the run's evals/qa.json is found by itself)."""
    out = runs["root"] / "report.html"
    result = invoke("report", runs["pre"], runs["ft"], runs["root"] / "compare.json", runs["root"] / "sparse.json",
                    "--out", out, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout), out.read_text(encoding="utf-8")


def png_size(uri: str) -> tuple[int, int]:
    """The width and height of a data: URI's PNG (from its IHDR chunk)."""
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix), uri[:60]
    data = base64.b64decode(uri[len(prefix) :], validate=True)
    assert data[:8] == PNG and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_page_holds_every_section(runs, report):
    out, summary, text = report
    assert summary["out"] == str(out) and summary["inputs"] == 4
    assert summary["sections"] == {"overview": 5, "training": 2, "evaluations": 2, "forgetting": 1,
                                   "knowledge-vs-behaviour": 1}  # fmt: skip
    page = Page(text)
    assert list(page.sections) == list(SECTIONS)
    for sid, title in SECTIONS.items():
        assert page.sections[sid]["h2"] == title
    images = {sid: s["images"] for sid, s in page.sections.items()}
    assert [len(images[s]) for s in SECTIONS] == [0, 2, 0, 1, 1]
    for uri in (u for uris in images.values() for u in uris):
        width, height = png_size(uri)
        assert width >= 400 and height >= 100

    # One self-contained file: nothing to fetch, no script.
    assert all(link.startswith(("#", "data:")) for link in page.links), page.links
    assert "http://" not in text and "https://" not in text
    assert not page.tags & {"script", "iframe", "object", "embed"}

    overview = page.sections["overview"]["text"]
    chain = f"preset:llama-14m → {runs['pre'] / 'model'} → {runs['ft'] / 'adapter'}"
    assert chain in overview  # the lineage, parent → child, across the two runs
    assert "2025-01-02T03:04:05" in overview and "finetune domain/lora" in overview

    training = page.sections["training"]["text"]
    ft_results = json.loads((runs["ft"] / "results.json").read_text())
    assert "steps12" in training.replace(" ", "") and "steps6" in training.replace(" ", "")
    assert f"{ft_results['val_loss']:.4g}" in training

    evaluations = page.sections["evaluations"]["text"]
    assert (
        "[0.4213, 0.5787]" in evaluations and "[0.5311, 0.6842]" in evaluations
    )  # the adapter's evals/qa.json
    assert "1 item(s) flagged" in evaluations and "Where was Ada born?" in evaluations
    assert "final_number" in evaluations and "0.0625" in evaluations  # a bare number: value, no interval

    forgetting = ft_results["forgetting"]
    shown = page.sections["forgetting"]["text"]
    assert f"{forgetting['increase_pct']:+.2f}%" in shown and f"{forgetting['perplexity_after']:.4g}" in shown
    assert str(runs["pre"]) not in shown  # a pretraining run measures no forgetting

    kvb = page.sections["knowledge-vs-behaviour"]["text"]
    assert COMPARE["reading"] in kvb
    assert "[-0.05, +0.07]" in kvb and "[+0.53, +0.7]" in kvb and "+0.62" in kvb
    assert "+0.25" in kvb  # format's delta: tuned − base


def test_sections_without_data_say_so(runs, tmp_path):
    out = tmp_path / "only-compare.html"
    result = invoke("report", runs["root"] / "compare.json", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout)["sections"]
    assert counts == {
        "overview": 1,
        "training": 0,
        "evaluations": 0,
        "forgetting": 0,
        "knowledge-vs-behaviour": 1,
    }
    page = Page(out.read_text(encoding="utf-8"))
    assert list(page.sections) == list(SECTIONS)
    for sid in ("training", "evaluations", "forgetting"):
        assert page.sections[sid]["text"].startswith("No ") and not page.sections[sid]["images"]


def test_browser_renders_every_section(report):
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip("needs the system Chromium and its driver: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    out, _, _ = report
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        driver.get(out.as_uri())
        for sid, title in SECTIONS.items():
            section = driver.find_element(By.ID, sid)
            driver.execute_script("arguments[0].scrollIntoView()", section)
            assert section.is_displayed() and section.size["height"] > 50
            assert section.find_element(By.TAG_NAME, "h2").text == title
        decoded = driver.execute_script(
            "return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)"
        )
        assert decoded == [True] * 4
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
    finally:
        driver.quit()


def test_bad_input_is_refused(runs, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a report input\n")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"kind": "something-else"}))
    (tmp_path / "empty").mkdir()
    for bad in (notes, other, tmp_path / "empty", tmp_path / "missing"):
        result = invoke("report", runs["root"] / "compare.json", bad, "--out", tmp_path / "r.html")
        assert str(bad) in error(result)
        assert not (tmp_path / "r.html").exists()  # nothing written

    out = tmp_path / "r.html"
    out.write_text("keep me")
    result = invoke("report", runs["root"] / "compare.json", "--out", out)
    assert "--overwrite" in error(result) and out.read_text() == "keep me"
    result = invoke("report", runs["root"] / "compare.json", "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert "is a directory" in error(
        invoke("report", runs["root"] / "compare.json", "--out", tmp_path / "empty")
    )


def test_model_directory_brings_its_evals_once(runs, tmp_path):
    out = tmp_path / "adapter.html"
    adapter = runs["ft"] / "adapter"
    result = invoke("report", adapter, runs["ft"], adapter / "evals" / "qa.json", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["inputs"] == 3  # the eval reached three ways is one table, one overview row
    assert summary["sections"]["overview"] == 3 and summary["sections"]["evaluations"] == 1
    overview = Page(out.read_text(encoding="utf-8")).sections["overview"]["text"]
    assert f"{runs['pre'] / 'model'} → {adapter}" in overview
