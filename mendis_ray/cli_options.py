"""Command-line options generated from a config dataclass (no copies of the settings).

A field of a config dataclass made with ``mendis_ray.config._setting`` carries its help
(and optionally ``choices`` and ``flag``) in its metadata; :func:`add_config_options`
turns each such field into one ``--option`` whose ``dest`` is the field name and whose
default is the field's, and :func:`config_from_args` builds the dataclass back from the
parsed namespace.  ``mendis score`` takes every :class:`~mendis_ray.config.ScoreConfig`
field this way, ``mendis serve`` the ones Serve shares (:data:`SERVE_SCORE_FIELDS`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable

__all__ = [
    "SERVE_SCORE_FIELDS",
    "add_config_options",
    "at_least",
    "config_from_args",
    "option_flag",
]

#: the ScoreConfig fields that are also Serve arguments (``ServeArgs``)
SERVE_SCORE_FIELDS = ("marginal", "range_sigma", "max_masked_fraction", "profile_steps")


def at_least(kind: type, low: float, *, equal: bool = True) -> Callable[[str], float]:
    """argparse type: a finite number of ``kind`` >= ``low`` (> ``low`` without ``equal``).
    A count or scale out of range (``--epochs -1``, ``--lr 0``) used to run and write an
    untrained model with exit status 0, or fail later with a traceback."""

    def parse(text: str) -> float:
        value = kind(text)
        if not ((value >= low if equal else value > low) and math.isfinite(value)):
            word = "at least" if equal else "above"
            raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number, {word} {low:g}")
        return value

    parse.__name__ = kind.__name__  # argparse: "invalid int value: 'x'"
    return parse


def option_flag(f: dataclasses.Field) -> str:
    """The ``--flag`` of a config field: its ``flag`` metadata, else ``--field-name``."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _scalar_type(annotation: object) -> type:
    """``int`` for ``int`` or ``int | None`` (likewise float, str, bool)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return annotation  # type: ignore[return-value]


def add_config_options(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    keep_defaults: bool = True,
) -> None:
    """Add one option per documented field of the dataclass ``cls`` (those in ``only``
    if given) to ``parser``: ``dest`` the field name, type and choices from the field,
    default the field's (with ``keep_defaults=False``: None, i.e. "not given"); a bool
    field is a ``store_true`` switch."""
    hints = typing.get_type_hints(cls)
    base = cls()
    wanted = None if only is None else set(only)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata or (wanted is not None and f.name not in wanted):
            continue
        default = getattr(base, f.name) if keep_defaults else None
        kind = _scalar_type(hints[f.name])
        kw: dict = {"dest": f.name, "default": default, "help": f.metadata["help"]}
        if kind is bool:
            kw["action"] = "store_true"
        else:
            kw["type"] = kind
            if "choices" in f.metadata:
                kw["choices"] = list(f.metadata["choices"])
        parser.add_argument(option_flag(f), **kw)


def config_from_args(cls: type, args: argparse.Namespace, **changes: object):
    """The dataclass ``cls`` from the options :func:`add_config_options` added (fields
    the namespace lacks, or holds as None where the field's default is not None, keep
    their defaults), then ``changes``."""
    base = cls()
    values = {}
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None or getattr(base, f.name) is None:
            values[f.name] = v
    return dataclasses.replace(base, **values, **changes)
