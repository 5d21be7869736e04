"""PEFT's key layout for RandLoRA adapter files, read and written.

Keys understood when reading (``<path>`` is a module path in the base model):

* ``base_model.model.<path>.randlora_lambda`` / ``.randlora_gamma``: per-layer trainable tensors;
* ``base_model.randlora_A`` / ``base_model.randlora_B``: the shared bases (model level);
* ``base_model.model.<path>.randlora_A`` / ``.randlora_B``: PEFT's duplicated per-layer copies of
  the bases (checked elsewhere to be identical to the model-level pair, then dropped);
* any of the above with the adapter name appended (``.randlora_lambda.default``,
  ``base_model.randlora_A.default``), as in state dicts saved by hand or by older tooling; when
  several adapter names occur, the requested one is selected;
* ``base_model.model.<path>.base_layer.bias`` (bias of an adapted layer) and
  ``base_model.model.<path>.bias`` (``bias="all"``), ``base_model.model.<path>.<param>`` for
  ``modules_to_save``.

Writing uses the model-level bases keys and the plain (no adapter name) per-layer keys, which is
what PEFT's ``save_pretrained`` writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.checkpoint import AdapterCheckpoint
from randlora_spec.config import RandLoraConfig
from randlora_spec.errors import CheckpointError

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PICKLE_NAME = "adapter_model.bin"
MODEL_PREFIX = "base_model.model."
BASES_PREFIX = "base_model."
ADAPTER_PARAMS = ("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B")
_LAMBDA, _GAMMA = ADAPTER_PARAMS[:2]


@dataclass
class PeftTensors:
    """The tensors of a PEFT adapter file, sorted by role."""

    lam: dict[str, np.ndarray] = field(default_factory=dict)
    gamma: dict[str, np.ndarray] = field(default_factory=dict)
    bases: dict[str, np.ndarray] = field(default_factory=dict)  # "A"/"B" at model level
    layer_bases: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (path, "A"/"B") copies
    biases: dict[str, np.ndarray] = field(default_factory=dict)
    saved: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    dtype: dict[str, str] = field(default_factory=dict)  # our key -> safetensors dtype code

    def layer_paths(self, source: str) -> list[str]:
        """The adapted module paths, each checked to have both lambda and gamma."""
        paths = sorted(set(self.lam) | set(self.gamma))
        if not paths:
            raise CheckpointError(f"{source}: no randlora_lambda / randlora_gamma tensors; not a RandLoRA adapter")
        for path in paths:
            if path not in self.lam or path not in self.gamma:
                which = "randlora_gamma" if path in self.lam else "randlora_lambda"
                raise CheckpointError(f"{source}: layer {path!r} lacks {which}")
        return paths

    def checkpoint_tensors(self, paths: list[str]) -> dict[str, np.ndarray]:
        """Every non-basis tensor under our checkpoint keys."""
        out: dict[str, np.ndarray] = {}
        for path in paths:
            out[path + spec_ckpt.LAMBDA_SUFFIX] = self.lam[path]
            out[path + spec_ckpt.GAMMA_SUFFIX] = self.gamma[path]
        for path, bias in self.biases.items():
            out[path + ".bias"] = bias
        for path, params in self.saved.items():
            for pname, value in params.items():
                out[f"{path}.{pname}"] = value
        return out


def split_adapter_key(key: str) -> tuple[str, str | None]:
    """Split off an adapter name that follows a RandLoRA parameter name.

    ``x.randlora_A.default`` -> ``("x.randlora_A", "default")``; other keys -> ``(key, None)``.
    """
    head, _, last = key.rpartition(".")
    if head and last not in ADAPTER_PARAMS and head.rpartition(".")[2] in ADAPTER_PARAMS:
        return head, last
    return key, None


def _strip_model_prefix(key: str) -> str:
    return key[len(MODEL_PREFIX) :] if key.startswith(MODEL_PREFIX) else key


def saved_module_split(rest: str, names: list[str] | frozenset[str]) -> tuple[str, str] | None:
    """``(module path, parameter name)`` if ``rest`` lies under a ``modules_to_save`` module.

    A module path matches a name when it equals it or ends with ``"." + name``. Each candidate path's
    dotted suffixes are looked up in a set, so the cost grows with the key's depth, not with the
    number of names (a config may list many).
    """
    wanted = names if isinstance(names, frozenset) else frozenset(names)
    parts = rest.split(".")
    for i in range(1, len(parts)):
        if any(".".join(parts[j:i]) in wanted for j in range(i)):
            return ".".join(parts[:i]), ".".join(parts[i:])
    return None


def _adapter_names(keys: list[str]) -> set[str]:
    return {name for key in keys for name in [split_adapter_key(key)[1]] if name is not None}


def _selected_name(names: set[str], adapter_name: str, source: str) -> str | None:
    """The adapter name to keep when the keys carry several, else ``None`` (keep every key)."""
    if len(names) <= 1:
        return None
    if adapter_name not in names:
        raise CheckpointError(
            f"{source}: keys carry several adapter names {sorted(names)}; none is the requested {adapter_name!r}"
        )
    return adapter_name


class _Sorter:
    """Sorts one file's tensors into a :class:`PeftTensors` (one method per role)."""

    def __init__(self, config: RandLoraConfig, source: str) -> None:
        self.out = PeftTensors()
        self.config = config
        self.source = source
        self.saved_names = frozenset(config.modules_to_save or [])
        self.wrapped: list[tuple[str, str, np.ndarray, str]] = []  # modules_to_save copies inside PEFT's wrapper

    def add(self, key: str, plain: str, value: np.ndarray, code: str) -> None:
        if not (self._adapter_param(key, plain, value, code) or self._saved(key, value, code) or self._bias(key, value, code)):
            raise CheckpointError(f"{self.source}: unexpected tensor {key!r} in a RandLoRA adapter file")

    def _adapter_param(self, key: str, plain: str, value: np.ndarray, code: str) -> bool:
        head, _, param = plain.rpartition(".")
        if param not in ADAPTER_PARAMS:
            return False
        if head in ("base_model", ""):
            if param in (_LAMBDA, _GAMMA):
                raise CheckpointError(f"{self.source}: {key!r} has no module path; lambda/gamma belong to a layer")
            self.out.bases[param[-1]] = value
            self.out.dtype["randlora_" + param[-1]] = code
            return True
        path = _strip_model_prefix(head)
        if param in (_LAMBDA, _GAMMA):
            (self.out.lam if param == _LAMBDA else self.out.gamma)[path] = value
            self.out.dtype[path + "." + param] = code
        else:
            self.out.layer_bases[(path, param[-1])] = value
        return True

    def _saved(self, key: str, value: np.ndarray, code: str) -> bool:
        split = saved_module_split(_strip_model_prefix(key), self.saved_names) if self.saved_names else None
        if split is None:
            return False
        path, pname = split
        if pname.startswith("original_module."):
            return True  # the frozen original (saved incidentally by bias="all"): base-model state, not the adapter's
        if pname.startswith("modules_to_save."):
            self.wrapped.append((path, pname.removeprefix("modules_to_save."), value, code))
            return True
        self.out.saved.setdefault(path, {})[pname] = value
        self.out.dtype[f"{path}.{pname}"] = code
        return True

    def _bias(self, key: str, value: np.ndarray, code: str) -> bool:
        rest = _strip_model_prefix(key)
        if rest != "bias" and not rest.endswith(".bias"):
            return False
        path = rest[: -len(".bias")] if rest != "bias" else ""
        path = path.removesuffix(".base_layer")
        if not path:
            raise CheckpointError(f"{self.source}: bias key {key!r} has no module path")
        if self.config.bias == "none":
            raise CheckpointError(f"{self.source}: bias tensor {key!r} is stored but the adapter config says bias='none'")
        self.out.biases[path] = value
        self.out.dtype[path + ".bias"] = code
        return True

    def merge_wrapped(self, names: set[str], adapter_name: str) -> None:
        """``<path>.modules_to_save[.<adapter>].<param>`` duplicates the trained copy ``<path>.<param>``.

        (``bias="all"`` saves it again.) It must agree, and stands in for it when the plain key is absent.
        """
        for path, rest, value, code in self.wrapped:
            head, _, tail = rest.partition(".")
            candidates = [rest] + ([tail] if tail and (head in names or head in (adapter_name, "default")) else [])
            have = self.out.saved.setdefault(path, {})
            target = next((c for c in candidates if c in have), candidates[-1])
            if target not in have:
                have[target] = value
                self.out.dtype[f"{path}.{target}"] = code
            elif not np_equal_values(have[target], value):
                raise CheckpointError(f"{self.source}: {path}.modules_to_save.{rest} differs from {path}.{target}")


