"""Where ``torch.compile`` keeps what it compiled: under the cache dir, so it outlives a reboot.

Inductor's default is ``/tmp/torchinductor_<user>``, which many systems empty at boot. A study
resumed after a reboot then compiles every graph again: 22-95 s for each of the first trials of a
Round 2 window on an H100 (results/README.md, session 11), against 2-8 s once the cache held them.
Under ``NKAT_CACHE_DIR`` (else ``~/.cache/nkat-search``, beside the decoded datasets) the resumed
study finds its graphs. A ``TORCHINDUCTOR_CACHE_DIR`` already set wins: the compose file puts it on
its own volume. Inductor keeps its Triton kernels under the same folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from nkat_search.train.sources import cache_dir


def use_persistent_compile_cache() -> Path | None:
    """Point Inductor's cache at ``<cache dir>/compile`` unless one is set; the folder in use.

    Called when a training run starts (``train_model``), before anything imports
    ``torch._dynamo``: that import fixes Inductor's cache dir, and the compile workers inherit it.
    A cache dir that cannot be written (a read-only home) leaves Inductor's default: None.
    """
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        path = cache_dir() / "compile"
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError:
            return None
        if not os.access(path, os.W_OK):
            return None
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
