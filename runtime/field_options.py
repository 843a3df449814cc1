"""Command-line options declared on dataclass fields: each field made with :func:`option` carries its help
text beside its type and default, so an option is defined once, in the dataclass, and the help shows the default."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Sequence

_KEY = "option"


def comma_list(item: Callable[[str], Any] = int, *, minimum: float | None = None,
               choices: Sequence[str] | None = None) -> Callable[[str], tuple]:
    """An argparse ``type`` for comma-separated values such as ``1,8,64``: a non-empty tuple of ``item``
    values, each at least ``minimum`` (or one of ``choices``); anything else is a usage error naming the value."""
    want = f"at least {minimum:g}" if minimum is not None else "one of " + ", ".join(choices) if choices else ""

    def parse(text: str) -> tuple:
        try:
            values = tuple(item(part.strip()) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__} values, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one value, got {text!r}")
        for v in values:
            if (minimum is not None and v < minimum) or (choices is not None and v not in choices):
                raise argparse.ArgumentTypeError(f"{v!r} in {text!r}: each value must be {want}")
        return values

    return parse


def joined(values: Sequence) -> str:
    """``values`` as :func:`comma_list` reads them back (``1,8,64``), for help texts."""
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _list_type(default: tuple, **checks: Any) -> Callable[[str], tuple]:
    """:func:`comma_list` reading values typed like the items of ``default`` (which must have one)."""
    if not default:
        raise TypeError("a list option needs a non-empty default to take its item type from")
    return comma_list(type(default[0]), **checks)


def add_list_option(parser: argparse.ArgumentParser, flag: str, default: tuple, help: str, *,
                    minimum: float | None = None, choices: Sequence[str] | None = None) -> None:
    """Add ``flag``, read by :func:`comma_list` into a tuple typed like ``default``'s items, its help ending
    with the default."""
    parser.add_argument(flag, type=_list_type(default, minimum=minimum, choices=choices), default=default,
                        help=f"{help} (default {joined(default)})")


def option(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
           flag: str | None = None, shown: str | None = None, why: str = "", **argparse_kwargs: Any) -> Any:
    """A dataclass field with a command-line option: ``help`` (for a bool, what its switch does), ``flag``
    (default ``--<name with dashes>``), ``shown`` in the help instead of the default, ``why`` after it, and
    further ``argparse`` arguments such as ``choices``. A tuple default is read and shown comma-separated."""
    spec = {"help": help, "flag": flag, "shown": shown, "why": why, **argparse_kwargs}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_KEY: spec})


class FieldOptions:
    """The options of dataclass ``cls``: :meth:`add` them to a parser, then :meth:`build` the instance."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self._fields = {f.name: f for f in dataclasses.fields(cls)}
        self._added: set[str] = set()  # the fields that have an option (argparse dest: the field name)

    def default(self, name: str) -> Any:
        """The field's default (a ``default_factory`` is called), None when it has none."""
        f = self._fields[name]
        if f.default is not dataclasses.MISSING:
            return f.default
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else None

    def add(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup, *names: str,
            **argparse_kwargs: Any) -> None:
        """Add the options of fields ``names`` (none: every option field the parser has no option for yet, in
        field order), each typed like its default unless ``type`` is given, its help ending with the default.
        A bool field becomes a switch that turns its default around: ``--no-<name>`` for True, else ``--<name>``."""
        present = {action.dest for action in parser._actions}
        for name in names or [n for n, f in self._fields.items() if _KEY in f.metadata and n not in present]:
            if _KEY not in self._fields[name].metadata:
                raise TypeError(f"{self.cls.__name__}.{name} is not declared with option()")
            self._add(parser, name, {**self._fields[name].metadata[_KEY], **argparse_kwargs})

    def _add(self, parser, name: str, spec: dict[str, Any]) -> None:
        help, flag, shown, why = spec.pop("help"), spec.pop("flag"), spec.pop("shown"), spec.pop("why")
        default = self.default(name)
        self._added.add(name)
        dashed = name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag or (f"--no-{dashed}" if default else f"--{dashed}"), dest=name,
                                action="store_false" if default else "store_true", help=help, **spec)
            return
        if default is not None and "type" not in spec:
            spec["type"] = _list_type(default) if isinstance(default, tuple) else type(default)
        text = shown if shown is not None else joined(default) if isinstance(default, tuple) else joined([default])
        parser.add_argument(flag or f"--{dashed}", dest=name, default=default,
                            help=f"{help} (default {text}{': ' + why if why else ''})", **spec)

    def build(self, args: argparse.Namespace, **values: Any) -> Any:
        """The dataclass from the parsed options added here; ``values`` give the other fields, or override."""
        return self.cls(**{**{name: getattr(args, name) for name in self._added}, **values})
