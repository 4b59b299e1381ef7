"""Ray Train's per-worker functions, in a module that imports nothing heavy.

Ray pickles a TorchTrainer's function by reference, so every process that unpickles it
(the Train controller as well as the workers) imports the module it lives in. Kept here,
the controller skips transformers, peft and the project's model code: about 5 s of CPU per
fit on a 2-core machine (benchmarks/RESULTS.md). (It still imports torch itself, for Ray's
``TorchConfig``.) The workers import the real loops on their first line.
"""

from __future__ import annotations

from typing import Any


def distill_worker(config: dict[str, Any]) -> None:
    """One distillation stage on this worker: ``pipelines.train_loop.train_loop``."""
    from pipelines.train_loop import train_loop

    train_loop(config)


def pretrain_worker(config: dict[str, Any]) -> None:
    """The shapes bundle's pretraining on this worker: ``pipelines.pretrain.pretrain_loop``."""
    from pipelines.pretrain import pretrain_loop

    pretrain_loop(config)
