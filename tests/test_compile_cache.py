"""Where torch.compile's code goes (train/compile_cache.py): the cache dir, unless one is set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = ("from nkat_search.train.compile_cache import use_persistent_compile_cache; "
         "import os; print(use_persistent_compile_cache(), os.environ.get('TORCHINDUCTOR_CACHE_DIR'))")


def _probe(env: dict) -> str:
    base = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                            timeout=60, cwd=REPO, env=base | env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_compile_cache_goes_under_the_cache_dir_unless_inductor_has_one(tmp_path):
    cache = tmp_path / "cache"
    assert _probe({"NKAT_CACHE_DIR": str(cache)}) == f"{cache}/compile {cache}/compile"
    assert (cache / "compile").is_dir()
    own = tmp_path / "inductor"
    assert _probe({"NKAT_CACHE_DIR": str(cache),
                   "TORCHINDUCTOR_CACHE_DIR": str(own)}) == f"{own} {own}"


def test_an_unwritable_cache_dir_leaves_inductor_its_default(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert _probe({"NKAT_CACHE_DIR": str(blocked)}) == "None None"
