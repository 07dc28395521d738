"""One typed dataclass per recipe, filled from a YAML file and `--key value` overrides.

`transformers.HfArgumentParser` (and TRL's `TrlParser` on top of it) cannot express fields such as a list of data
sources (a list of mappings), and it ignores unknown YAML keys silently. Recipes here need both, so this small parser
reads the dataclass fields and their `help` metadata directly: YAML first, then the command line, each value parsed
as YAML (`--lr 3e-4`, `--goldfish false`, `--data '[{path: corpus/, weight: 2}]'`) and checked against the field's
type. Unknown keys are errors that suggest the nearest field.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

RecipeConfig = TypeVar("RecipeConfig")


class RecipeArgumentError(ValueError):
    """A recipe option that does not exist or whose value does not fit its type."""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(choice) for choice in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(arg) for arg in typing.get_args(annotation))}]"
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """`value` checked against `annotation`; ints are accepted for floats. Raises RecipeArgumentError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (arg for arg in args if arg is not type(None)):
            try:
                return _coerce(value, option, where)
            except RecipeArgumentError:
                continue
    elif origin is Literal:
        if value in args:
            return value
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [_coerce(item, args[0] if args else Any, f"{where}[{i}]") for i, item in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            key_type, value_type = args or (Any, Any)
            return {
                _coerce(key, key_type, where): _coerce(item, value_type, f"{where}.{key}")
                for key, item in value.items()
            }
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `1e-3` (no dot) as a string.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is str:
        # YAML reads `--name 2026` as an int; for a string field the user meant the text.
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif isinstance(annotation, type) and isinstance(value, annotation):
        return value
    raise RecipeArgumentError(f"{where}={value!r} is not a valid {_type_name(annotation)}.")


def _field_help(config_class: type) -> str:
    hints = typing.get_type_hints(config_class)
    lines = [f"Options of {config_class.__name__} (YAML keys or --key value; values are parsed as YAML):", ""]
    for field in dataclasses.fields(config_class):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        lines.append(f"  --{field.name} ({_type_name(hints[field.name])}, default {default!r})")
        lines.append(f"      {field.metadata.get('help', '')}")
    return "\n".join(lines)


def recipe_config_from_dict(
    config_class: type[RecipeConfig], values: dict[str, Any], source: str | dict[str, str] = "the recipe"
) -> RecipeConfig:
    """Build `config_class` from `values`, checking names and types.

    `source` names where the values came from (one name, or one per key) for the error messages.
    """
    hints = typing.get_type_hints(config_class)
    known = [field.name for field in dataclasses.fields(config_class)]
    checked = {}
    for key, value in values.items():
        where = source if isinstance(source, str) else source.get(key, "the recipe")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" Valid options: {', '.join(known)}."
            raise RecipeArgumentError(f"Unknown option {key!r} in {where}.{hint}")
        checked[key] = _coerce(value, hints[key], f"{key} (from {where})")
    return config_class(**checked)


def parse_recipe_args(config_class: type[RecipeConfig], argv: list[str] | None = None) -> RecipeConfig:
    """Fill `config_class` from `--config recipe.yaml` (optional) and `--key value` / `--key=value` overrides.

    Later values win: dataclass defaults, then the YAML file, then the command line in order. `--help` prints every
    option with its type, default and help text.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(_field_help(config_class))
        raise SystemExit(0)
    pairs: list[tuple[str, str]] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        if not token.startswith("--") or token == "--":
            raise RecipeArgumentError(f"Expected an option like --key value, got {token!r}.")
        if "=" in token:
            key, raw = token[2:].split("=", 1)
            index += 1
        else:
            if index + 1 >= len(argv):
                raise RecipeArgumentError(f"Option {token} has no value; write {token} VALUE.")
            key, raw = token[2:], argv[index + 1]
            index += 2
        pairs.append((key.replace("-", "_"), raw))

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, raw in pairs:
        if key != "config":
            continue
        path = Path(raw)
        if not path.is_file():
            raise RecipeArgumentError(f"--config {raw}: no such file.")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise RecipeArgumentError(f"{raw} must hold a YAML mapping of option: value, got {type(loaded).__name__}.")
        values.update(loaded)
        sources.update(dict.fromkeys(loaded, str(path)))
    for key, raw in pairs:
        if key == "config":
            continue
        try:
            values[key] = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise RecipeArgumentError(f"--{key} {raw!r} is not valid YAML: {error}") from error
        sources[key] = "the command line"
    return recipe_config_from_dict(config_class, values, sources)
