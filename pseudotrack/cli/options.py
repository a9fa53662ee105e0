"""Command-line options read off `RoundConfig`: each labelling option is declared once, in config.py.

`round`, `watch` and `scaling-study` take the round's options from the dataclass fields (name, type,
default and the help in the field's metadata), so they cannot drift apart from each other or from the
config. `with_round_options` adds them to a typer command function; the command receives them as one
dict of RoundConfig keyword arguments (`round_options`) and builds the config where it handles errors.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Iterable
from dataclasses import MISSING, fields
from typing import Annotated, Any

import typer

from ..config import RoundConfig

Verbose = Annotated[bool, typer.Option(help="Show Prefect's logs.")]

ROUND_OPTIONS = "round_options"


def option_name(field_name: str) -> str:
    """The command-line flag of a RoundConfig field: its metadata's `option`, else --field-name."""
    meta = {f.name: f.metadata for f in fields(RoundConfig)}[field_name]
    return meta.get("option") or "--" + field_name.replace("_", "-")


def round_parameters(exclude: Iterable[str] = (), defaults: dict[str, Any] | None = None) -> list[inspect.Parameter]:
    """One keyword-only typer parameter per RoundConfig field (but `exclude`), typed, with default and help.

    defaults: fields whose command-line default differs from the config's (e.g. None for a --bucket that a
    saved config file may give instead); the help says so through the command's own docstring.
    """
    hints = typing.get_type_hints(RoundConfig)
    skipped = set(exclude)
    overrides = defaults or {}
    params = []
    for f in fields(RoundConfig):
        if f.name in skipped:
            continue
        if "help" not in f.metadata:
            raise TypeError(f"RoundConfig.{f.name} has no help in its metadata: add it in config.py")
        kind = hints[f.name]
        if f.name in overrides:
            default = overrides[f.name]
            if default is None:
                kind = kind | None
        elif f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = inspect.Parameter.empty
        option = typer.Option(option_name(f.name), help=f.metadata["help"])
        annotation = Annotated[kind, option]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    return params


def with_round_options(
    exclude: Iterable[str] = (), defaults: dict[str, Any] | None = None
) -> Callable[[Callable], Callable]:
    """Decorator: the command gets RoundConfig's options (after its own) and receives them as `round_options`.

    The decorated function takes a `round_options: dict` parameter; the others are its own options.
    """

    def decorate(fn: Callable) -> Callable:
        own = inspect.signature(fn, eval_str=True)
        if ROUND_OPTIONS not in own.parameters:
            raise TypeError(f"{fn.__name__} must take a {ROUND_OPTIONS!r} parameter")
        extra = round_parameters(exclude, defaults)
        names = [p.name for p in extra]
        clash = set(names) & set(own.parameters)
        if clash:
            raise TypeError(f"{fn.__name__}: options {sorted(clash)} are also RoundConfig fields")
        kept = [p for p in own.parameters.values() if p.name != ROUND_OPTIONS]
        required = [p for p in kept if p.default is inspect.Parameter.empty]
        optional = [p for p in kept if p.default is not inspect.Parameter.empty]
        as_keywords = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in (*required, *optional)]
        params = [*as_keywords[: len(required)], *extra, *as_keywords[len(required) :]]

        @functools.wraps(fn)
        def command(**kwargs):
            options = {name: kwargs.pop(name) for name in names}
            if "teachers" in options:  # a repeatable option arrives as a tuple, or empty when not given
                options["teachers"] = (
                    list(options["teachers"] or []) or RoundConfig.__dataclass_fields__["teachers"].default_factory()
                )
            return fn(**kwargs, **{ROUND_OPTIONS: options})

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # typer must read the signature above, not the function's own
        return command

    return decorate
