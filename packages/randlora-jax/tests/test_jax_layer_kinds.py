"""randlora-jax computes linear layers without DoRA: it refuses other checkpoints (catalogue row ERR-368)
and its drivers skip the golden cases of other layer kinds and DoRA with the reason.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from randlora_jax import load_adapter
from randlora_jax.driver import JaxDriver
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.config import RandLoraConfig
from randlora_spec.driver import Unsupported
from randlora_spec.golden import load_cases
from randlora_spec.testing import catalogue
from randlora_spec.testing.kind_cases import KindSpec, kind_checkpoint_inputs


class Net(nnx.Module):
    def __init__(self) -> None:
        self.fc1 = nnx.Linear(12, 6, rngs=nnx.Rngs(0))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc1(x)


def _state(model: nnx.Module) -> list[tuple[str, bytes]]:
    return [
        (".".join(map(str, p)), np.asarray(v.get_value()).tobytes())
        for p, v in nnx.iter_graph(model)
        if isinstance(v, nnx.Variable)
    ]


def test_err_368_a_dora_checkpoint_is_refused(tmp_path: Path) -> None:
    config = RandLoraConfig(r=2, target_modules=["fc1"], use_dora=True)
    ckpt, _, _ = kind_checkpoint_inputs("jax", config, {"fc1": KindSpec("fc1", "linear", 6, {}, in_features=12)})
    path = tmp_path / "dora.safetensors"
    spec_ckpt.save(path, ckpt, readable_features=spec_ckpt.ALL_FEATURES)
    model = Net()
    catalogue.check_row("ERR-368", lambda: load_adapter(model, path), model, tmp_path, state=_state)


def test_driver_skips_other_kinds_and_dora_with_the_reason() -> None:
    wanted = ("forward-conv2d-float32", "backward-dora-in-lt-out-float64", "checkpoint-dora-without-bases")
    cases = [c for c in load_cases() if c.id in wanted]
    assert len(cases) == 3
    for case in cases:
        result = JaxDriver().run(case)
        assert isinstance(result, Unsupported) and "randlora-jax adapts nnx.Linear" in result.reason
