"""``modules_to_save``: modules trained in full, one copy per adapter, saved with the adapter.

The wrapper keeps the original module and a clone per adapter that names it; a call runs the clone
of the first active adapter that has one, else the original. The clones' parameters are marked
trainable while their adapter is active.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from randlora_jax.variables import set_trainable


def parameters(module: nnx.Module) -> dict[str, nnx.Variable[Any]]:
    """The ``nnx.Param`` variables of ``module`` by dotted name relative to it (``kernel``, ``norm.scale``)."""
    return {".".join(str(p) for p in path): var for path, var in nnx.iter_graph(module) if isinstance(var, nnx.Param)}


class ModulesToSaveWrapper(nnx.Module):
    """Holds ``original_module`` and an independent trainable copy of it per adapter."""

    def __init__(self, original_module: nnx.Module) -> None:
        self.original_module = original_module
        self.copies: nnx.Dict[nnx.Module] = nnx.Dict()
        self.active_adapters: tuple[str, ...] = ()

    def add(self, name: str) -> None:
        """Give adapter ``name`` its own copy, starting from the original's values."""
        self.copies[name] = nnx.clone(self.original_module)
        self.set_active(self.active_adapters)

    def delete(self, name: str) -> None:
        """Drop adapter ``name``'s copy."""
        if name in self.copies:
            del self.copies[name]
        self.active_adapters = tuple(n for n in self.active_adapters if n != name)

    def set_active(self, names: tuple[str, ...]) -> None:
        """Make the first of ``names`` that has a copy the one in use and trainable."""
        self.active_adapters = tuple(names)
        chosen = self.current_name()
        for name in list(self.copies):
            for var in parameters(self.copies[name]).values():
                set_trainable(var, name == chosen)

    def current_name(self) -> str | None:
        """The adapter whose copy runs, or None for the original."""
        return next((n for n in self.active_adapters if n in self.copies), None)

    def current(self) -> nnx.Module:
        """The module a call runs."""
        name = self.current_name()
        return self.copies[name] if name is not None else self.original_module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the active adapter's copy (or the original)."""
        return self.current()(*args, **kwargs)
