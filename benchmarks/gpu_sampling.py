"""nvidia-smi helpers shared by the benchmarks: GPU names, and utilisation sampled in a thread."""

from __future__ import annotations

import shutil
import subprocess
import threading


def gpu_names() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


class UtilisationSampler:
    """``nvidia-smi`` every second in a thread; ``means()`` is the mean utilisation per GPU.

    utilization.gpu is the share of the sample period in which at least one kernel ran on that
    GPU: it says the GPU was busy, not how much of it was used.
    """

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.samples: dict[int, list[float]] = {}
        self.memory_mib: dict[int, list[float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.available = shutil.which("nvidia-smi") is not None

    def __enter__(self) -> UtilisationSampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                for index, line in enumerate(out.strip().splitlines()):
                    busy, memory = (float(part) for part in line.split(","))
                    self.samples.setdefault(index, []).append(busy)
                    self.memory_mib.setdefault(index, []).append(memory)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass  # one missed sample is not worth stopping the run for
            self._stop.wait(self.interval)

    def means(self) -> dict[int, float]:
        return {i: sum(v) / len(v) for i, v in sorted(self.samples.items()) if v}

    def peak_memory_gib(self) -> dict[int, float]:
        return {i: max(v) / 1024 for i, v in sorted(self.memory_mib.items()) if v}