def parse_peft_tensors(
    tensors: dict[str, np.ndarray], dtypes: dict[str, str], config: RandLoraConfig, adapter_name: str, source: str
) -> PeftTensors:
    """Sort a PEFT adapter file's tensors by role (see the module docstring); raises on any key it does not understand."""
    names = _adapter_names(list(tensors))
    wanted = _selected_name(names, adapter_name, source)
    sorter = _Sorter(config, source)
    for key, value in tensors.items():
        plain, name = split_adapter_key(key)
        if wanted is None or name is None or name == wanted:
            sorter.add(key, plain, value, dtypes[key])
    sorter.merge_wrapped(names, adapter_name)
    return sorter.out


def np_equal_values(a: np.ndarray, b: np.ndarray) -> bool:
    """Same shape and values (dtype-independent)."""
    return a.shape == b.shape and bool(np.array_equal(a.astype(np.float64), b.astype(np.float64)))


def peft_keys(ckpt: AdapterCheckpoint, per_layer_bases: bool) -> dict[str, str]:
    """PEFT key -> our checkpoint key for every tensor of ``ckpt`` (``randlora_A`` / ``randlora_B`` for the bases).

    The bases appear once at model level, and also per layer when ``per_layer_bases`` is true.
    """
    keys = {BASES_PREFIX + "randlora_A": spec_ckpt.BASIS_A_KEY, BASES_PREFIX + "randlora_B": spec_ckpt.BASIS_B_KEY}
    for path in sorted(ckpt.layers):
        for suffix in (spec_ckpt.LAMBDA_SUFFIX, spec_ckpt.GAMMA_SUFFIX):
            keys[MODEL_PREFIX + path + suffix] = path + suffix
        if per_layer_bases:
            keys[MODEL_PREFIX + path + ".randlora_A"] = spec_ckpt.BASIS_A_KEY
            keys[MODEL_PREFIX + path + ".randlora_B"] = spec_ckpt.BASIS_B_KEY
    for path in ckpt.biases:
        keys[MODEL_PREFIX + path + (".base_layer.bias" if path in ckpt.layers else ".bias")] = path + ".bias"
    for path, names in ckpt.modules_to_save.items():
        for name in names:
            keys[f"{MODEL_PREFIX}{path}.{name}"] = f"{path}.{name}"
    return keys
