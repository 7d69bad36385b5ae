"""The tasks' data: JSONL files beside this file, read without the network or a dataset cache."""

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def load(file: str, **_: Any) -> Any:
    """A DatasetDict whose `test` split holds the records of `file` (a JSONL file in this folder)."""
    import datasets

    lines = (HERE / file).read_text(encoding="utf-8").splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines])})
