"""``modules_to_save``: fully trainable per-adapter copies of whole modules (PEFT semantics).

The wrapper keeps the original module (frozen, used when adapters are disabled or when no active
adapter has a copy) and one deep copy per adapter that listed the module. The copy of the first
active adapter that has one runs in forward.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from randlora_core.mixed import mixed_groups, scatter_rows


class ModulesToSaveWrapper(nn.Module):
    """Holds ``original_module`` and ``modules_to_save[adapter_name]`` copies."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.mixed_adapters: list[str] | None = None
        """One adapter name per batch row during a mixed-adapter call (set by the model), else ``None``."""

    def add_adapter(self, adapter_name: str) -> None:
        """Add a trainable copy of the original module for ``adapter_name``."""
        clone = copy.deepcopy(self.original_module)
        clone.requires_grad_(True)
        self.modules_to_save[adapter_name] = clone

    def set_adapter(self, adapter_names: list[str]) -> None:
        """Use the copy of the first of ``adapter_names`` that has one; others are frozen."""
        self.active_adapter = next((n for n in adapter_names if n in self.modules_to_save), None)
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == self.active_adapter)

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop ``adapter_name``'s copy."""
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def active_module(self) -> nn.Module:
        """The module forward runs now."""
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Forward of :meth:`active_module`; in a mixed-adapter call each row comes from its adapter's copy.

        Each copy present runs on the whole batch (its rows are then exactly a single-adapter call's).
        """
        if self.mixed_adapters is None or self.disabled:
            return self.active_module()(*args, **kwargs)
        x = args[0]
        parts, order = [], []
        for name, rows in mixed_groups(self.mixed_adapters, x.device).items():
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            parts.append(module(*args, **kwargs).index_select(0, rows))
            order.append(rows)
        return scatter_rows(parts, order, x.shape[0])
