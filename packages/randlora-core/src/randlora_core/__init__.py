"""randlora-core: RandLoRA for PyTorch.

Quick start::

    from randlora_core import RandLoraConfig, get_randlora_model
    model = get_randlora_model(my_module, RandLoraConfig(r=8, target_modules=["q_proj", "v_proj"]))

See :mod:`randlora_core.model` for the adapter API, :mod:`randlora_core.peft_api` for the rest of
PEFT's model API (adapter directories, status, base-model state dicts), :mod:`randlora_core.registry`
for the wrapper protocol, :mod:`randlora_core.state` for the in-memory checkpoint seam and
:mod:`randlora_core.checkpoint` for checkpoint files.
"""

from randlora_core.base_state import get_base_model_state_dict, set_base_model_state_dict
from randlora_core.bases import RandLoraBases, generate_bases
from randlora_core.checkpoint import apply_checkpoint, load_adapter, save_adapter
from randlora_core.conv import RandLoraConv
from randlora_core.defaults import DEFAULT_TARGET_MODULES
from randlora_core.embedding import RandLoraEmbedding
from randlora_core.hotswap import hotswap_adapter
from randlora_core.layer import RandLoraLinear
from randlora_core.model import RandLoraModel, get_randlora_model
from randlora_core.modules_to_save import ModulesToSaveWrapper
from randlora_core.registry import is_conv1d_like, register_layer_wrapper
from randlora_core.state import build_checkpoint
from randlora_core.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from randlora_spec import errors as _errors
from randlora_spec.config import RandLoraConfig
from randlora_spec.errors import *  # noqa: F403 - every error class is re-exported

__version__ = "1.0.0"

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "ModulesToSaveWrapper",
    "RandLoraBases",
    "RandLoraConfig",
    "RandLoraConv",
    "RandLoraEmbedding",
    "RandLoraLinear",
    "RandLoraModel",
    "TunerLayerStatus",
    "TunerModelStatus",
    "apply_checkpoint",
    "build_checkpoint",
    "generate_bases",
    "get_base_model_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_randlora_model",
    "hotswap_adapter",
    "is_conv1d_like",
    "load_adapter",
    "register_layer_wrapper",
    "save_adapter",
    "set_base_model_state_dict",
]
__all__ += _errors.__all__
