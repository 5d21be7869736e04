"""Entry-point discovery of layer wrappers (group ``randlora.layers``), with a real installed-style plugin."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

PLUGIN = """
import torch
from torch import nn
from randlora_core import RandLoraLinear, register_layer_wrapper

class ScaledLinear(nn.Linear):
    '''A Linear subclass that the built-in nn.Linear wrapper would also accept.'''

class ScaledWrapper(RandLoraLinear):
    def _base_forward(self, x, *args, **kwargs):
        return 2 * self.base_layer(x, *args, **kwargs)

def register():
    register_layer_wrapper(ScaledLinear, ScaledWrapper)

def broken():
    raise RuntimeError("plugin exploded")
"""

SCRIPT = """
import warnings
import torch
from torch import nn
from randlora_core import RandLoraConfig, get_randlora_model
from fakeplugin import ScaledLinear, ScaledWrapper

net = nn.ModuleDict({"a": ScaledLinear(4, 6), "b": nn.Linear(4, 6)})
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = get_randlora_model(net, RandLoraConfig(r=2, target_modules=["a", "b"]))
assert type(model.model.a) is ScaledWrapper, type(model.model.a)
assert type(model.model.b).__name__ == "RandLoraLinear"
x = torch.randn(3, 4)
assert torch.equal(model.model.a(x), 2 * net.a.base_layer(x))
assert any("plugin 'zz_broken'" in str(w.message) and "exploded" in str(w.message) for w in caught), caught
print("ok")
"""


def test_entry_point_plugin_is_loaded_lazily(tmp_path: Path) -> None:
    (tmp_path / "fakeplugin.py").write_text(textwrap.dedent(PLUGIN))
    dist = tmp_path / "fakeplugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[randlora.layers]\nscaled = fakeplugin:register\nzz_broken = fakeplugin:broken\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
