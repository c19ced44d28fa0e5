"""Optimizers behind one interface (`tasks.optimizers.base.Optimizer`)."""

from __future__ import annotations

from tasks.optimizers.base import (
    CompileRequest,
    CycleStopped,
    IterationEvent,
    Optimizer,
    OptimizeResult,
)


def get_optimizer(name: str) -> Optimizer:
    if name == "mipro":
        from tasks.optimizers.mipro import MiproOptimizer

        return MiproOptimizer()
    if name == "gepa":
        from tasks.optimizers.gepa import GepaOptimizer

        return GepaOptimizer()
    if name == "genetic":
        from tasks.optimizers.genetic import GeneticOptimizer

        return GeneticOptimizer()
    if name == "capacity":
        from tasks.optimizers.capacity import CapacityOptimizer

        return CapacityOptimizer()
    from tasks.cycle.spec import KNOWN_OPTIMIZERS

    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(KNOWN_OPTIMIZERS)}")


__all__ = [
    "CompileRequest",
    "CycleStopped",
    "IterationEvent",
    "OptimizeResult",
    "Optimizer",
    "get_optimizer",
]
