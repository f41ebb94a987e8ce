"""User-facing error families.

The library raises these with a message a user can act on (what, where, how to fix); the CLI turns each into
a one-line message and exit code 2. Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import math
import typing
from collections.abc import Mapping
from typing import Any


def reject_unknown_keys(keys, known, label: str = "key", where: str = "") -> None:
    """One message for every mapping a user writes (recipes, study files): name the first unknown key."""
    unknown = sorted(set(keys) - set(known))
    if unknown:
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}unknown {label} {unknown[0]!r}; known keys: {', '.join(sorted(known))}")


def check_types(cls: type, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``values`` converted to the declared types of dataclass ``cls``'s fields, by pydantic's lax rules ("3" is an
    int, 1 a float, a list a tuple, a ``Literal`` one of its choices). A value that does not fit is a one-line
    ``ConfigError`` naming where, the key, the value and what is allowed. Ranges stay with each dataclass."""
    from pydantic import ValidationError

    hints = _field_types(cls)
    out = {}
    for key, value in values.items():
        try:
            out[key] = _adapter(hints[key]).validate_python(value)
        except ValidationError as err:
            problem = err.errors()[0]["msg"]
            raise ConfigError(f"{where}: {key} = {value!r} is not allowed: {problem[:1].lower()}{problem[1:]}"
                              ) from None
        if not _all_finite(out[key]):
            raise ConfigError(f"{where}: {key} = {value!r} is not allowed: give a finite number")
    return out


def _all_finite(value: Any) -> bool:
    """No inf or nan anywhere in ``value``: every setting has a finite range (an infinite budget is ``null``)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (tuple, list)):
        return all(_all_finite(v) for v in value)
    return True


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _adapter(annotation: Any) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(annotation)


class AlternasError(Exception):
    """Base of every error caused by user input rather than by a bug."""

    def one_line(self) -> str:
        """The message a user reads. A DataLoader worker's error comes back wrapped, with the worker's traceback
        in its text; the original message is that traceback's last line."""
        message = str(self)
        if "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        return message


class PlacementError(AlternasError, ValueError):
    """A placement string that cannot describe an AlterNet for the chosen base and image size."""


class ConfigError(AlternasError, ValueError):
    """A bad value in a recipe, study file, search space or command-line option."""


class DataError(AlternasError):
    """A dataset that is missing, malformed or unreachable."""


