"""Typed stage configs: YAML recipes, `--set key.sub=value` overrides, clear errors, the saved `config.yaml`."""

import json
import re
import reprlib
import textwrap
import types
from collections.abc import Callable, Sequence
from difflib import SequenceMatcher
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write

C = TypeVar("C", bound=BaseModel)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, each field's docstring is its help."""

    # allow_inf_nan: no count, size, rate or probability is meant to be NaN or infinite (YAML reads `.nan`).
    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_assignment=True, allow_inf_nan=False
    )


class TrainSection(Section):
    """The training-loop settings every stage shares (stages subclass it to add theirs)."""

    max_steps: int = Field(1000, ge=1)
    """Number of optimizer steps to run."""
    seed: int = Field(0, ge=0)
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
    """One leaf field: dotted `key` (as given to `--set`), `type` as text, `default` (`...` if required),
    and `range`, the values its constraints allow ('>= 1', 'in [0, 1]', 'each >= 0'; '' when unconstrained)."""

    key: str
    type: str
    default: Any
    description: str
    range: str = ""


def _union_args(annotation: Any) -> tuple[Any, ...]:
    """The members of a union annotation, or `(annotation,)`."""
    is_union = get_origin(annotation) in (Union, types.UnionType)
    return get_args(annotation) if is_union else (annotation,)


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The model class of a section field (`Section` or `Section | None`), else None."""
    models = [a for a in _union_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 else None


def _type_text(annotation: Any) -> str:
    """A short readable name of a type annotation: `int`, `float | None`, `list[int]` (constraints left out)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_text(args[0])
    if origin in (Union, types.UnionType):
        return " | ".join(map(_type_text, args))
    if origin is Literal:
        text = f"Literal[{', '.join(map(repr, args))}]"
        return (
            text if len(text) <= 48 else "str"
        )  # a long choice reads as str; its description names each one
    if annotation is type(None):
        return "None"
    if args and isinstance(origin, type):
        return f"{origin.__name__}[{', '.join(map(_type_text, args))}]"
    if isinstance(annotation, type):
        return annotation.__name__
    return re.sub(r"\b(typing|pathlib)\.", "", str(annotation))


def _number(value: float) -> str:
    """A bound as the user would type it: 1, 0.5, 1e-08."""
    return str(value) if isinstance(value, int) else format(value, "g")


def _bounds(metadata: Sequence[Any]) -> dict[str, Any]:
    """The gt/ge/lt/le bounds among pydantic constraints (annotated_types' Ge, Interval, ..., or a FieldInfo)."""
    bounds: dict[str, Any] = {}
    for m in metadata:
        if isinstance(m, FieldInfo):  # Annotated[float, Field(ge=0)] inside a container is not flattened
            bounds.update(_bounds(m.metadata))
        else:
            found = {k: getattr(m, k, None) for k in ("gt", "ge", "lt", "le")}
            bounds.update({k: v for k, v in found.items() if v is not None})
    return bounds


def _range_text(metadata: Sequence[Any]) -> str:
    """The values pydantic constraints (`Field(ge=..., lt=...)`) allow: '>= 1', '> 0', 'in [0, 1)'; else ''."""
    bounds = _bounds(metadata)
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    if low and high:
        return f"in {low[0]}{_number(low[1])}, {_number(high[1])}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {_number(low[1])}"
    if high:
        return f"{'<=' if high[0] == ']' else '<'} {_number(high[1])}"
    return ""


def _field_range(info: FieldInfo) -> str:
    """The range of a field's values, or of every item of a list/tuple/dict field ('each in [0, 1)')."""
    if own := _range_text(info.metadata):
        return own

    def inner(annotation: Any) -> set[str]:
        if get_origin(annotation) is Annotated:
            return {_range_text(get_args(annotation)[1:])} | inner(get_args(annotation)[0])
        return set().union(*map(inner, get_args(annotation)))

    ranges = inner(info.annotation) - {""}
    return f"each {ranges.pop()}" if len(ranges) == 1 else ""


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
                rows.append(
                    ConfigField(prefix + name, _type_text(info.annotation), default, text, _field_range(info))
                )
        return rows

    return walk(cls, "", cls.model_construct())


def _show(value: Any) -> str:
    """A default value as the user would type it after `--set key=`."""
    if value is ...:
        return "(required)"
    text = value if isinstance(value, str) and value else json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:36] + " ..."


