"""Command-line options for the fields of a dataclass: each option takes its type and default from its field,
so every default is defined once, in the dataclass, and the help shows it."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any


class FieldOptions:
    """Options of one dataclass ``cls``; :meth:`add` one per field, then :meth:`build` the instance."""

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

    def add(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, help: str, *,
            flag: str | None = None, shown: str | None = None, why: str = "", **kwargs: Any) -> None:
        """Add the option of field ``name``: ``flag`` (default ``--<name with dashes>``), typed like the default
        unless ``type`` is given, its help ending with the default (``shown`` instead, ``why`` after it).
        A bool field becomes a switch that turns its default around: ``--no-<name>`` for True, else ``--<name>``."""
        default = self.default(name)
        self._added.add(name)
        dashed = name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag or (f"--no-{dashed}" if default else f"--{dashed}"), dest=name,
                                action="store_false" if default else "store_true", help=help, **kwargs)
            return
        if default is not None and "type" not in kwargs:
            kwargs["type"] = type(default)
        text = shown if shown is not None else f"{default:g}" if isinstance(default, float) else str(default)
        parser.add_argument(flag or f"--{dashed}", dest=name, default=default,
                            help=f"{help} (default {text}{': ' + why if why else ''})", **kwargs)

    def build(self, args: argparse.Namespace, **values: Any) -> Any:
        """The dataclass from the parsed options added here; ``values`` give the other fields, or override."""
        return self.cls(**{**{name: getattr(args, name) for name in self._added}, **values})
