"""``RandLoraLinear``: a frozen ``nn.Linear`` or Conv1D-like layer plus RandLoRA adapters.

The wrapper holds the base layer as ``base_layer``, and per adapter ``randlora_lambda[name]``
(r, nb), ``randlora_gamma[name]`` (nb, m), a dropout module, ``r`` and ``scaling``. It keeps a
plain reference to the model's shared :class:`~randlora_core.bases.RandLoraBases` (not a
submodule: neither duplicated in ``state_dict`` nor moved per layer) and slices windows on use.

Dtypes follow SPEC.md 5 (float32 lambda/gamma on half-precision bases unless
``autocast_adapter_dtype=False``, as PEFT). Like PEFT's layers, the wrapper exposes its base
layer's ``weight`` and ``bias`` (transformers code reads them: T5 reads ``self.wo.weight.dtype``).

Other base layers (bitsandbytes) override the hooks ``_features``, ``_base_forward``,
``_param_dtype``, ``_dense_weight``, ``_merge_delta``, ``_unmerge_delta``; other layer kinds (SPEC
3.10: :mod:`randlora_core.conv`, :mod:`randlora_core.embedding`) also ``_check_input``,
``_weight_view`` / ``_view_to_storage`` (the weight as ``(O, I)``), ``_apply_weight``,
``_plain_adapted``, ``layer_record``. DoRA (SPEC 3.11) is :mod:`randlora_core.dora` on every kind.

Forward: the layer gathers its operands (the base call; per active adapter its basis windows,
lambda, gamma, scaling and dropout: :meth:`RandLoraLinear.adapter_call`) and hands them to
:func:`randlora_core.engine.layer_forward`, which plans and evaluates the call as one autograd node.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from randlora_core import dora
from randlora_core.bases import RandLoraBases
from randlora_core.compute import Compute, resolve_compute
from randlora_core.engine import layer_forward
from randlora_core.inference_cache import InferenceCache, tensor_key
from randlora_core.layer_view import LinearView
from randlora_core.mixed import mixed_forward
from randlora_core.operands import AdapterCall, BaseCall, LayerInput
from randlora_core.plain import delta_weight
from randlora_core.registry import _register_builtin, is_conv1d_like, linear_features, plain_linear_operands
from randlora_core.sparse import MAX_DENSITY, sparse_density, window_structure
from randlora_spec.bases import num_bases
from randlora_spec.config import RandLoraConfig
from randlora_spec.errors import CheckpointError, MergeError, ShapeError
from randlora_spec.layer_kinds import LINEAR

HALF_DTYPES = (torch.float16, torch.bfloat16)


class RandLoraLinear(LinearView, nn.Module):
    """RandLoRA wrapper around a linear base layer (``nn.Linear``, or Conv1D-like with ``fan_in_fan_out``).

    Args:
        base_layer: the layer to adapt; it is held, never modified except by merging.
        fan_in_fan_out: the base weight is stored ``(in, out)`` (GPT-2 Conv1D) instead of ``(out, in)``.

    """

    layer_kind = LINEAR
    """The layer kind of SPEC 3.10 (what checkpoints record)."""
    applies_dropout = True
    """Whether ``randlora_dropout`` acts on the adapter input (not for index inputs)."""

    _bases: RandLoraBases | None  # set with object.__setattr__, so nn.Module does not register it

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = self._features(base_layer)
        self.randlora_lambda = nn.ParameterDict()
        self.randlora_gamma = nn.ParameterDict()
        self.randlora_dropout = nn.ModuleDict()
        self.randlora_magnitude = nn.ParameterDict()
        """DoRA adapters' magnitude vectors (out_features,), SPEC 3.11."""
        self.use_dora: dict[str, bool] = {}
        self.dora_merges: list[dora.DoraMerge] = []
        """Merges that involved a DoRA adapter, with the factors unmerging needs (in merge order)."""
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.compute: dict[str, Compute] = {}
        """Each adapter's ``compute`` setting (``auto``, ``factored`` or ``dense``), from its config."""
        self.merged_adapters: list[str] = []
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        self.layer_name = ""
        """Dotted path of this layer in the model, for messages (set by the model)."""
        self.inference_cache: InferenceCache | None = None
        """The model's inference cache, when enabled (:meth:`RandLoraModel.enable_inference_cache`)."""
        self.mixed_adapters: list[str] | None = None
        """One adapter name per batch row during a mixed-adapter call (set by the model), else ``None``."""
        object.__setattr__(self, "_bases", None)  # a reference, deliberately not a registered submodule

    # -- hooks for subclasses -------------------------------------------------------------------

    def _features(self, base_layer: nn.Module) -> tuple[int, int]:
        """``(in_features, out_features)`` of the base layer."""
        features = linear_features(base_layer)
        if features is None:
            raise ShapeError(f"cannot read in_features/out_features of {type(base_layer).__name__}")
        return features

    def _base_forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        """The frozen base layer's output; a float input of another dtype is cast to a float weight's dtype first."""
        weight = getattr(self.base_layer, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point() and x.is_floating_point() and x.dtype != weight.dtype:
            x = x.to(weight.dtype)
        out: torch.Tensor = self.base_layer(x, *args, **kwargs)
        return out

    def _param_dtype(self) -> torch.dtype:
        """The base weight's dtype if it is floating point, else float32 (before ``autocast_adapter_dtype``)."""
        weight = getattr(self.get_base_layer(), "weight", None)
        return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32

    def adapter_dtype(self, autocast_adapter_dtype: bool = True) -> torch.dtype:
        """Dtype of new lambda/gamma: :meth:`_param_dtype`, upcast from float16/bfloat16 to float32 when autocasting."""
        dtype = self._param_dtype()
        return torch.float32 if autocast_adapter_dtype and dtype in HALF_DTYPES else dtype

    def _param_device(self) -> torch.device:
        weight = getattr(self.get_base_layer(), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
            return weight.device
        return torch.device("cpu")

    def _base_weight(self) -> torch.Tensor:
        weight = getattr(self.get_base_layer(), "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ShapeError(
                f"layer {self.layer_name!r}: the base layer {type(self.get_base_layer()).__name__} has no weight tensor"
            )
        return weight

    def _dense_weight(self) -> torch.Tensor:
        """The base weight in storage layout as a dense floating tensor (used to check a safe merge)."""
        return self._base_weight()

    def _merge_delta(self, delta: torch.Tensor) -> None:
        """Add ``delta`` (storage layout) to the base weight, cast to the weight dtype first (SPEC 5.4)."""
        weight = self._base_weight()
        with torch.no_grad():  # in place on the parameter, so its version counter (caches) sees the change
            weight.add_(delta.to(device=weight.device, dtype=weight.dtype))

    def _unmerge_delta(self, delta: torch.Tensor) -> None:
        """Subtract ``delta`` (storage layout) from the base weight."""
        weight = self._base_weight()
        with torch.no_grad():
            weight.sub_(delta.to(device=weight.device, dtype=weight.dtype))

    @property
    def supports_dora(self) -> bool:
        """Whether DoRA adapters can be added: the plain weight must be readable and writable (not quantized)."""
        cls = type(self)
        return cls._base_forward is RandLoraLinear._base_forward and cls._merge_delta is RandLoraLinear._merge_delta

    # -- adapters -------------------------------------------------------------------------------

    def get_base_layer(self) -> nn.Module:
        """The wrapped base layer."""
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (as PEFT's layers: transformers code reads ``layer.weight``)."""
        return self._base_weight()

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (``None`` without one)."""
        return getattr(self.get_base_layer(), "bias", None)

    @property
    def bases(self) -> RandLoraBases:
        """The model's shared bases this layer reads from."""
        if self._bases is None:
            raise ShapeError(f"layer {self.layer_name!r} has no shared bases attached")
        return self._bases

    @property
    def merged(self) -> bool:
        """True while any adapter is merged into the base weight."""
        return bool(self.merged_adapters)

    def geometry(self, adapter_name: str) -> tuple[int, int, int, int]:
        """``(r, m, M, nb)`` of ``adapter_name`` on this layer."""
        r = self.r[adapter_name]
        m, big_m = min(self.in_features, self.out_features), max(self.in_features, self.out_features)
        return r, m, big_m, num_bases(m, r)

    def update_layer(
        self,
        adapter_name: str,
        config: RandLoraConfig,
        bases_module: RandLoraBases,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        """Add adapter ``adapter_name`` with ``config``, reading windows of ``bases_module``.

        lambda/gamma start per SPEC 3.8 (``init_weights``) on the base weight's device, in
        :meth:`adapter_dtype`; with ``low_cpu_mem_usage`` they are created empty on the meta device
        (a checkpoint load materialises them).
        """
        r = config.r
        m, big_m = min(self.in_features, self.out_features), max(self.in_features, self.out_features)
        nb = num_bases(m, r)
        have = bases_module.shape
        if have.r < r or have.m_max < m or have.M_max < big_m or have.nb_max < nb:
            raise ShapeError(
                f"layer {self.layer_name!r} ({self.in_features}x{self.out_features}, r={r}) needs bases windows "
                f"A[:{r}, 0, :{m}] and B[:{big_m}, :{nb}, :{r}], but the shared bases are {have}"
            )
        dtype = self.adapter_dtype(autocast_adapter_dtype)
        if low_cpu_mem_usage:
            lam = torch.empty(r, nb, dtype=dtype, device="meta")
            gamma = torch.empty(nb, m, dtype=dtype, device="meta")
        else:
            lam, gamma = _initial_values(r, m, big_m, nb, config.init_weights)
            lam, gamma = (t.to(device=self._param_device(), dtype=dtype) for t in (lam, gamma))
        self.randlora_lambda[adapter_name] = nn.Parameter(lam)
        self.randlora_gamma[adapter_name] = nn.Parameter(gamma)
        p = config.randlora_dropout
        self.randlora_dropout[adapter_name] = nn.Dropout(p) if p > 0 and self.applies_dropout else nn.Identity()
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.randlora_alpha / r
        self.compute[adapter_name] = getattr(config, "compute", "auto")
        object.__setattr__(self, "_bases", bases_module)
        self.use_dora[adapter_name] = bool(getattr(config, "use_dora", False))
        if self.use_dora[adapter_name]:
            magnitude = (
                torch.empty(self.out_features, dtype=dtype, device="meta")
                if low_cpu_mem_usage
                else dora.initial_magnitude(self, adapter_name).to(dtype)
            )
            self.randlora_magnitude[adapter_name] = nn.Parameter(magnitude)

    def set_adapter(self, adapter_names: list[str]) -> None:
        """Make ``adapter_names`` the active adapters (names this layer lacks are skipped in forward).

        DoRA magnitudes train exactly when their adapter is active (the model sets lambda/gamma alike).
        """
        self.active_adapters = list(adapter_names)
        for name, magnitude in self.randlora_magnitude.items():
            magnitude.requires_grad_(name in self.active_adapters)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` from this layer (it must not be merged)."""
        if adapter_name in self.merged_adapters:
            raise MergeError(f"adapter {adapter_name!r} is merged into layer {self.layer_name!r}; unmerge it before deleting")
        for container in (self.randlora_lambda, self.randlora_gamma, self.randlora_dropout, self.randlora_magnitude):
            if adapter_name in container:
                del container[adapter_name]
        self.use_dora.pop(adapter_name, None)
        self.r.pop(adapter_name, None)
        self.scaling.pop(adapter_name, None)
        self.compute.pop(adapter_name, None)
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    # -- forward: gather the operands, let the engine plan and run the call -------------------

    def _compute_dtype(self, names: list[str], device: torch.device) -> torch.dtype:
        """The dtype of the adapter math (SPEC 5.2): lambda's, but float32 for half precision on CPU (as PEFT)."""
        dtype = self.randlora_lambda[names[0]].dtype
        for name in names[1:]:
            dtype = torch.promote_types(dtype, self.randlora_lambda[name].dtype)
        # Half-precision matmuls are slow (and on some CPUs unsupported) on CPU.
        return torch.float32 if device.type == "cpu" and dtype in HALF_DTYPES else dtype

    def adapter_call(self, adapter_name: str, dtype: torch.dtype, device: torch.device) -> AdapterCall:
        """The operands of ``adapter_name`` for one call, in ``dtype`` on ``device``.

        Raises:
            CheckpointError: the adapter's lambda/gamma are still empty (meta device, ``low_cpu_mem_usage``).

        """
        lam, gamma = self.randlora_lambda[adapter_name], self.randlora_gamma[adapter_name]
        if lam.is_meta or gamma.is_meta:
            raise CheckpointError(
                f"adapter {adapter_name!r} on layer {self.layer_name!r} has no weights yet: it was created with "
                "low_cpu_mem_usage=True (on the meta device); load its weights with load_adapter(path, adapter_name) first"
            )
        r, m, big_m, nb = self.geometry(adapter_name)
        a_s, b_flat = self.bases.window(r, m, big_m, nb, dtype, device)
        bases = self.bases
        structure = None
        if bases.kind != "dense" and (
            sparse_density(bases) <= MAX_DENSITY or resolve_compute(self._requested_compute([adapter_name])) == "sparse"
        ):
            values = (tensor_key(bases.randlora_A), tensor_key(bases.randlora_B))
            structure = window_structure(bases, (r, m, big_m, nb, dtype, device), values, a_s, b_flat, nb)
        return AdapterCall(
            a_s=a_s,
            b_flat=b_flat,
            lam=lam if lam.dtype == dtype and lam.device == device else lam.to(device=device, dtype=dtype),
            gamma=gamma if gamma.dtype == dtype and gamma.device == device else gamma.to(device=device, dtype=dtype),
            scaling=self.scaling[adapter_name],
            window=r,  # equal rank on one layer: the same windows of the one shared pair
            dropout=self.randlora_dropout[adapter_name],
            key=(adapter_name, tensor_key(lam), tensor_key(gamma), tensor_key(bases.randlora_A), tensor_key(bases.randlora_B)),
            sparse=structure,
        )

    def delta_view(self, adapter_name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """delta-W of ``adapter_name`` as ``(O, I)`` (SPEC 3.4), in ``dtype``; differentiable in lambda and gamma."""
        op = self.adapter_call(adapter_name, dtype, device)
        return delta_weight(op.a_s, op.b_flat, op.lam, op.gamma, op.scaling, self.in_features <= self.out_features)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """delta-W of ``adapter_name`` in the weight's storage layout, in the adapter's compute dtype.

        Differentiable with respect to lambda and gamma. For a DoRA adapter this is its plain update
        (SPEC 3.11); what merging writes also rescales rows.
        """
        lam = self.randlora_lambda[adapter_name]
        device = self._param_device() if lam.is_meta else lam.device
        return self._view_to_storage(self.delta_view(adapter_name, self._compute_dtype([adapter_name], device), device))

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        """``base(x)`` plus every active, unmerged adapter's output; the result has ``x``'s dtype.

        ``x`` must be a floating tensor (else :class:`DtypeError`); a float dtype other than the
        weight's is computed in the weight's dtype and the result cast back (SPEC 5.3).
        """
        self._check_input(x)
        if self.disable_adapters and self.merged:
            warnings.warn(f"adapters are disabled on {self.layer_name!r} while merged: unmerging them", stacklevel=2)
            self.unmerge()
        call = LayerInput(x, args, kwargs)
        if self.mixed_adapters is not None and not self.disable_adapters:
            return mixed_forward(self, call, self.mixed_adapters)
        return self._adapted(call, [] if self.disable_adapters else self._active_unmerged())

    def _base_output(self, call: LayerInput) -> torch.Tensor:
        """``base(x)`` for this call: the one it carries, else computed now."""
        return call.base_out if call.base_out is not None else self._base_forward(call.x, *call.args, **call.kwargs)

    def _adapted(self, call: LayerInput, names: list[str]) -> torch.Tensor:
        """``base(x)`` plus the adapters ``names`` (held here, unmerged): DoRA ones via :mod:`randlora_core.dora`."""
        if not names:
            return self._finish(call.x, self._base_output(call))
        if any(self.use_dora.get(n, False) for n in names):
            return dora.forward(self, call, names)
        return self._plain_adapted(call, names)

    def _plain_adapted(self, call: LayerInput, names: list[str]) -> torch.Tensor:
        """``base(x)`` plus plain adapters ``names`` through the layer engine."""
        x = call.x
        dtype = self._compute_dtype(names, x.device)
        weight, bias = self._fusable_operands() if call.plain else (None, None)
        run_base = functools.partial(self._base_forward, x, *call.args, **call.kwargs)
        base = BaseCall(run_base, weight, bias, self.fan_in_fan_out, self.inference_cache, id(self))
        adapters = [self.adapter_call(n, dtype, x.device) for n in names]
        compute = self._requested_compute(names)
        return layer_forward(x, base, adapters, self.in_features, self.out_features, compute, call.base_out)

    def _active_unmerged(self) -> list[str]:
        return [n for n in self.active_adapters if n in self.randlora_lambda and n not in self.merged_adapters]

    def _requested_compute(self, names: list[str]) -> Compute:
        """The adapters' ``compute`` for a call: an explicit setting beats ``auto``.

        ``dense`` against ``factored`` gives ``factored``, the path that always applies and needs least memory.
        """
        modes = {self.compute.get(n, "auto") for n in names}
        if len(modes) > 1:
            modes.discard("auto")
        return modes.pop() if len(modes) == 1 else "factored"

    def _fusable_operands(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(weight, bias)`` when the base forward may be replaced by the engine's own matmul, else ``(None, None)``.

        A subclass with its own ``_base_forward`` (quantized layers) always keeps the base layer's call.
        """
        if type(self)._base_forward is not RandLoraLinear._base_forward:
            return None, None
        return plain_linear_operands(self.get_base_layer(), self.fan_in_fan_out)

    # -- merging --------------------------------------------------------------------------------

    def check_merge(self, adapter_names: list[str]) -> None:
        """Raise :class:`MergeError` unless merging ``adapter_names`` gives finite weights (computed on a copy)."""
        with torch.no_grad():
            if any(self.use_dora.get(n, False) for n in adapter_names):
                weight = dora.merged_view(self, adapter_names)[0]
            else:
                weight = self._dense_weight().detach().clone()
                for name in adapter_names:
                    weight += self.get_delta_weight(name).to(device=weight.device, dtype=weight.dtype)
            if not bool(torch.isfinite(weight).all()):
                raise MergeError(
                    f"merging adapter(s) {adapter_names} into layer {self.layer_name!r} would produce NaN or Inf weights; "
                    "nothing was merged (the adapter seems broken)"
                )

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the delta-W of ``adapter_names`` (default: the active ones held here) to the base weight, in order."""
        names = [n for n in (self.active_adapters if adapter_names is None else adapter_names) if n in self.randlora_lambda]
        already = [n for n in names if n in self.merged_adapters]
        if already:
            raise MergeError(f"adapter(s) {already} are already merged into layer {self.layer_name!r}")
        if safe_merge:
            self.check_merge(names)
        if any(self.use_dora.get(n, False) for n in names):
            dora.merge(self, names)  # one merge: W_eff of all of them (SPEC 3.11)
            return
        with torch.no_grad():
            for name in names:
                self._merge_delta(self.get_delta_weight(name))
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's delta-W, in reverse merge order (warns if nothing is merged, like PEFT)."""
        if not self.merged:
            warnings.warn(f"layer {self.layer_name!r}: already unmerged, nothing to do", stacklevel=2)
            return
        with torch.no_grad():
            while self.merged_adapters:
                last = self.dora_merges[-1].names if self.dora_merges else None
                if last is not None and self.merged_adapters[-len(last) :] == last:
                    dora.unmerge_last(self)
                else:
                    self._unmerge_delta(self.get_delta_weight(self.merged_adapters.pop()))

    def extra_repr(self) -> str:
        """Sizes, layout and adapter names."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"fan_in_fan_out={self.fan_in_fan_out}, adapters={list(self.r)}"
        )


def _initial_values(r: int, m: int, big_m: int, nb: int, init_weights: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial lambda (r, nb) and gamma (nb, m) (SPEC 3.8), float32 on CPU."""
    if init_weights:
        return torch.zeros(r, nb), torch.full((nb, m), 1.0 / max(nb, m))
    return torch.randn(r, nb), torch.full((nb, m), 1.0 / big_m)


_register_builtin(nn.Linear, RandLoraLinear)
_register_builtin(is_conv1d_like, RandLoraLinear)
