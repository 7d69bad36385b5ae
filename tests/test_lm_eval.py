"""lm-evaluation-harness's `lmforge` model against lm-eval's own `hf` model on the same tiny directory.

The tasks (tests/lm_eval_tasks) are local: 20 multiple-choice questions (one-token choices that share a row,
multi-token ones, one context longer than the model's 128 positions), 8 documents for rolling perplexity (some
several windows long) and 10 greedy generations with stop strings.
"""

from __future__ import annotations

import json
import os
from functools import partialmethod
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from typer.testing import CliRunner  # noqa: E402

from lmforge.cli import app  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.eval.harness import LmforgeLM  # noqa: E402
from lmforge.eval.loglik import rolling_logprob, rolling_windows, score_continuations  # noqa: E402

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
TASKS = ["lmforge_mc", "lmforge_rolling", "lmforge_gen"]
runner = CliRunner()


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False, include_path=str(TASKS_DIR))


def evaluate(lm, task_manager, tasks=TASKS) -> dict:
    """lm-eval's simple_evaluate of `tasks` with every request's response logged."""
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, log_samples=True)


@pytest.fixture(scope="module")
def hf_run(tiny_model_dir, task_manager) -> dict:
    from lm_eval.models.huggingface import HFLM

    return evaluate(HFLM(pretrained=str(tiny_model_dir), batch_size=4, device="cpu"), task_manager)


def metrics(results: dict) -> dict[str, dict[str, float]]:
    """Each task's scores (no names, aliases or sample counts)."""
    skip = {"name", "alias", "sample_len"}
    return {
        task: {k: float(v) for k, v in scores.items() if k not in skip and not isinstance(v, str)}
        for task, scores in results["results"].items()
    }


def assert_same_scores(ours: dict, theirs: dict) -> None:
    assert metrics(ours).keys() == metrics(theirs).keys()
    for task, scores in metrics(theirs).items():
        assert metrics(ours)[task] == pytest.approx(scores, rel=1e-5, abs=1e-6), task


def assert_same_responses(ours: dict, theirs: dict, tasks=TASKS) -> int:
    """Every request's response equal: log-likelihoods within 1e-4 (rolling sums of ~300 fp32 terms, which the
    `hf` model adds in fp32, within 1e-6 relative), greedy flags and generations exactly. Returns the count."""
    compared = 0
    for task in tasks:
        a = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        b = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b]
        for x, y in zip(a, b, strict=True):
            assert x["arguments"] == y["arguments"]
            for (got,), (want,) in zip(x["resps"], y["resps"], strict=True):
                if isinstance(want, str):
                    assert got == want, (task, x["doc_id"])
                elif isinstance(want, (list, tuple)):  # loglikelihood: (logprob, is_greedy)
                    assert float(got[0]) == pytest.approx(float(want[0]), abs=1e-4), (task, x["doc_id"])
                    assert bool(got[1]) == bool(want[1]), (task, x["doc_id"])
                else:  # loglikelihood_rolling: the document's log-likelihood
                    assert float(got) == pytest.approx(float(want), abs=1e-4, rel=1e-6), (task, x["doc_id"])
                compared += 1
    return compared


def test_requests_and_scores_equal_hf(tiny_model_dir, task_manager, hf_run):
    ours = evaluate(LmforgeLM(pretrained=str(tiny_model_dir), batch_size=4), task_manager)
    assert assert_same_responses(ours, hf_run) == 20 * 4 + 8 + 10
    assert_same_scores(ours, hf_run)
    rolling = [s["resps"][0][0] for s in ours["samples"]["lmforge_rolling"]]
    assert all(r < 0 for r in rolling) and len(set(rolling)) == len(rolling)


