"""Exception hierarchy shared by every randlora distribution.

All library errors derive from :class:`RandLoraError`, so callers can catch one type. Each concrete
error also derives from the builtin a Python user would expect (``ValueError`` for bad values,
``KeyError`` for unknown names) so existing ``except ValueError`` code keeps working.
"""

from __future__ import annotations

__all__ = [
    "AdapterNotFoundError",
    "BasisRuleError",
    "CheckpointError",
    "ConfigError",
    "DtypeError",
    "MergeError",
    "RandLoraError",
    "ShapeError",
    "TargetModuleError",
]


class RandLoraError(Exception):
    """Root of every exception raised on purpose by randlora packages."""


class ConfigError(RandLoraError, ValueError):
    """A configuration field holds an invalid value; the message names the field."""


class BasisRuleError(RandLoraError, ValueError):
    """A basis-generation rule is unknown or cannot be implemented by this package."""


class CheckpointError(RandLoraError, ValueError):
    """A checkpoint file is malformed, inconsistent, or does not fit the model it is loaded into."""


class ShapeError(RandLoraError, ValueError):
    """Tensor or layer shapes are incompatible with the adapter or the shared bases."""


class AdapterNotFoundError(RandLoraError, KeyError):
    """An adapter name that the model does not hold was requested."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable.
        return str(self.args[0]) if self.args else ""


class TargetModuleError(RandLoraError, ValueError):
    """Target-module selection matched nothing, or matched modules that cannot be adapted."""


class DtypeError(RandLoraError, TypeError):
    """A tensor has a dtype the operation cannot use (for example an integer input to a RandLoRA layer)."""


class MergeError(RandLoraError, RuntimeError):
    """A merge or unmerge request is invalid in the current state (for example merging twice)."""
