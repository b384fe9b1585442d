"""Checking configs made from data rather than code (an LDM yaml, the shapes of a checkpoint's tensors, a
diffusers config.json): every field has its annotated type and every size is a positive integer, so a bad value
fails with a message naming the field instead of deep inside a model constructor."""
from __future__ import annotations

import dataclasses
import math
import reprlib
import typing
from typing import Any, Dict, Literal, TypeVar, Union

C = TypeVar("C")


class ConfigError(ValueError):
    """An LDM yaml that does not describe a model we can build."""


def build(klass: Any, values: Dict[str, Any]) -> Any:
    """Construct a config dataclass from a dict, turning lists into tuples; unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(klass)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {klass.__name__} fields: {', '.join(unknown)}")
    tuples = {f.name for f in dataclasses.fields(klass) if "Tuple" in str(f.type)}
    # Only lists: an int stays an int (transformer_depth takes either); validate() judges what is left.
    return klass(**{k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in values.items()})


def validate(cfg: C) -> C:
    """Return `cfg` if every field of it and of its parts has its annotated type and every size is a positive
    integer; raise ConfigError otherwise. For configs made from data rather than code: yamls, the shapes of a
    checkpoint's tensors, diffusers config.json files."""
    _check_fields(cfg)
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        part = getattr(cfg, f.name)
        if dataclasses.is_dataclass(part):  # unet, vae, text and, for SDXL, text2
            _check_fields(part)
    return cfg


# Sizes that may be -1 ("unused": the other of num_heads / num_head_channels fixes the head size).
_MAY_BE_UNSET = {"num_heads", "num_head_channels"}
# Tuples of sizes that may be empty (no attention at any resolution).
_MAY_BE_EMPTY = {"attention_resolutions", "attn_resolutions"}


def _check_fields(obj: Any) -> None:
    """Every field of a config dataclass has its annotated type, and every size is a positive integer.

    A yaml is free text: `model_channels: "320"`, `ch_mult: 4` or `timesteps: .inf` parse fine, and would only
    fail later, deep inside a model constructor, with a message that says nothing about the yaml.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        if not _has_type(value, hint, f.name):
            raise ConfigError(f"{type(obj).__name__}.{f.name} = {reprlib.repr(value)} is not a valid "
                              f"{_type_name(hint)}")


def _has_type(value: Any, hint: Any, name: str) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:  # Optional[X] and "an int or a tuple" (per-level transformer_depth)
        return any(_has_type(value, a, name) for a in args)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin is tuple:
        return isinstance(value, tuple) and (len(value) > 0 or name in _MAY_BE_EMPTY) and \
            all(_has_type(v, int, name) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # bool is an int subclass: `channels: true` is not a size
        return isinstance(value, int) and not isinstance(value, bool) and \
            (value >= 1 or (value == -1 and name in _MAY_BE_UNSET))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is Literal:
        return "choice: one of " + ", ".join(map(repr, typing.get_args(hint)))
    if typing.get_origin(hint) is tuple:
        return "tuple of positive integers"
    return {int: "positive integer", float: "finite number", bool: "boolean"}.get(hint, getattr(hint, "__name__", ""))
