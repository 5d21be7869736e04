"""Warning filters for the README examples, which run every package together (readme and build sessions).

Only third-party notices that our code does not cause and cannot avoid are ignored, each matched
by its exact message and category, so anything else, and every warning of ours, still shows.
"""

from __future__ import annotations

import pytest

# `import bitsandbytes` wraps its default ops in torch.compile, whose inductor imports torch 2.13's
# own torch.utils.mkldnn, which still decorates with torch.jit.script_method: a dozen per process.
JIT_NOTICE = "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"

THIRD_PARTY_NOISE = [
    JIT_NOTICE,
    # PEFT 0.21 calls transformers 5's deprecated is_gradient_checkpointing in get_peft_model.
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
]


def pytest_configure(config: pytest.Config) -> None:
    for line in THIRD_PARTY_NOISE:
        config.addinivalue_line("filterwarnings", line)
