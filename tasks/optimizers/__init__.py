"""Optimizers behind one interface (`tasks.optimizers.base.Optimizer`)."""

from __future__ import annotations

from tasks.optimizers.base import CompileRequest, IterationEvent, Optimizer, OptimizeResult


def get_optimizer(name: str) -> Optimizer:
    if name == "mipro":
        from tasks.optimizers.mipro import MiproOptimizer

        return MiproOptimizer()
    if name == "capacity":
        from tasks.optimizers.capacity import CapacityOptimizer

        return CapacityOptimizer()
    from tasks.spec import KNOWN_OPTIMIZERS

    if name in KNOWN_OPTIMIZERS:
        raise NotImplementedError(f"optimizer {name!r} is not available yet")
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(KNOWN_OPTIMIZERS)}")


__all__ = ["CompileRequest", "IterationEvent", "OptimizeResult", "Optimizer", "get_optimizer"]
