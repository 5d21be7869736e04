"""What is measured: the methods, the cases (linear stacks and a small Llama) and the grid of a full run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

METHODS = ("floor", "core-auto", "core-factored", "core-dense", "peft-randlora", "peft-lora")
CORE_COMPUTE = {"core-auto": "auto", "core-factored": "factored", "core-dense": "dense"}

# Grid of issue #6. Dropped: the largest combinations, which alone would take longer than the rest
# of the grid together (about 7 min each for the rect stack at d=2048 and 8192 tokens, see report).
GRID_D = (512, 1024, 2048)
GRID_TOKENS = (128, 512, 2048, 8192)
GRID_R = (8, 32)
GRID_KINDS = ("square", "rect")
DROPPED = {("rect", 2048, 8192), ("square", 2048, 8192)}
LLAMA_GRID = ((512, 512), (512, 2048), (1024, 512), (1024, 2048))  # (hidden size, tokens), r = 32
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class StackCase:
    """A stack of linear layers without nonlinearities: ``square`` d -> d -> d, ``rect`` d -> 4d -> d."""

    kind: str
    d: int
    tokens: int
    r: int
    suite: ClassVar[str] = "stack"

    @property
    def dims(self) -> list[int]:
        """Feature sizes along the stack."""
        return [self.d, self.d, self.d] if self.kind == "square" else [self.d, 4 * self.d, self.d]

    @property
    def label(self) -> str:
        """Short identifier used in logs and tables."""
        return f"stack-{self.kind}-d{self.d}-n{self.tokens}-r{self.r}"


@dataclass(frozen=True)
class LlamaCase:
    """A small Llama-style model: ``layers`` decoder layers of hidden size ``d``, sequences of ``seq`` tokens."""

    d: int
    tokens: int
    r: int
    layers: int = 2
    seq: int = 512
    suite: ClassVar[str] = "llama"

    @property
    def heads(self) -> int:
        """Attention heads (64 features each)."""
        return max(1, self.d // 64)

    @property
    def kv_heads(self) -> int:
        """Key/value heads: grouped-query attention makes the k/v projections d -> d/4."""
        return max(1, self.heads // 4)

    @property
    def label(self) -> str:
        """Short identifier used in logs and tables."""
        return f"llama-d{self.d}-n{self.tokens}-r{self.r}"


Case = StackCase | LlamaCase


def case_from(suite: str, fields: dict[str, Any]) -> Case:
    """The case a ``Row.case`` dict (``dataclasses.asdict`` of a case) of ``suite`` describes."""
    return StackCase(**fields) if suite == StackCase.suite else LlamaCase(**fields)


def case_name(case: dict[str, Any], full: bool = False) -> str:
    """``square d=512`` (tables) or, with ``full``, ``square d=512 tokens=128 r=8`` (lists of points)."""
    name = f"{case.get('kind', 'llama')} d={case['d']}"
    return f"{name} tokens={case['tokens']} r={case['r']}" if full else name


def grid(smoke: bool) -> tuple[list[Case], list[str]]:
    """The cases to time, and the labels of those dropped for time."""
    if smoke:
        return [StackCase("square", 64, 32, 8), StackCase("rect", 64, 128, 8), LlamaCase(64, 64, 8, seq=32)], []
    cases: list[Case] = []
    dropped = []
    for kind in GRID_KINDS:
        for d in GRID_D:
            for tokens in GRID_TOKENS:
                for r in GRID_R:
                    if (kind, d, tokens) in DROPPED:
                        dropped.append(f"{kind} d={d} tokens={tokens} r={r}")
                    else:
                        cases.append(StackCase(kind, d, tokens, r))
    cases += [LlamaCase(d, tokens, 32) for d, tokens in LLAMA_GRID]
    return cases, dropped


def target_shapes(case: Case) -> list[tuple[int, int]]:
    """``(in, out)`` of every adapted linear layer of the case's model, in model order."""
    if isinstance(case, StackCase):
        return list(zip(case.dims[:-1], case.dims[1:], strict=True))
    d, kv = case.d, case.kv_heads * (case.d // case.heads)
    per_layer = [(d, d), (d, kv), (d, kv), (d, d), (d, 4 * d), (d, 4 * d), (4 * d, d)]
    return per_layer * case.layers


def randlora_params_per_layer(in_f: int, out_f: int, r: int) -> int:
    """Trainable parameters of one RandLoRA layer: lambda (r, nb) + gamma (nb, m)."""
    m = min(in_f, out_f)
    nb = -(-m // r)
    return r * nb + nb * m


def lora_rank(case: Case) -> int:
    """LoRA rank whose trainable-parameter count is closest to RandLoRA's on the same layers."""
    shapes = target_shapes(case)
    randlora = sum(randlora_params_per_layer(i, o, case.r) for i, o in shapes)
    per_rank = sum(i + o for i, o in shapes)
    return max(1, round(randlora / per_rank))


def core_supports_compute() -> bool:
    """Whether the installed randlora-spec config has the ``compute`` field (issue #6)."""
    from randlora_spec.config import RandLoraConfig

    return "compute" in RandLoraConfig.model_fields


def available_methods() -> list[str]:
    """The methods this installation can run."""
    if core_supports_compute():
        return list(METHODS)
    return [m for m in METHODS if m not in ("core-auto", "core-dense")]
