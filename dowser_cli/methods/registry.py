"""The registries of interchangeable methods and what an entry of each looks like; the methods
themselves (methods.masks, methods.finetuning, methods.merges) register into them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

from dowser_cli.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind, self._items = kind, {}

    def register(self, name: str, item: T) -> T:
        self._items[name] = item
        return item

    def get(self, name: str, option: str) -> T:
        if name not in self._items:
            raise UserError(f"{option} {name!r}: unknown {self.kind}; available: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return list(self._items)


@dataclass(frozen=True)
class MaskStrategy:
    """``score(weight [out, in], factors, generator)`` returns non-negative scores [out, in]; the
    ratio's k LOWEST become trainable, or, with ``invert``, the k highest (freezing the least
    important: an ablation). ``factors``: the names of the probe's tensors the score reads (psi
    [P, out], act [P, in], act_sq [B, in]), given to it as {name: tensor}; empty when it reads none.
    ``from_dense(weight, importance [out, in], generator)``: the same scores from dense importance
    scores (`import-scores`); None when the strategy needs the factors themselves."""

    name: str
    score: Callable
    factors: tuple[str, ...] = ()
    invert: bool = False
    help: str = ""
    from_dense: Callable | None = None

    @property
    def needs_factors(self) -> bool:
        return bool(self.factors)


MASK_STRATEGIES: Registry[MaskStrategy] = Registry("mask strategy")


@dataclass(frozen=True)
class FinetuneMethod:
    """A way to fine-tune the selected layers. ``make(lm, cfg)`` returns the run's hooks (an object
    with the interface of ``methods.finetuning.MethodRun``); ``mask``: "required" | "forbidden" | "optional";
    ``distributed``: whether it runs under torchrun (DDP / FSDP); ``snapshots``: whether its trained
    values make a delta before the run ends (PEFT tuners merge only at the end)."""

    name: str
    make: Callable
    mask: str
    distributed: bool
    help: str = ""
    snapshots: bool = True


# filled by dowser_cli.methods.finetuning (imported by the finetune stage)
FINETUNE_METHODS: Registry[FinetuneMethod] = Registry("fine-tuning method")


@dataclass(frozen=True)
class MergeMethod:
    """A post-hoc baseline of `dowser merge`: ``apply(ctx)`` gets a `dowser_cli.merge.MergeContext`
    (base and fine-tuned values of the run's tensors, the targeted decoder linears, calibration and
    loss helpers) and returns ({target name: `merge.Patch`}, method statistics for run.yaml).
    Tensors it does not return keep the run's delta unchanged."""

    name: str
    apply: Callable
    needs_data: bool
    help: str = ""


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method")
