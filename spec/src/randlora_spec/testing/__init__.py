"""Test support shared by every package's tests, the conformance suite and the fixture generator.

numpy only, like the rest of randlora-spec (torch is imported lazily where a helper inspects a
torch model):

- :mod:`~randlora_spec.testing.compare`: a driver's outputs against expected values, bit-exact for
  bases and within the declared tolerances otherwise;
- :mod:`~randlora_spec.testing.cases`: golden-style cases built from a layer spec or a checkpoint
  recipe (``tools/make_golden.py`` builds the committed fixtures with them);
- :mod:`~randlora_spec.testing.catalogue`: the error catalogue of ``docs/errors.md`` as data, and
  the check every catalogue test makes;
- :mod:`~randlora_spec.testing.checkout`: files of the source checkout the tests read.
"""

from randlora_spec.testing.cases import LayerSpec, checkpoint_case, checkpoint_inputs, layer_case
from randlora_spec.testing.compare import Comparison, assert_driver_matches, compare_case, compare_outputs

__all__ = [
    "Comparison",
    "LayerSpec",
    "assert_driver_matches",
    "checkpoint_case",
    "checkpoint_inputs",
    "compare_case",
    "compare_outputs",
    "layer_case",
]
