"""The kernels Inductor generates for one NKAT attention layer (forward + backward), without a GPU.

Inductor's GPU code generator (Triton, SIMD scheduling) also serves CPU tensors when
``cpu_backend = "triton"``; its fusion decisions are the ones a GPU gets. Without a Triton driver
the generated kernels cannot compile, so this probe takes each graph's generated code, then runs
that graph eagerly so that the backward graph gets generated too. It lists, per direction, the
Triton kernels (with their reduction count and the N x N buffers they read and write) and the
extern calls (matmuls, topk, sort), for the explicit and the fused path. CPU only, for reading the
fusion, not the speed; it patches two Inductor internals (names below) and may need updating with
torch. bf16 q, k, v as under autocast; dropout on; the modulation on.

    python benchmarks/attention_codegen.py [--tokens 17 65 257]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


_CODE: list[str] = []


def _install_probe():
    import torch._inductor.config as inductor_config
    import torch.utils._triton as torch_triton
    from torch._functorch._aot_autograd.utils import make_boxed_func
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner
    from torch._inductor.graph import GraphLowering

    inductor_config.cpu_backend = "triton"
    inductor_config.compile_threads = 1
    # Only used for a cache key; asking Triton for its backend needs a driver.
    torch_triton.triton_hash_with_backend = lambda: "0" * 64
    if not hasattr(GraphLowering, "_probe_codegen"):
        GraphLowering._probe_codegen = GraphLowering.codegen

        def codegen(self):
            wrapper, kernels = self._probe_codegen()
            _CODE.append(getattr(wrapper, "value", str(wrapper)))
            return wrapper, kernels

        GraphLowering.codegen = codegen

    def inner(gm, example_inputs, **kwargs):
        try:
            return compile_fx_inner(gm, example_inputs, **kwargs)
        except Exception:  # noqa: BLE001 - the kernels cannot compile here; the code is kept
            return make_boxed_func(gm.forward)

    return lambda gm, example_inputs: compile_fx(gm, example_inputs, inner_compile=inner)


def generated_code(fn, *args) -> list[str]:
    """The wrapper code (kernels included) of each graph Inductor generates for fn(*args) and
    its backward, in that order."""
    _CODE.clear()
    torch._dynamo.reset()
    backend = _install_probe()
    out = torch.compile(fn, backend=backend)(*args)
    out.float().square().sum().backward()
    return list(_CODE)


def summarise(code: str, elements: int, n: int) -> list[str]:
    """One line per launched kernel or extern call, in launch order; a Triton kernel that walks
    all ``elements`` (batch x heads x N x N, or N times that) says how many tensors it loads and
    stores."""
    kernels = {}
    for match in re.finditer(r"def (triton_\w+)\((.*?)\):\n(.*?)'''", code, re.S):
        name, body = match.group(1), match.group(3)
        meta = re.search(rf"'kernel_name': '{name}'.*?'num_load': (\d+), 'num_store': (\d+), "
                         rf"'num_reduction': (\d+)", code, re.S)
        sizes = [int(s) for s in re.findall(r"(?:xnumel|r0_numel) = (\d+)", body)]
        walked = 1
        for size in sizes:
            walked *= size
        kernels[name] = (meta.groups() if meta else ("?", "?", "?"), walked)
    call = code[code.index("def call("):]
    lines = []
    for line in call.splitlines():
        line = line.strip()
        launch = re.match(r"(triton_\w+)\.run\(", line)
        if launch:
            name = launch.group(1)
            (loads, stores, reductions), walked = kernels.get(name, (("?",) * 3, 0))
            shape = {elements: "N x N", elements * n: "N x N x N"}.get(walked)
            what = f"{shape}: {loads} loads, {stores} stores" if shape else "small"
            lines.append(f"triton  {reductions:>2} reductions  {what:<26} {name[:60]}")
        else:
            op = re.match(r"(?:\w+ = )?(extern_kernels\.\w+|torch\.ops\.aten\.\w+)\.?\w*\(", line)
            if op:
                lines.append(f"extern  {op.group(1)}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="*", default=[17, 65, 257])
    args = parser.parse_args()
    from nkat_search.config import ModelConfig
    from nkat_search.train.model import NKATAttention

    torch.set_num_threads(1)
    cfg = ModelConfig()  # the baseline: top_k 6, top_p 0.8, strength 0.0024, dropout 0.17
    dim, heads = cfg.embed_dim, cfg.num_heads
    for n in args.tokens:
        for path in ("explicit", "fused"):
            attn = NKATAttention(dim, heads, layer_index=0, cfg=cfg).train()
            attn.path = path
            x = torch.randn(2, n, dim, requires_grad=True)

            def layer(inp, attn=attn):
                # q, k, v in bf16 as autocast gives them; the rest as NKATAttention.forward.
                q, k, v = (t.to(torch.bfloat16) for t in attn._qkv(inp))
                if attn.uses_fused(q):
                    from nkat_search.train.attention import fused_attention

                    out = fused_attention(q, k, v, attn.scale, attn.top_k, attn.top_p,
                                          attn.attn_drop_p) * attn.modulation(inp)
                else:
                    out = attn.attend(q, k, v, inp)
                return out

            graphs = generated_code(layer, x)
            print(f"== {n} tokens, {path}: {len(graphs)} graphs (forward, backward)")
            for direction, code in zip(("forward", "backward"), graphs):
                for line in summarise(code, x.shape[0] * heads * n * n, n):
                    print(f"   {direction:<8} {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
