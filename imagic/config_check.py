"""Checking configs made from data rather than code (an LDM yaml, the shapes of a checkpoint's tensors, a
diffusers config.json): every field has its annotated type and every size is a positive integer, so a bad value
fails with a message naming the field instead of deep inside a model constructor."""
from __future__ import annotations

import dataclasses
import math
import reprlib
import typing
from typing import Any, Literal, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """An LDM yaml that does not describe a model we can build."""


def validate(cfg: C) -> C:
    """Return `cfg` if every field of it and of its parts has its annotated type and every size is a positive
    integer; raise ConfigError otherwise. For configs made from data rather than code: yamls, the shapes of a
    checkpoint's tensors, diffusers config.json files."""
    for part in (cfg, cfg.unet, cfg.vae, cfg.text):  # type: ignore[attr-defined]
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
    if typing.get_origin(hint) is Literal:
        return "choice: one of " + ", ".join(map(repr, typing.get_args(hint)))
    if typing.get_origin(hint) is tuple:
        return "tuple of positive integers"
    return {int: "positive integer", float: "finite number", bool: "boolean"}.get(hint, getattr(hint, "__name__", ""))