def test_cli_gives_the_hf_scores(tiny_model_dir, hf_run, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    # lm-eval's command line indexes its ~10,000 built-in task files first (~30 s): only ours here.
    monkeypatch.setattr(TaskManager, "__init__", partialmethod(TaskManager.__init__, include_defaults=False))
    args = ["lm-eval", "--model", "lmforge", "--model_args", f"pretrained={tiny_model_dir}", "--tasks",
            ",".join(TASKS), "--include_path", str(TASKS_DIR), "--output_path", str(tmp_path), "--batch_size", "3"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (path,) = tmp_path.rglob("results_*.json")
    assert_same_scores(json.loads(path.read_text()), hf_run)

    result = runner.invoke(app, args[:3] + args[5:])  # no --model_args: no pretrained
    assert result.exit_code == 2
    assert "pretrained=DIR is required" in result.output


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(model dir, PEFT LoRA dir): the tiny Llama sized to its tokenizer's 280 ids, since lm-eval's `hf` model
    resizes the embeddings to the tokenizer when it loads a PEFT adapter (tiny_model_dir has 300 rows)."""
    import shutil

    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from lmforge.model.configs import preset
    from lmforge.model.hf import build_model, save_model
    from lmforge.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("lm-eval-lora")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, root / name)
    vocab = Tokenizer.from_dir(root).vocab_size
    torch.manual_seed(0)
    save_model(build_model(preset("tiny-llama", vocab_size=vocab, eos_token_id=3, pad_token_id=0)), root)
    torch.manual_seed(2)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj", "down_proj"],
                             init_lora_weights=False)  # fmt: skip
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(root), config)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_B" in key:
                p.mul_(20)  # a LoRA that changes the scores
    model.save_pretrained(root / "lora")
    return root, root / "lora"


def test_adapter_equals_peft(lora_model, task_manager):
    from lm_eval.models.huggingface import HFLM

    tasks = ["lmforge_mc", "lmforge_rolling"]
    base, adapter = map(str, lora_model)
    theirs = evaluate(HFLM(pretrained=base, peft=adapter, batch_size=4, device="cpu"), task_manager, tasks)
    ours = evaluate(LmforgeLM(pretrained=base, adapter=adapter, batch_size=4), task_manager, tasks)
    assert assert_same_responses(ours, theirs, tasks) == 20 * 4 + 8
    assert_same_scores(ours, theirs)
    # The adapter changes the model: without it, every document's log-likelihood is another number.
    plain = evaluate(LmforgeLM(pretrained=base, batch_size=4), task_manager, ["lmforge_rolling"])
    by_doc = lambda run: sorted(run["samples"]["lmforge_rolling"], key=lambda s: s["doc_id"])  # noqa: E731
    for with_lora, without in zip(by_doc(ours), by_doc(plain), strict=True):
        assert with_lora["resps"][0][0] != pytest.approx(without["resps"][0][0], abs=1e-2)


def test_bad_model_args(tiny_model_dir):
    with pytest.raises(LmforgeError, match="pretrained=DIR is required"):
        LmforgeLM()
    with pytest.raises(LmforgeError, match="model_args revision: not understood"):
        LmforgeLM(pretrained=str(tiny_model_dir), revision="main")
    with pytest.raises(LmforgeError, match="max_length=500: expected 1 to 128"):
        LmforgeLM(pretrained=str(tiny_model_dir), max_length=500)
    with pytest.raises(LmforgeError, match="batch_size=0"):
        LmforgeLM(pretrained=str(tiny_model_dir), batch_size=0)
    with pytest.raises(LmforgeError, match="compile=maybe: expected true or false"):
        LmforgeLM(pretrained=str(tiny_model_dir), compile="maybe")
    assert LmforgeLM(pretrained=str(tiny_model_dir), compile="True").engine.compiled is not None
    assert LmforgeLM(pretrained=str(tiny_model_dir), compile="false").engine.compiled is None


def test_chat_template_renders_as_transformers(tiny_model_dir):
    from transformers import AutoTokenizer

    ours = LmforgeLM(pretrained=str(tiny_model_dir))
    hf = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat?"}]
    want = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(chat) == want
    prefilled = [*chat, {"role": "assistant", "content": "the mat "}]
    want = hf.apply_chat_template(prefilled, tokenize=False, continue_final_message=True)
    assert ours.apply_chat_template(prefilled, add_generation_prompt=False) == want
    assert ours.chat_template(True) == hf.chat_template and ours.chat_template(False) is None


def test_help_and_missing_lm_eval(monkeypatch):
    result = runner.invoke(app, ["lm-eval", "--help"])
    assert result.exit_code == 0 and "Language Model Evaluation Harness" in result.output
    monkeypatch.setitem(__import__("sys").modules, "lm_eval.__main__", None)  # as if not installed
    result = runner.invoke(app, ["lm-eval", "--model", "lmforge"])
    assert result.exit_code == 2
    assert "lm-eval is not installed: pip install 'lmforge[eval]'" in result.output


# ------------------------------------------------------------------------------------ eval/loglik.py


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from lmforge.infer.engine import Engine

    return Engine.from_dir(tiny_model_dir, device="cpu").model


def reference(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Σ log p(continuation | context) and greedy-ness from the full logits of one unbatched forward."""
    ids = torch.tensor([[*context, *continuation]])
    with torch.no_grad():
        logp = F.log_softmax(model(ids[:, :-1]).float(), -1)[0, len(context) - 1 :]  # (len(cont), V)
    target = torch.tensor(continuation)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


@pytest.fixture(scope="module")
def tiny_mistral():
    """A random tiny Mistral: every layer attends to a sliding window of 8 tokens."""
    from lmforge.model.configs import preset
    from lmforge.model.hf import build_model

    torch.manual_seed(3)
    return build_model(preset("tiny-mistral", vocab_size=300)).eval()


@pytest.mark.parametrize("name", ["tiny_model", "tiny_mistral"])
def test_score_continuations_matches_full_softmax(name, request):
    model = request.getfixturevalue(name)
    torch.manual_seed(0)
    rand = lambda n: torch.randint(10, 250, (n,)).tolist()  # noqa: E731
    shared, other = rand(7), rand(12)
    with torch.no_grad():  # a greedy continuation: the argmax after `shared`, three times
        greedy = []
        for _ in range(3):
            greedy.append(int(model(torch.tensor([shared + greedy]))[0, -1].argmax()))
    pairs = [
        *[(shared, [t]) for t in (5, 17, greedy[0], 17)],  # one-token choices: one row
        (shared, greedy),  # the same prefix (shared[:-1]) as that row: run once, from its KV cache
        (shared + greedy[:2], [99]),  # the same input as (shared, greedy), another final token
        *[(other, rand(n)) for n in (3, 5, 1)],  # another prefix, longer than the sliding window
        (rand(3), rand(4)),  # rows run whole
        (rand(1), rand(1)),
    ]
    want = [reference(model, list(c), list(k)) for c, k in pairs]
    for batch_size in (1, 2, 32):
        got = score_continuations(model, pairs, batch_size=batch_size)
        assert [g.tokens for g in got] == [len(k) for _, k in pairs]
        assert [g.greedy for g in got] == [w[1] for w in want]
        assert [g.logprob for g in got] == pytest.approx([w[0] for w in want], abs=1e-5)
    assert [w[1] for w in want] == [False, False, True, False, True, *[False] * 6]


def test_score_continuations_truncates_from_the_left(tiny_model):
    long_context = list(range(10, 210))  # 200 tokens: the model holds 128
    continuation = [7, 8, 9]
    (got,) = score_continuations(tiny_model, [(long_context, continuation)])
    kept = (long_context + continuation)[-129:]  # 128 inputs, the last token only predicted
    assert got.logprob == pytest.approx(reference(tiny_model, kept[:-3], continuation)[0], abs=1e-5)
    with pytest.raises(LmforgeError, match="pair 0: a continuation of 129 tokens does not fit"):
        score_continuations(tiny_model, [([1], [5] * 129)])
    with pytest.raises(LmforgeError, match="pair 1: the continuation is empty"):
        score_continuations(tiny_model, [([1], [2]), ([1], [])])
    with pytest.raises(LmforgeError, match="pair 0: the context is empty"):
        score_continuations(tiny_model, [([], [2])])


def test_rolling_windows_are_lm_evals():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for n in range(0, 23):
        for context in (1, 2, 5, 8):
            ids = list(range(100, 100 + n))
            want = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, 1, context, 1)]
            got = rolling_windows(ids, context=context, prefix_token=1)
            assert got == [(list(a), list(b)) for a, b in want]


def test_rolling_logprob(tiny_model):
    ids = torch.randint(10, 250, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    one_window = rolling_logprob(tiny_model, ids, context=64, prefix_token=2)
    assert one_window.tokens == 40
    assert one_window.logprob == pytest.approx(reference(tiny_model, [2], ids)[0], abs=1e-4)
    # Windows of 16 model inputs: the first 16 tokens after the prefix; the next 16 after the one token before
    # them; the last 8 after the 9 tokens before them that fill the window.
    windowed = rolling_logprob(tiny_model, ids, context=16, prefix_token=2, batch_size=2)
    parts = [reference(tiny_model, [2], ids[:16])[0], reference(tiny_model, ids[15:16], ids[16:32])[0],
             reference(tiny_model, ids[23:32], ids[32:])[0]]  # fmt: skip
    assert windowed.logprob == pytest.approx(sum(parts), abs=1e-4) and windowed.tokens == 40
    assert rolling_logprob(tiny_model, [], context=16, prefix_token=2).tokens == 0
