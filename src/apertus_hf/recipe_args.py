"""Typed dataclasses filled from a YAML recipe and `--key value` overrides.

`transformers.HfArgumentParser` (and TRL's `TrlParser` on top of it) cannot express fields such as a list of data
sources (a list of mappings), and it ignores unknown YAML keys silently. Recipes here need both, so this small parser
reads the dataclass fields and their `help` metadata directly: recipe defaults first, then the YAML file, then the
command line, each value parsed as YAML (`--lr 3e-4`, `--goldfish false`, `--data '[{path: corpus/, weight: 2}]'`)
and checked against the field's type. One recipe can fill several dataclasses (the post-training recipes fill their
own small one and a TRL config such as `SFTConfig`, as alignment-handbook's scripts do): each key goes to the one
dataclass that has it. Unknown keys are errors that suggest the nearest field of any of them.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import sys
import types
import typing
from collections.abc import Mapping, Sequence
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
    """`value` checked against `annotation`; ints are accepted for floats, values for enums. Raises
    RecipeArgumentError. Types this does not know (a class of a library's own) take only their own instances."""
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
    elif isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        # transformers' option enums (IntervalStrategy, SchedulerType, ...) are written by their values; YAML 1.1
        # reads their "no" (`--eval_strategy no`) as false.
        choices = {member.value for member in annotation}
        if value is False and "no" in choices:
            return annotation("no")
        if isinstance(value, (str, int)) and value in choices:
            return annotation(value)
    elif isinstance(annotation, type) and isinstance(value, annotation):
        return value
    raise RecipeArgumentError(f"{where}={value!r} is not a valid {_type_name(annotation)}.")


def _options(config_class: type) -> list[dataclasses.Field]:
    """The fields of `config_class` that its constructor takes."""
    return [field for field in dataclasses.fields(config_class) if field.init]


def _own_options(config_class: type) -> list[dataclasses.Field]:
    """The options `config_class` adds to the dataclasses it extends."""
    inherited = {
        field.name for base in config_class.__mro__[1:] if dataclasses.is_dataclass(base) for field in _options(base)
    }
    return [field for field in _options(config_class) if field.name not in inherited]


def _option_help(
    field: dataclasses.Field, hints: dict[str, Any], defaults: Mapping[str, Any], help_overrides: Mapping[str, str]
) -> list[str]:
    # transformers escapes `%` in its help texts for argparse.
    help_text = help_overrides.get(field.name, field.metadata.get("help", "").replace("%%", "%"))
    if field.name in defaults:
        default = defaults[field.name]
    elif field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        return [f"  --{field.name} ({_type_name(hints[field.name])}, required)", f"      {help_text}"]
    if isinstance(default, enum.Enum):
        default = default.value
    return [f"  --{field.name} ({_type_name(hints[field.name])}, default {default!r})", f"      {help_text}"]


def recipe_help(
    config_classes: Sequence[type],
    defaults: Mapping[str, Any] | None = None,
    documentation: Mapping[type, str] | None = None,
    description: str | None = None,
    help_overrides: Mapping[str, str] | None = None,
) -> str:
    """The text of `--help`: usage, `--config`, then the options of each class with the recipe's `defaults`. A class
    in `documentation` (a TRL or transformers config of 100+ fields) gets a pointer to its documentation and only the
    options the recipe sets and the ones the class adds to what it extends. `help_overrides` replaces the help text
    of options whose meaning the recipe changes."""
    defaults = defaults or {}
    documentation = documentation or {}
    help_overrides = help_overrides or {}
    prog = Path(sys.argv[0]).as_posix() if sys.argv and sys.argv[0] else "recipe"
    lines = [f"usage: {prog} [--config RECIPE.yaml] [--key value ...]", ""]
    if description:
        lines += [description.strip(), ""]
    lines += [
        "Options are the keys of the --config file or --key value / --key=value on the command line; values are "
        "parsed as YAML ('[a, b]', '{k: v}', null, true). Later ones win: the recipe's defaults, the file, then the "
        "command line.",
        "",
        "  --config RECIPE.yaml",
        "      A YAML recipe: a mapping of option: value, e.g. one of recipes/configs/<size>/.",
    ]
    for config_class in config_classes:
        hints = typing.get_type_hints(config_class)
        if config_class in documentation:
            shown = [field for field in _options(config_class) if field.name in defaults]
            own = [field for field in _own_options(config_class) if field.name not in defaults]
            lines += [
                "",
                f"Options of {config_class.__name__}: all of its fields, see {documentation[config_class]}",
                "Those this recipe sets:",
            ]
            lines += [line for field in shown for line in _option_help(field, hints, defaults, help_overrides)]
            if own:
                lines += [f"Those {config_class.__name__} adds to the transformers TrainingArguments it extends:"]
                lines += [line for field in own for line in _option_help(field, hints, defaults, help_overrides)]
        else:
            lines += ["", f"Options of {config_class.__name__}:"]
            lines += [
                line
                for field in _options(config_class)
                for line in _option_help(field, hints, defaults, help_overrides)
            ]
    return "\n".join(lines)


def recipe_configs_from_dict(
    config_classes: Sequence[type],
    values: Mapping[str, Any],
    source: str | Mapping[str, str] = "the recipe",
) -> tuple:
    """Build one instance of each of `config_classes` from `values`, each key going to the class that has it.

    Names and types are checked; `source` names where the values came from (one name, or one per key) for the error
    messages. Two classes must not share a field name: every option has one owner.
    """
    owners: dict[str, type] = {}
    for config_class in config_classes:
        for field in _options(config_class):
            if field.name in owners:
                raise TypeError(
                    f"Option {field.name!r} is a field of both {owners[field.name].__name__} and "
                    f"{config_class.__name__}; a recipe option must have one owner."
                )
            owners[field.name] = config_class
    hints = {config_class: typing.get_type_hints(config_class) for config_class in config_classes}
    checked: dict[type, dict[str, Any]] = {config_class: {} for config_class in config_classes}
    for key, value in values.items():
        where = source if isinstance(source, str) else source.get(key, "the recipe")
        if key not in owners:
            close = difflib.get_close_matches(key, list(owners), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else " `--help` lists the options."
            raise RecipeArgumentError(f"Unknown option {key!r} in {where}.{hint}")
        owner = owners[key]
        checked[owner][key] = _coerce(value, hints[owner][key], f"{key} (from {where})")
    return tuple(config_class(**checked[config_class]) for config_class in config_classes)


def recipe_config_from_dict(
    config_class: type[RecipeConfig], values: Mapping[str, Any], source: str | Mapping[str, str] = "the recipe"
) -> RecipeConfig:
    """Build `config_class` from `values`, checking names and types (see `recipe_configs_from_dict`)."""
    return recipe_configs_from_dict([config_class], values, source)[0]


def read_recipe_args(argv: Sequence[str] | None, help_text: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The values of `--config recipe.yaml` (optional) and the `--key value` / `--key=value` overrides in `argv`
    (default: `sys.argv[1:]`), later ones winning, and where each came from (the file's path or "the command line").
    `-h`/`--help` prints `help_text` and exits."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text)
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
    return values, sources


def parse_recipe_configs(
    config_classes: Sequence[type],
    argv: Sequence[str] | None = None,
    *,
    defaults: Mapping[str, Any] | None = None,
    documentation: Mapping[type, str] | None = None,
    description: str | None = None,
) -> tuple:
    """Fill one instance of each of `config_classes` from `--config recipe.yaml` (optional) and `--key value`
    overrides (default: `sys.argv[1:]`); each key goes to the class that has it.

    Later values win: the dataclass defaults, then `defaults` (the recipe's own defaults for fields of the classes),
    then the YAML file, then the command line in order. `--help` prints a usage line, `description`, and the options
    (see `recipe_help` for the classes named in `documentation`).
    """
    defaults = dict(defaults or {})
    values, sources = read_recipe_args(argv, recipe_help(config_classes, defaults, documentation, description))
    return recipe_configs_from_dict(
        config_classes, defaults | values, {**dict.fromkeys(defaults, "the recipe's defaults"), **sources}
    )


def parse_recipe_args(
    config_class: type[RecipeConfig], argv: Sequence[str] | None = None, *, description: str | None = None
) -> RecipeConfig:
    """Fill `config_class` from `--config recipe.yaml` (optional) and `--key value` / `--key=value` overrides (see
    `parse_recipe_configs`). `--help` prints every option with its type, default and help text."""
    return parse_recipe_configs([config_class], argv, description=description)[0]
