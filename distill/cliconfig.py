"""Typed configuration from command-line flags and YAML files, validated by pydantic.

A pydantic model is the single source of truth: every leaf field becomes a dotted flag
(`--optim.lr`, `--teacher.kind`, Bittensor style), its description is the `--help` text, Literal
fields become choices. Values come from the model's defaults, then a YAML file (`--config`), then
flags, and the merged result is validated once; errors name the field, what was wrong and the value.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration that does not validate; the message lists every problem."""


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected JSON, got {text!r} ({e.msg})") from e


def _parse_optional(inner, none_words=("none", "null")):
    def parse(text: str):
        return None if text.lower() in none_words else inner(text)

    parse.__name__ = getattr(inner, "__name__", "value")
    return parse


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], prefix: str = "") -> None:
    """Add one flag per leaf field of `model` (recursively for nested models) to `parser`."""
    group = parser.add_argument_group(prefix.rstrip(".") or "options") if prefix else parser
    for name, field in model.model_fields.items():
        annotation, optional = _unwrap_optional(field.annotation)
        dotted = f"{prefix}{name}"
        if _is_model(annotation):
            add_model_flags(parser, annotation, prefix=f"{dotted}.")
            continue
        help_text = (field.description or "").rstrip(".")
        if field.is_required():
            suffix = "required"
        else:
            default = field.get_default(call_default_factory=True)
            suffix = f"default: {default.value if hasattr(default, 'value') else default!r}"
        help_text = f"{help_text} ({suffix})" if help_text else suffix
        kwargs: dict[str, Any] = {"dest": dotted, "default": argparse.SUPPRESS, "help": help_text}
        if annotation is not bool:
            kwargs["metavar"] = name.upper()
        flag = f"--{dotted}"
        origin = get_origin(annotation)
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            choices = list(get_args(annotation))
            kwargs["choices"] = choices
            kwargs["type"] = type(choices[0]) if choices else str
        elif origin in (list, tuple):
            (item,) = get_args(annotation)[:1] or (str,)
            kwargs["nargs"] = "+"
            kwargs["type"] = item if item in (int, float, str) else str
        elif origin is dict or annotation in (dict, Any):
            kwargs["type"] = _parse_json
            kwargs["metavar"] = "JSON"
        elif annotation in (int, float, str):
            kwargs["type"] = annotation
        elif annotation is Path:
            kwargs["type"] = str
            kwargs["metavar"] = "PATH"
        else:
            kwargs["type"] = str
        if optional and "type" in kwargs and "nargs" not in kwargs:
            # "none" may itself be a choice (position_mode none): then only "null" means unset.
            words = ("null",) if "none" in kwargs.get("choices", ()) else ("none", "null")
            kwargs["type"] = _parse_optional(kwargs["type"], words)
            if "choices" in kwargs:
                kwargs["choices"] = [*kwargs["choices"], None]
        group.add_argument(flag, **kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[leaf] = value


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"config file {path} does not exist") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(config)"
        got = item.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  --{where}: {item['msg']}{shown}")
    return "invalid configuration:\n" + "\n".join(lines)


def build_config(model: type[M], namespace: argparse.Namespace, yaml_path: str | None = None) -> M:
    """Defaults < YAML file < flags, validated once. Raises ConfigError with every problem listed."""
    return build_layered_config(model, namespace, yaml_path=yaml_path)


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> typing.Iterator[tuple[str, Any]]:
    for name, field in model.model_fields.items():
        annotation, _ = _unwrap_optional(field.annotation)
        if _is_model(annotation):
            yield from _leaf_fields(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", annotation


def env_name(prefix: str, dotted: str) -> str:
    """`Q24_` + `wallet.name` -> `Q24_WALLET__NAME` (a double underscore separates sections)."""
    return prefix + dotted.upper().replace(".", "__")


def env_overrides(model: type[BaseModel], prefix: str, environ: typing.Mapping[str, str]) -> dict[str, Any]:
    """{dotted field: value} for every leaf field of `model` set in `environ` as `env_name(prefix, field)`.
    Text fields keep the raw string; others are read as a YAML scalar or list (`24`, `true`, `[a, b]`)
    and validated with everything else. Unknown variables under `prefix` are an error, so a typo is
    not silently ignored."""
    import yaml

    fields = dict(_leaf_fields(model))
    known = {env_name(prefix, dotted): dotted for dotted in fields}
    unknown = sorted(k for k in environ if k.startswith(prefix) and k not in known)
    if unknown:
        raise ConfigError(
            f"unknown environment variable(s) {', '.join(unknown)}; settings are named like "
            f"{next(iter(known), prefix + 'NAME')} (see --help for the fields)"
        )
    out: dict[str, Any] = {}
    for var, dotted in known.items():
        if var not in environ:
            continue
        raw = environ[var]
        if fields[dotted] in (str, Path) or get_origin(fields[dotted]) is Literal:
            out[dotted] = raw
            continue
        try:
            out[dotted] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"environment variable {var}={raw!r} is not a readable value: {e}") from e
    return out


def build_layered_config(
    model: type[M],
    namespace: argparse.Namespace,
    *,
    yaml_path: str | None = None,
    env_prefix: str | None = None,
    environ: typing.Mapping[str, str] | None = None,
) -> M:
    """Defaults < YAML file < environment (`env_prefix`) < flags, validated once."""
    import os

    data: dict[str, Any] = load_yaml(yaml_path) if yaml_path else {}
    if env_prefix:
        for dotted, value in env_overrides(
            model, env_prefix, os.environ if environ is None else environ
        ).items():
            _set_dotted(data, dotted, value)
    for dotted, value in sorted(vars(namespace).items()):
        if "." in dotted or dotted in model.model_fields:
            _set_dotted(data, dotted, value)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
