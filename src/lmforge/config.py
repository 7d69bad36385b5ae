"""Typed stage configs: YAML recipes, `--set key.sub=value` overrides, clear errors, the saved `config.yaml`."""

import json
import re
import reprlib
import textwrap
import types
from collections.abc import Callable, Sequence
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write

C = TypeVar("C", bound=BaseModel)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, each field's docstring is its help."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class TrainSection(Section):
    """The training-loop settings every stage shares (stages subclass it to add theirs)."""

    max_steps: int = 1000
    """Number of optimizer steps to run."""
    seed: int = 0
    """Seed of every random number generator (model init, data order, dropout, sampling)."""
    resume: bool = False
    """Continue from the newest complete checkpoint in the run directory (`--resume RUN_DIR` sets it)."""


class StageConfig(Section):
    """Base of a stage's config; stages add their `model`, `data`, `optim` and `eval` sections."""

    init_from_key: ClassVar[str | None] = None
    """The dotted field `--init-from DIR` sets (the model a stage starts from); None: the stage has none."""

    train: TrainSection = Field(default_factory=TrainSection)
    """Training loop."""


class ConfigField(NamedTuple):
    """One leaf field: dotted `key` (as given to `--set`), `type` as text, `default` (`...` if required)."""

    key: str
    type: str
    default: Any
    description: str