def config_help(cls: type[BaseModel], width: int = 100) -> str:
    """Every field of `cls` with its type, default, range and description, one per line (the `--help` epilog)."""
    rows = config_fields(cls)
    heads, texts = [], []
    for r in rows:
        head, default = f"  {r.key}: {r.type}", f"= {_show(r.default)}{f' ({r.range})' if r.range else ''}"
        whole = len(head) + 1 + len(default) <= width  # else the default opens the description
        heads.append(f"{head} {default}" if whole else head)
        texts.append(r.description or "-" if whole else f"{default[2:]}: {r.description or '-'}")
    lengths = sorted(map(len, heads)) or [0]
    column = min(lengths[len(lengths) * 9 // 10] + 2, width // 2)  # the few longest heads get their own line
    lines = ["Config fields (set in the --config recipe or with --set KEY=VALUE):"]
    for head, text in zip(heads, texts, strict=True):
        if len(head) + 2 > column:
            lines.append(head)
            head = ""
        lines += textwrap.wrap(
            text, width, initial_indent=head.ljust(column), subsequent_indent=" " * column,
            break_long_words=False, break_on_hyphens=False,
        )  # fmt: skip
    return "\n".join(lines)


# What other trainers (HF Trainer, TRL, PEFT, nanoGPT) call lmforge's keys: their names share too few letters
# with ours for the spelling match below. A name may map to several keys; the first the config has is offered.
_ALIASES = {
    "optim.lr": "learning_rate lr_rate peak_lr max_lr",
    "optim.schedule": "lr_scheduler_type lr_scheduler lr_schedule scheduler",
    "optim.warmup_steps": "warmup_ratio num_warmup_steps warmup_iters warmup",
    "optim.grad_clip": "max_grad_norm clip_grad_norm gradient_clipping grad_norm_clip",
    "optim.betas": "adam_beta1 adam_beta2 beta1 beta2",
    "optim.eps": "adam_epsilon epsilon",
    "optim.name": "optimizer optimizer_type",
    "train.max_steps": "num_train_epochs epochs num_epochs max_iters train_steps total_steps",
    "train.micro_batch_size": "per_device_train_batch_size train_batch_size batch_size micro_batch",
    "train.grad_accum_steps": "gradient_accumulation_steps gradient_accumulation grad_accum",
    "train.seq_len": "max_seq_length max_seq_len max_length seq_length block_size context_length",
    "train.log_every": "logging_steps log_interval",
    "train.eval_every": "eval_steps eval_interval",
    "train.eval_batches": "eval_iters",
    "train.checkpoint_every": "save_steps checkpoint_interval",
    "train.keep_checkpoints": "save_total_limit",
    "train.activation_checkpointing": "gradient_checkpointing",
    "train.autocast": "bf16 mixed_precision",
    "train.compile": "torch_compile",
    "lora.r": "lora_r lora_rank rank",
    "lora.alpha": "lora_alpha",
    "lora.dropout": "lora_dropout",
    "lora.rslora": "use_rslora",
    "lora.dora": "use_dora",
    "model.init_from": "model_name_or_path base_model",
    "model": "model_name_or_path base_model",
}


def _free_dict_field(cls: type[BaseModel], section: Sequence[str]) -> str | None:
    """The name of a free-form `dict[str, Any]` field (e.g. model.overrides) of the section at `section`."""
    model: type[BaseModel] | None = cls
    for part in section:
        model = _section_class(model.model_fields[part].annotation) if part in model.model_fields else None
        if model is None:
            return None
    fields = model.model_fields.items()
    return next(
        (n for n, f in fields if any(get_args(a) == (str, Any) for a in _union_args(f.annotation))), None
    )


def _one_line(text: str) -> str:
    """`text` with line breaks and other control characters escaped (`\\n`), for a one-line message."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _unknown_key(cls: type[BaseModel], parts: Sequence[str], i: int, source: str) -> str:
    """The error for the unknown key `parts[i]`, with the closest valid key as a suggestion."""
    key, rest, keys = ".".join(parts), parts[i + 1 :], [row.key for row in config_fields(cls)]
    # Another trainer's name for one of our keys (learning_rate: optim.lr).
    given = {parts[i].lower(), parts[-1].lower()}
    aliased = [k for k, names in _ALIASES.items() if k in keys and given & set(names.split())]
    # Candidates: the keys at the same level, then every full key, compared by full path and by leaf name
    # (a key put in the wrong section). On a tie the key at the same level wins.
    level = ".".join([*parts[:i], ""]) if i else ""
    names = dict.fromkeys(k[len(level) :].split(".")[0] for k in keys if k.startswith(level))
    ratio = lambda a, b: SequenceMatcher(None, a, b).ratio()  # noqa: E731
    scored = [(ratio(parts[i], name), ".".join([*parts[:i], name, *rest])) for name in names]
    near = max(scored, key=lambda s: s[0], default=(0.0, ""))[0] >= 0.6  # a misspelt key of this section
    scored += [(max(ratio(key, k), ratio(parts[-1], k.rsplit(".", 1)[-1])), k) for k in keys]
    score, guess = max(scored, key=lambda s: s[0], default=(0.0, ""))
    # A key of a section with a free-form dict (model.hidden_size) most likely belongs in that dict, unless it
    # is a misspelling here or the exact name of a key elsewhere (model.seed: train.seed).
    inside = _free_dict_field(cls, parts[:i])
    if aliased:
        guess = aliased[0]
    elif inside is not None and not near and score < 1.0:
        guess = ".".join([*parts[:i], inside, *parts[i:]])
    elif score < 0.6:
        guess = ""
    hint = f"; did you mean '{guess}'?" if guess else ""
    return f"unknown config key '{_one_line(key)}' ({source}){hint}"


_BOUND_OPS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
             "list": "a list", "dict": "a mapping", "model": "a mapping (a config section)"}  # fmt: skip


def validation_message(
    err: ValidationError, cls: type[BaseModel] | None = None, source: Callable[[str], str] = lambda key: ""
) -> str:
    """All errors of `err` on one line: dotted field, what was expected, what was given, where it came from."""
    ranges = {row.key: row.range for row in config_fields(cls)} if cls else {}
    leaves = set(ranges)
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
        elif kind in _BOUND_OPS:  # the field's whole range ('in [0, 1]'), else the bound that failed
            bound = next(iter(e.get("ctx", {}).values()), None)
            allowed = ranges.get(key) or f"{_BOUND_OPS[kind]} {_number(bound)}"
            noun = "each value" if allowed.startswith("each ") else "a value"  # a list, tuple or dict field
            text = f"expected {noun} {allowed.removeprefix('each ')}"
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
    except RecursionError:  # PyYAML recurses once per nesting level
        raise LmforgeError(f"{path}: invalid YAML: nested too deeply to read") from None
    except yaml.YAMLError as e:
        line = f", line {e.problem_mark.line + 1}" if getattr(e, "problem_mark", None) else ""
        detail = getattr(e, "problem", None) or str(e).split("\n")[0]  # a ReaderError's str() has two lines
        raise LmforgeError(f"{path}{line}: invalid YAML: {detail}") from e
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
    except (yaml.YAMLError, RecursionError):  # RecursionError: nested too deeply for PyYAML
        return raw  # pydantic names the field and the expected type


def _dict_value_type(annotation: Any) -> Any:
    """The value type of a dict field (`dict[str, float]`, `dict | None`: Any), else None."""
    for a in _union_args(annotation):
        if a is dict or get_origin(a) is dict:
            return (get_args(a) or (str, Any))[1]
    return None


def _set_in_dict(mapping: Any, parts: Sequence[str], at: int, value: Any, text: str) -> dict:
    """`mapping` (the value at `parts[:at]`, None: empty) with the entry at `parts[at:]` set to `value`."""
    if mapping is not None and not isinstance(mapping, dict):
        where = ".".join(parts[:at])
        raise LmforgeError(
            f"--set {_one_line(text)}: {where} is {reprlib.repr(mapping)}, not a mapping to set a key in"
        )
    # A copy with every other key: the recipe's entries stay, and a YAML alias of it elsewhere is not changed.
    mapping, key = dict(mapping or {}), parts[at]
    last = at == len(parts) - 1
    mapping[key] = value if last else _set_in_dict(mapping.get(key), parts, at + 1, value, text)
    return mapping


def _apply_override(cls: type[BaseModel], data: dict, text: str) -> str:
    """Set one `KEY=VALUE` override into the raw config `data`; return the dotted key.

    A key below a dict field (`model.overrides.num_hidden_layers=2`) sets that entry and keeps the others."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise LmforgeError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.max_steps=20")
    parts = key.split(".")
    model: type[BaseModel] | None = cls
    for i, part in enumerate(parts):
        if model is None or part not in model.model_fields:  # also `train.max_steps.x`: not a section
            raise LmforgeError(_unknown_key(cls, parts, i, f"from --set {_one_line(text)}"))
        info = model.model_fields[part]
        if i == len(parts) - 1:
            data[part] = _parse_value(info.annotation, raw)
        elif (value_type := _dict_value_type(info.annotation)) is not None:  # a key inside a dict field
            current = data[part] if part in data else info.get_default(call_default_factory=True)
            value = _parse_value(value_type if i == len(parts) - 2 else Any, raw)
            data[part] = _set_in_dict(current, parts, i + 1, value, text)
            return key
        else:
            if not isinstance(data.get(part), dict):
                data[part] = {}
            data, model = data[part], _section_class(info.annotation)
    return key


def load_config(cls: type[C], path: Path | None, overrides: Sequence[str] = ()) -> C:
    """Resolve a config: `cls` defaults, then the YAML recipe at `path`, then each `--set KEY=VALUE` in order."""
    data = _read_recipe(Path(path)) if path is not None else {}
    set_keys = [(_apply_override(cls, data, text), text) for text in overrides]

    def source(key: str) -> str:
        for set_key, text in reversed(set_keys):  # the last override touching the key wins
            if key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + "."):
                return f"from --set {_one_line(text)}"
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
