"""Registers and spills of the attention kernel's sm_90 programs, without a GPU.

Triton compiles each program of ``nkat_search/train/attention_kernel.py`` for sm_90 (bf16, head
dims up to 64 padded to 64, the module's default tiles, dropout on) and its bundled ptxas reports
what the program uses (``ptxas -v``): registers a thread, and the bytes spilled to local memory
when 255 registers are not enough. Spills are loads and stores to memory in the inner loops, so
a program that spills a lot is a suspect before any timing; the timing itself is
``attention_kernel_check.py``'s, on a GPU. Each program at 4 and 8 warps, with key tiles of 64
and 32 (the timing's tile choices; query tiles stay 64). ``--bwd-block-m 32`` adds the programs
that loop over query tiles inside a key block (dK / dV) and the sparse slots program at that
query tile (``kernel_attention``'s ``bwd_block_m``).

    python benchmarks/kernel_registers.py [--warps 4 8] [--block-n 64 32] [--bwd-block-m 32]
        [--out FILE.json]

Runs on the CPU (Triton's compiler needs no GPU). The numbers depend on the Triton version (its
code generator and bundled ptxas), which the JSON records.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402

from nkat_search.atomic import write_text_atomic  # noqa: E402
from nkat_search.train import attention_kernel as ak  # noqa: E402

POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
FLOAT_BUFFERS = {"THR", "LSE", "DELTA", "DQ_ACC", "KNOBS", "PS", "DSS", "WS"}


def compile_for_hopper(fn, dtype: str, constexprs: dict, num_warps: int):
    """Triton's compiler on one kernel for sm_90, no GPU needed: the compiled program, whose
    ``asm`` holds its PTX (and catches what the interpreter lets through: loop-carried type
    changes, layouts, shared memory)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = f"*{dtype}"
        elif name in FLOAT_BUFFERS:
            signature[name] = "*fp32"
        elif name in ("IDX", "COUNT"):
            signature[name] = "*i32"
        elif name == "SEED":
            signature[name] = "*i64"
        else:
            signature[name] = "i32"
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps})


def hopper_tiles() -> dict:
    """The launch constants every kernel shares, at the module's defaults (head dim 64)."""
    return dict(BLOCK_M=ak.BLOCK_M, BLOCK_N=ak.BLOCK_N, BLOCK_D=64, TAIL=ak.TAIL_BLOCK,
                ROUNDS=ak.PHILOX_ROUNDS, PRECISION="tf32", SKIP_EMPTY=ak.SKIP_EMPTY_TILES)


def dense_kv() -> dict:
    """The key-block kernel's constants for the split and atomic backward (no slots)."""
    return dict(SPARSE=False, S=ak.SPARSE_SLOTS)


def programs() -> dict[str, tuple]:
    """name -> (kernel, constexprs): every program a training step with top_k launches."""
    tiles = hopper_tiles()
    forward = dict(TOP_K=6, TOPK_ON=True, NUCLEUS_ON=True, LEVELS=6, LEVELS_PAD=8, DROPOUT=True)
    return {
        "forward": (ak._fwd_kernel, dict(forward, **tiles)),
        "backward dK dV, atomic": (ak._bwd_kv_kernel,
                                   dict(DROPOUT=True, ATOMIC_DQ=True, **dense_kv(), **tiles)),
        "backward dK dV, split": (ak._bwd_kv_kernel,
                                  dict(DROPOUT=True, ATOMIC_DQ=False, **dense_kv(), **tiles)),
        "backward dQ, split": (ak._bwd_q_kernel, dict(DROPOUT=True, **tiles)),
        "backward slots, sparse": (ak._bwd_slots_kernel,
                                   dict(tiles, S=ak.SPARSE_SLOTS, DROPOUT=True)),
        "backward dK dV, sparse": (ak._bwd_kv_kernel,
                                   dict(tiles, S=ak.SPARSE_SLOTS, DROPOUT=True, SPARSE=True,
                                        ATOMIC_DQ=True)),
    }


# The programs whose query tile is bwd_block_m when it is given (attention_kernel.BWD_BLOCK_M).
BWD_BLOCK_M_PROGRAMS = ("backward dK dV, atomic", "backward dK dV, split",
                        "backward slots, sparse", "backward dK dV, sparse")


def ptxas_tool():
    """Triton's bundled ptxas (the one that builds its cubins); its lookup changed across
    Triton versions."""
    from triton.backends.nvidia import compiler

    try:
        return compiler.get_ptxas(90)
    except TypeError:
        return compiler.get_ptxas()


def ptxas_usage(ptx: str, ptxas: str) -> dict:
    """Registers, spill stores / loads and stack frame (bytes) that ``ptxas -v`` reports."""
    arch = re.search(r"^\.target (\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        report = subprocess.run([ptxas, f"-arch={arch}", "-v", str(path), "-o", "/dev/null"],
                                capture_output=True, text=True, check=True).stderr

    def number(pattern: str) -> int:
        match = re.search(pattern, report)
        return int(match.group(1)) if match else 0

    return {"arch": arch, "registers": number(r"Used (\d+) registers"),
            "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"),
            "stack_frame": number(r"(\d+) bytes stack frame")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--block-n", type=int, nargs="+", default=[64, 32],
                        help="key tile sizes (powers of two from 16)")
    parser.add_argument("--bwd-block-m", type=int, nargs="*", default=[],
                        help="also the dK / dV and slots programs at these query tiles")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    tool = ptxas_tool()
    compiled_programs = programs()
    every = [(name, ak.BLOCK_M) for name in compiled_programs]
    every += [(name, block_m) for block_m in args.bwd_block_m for name in BWD_BLOCK_M_PROGRAMS]
    rows = []
    for name, block_m in every:
        fn, constexprs = compiled_programs[name]
        for block_n in args.block_n:
            for warps in args.warps:
                tiles = dict(BLOCK_M=block_m, BLOCK_N=block_n,
                             TAIL=min(constexprs["TAIL"], block_m))
                compiled = compile_for_hopper(fn, "bf16", dict(constexprs, **tiles), warps)
                row = {"program": name, "block_m": block_m, "block_n": block_n, "warps": warps,
                       "shared_bytes": compiled.metadata.shared,
                       **ptxas_usage(compiled.asm["ptx"], tool.path)}
                rows.append(row)
                print(f"{name:<24} {block_m}x{block_n:<2} w{warps}  registers "
                      f"{row['registers']:>3}  spill stores {row['spill_stores']:>5} B  loads "
                      f"{row['spill_loads']:>5} B  shared {row['shared_bytes']:>6} B", flush=True)
    result = {"triton": triton.__version__, "ptxas": tool.version,
              "conditions": f"sm_90, bf16, head dim padded to 64, query tiles {ak.BLOCK_M} "
                            "(but where block_m says otherwise), "
                            f"tail tiles {ak.TAIL_BLOCK}, dropout on, top_k 6, "
                            f"{ak.SPARSE_SLOTS} sparse slots",
              "rows": rows}
    if args.out:
        write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
