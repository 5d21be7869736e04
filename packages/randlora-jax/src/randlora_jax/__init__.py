"""randlora-jax: RandLoRA for JAX and Flax NNX, written from the RandLoRA specification v1.0.

Quick start::

    from randlora_jax import RandLoraConfig, get_randlora_model, trainable
    model = get_randlora_model(my_nnx_module, RandLoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=trainable)

Bases are bit-identical to every other implementation of the portable rule; checkpoints are the
spec's format v1, so adapters move between JAX and PyTorch (randlora-core). Depends on jax, flax
and randlora-spec only, never on torch.
"""

from randlora_jax.bases import generate_bases, generate_basis
from randlora_jax.checkpoint import load_adapter, save_adapter
from randlora_jax.layer import RandLoraLinear
from randlora_jax.model import RandLoraModel, get_randlora_model
from randlora_jax.modules_to_save import ModulesToSaveWrapper
from randlora_jax.shared import RandLoraBases
from randlora_jax.state import build_checkpoint
from randlora_jax.variables import RandLoraBasis, RandLoraParam, trainable
from randlora_spec import errors as _errors
from randlora_spec.config import RandLoraConfig
from randlora_spec.errors import *  # noqa: F403 - every error class is re-exported

__version__ = "1.0.0"

__all__ = [
    "ModulesToSaveWrapper",
    "RandLoraBases",
    "RandLoraBasis",
    "RandLoraConfig",
    "RandLoraLinear",
    "RandLoraModel",
    "RandLoraParam",
    "build_checkpoint",
    "generate_bases",
    "generate_basis",
    "get_randlora_model",
    "load_adapter",
    "save_adapter",
    "trainable",
]
__all__ += _errors.__all__