def _union_args(annotation: Any) -> tuple[Any, ...]:
    """The members of a union annotation, or `(annotation,)`."""
    is_union = get_origin(annotation) in (Union, types.UnionType)
    return get_args(annotation) if is_union else (annotation,)


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The model class of a section field (`Section` or `Section | None`), else None."""
    models = [a for a in _union_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 else None


def _type_text(annotation: Any) -> str:
    """A short readable name of a type annotation: `int`, `float | None`, `list[int]`."""
    plain = isinstance(annotation, type) and not get_args(annotation)
    return annotation.__name__ if plain else re.sub(r"\b(typing|pathlib)\.", "", str(annotation))


def config_fields(cls: type[BaseModel]) -> list[ConfigField]:
    """Every leaf field of `cls`, nested sections flattened to dotted keys, in field order."""

    def walk(model: type[BaseModel], prefix: str, defaults: BaseModel) -> list[ConfigField]:
        rows = []
        for name, info in model.model_fields.items():
            default = getattr(defaults, name, ...)  # model_construct() leaves required fields unset
            if (section := _section_class(info.annotation)) is not None:
                # A stage may change a section's defaults: list the stage's.
                inner = default if isinstance(default, section) else section.model_construct()
                rows += walk(section, f"{prefix}{name}.", inner)
            else:
                text = " ".join((info.description or "").split())
                rows.append(ConfigField(prefix + name, _type_text(info.annotation), default, text))
        return rows

    return walk(cls, "", cls.model_construct())


def _show(value: Any) -> str:
    """A default value as the user would type it after `--set key=`."""
    if value is ...:
        return "(required)"
    text = value if isinstance(value, str) and value else json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:36] + " ..."


def config_help(cls: type[BaseModel], width: int = 100) -> str:
    """Every field of `cls` with its type, default and description, one per line (the `--help` epilog)."""
    rows = config_fields(cls)
    heads = [f"  {r.key}: {r.type} = {_show(r.default)}" for r in rows]
    lengths = sorted(map(len, heads)) or [0]
    column = min(lengths[len(lengths) * 9 // 10] + 2, width // 2)  # the few longest heads get their own line
    lines = ["Config fields (set in the --config recipe or with --set KEY=VALUE):"]
    for head, row in zip(heads, rows, strict=True):
        if len(head) + 2 > column:
            lines.append(head)
            head = ""
        lines += textwrap.wrap(
            row.description or "-", width, initial_indent=head.ljust(column), subsequent_indent=" " * column,
            break_long_words=False, break_on_hyphens=False,
        )  # fmt: skip
    return "\n".join(lines)


def _unknown_key(cls: type[BaseModel], parts: Sequence[str], i: int, source: str) -> str:
    """The error for the unknown key `parts[i]`, with the closest valid key as a suggestion."""
    key, rest, keys = ".".join(parts), parts[i + 1 :], [row.key for row in config_fields(cls)]
    # Candidates: the keys at the same level, then every full key, compared by full path and by leaf name
    # (a key put in the wrong section). On a tie the key at the same level wins.
    level = ".".join([*parts[:i], ""]) if i else ""
    names = dict.fromkeys(k[len(level) :].split(".")[0] for k in keys if k.startswith(level))
    ratio = lambda a, b: SequenceMatcher(None, a, b).ratio()  # noqa: E731
    scored = [(ratio(parts[i], name), ".".join([*parts[:i], name, *rest])) for name in names]
    scored += [(max(ratio(key, k), ratio(parts[-1], k.rsplit(".", 1)[-1])), k) for k in keys]
    score, guess = max(scored, key=lambda s: s[0], default=(0.0, ""))
    hint = f"; did you mean '{guess}'?" if score >= 0.6 else ""
    return f"unknown config key '{key}' ({source}){hint}"


_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
             "list": "a list", "dict": "a mapping", "model": "a mapping (a config section)"}  # fmt: skip


def validation_message(
    err: ValidationError, cls: type[BaseModel] | None = None, source: Callable[[str], str] = lambda key: ""
) -> str:
    """All errors of `err` on one line: dotted field, what was expected, what was given, where it came from."""
    leaves = {row.key for row in config_fields(cls)} if cls else set()
    messages, found = [], {}  # found: key -> ([expectations], ", got X (from Y)")
    for e in err.errors():
        parts, kind, given = [str(p) for p in e["loc"]], e["type"], e.get("input")
        # Cut the loc at the field: below it are list indices and union members ('int', 'list[int]').
        n = next((n for n in range(1, len(parts)) if ".".join(parts[:n]) in leaves), len(parts))
        key = ".".join(parts[:n]) or "config"
        where = f" ({source(key)})" if source(key) else ""
        if kind == "extra_forbidden" and cls is not None:
            messages.append(_unknown_key(cls, parts, len(parts) - 1, source(key)))
            continue
        prefix = kind.split("_")[0]
        if prefix in _EXPECTED and kind.endswith(("_type", "_parsing", "_from_float")):
            text = f"expected {_EXPECTED[prefix]}"
        elif kind == "missing":
            text = "required field is missing"
        else:
            text = e["msg"].removeprefix("Value error, ").replace("Input should be", "expected", 1)
        got = "" if kind == "missing" or isinstance(given, dict) else f", got {reprlib.repr(given)}"
        found.setdefault(key, ([], got + where))[0].append(text)
    # A union field fails once per member: "expected an integer or a list".
    for key, (texts, tail) in found.items():
        messages.append(f"{key}: {' or '.join(dict.fromkeys(texts)).replace(' or expected ', ' or ')}{tail}")
    return "; ".join(messages)


def _read_recipe(path: Path) -> dict:
    """The top-level mapping of a YAML recipe."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:  # not found, a directory, not readable
        raise LmforgeError(f"cannot read recipe {path}: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        line = f", line {e.problem_mark.line + 1}" if getattr(e, "problem_mark", None) else ""
        raise LmforgeError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', None) or e}") from e
    data = {} if data is None else data  # an empty recipe
    if not isinstance(data, dict):
        raise LmforgeError(f"{path}: expected a mapping of config sections, got a {type(data).__name__}")
    return data


def _parse_value(annotation: Any, raw: str) -> Any:
    """A `--set` value typed by its field: raw text for str, Path and string Literals, else parsed as YAML."""
    members = _union_args(annotation)
    for a in members:
        if a in (str, Path) or (get_origin(a) is Literal and all(isinstance(v, str) for v in get_args(a))):
            return None if type(None) in members and raw in ("null", "~") else raw
    try:
        return yaml.safe_load(raw)  # 20 -> int, [1, 2] -> list, null -> None; "3e-4" stays text for pydantic
    except yaml.YAMLError:
        return raw  # pydantic names the field and the expected type


def _apply_override(cls: type[BaseModel], data: dict, text: str) -> str:
    """Set one `KEY=VALUE` override into the raw config `data`; return the dotted key."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise LmforgeError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.max_steps=20")
    parts = key.split(".")
    model: type[BaseModel] | None = cls
    for i, part in enumerate(parts):
        if model is None or part not in model.model_fields:  # also `train.max_steps.x`: not a section
            raise LmforgeError(_unknown_key(cls, parts, i, f"from --set {text}"))
        annotation = model.model_fields[part].annotation
        if i == len(parts) - 1:
            data[part] = _parse_value(annotation, raw)
        else:
            if not isinstance(data.get(part), dict):
                data[part] = {}
            data, model = data[part], _section_class(annotation)
    return key


def load_config(cls: type[C], path: Path | None, overrides: Sequence[str] = ()) -> C:
    """Resolve a config: `cls` defaults, then the YAML recipe at `path`, then each `--set KEY=VALUE` in order."""
    data = _read_recipe(Path(path)) if path is not None else {}
    set_keys = [(_apply_override(cls, data, text), text) for text in overrides]

    def source(key: str) -> str:
        for set_key, text in reversed(set_keys):  # the last override touching the key wins
            if key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + "."):
                return f"from --set {text}"
        return f"from {path}" if path is not None else "from the defaults"

    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise LmforgeError(validation_message(e, cls, source)) from e


def save_config(cfg: BaseModel, out_dir: Path) -> Path:
    """Write the resolved config to `out_dir/config.yaml` atomically, keys in field order; return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "config.yaml"
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    atomic_write(path, text)
    return path
