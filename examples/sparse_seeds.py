"""Dense vs very_sparse RandLoRA bases over several projection seeds: per-seed records and their report.

One test accuracy on 1,000 examples has a standard error of ~1.3 points, so a 1-point comparison
between the two basis kinds needs several projection seeds. Besides accuracy, each run records why
very sparse bases can lose capacity: ``A`` is shared by every basis (SPEC 3.1), so a coordinate of
the layers' small side whose ``A`` column is all zero gets no update in any layer.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from randlora_core import RandLoraModel

FINAL_LOSS_STEPS = 20  # the training loss a run ends with: the mean over its last steps


@dataclass
class SeedRun:
    """One RandLoRA fine-tuning run of the dense vs very_sparse comparison."""

    projection_seed: int
    very_sparse: bool
    test_accuracy: float
    final_loss: float  # mean training loss over the last FINAL_LOSS_STEPS steps
    untouched: int  # small-side coordinates no basis reaches (all-zero columns of the A window)
    small_side: int  # m of the narrowest targeted layer (all of MiniLM's have m = 384)
    m_max: int  # of the bases' allocation (SPEC 3.1); very_sparse keeps 1/sqrt(m_max) nonzeros


def untouched_coordinates(model: RandLoraModel, r: int) -> tuple[int, int, int]:
    """All-zero columns of the shared window ``A[:r, 0, :m]`` of the narrowest targeted layer; ``m``; ``m_max``.

    ``delta_W`` is zero on such a small-side coordinate whatever lambda and gamma learn.
    """
    assert model.randlora_bases is not None
    m = min(min(layer.in_features, layer.out_features) for _, layer in model.named_randlora_layers())
    a = model.randlora_bases.randlora_A
    return int((a[:r, 0, :m] == 0).all(0).sum()), m, a.shape[2]


def mean_accuracies(seed_runs: list[SeedRun]) -> tuple[float, float]:
    """Mean test accuracy of the dense runs and of the very_sparse runs."""
    dense = statistics.fmean(r.test_accuracy for r in seed_runs if not r.very_sparse)
    return dense, statistics.fmean(r.test_accuracy for r in seed_runs if r.very_sparse)


def _mean(runs: dict[int, SeedRun], attr: str) -> float:
    return statistics.fmean(getattr(r, attr) for r in runs.values())


def seed_table(seed_runs: list[SeedRun]) -> list[str]:
    """Markdown lines: per projection seed, both accuracies, final losses and untouched coordinates; then means."""
    dense = {r.projection_seed: r for r in seed_runs if not r.very_sparse}
    sparse = {r.projection_seed: r for r in seed_runs if r.very_sparse}
    rows = [
        "| projection seed | dense | very_sparse | difference | final loss dense / very_sparse | untouched coordinates |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for seed, d in dense.items():
        s = sparse[seed]
        rows.append(
            f"| {seed} | {100 * d.test_accuracy:.1f} % | {100 * s.test_accuracy:.1f} % "
            f"| {100 * (s.test_accuracy - d.test_accuracy):+.1f} | {d.final_loss:.3f} / {s.final_loss:.3f} "
            f"| {d.untouched} / {s.untouched} |"
        )
    diffs = [100 * (sparse[seed].test_accuracy - d.test_accuracy) for seed, d in dense.items()]
    stderr = f" ± {statistics.stdev(diffs) / len(diffs) ** 0.5:.1f}" if len(diffs) > 1 else ""
    rows.append(
        f"| mean | {100 * _mean(dense, 'test_accuracy'):.1f} % | {100 * _mean(sparse, 'test_accuracy'):.1f} % "
        f"| {statistics.fmean(diffs):+.1f}{stderr} "
        f"| {_mean(dense, 'final_loss'):.3f} / {_mean(sparse, 'final_loss'):.3f} "
        f"| {_mean(dense, 'untouched'):.0f} / {_mean(sparse, 'untouched'):.0f} |"
    )
    return rows


def seed_section(seed_runs: list[SeedRun], first_seed: int, r: int) -> list[str]:
    """The summary's section: the seed table and what its columns mean."""
    m, m_max = seed_runs[0].small_side, seed_runs[0].m_max
    return [
        "## Dense vs very_sparse bases over projection seeds",
        "",
        *seed_table(seed_runs),
        "",
        f"Both variants train with the same data order, head initialisation and hyperparameters; only "
        f"`projection_prng_key` and the basis kind change (seed {first_seed} is the table's rows above). "
        f"Difference: very_sparse minus dense, in points (mean ± standard error of the paired differences). "
        f"Final loss: mean training loss over the last {FINAL_LOSS_STEPS} steps. Untouched coordinates "
        f"(dense / very_sparse, of the layers' m = {m}): all-zero columns of the shared `A` window "
        f"`A[:r, 0, :m]`, i.e. hidden coordinates that the update of every layer neither reads (`query`, "
        f"`key`, `value`, attention output, intermediate) nor writes (FFN output). The bases are allocated "
        f"with m_max = min(largest in, largest out) = {m_max} (SPEC 3.1), so very_sparse keeps "
        f"1/sqrt({m_max}) = {100 / m_max**0.5:.1f} % nonzeros and leaves about (1 - 1/sqrt({m_max}))^{r} "
        f"= {100 * (1 - m_max**-0.5) ** r:.0f} % of the coordinates untouched.",
        "",
    ]
