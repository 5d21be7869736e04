"""randlora-spec: the RandLoRA specification as code.

The config schema, the portable basis rule, the float64 reference implementation, the checkpoint
format, declared tolerances, golden cases and the conformance driver interface. Depends only on
numpy and pydantic; it never imports torch.
"""

from randlora_spec.bases import PEFT_RULE, PORTABLE_RULE, generate_bases
from randlora_spec.config import SPEC_VERSION, RandLoraConfig
from randlora_spec.errors import (
    AdapterNotFoundError,
    BasisRuleError,
    CheckpointError,
    ConfigError,
    DtypeError,
    MergeError,
    RandLoraError,
    ShapeError,
    TargetModuleError,
)
from randlora_spec.geometry import BasesShape, LayerGeometry, allocation, bases_shape_for_layers, num_bases, shape_of_bases
from randlora_spec.tolerances import TOLERANCES, Tolerance, check_close, tolerance

__version__ = "1.0.0"

__all__ = [
    "PEFT_RULE",
    "PORTABLE_RULE",
    "SPEC_VERSION",
    "TOLERANCES",
    "AdapterNotFoundError",
    "BasesShape",
    "BasisRuleError",
    "CheckpointError",
    "ConfigError",
    "DtypeError",
    "LayerGeometry",
    "MergeError",
    "RandLoraConfig",
    "RandLoraError",
    "ShapeError",
    "TargetModuleError",
    "Tolerance",
    "allocation",
    "bases_shape_for_layers",
    "check_close",
    "generate_bases",
    "num_bases",
    "shape_of_bases",
    "tolerance",
]
