"""Errors of the model library, worded for whoever called it.

drn's messages say what to change. A Python caller changes ``create_model``'s arguments;
a command-line user changes flags. So a message that names an argument keeps it as a
placeholder, and each interface renders the message in its own terms: ``str(exc)`` in
Python's (``num_classes``), ``exc.render(spelling)`` in another's (the drn-label CLI
passes a spelling that says ``--num-classes``).

Placeholders in a template:

- ``{arg:num_classes}``: the argument's name (``num_classes`` / ``--num-classes``);
- ``{list:models}``, ``{list:weights}``: where the interface lists the architectures or
  the released checkpoints (``drn.list_models()`` / ``drn-label models``);
- a value given as ``Setting(argument, value)``: the argument set to that value
  (``create_model('drn_d_38', ...)`` / ``--model drn_d_38``);
- any other ``{name}``: a value given with the error, inserted verbatim.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Callable, Mapping

__all__ = ["ModelError", "Setting", "Spelling", "PYTHON"]


@dataclass(frozen=True)
class Setting:
    """An argument set to a value, spelled by the interface that renders the message."""

    argument: str
    value: str


@dataclass(frozen=True)
class Spelling:
    """How an interface names create_model's arguments and where it lists things."""

    argument: Callable[[str], str]
    setting: Callable[[str, str], str]
    listing: Mapping[str, str]


def _python_argument(name: str) -> str:
    return "create_model's name" if name == "model" else name


def _python_setting(name: str, value: str) -> str:
    return f"create_model({value!r}, ...)" if name == "model" else f"{name}={value!r}"


PYTHON = Spelling(argument=_python_argument, setting=_python_setting,
                  listing={"models": "drn.list_models()",
                           "weights": "drn.checkpoints.RELEASED_WEIGHTS"})
"""The library's own spelling: create_model's keyword arguments."""


class _Placeholder:
    """Marks the `arg` and `list` fields of a template."""

    def __init__(self, kind: str) -> None:
        self.kind = kind


class _Renderer(string.Formatter):
    def __init__(self, spelling: Spelling) -> None:
        self.spelling = spelling

    def format_field(self, value: Any, format_spec: str) -> str:
        if isinstance(value, _Placeholder):
            if value.kind == "arg":
                return self.spelling.argument(format_spec)
            return self.spelling.listing[format_spec]
        if isinstance(value, Setting):
            return self.spelling.setting(value.argument, value.value)
        return super().format_field(value, format_spec)


class ModelError(ValueError):
    """A model cannot be built as asked: the message says what to change.

    ``ModelError("plain text")`` is a literal message; ``ModelError.spelled(template,
    **values)`` keeps placeholders (see the module doc) that ``render`` fills in.
    """

    def __init__(self, message: str, values: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.template = message
        self.values = dict(values) if values is not None else None

    @classmethod
    def spelled(cls, template: str, **values: Any) -> "ModelError":
        return cls(template, values)

    def render(self, spelling: Spelling = PYTHON) -> str:
        if self.values is None:
            return self.template
        return _Renderer(spelling).format(self.template, arg=_Placeholder("arg"),
                                          list=_Placeholder("list"), **self.values)

    def __str__(self) -> str:
        return self.render(PYTHON)

    def __reduce__(self):  # errors cross process boundaries (Ray tasks, actors)
        return type(self), (self.template, self.values)
