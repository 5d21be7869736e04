"""Moving arrays between the host (numpy) and JAX without compiling anything.

``jnp.asarray(numpy_array)`` compiles a small program per shape; ``jax.device_put`` does not. Loading
checkpoints and setting values touch many shapes once each, so the difference is most of their time.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def to_device(value: Any, dtype: Any = None) -> jax.Array:
    """``value`` as a JAX array (of ``dtype`` if given); host data is converted on the host first."""
    if isinstance(value, jax.Array):
        return value if dtype is None or value.dtype == np.dtype(dtype) else value.astype(dtype)
    placed: jax.Array = jax.device_put(np.asarray(value, dtype=dtype))
    return placed


def to_host(value: Any) -> np.ndarray:
    """A host (numpy) copy of a JAX array."""
    return np.asarray(jax.device_get(value))
