"""What one worker process keeps between training runs: datasets on the device, the compiled model.

A search trial trains 3 or 4 runs (CIFAR-10, then the Stage 2 datasets) and a worker trains many
trials. Without this every run read its dataset from the cache files again and compiled its model
afresh (``torch._dynamo.reset()`` and a new ``torch.compile``), about 30 s on an H200 for the
baseline, against 36 s of CIFAR-10 training. The session keeps:

- every dataset it loaded, on its device, keyed by everything that shapes it (a dataset that could
  not be loaded is remembered too, so a missing EMNIST is not looked for again every trial);
- the last compiled model and its compiled forward. A run whose model has the same architecture,
  input channels and classes (MNIST after Fashion-MNIST in Stage 2, or a retried trial) gets the
  same module back with freshly initialised weights copied in place: the compiled code and its
  CUDA graphs, which hold the parameters' addresses, stay valid, so nothing is compiled again.
  Another architecture drops it (and Dynamo's state), so stale graphs and their memory pools do
  not pile up.

Nothing here imports Optuna; the trainer takes a session through ``TrainOptions``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from nkat_search.train.data import load_dataset
from nkat_search.train.sources import DataError, resolve_data_dir


@dataclass
class CompiledModel:
    key: str
    model: nn.Module
    forward: Callable


class TrainingSession:
    """Datasets and the last compiled model of one process (see the module docstring)."""

    def __init__(self) -> None:
        self._datasets: dict[tuple, object] = {}
        self._compiled: CompiledModel | None = None
        self.compiles = 0
        self.reuses = 0

    def dataset(self, name: str, data_dir, device: torch.device, **shape) -> object:
        """``load_dataset(name, data_dir, device, **shape)``, loaded once per process.

        A ``DataError`` is remembered and raised again, so a dataset missing on this host costs
        one look, not one per trial.
        """
        key = (name, str(resolve_data_dir(data_dir)), str(device), *sorted(shape.items()))
        if key not in self._datasets:
            try:
                self._datasets[key] = load_dataset(name, data_dir, device, **shape)
            except DataError as err:
                self._datasets[key] = err
        found = self._datasets[key]
        if isinstance(found, Exception):
            raise found
        return found

    def compiled_model(self, key: dict, build: Callable[[], nn.Module],
                       compile_fn: Callable[[nn.Module], Callable]) -> tuple[nn.Module, Callable, bool]:
        """``(model, forward, reused)`` for an architecture ``key``; ``build()`` makes a fresh model.

        ``build`` must be seeded by the caller: on reuse its fresh weights are copied into the
        kept module, so the run starts from exactly the weights a fresh build would have.
        """
        text = json.dumps(key, sort_keys=True, default=str)
        fresh = build()
        if self._compiled is not None and self._compiled.key == text:
            with torch.no_grad():
                self._compiled.model.load_state_dict(fresh.state_dict())
            self.reuses += 1
            return self._compiled.model, self._compiled.forward, True
        self.release_model()
        self._compiled = CompiledModel(text, fresh, compile_fn(fresh))
        self.compiles += 1
        return fresh, self._compiled.forward, False

    def release_model(self) -> None:
        """Drop the compiled model and Dynamo's compiled code (and with them the CUDA graphs)."""
        self._compiled = None
        torch._dynamo.reset()

    def describe(self) -> dict:
        return {"datasets": len(self._datasets), "compiles": self.compiles, "reuses": self.reuses}
