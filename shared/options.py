"""Declaring a stage option once: default, type, choices and help live in the dataclass field.

`RunConfig` composes the stages' option dataclasses, and the CLI builds its flags from the same
fields (`add_flags` / `from_args`), so a new option is one field plus the code that uses it.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import MISSING, field, fields


def positive(value) -> str | None:
    """A `check` for an option that must be above 0 (None, where the type allows it, is "no limit")."""
    return None if value is None or value > 0 else "must be positive"


def not_negative(value) -> str | None:
    return None if value is None or value >= 0 else "must be 0 or more"


def option(default, help: str, *, choices=None, flag: str | None = None, metavar: str | None = None,
           check=None):
    """A stage option. Lists and tuples are comma lists on the command line; bools are switches
    that are off by default. `check(value)` returns an error message or None."""
    meta = {"help": help, "choices": choices, "flag": flag, "metavar": metavar, "check": check}
    if isinstance(default, (list, dict, set)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta)
    return field(default=default, metadata=meta)


def _base_type(tp):
    """float | None -> float; tuple[str, ...] -> tuple."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return origin or tp


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_flags(parser, options_cls, title: str | None = None) -> None:
    """One flag per field of `options_cls`, in an argument group titled `title`."""
    group = parser.add_argument_group(title) if title else parser
    hints = typing.get_type_hints(options_cls)
    for f in fields(options_cls):
        if "help" not in f.metadata:
            continue
        kind = _base_type(hints[f.name])
        default = f.default if f.default is not MISSING else f.default_factory()
        help_text = f.metadata["help"]
        kwargs = {"dest": f"opt_{options_cls.__name__}_{f.name}", "default": argparse.SUPPRESS}
        if kind is bool:
            group.add_argument(flag_name(f), action="store_true", help=help_text, **kwargs)
            continue
        shown = ",".join(default) if kind in (list, tuple) else default
        if kind in (list, tuple):
            kwargs["type"] = _comma_list
            kwargs["metavar"] = f.metadata.get("metavar") or "A,B"
        else:
            kwargs["type"] = kind
            if not f.metadata.get("choices"):
                kwargs["metavar"] = f.metadata.get("metavar") or {int: "N", float: "X"}.get(kind, "TEXT")
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        help_text += "" if shown in (None, "") else f" (default {shown})".replace("%", "%%")
        group.add_argument(flag_name(f), help=help_text, **kwargs)


def from_args(options_cls, args, **overrides):
    """An `options_cls` from parsed flags: defaults for flags not given, then `overrides`."""
    given = {}
    prefix = f"opt_{options_cls.__name__}_"
    for name, value in vars(args).items():
        if name.startswith(prefix):
            given[name[len(prefix):]] = value
    opts = build(options_cls, {**given, **overrides})
    return opts


def build(options_cls, values: dict):
    """An `options_cls` from a dict (run.json or flags): unknown keys ignored, types normalised,
    each field's check run. A bad value raises ValueError naming the flag."""
    hints = typing.get_type_hints(options_cls)
    known = {f.name for f in fields(options_cls)}
    kwargs = {}
    for name, value in values.items():
        if name not in known:
            continue
        kind = _base_type(hints[name])
        if kind is tuple and value is not None:
            value = tuple(value)
        kwargs[name] = value
    return validate(options_cls(**kwargs))


def validate(opts):
    """Check every field's choices and check; a bad value raises ValueError naming the flag."""
    for f in fields(opts):
        check = f.metadata.get("check")
        choices = f.metadata.get("choices")
        value = getattr(opts, f.name)
        if choices and value not in choices:
            raise ValueError(f"{flag_name(f)} must be one of {', '.join(map(str, choices))}, got {value!r}")
        problem = check(value) if check else None
        if problem:
            raise ValueError(f"{flag_name(f)}: {problem}")
    return opts
