"""Benchmark randlora-core against Hugging Face PEFT's RandLoRA and LoRA on this machine (issue #6).

Everything is measured in ONE process run so that the ratios compare like with like: for every
configuration all methods are built side by side and their training steps are timed in alternating
order (the order rotates each repeat, so slow drifts of a shared machine hit every method alike);
the report gives per-method medians and ratios of medians.

A training step is forward + backward + AdamW on the trainable (adapter) parameters, with the input
requiring grad (as it does for every layer but the first in a real model). Methods:

- ``floor``: the frozen base model, forward + backward with only the input's gradient. Nothing
  trains, so no adapter method can beat it; it is the floor the targets are stated against.
- ``core-auto`` / ``core-factored`` / ``core-dense``: randlora-core with ``compute`` set to each
  value (only ``core-factored`` when the installed core has no ``compute`` field).
- ``peft-randlora``: PEFT's RandLoRA with the same ``r``.
- ``peft-lora``: PEFT's LoRA with the rank giving about the same number of trainable parameters.

Suites: a grid of stacks of linear layers (``square``: two d x d layers; ``rect``: d -> 4d -> d, i.e.
one layer with in < out and one with in > out), a small Llama-style transformer built from a
``transformers.LlamaConfig`` (random weights, no download), peak memory, merge time, basis
generation throughput and checkpoint sizes. The report goes to ``bench/results/<machine>.md`` with a
PNG plot of step time against tokens and the raw numbers as JSON.

Peak memory on CPU: ``tracemalloc`` does not see torch's allocations, so each (configuration,
method) runs in a fresh child process forked from a "memory server" that has imported everything
but allocated nothing (see :mod:`bench.memory`).

Modules: :mod:`~bench.cases` (what is measured), :mod:`~bench.models` (building and adapting the
models), :mod:`~bench.timing` (interleaved step timing), :mod:`~bench.machine` (a quiet machine,
environment facts), :mod:`~bench.memory` (peak memory), :mod:`~bench.suites` (merge, bases,
checkpoints, ablation), :mod:`~bench.calibration` (the cost model), :mod:`~bench.analysis` (targets
and flop bounds), :mod:`~bench.report` and :mod:`~bench.plot` (the written results),
:mod:`~bench.run` (one full run), :mod:`~bench.core_internals` (every use of randlora-core's
internal modules).

Usage::

    python tools/bench            # full run (~25 min on 2 CPU cores), writes bench/results/
    python tools/bench --smoke    # tiny configuration in seconds, writes to a temp dir
    nox -s bench [-- --smoke]
    python tools/bench --report-from bench/results/cpu-2core.json   # re-render a report
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "bench" / "results"
COMMAND = "tools/bench"
"""How the reports name this benchmark."""
