"""User-facing error families.

The library raises these with a message a user can act on (what, where, how to fix); the CLI turns each into
a one-line message and exit code 2. Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations


def reject_unknown_keys(keys, known, label: str = "key", where: str = "") -> None:
    """One message for every mapping a user writes (recipes, study files): name the first unknown key."""
    unknown = sorted(set(keys) - set(known))
    if unknown:
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}unknown {label} {unknown[0]!r}; known keys: {', '.join(sorted(known))}")


class AlternasError(Exception):
    """Base of every error caused by user input rather than by a bug."""


class PlacementError(AlternasError, ValueError):
    """A placement string that cannot describe an AlterNet for the chosen base and image size."""


class ConfigError(AlternasError, ValueError):
    """A bad value in a recipe, study file, search space or command-line option."""


class DataError(AlternasError):
    """A dataset that is missing, malformed or unreachable."""


class StudyLockedError(AlternasError):
    """Another process holds the study folder."""
