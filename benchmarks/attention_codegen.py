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
import os
import subprocess
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


_CODE: list[str] = []


def _install_probe(interpret: bool = False):
    import torch._inductor.config as inductor_config
    import torch.utils._triton as torch_triton
    from torch._functorch._aot_autograd.utils import make_boxed_func
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner
    from torch._inductor.graph import GraphLowering

    inductor_config.cpu_backend = "triton"
    inductor_config.compile_threads = 1
    inductor_config.force_disable_caches = True  # every graph generated here, not read back
    # Only used for a cache key; asking Triton for its backend needs a driver.
    torch_triton.triton_hash_with_backend = lambda: "0" * 64
    if not hasattr(GraphLowering, "_probe_codegen"):
        GraphLowering._probe_codegen = GraphLowering.codegen

        def codegen(self):
            wrapper, kernels = self._probe_codegen()
            _CODE.append(getattr(wrapper, "value", str(wrapper)))
            return wrapper, kernels

        GraphLowering.codegen = codegen

    if interpret:
        _patch_libdevice_for_the_interpreter()
        return "inductor"

    def inner(gm, example_inputs, **kwargs):
        try:
            return compile_fx_inner(gm, example_inputs, **kwargs)
        except Exception:  # noqa: BLE001 - the kernels cannot compile here; the code is kept
            return make_boxed_func(gm.forward)

    return lambda gm, example_inputs: compile_fx(gm, example_inputs, inner_compile=inner)


def _patch_libdevice_for_the_interpreter() -> None:
    """Triton's interpreter has no libdevice; the few functions the attention layer's kernels
    call get tl.math equivalents (isnan / isinf come from Inductor's guard around x - x)."""
    from torch._inductor.runtime import triton_helpers

    for name, fn in (("exp", _exp), ("log", _log), ("tanh", _tanh), ("isnan", _isnan),
                     ("isinf", _isinf)):
        setattr(triton_helpers.libdevice, name, fn)


# Module level: the interpreter wants triton.language in a jit function's globals.
@triton.jit
def _exp(x):
    return tl.exp(x)


@triton.jit
def _log(x):
    return tl.log(x)


@triton.jit
def _tanh(x):
    return 2 * tl.sigmoid(2 * x) - 1


@triton.jit
def _isnan(x):
    return x != x


@triton.jit
def _isinf(x):
    return (x == float("inf")) | (x == float("-inf"))


def generated_code(fn, *args) -> list[str]:
    """The wrapper code (kernels included) of each graph Inductor generates for fn(*args) and
    its backward, in that order."""
    _CODE.clear()
    torch._dynamo.reset()
    backend = _install_probe()
    out = torch.compile(fn, backend=backend)(*args)
    out.float().square().sum().backward()
    return list(_CODE)


def interpreted(fn):
    """fn compiled by Inductor for the GPU's code generator, its Triton kernels run by Triton's
    interpreter (needs TRITON_INTERPRET=1 before triton is imported: see ``--interpret``)."""
    torch._dynamo.reset()
    return torch.compile(fn, backend=_install_probe(interpret=True))


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


def check_interpreted(tokens: list[int]) -> None:
    """The fused core's generated Triton code, interpreted, against eager PyTorch.

    float32: one layer from its input x (qkv, the core, the modulation), against the eager fused
    and explicit paths, output and every gradient. bf16: the core from bf16 q, k, v, against the
    eager fused core; Triton's interpreter converts float32 to bf16 by truncation where a GPU
    rounds to nearest, so bf16 stores differ by up to one bf16 ulp (0.4 %) there.
    """
    from nkat_search.config import ModelConfig
    from nkat_search.train.attention import fused_attention
    from nkat_search.train.model import NKATAttention

    cfg = ModelConfig(embed_dim=32, num_heads=4, dropout_attn=0.0, nkat_strength=0.3)

    def worst_error(results, reference):
        return max(((a - b).abs().max() / a.abs().max()).item()
                   for a, b in zip(results[reference], results["interpreted"]))

    for n in tokens:
        torch.manual_seed(n)
        attn = NKATAttention(32, 4, layer_index=0, cfg=cfg).train()
        x = torch.randn(2, n, 32)
        x[:, 1::2] = x[:, 1:2]  # tied tokens

        def layer(inp, path, attn=attn):
            q, k, v = attn._qkv(inp)
            if path == "explicit":
                return attn.attend(q, k, v, inp)
            return (fused_attention(q, k, v, attn.scale, attn.top_k, attn.top_p, 0.0)
                    * attn.modulation(inp))

        compiled = interpreted(lambda inp: layer(inp, "fused"))
        results = {}
        for name, fn in (("explicit", lambda inp: layer(inp, "explicit")),
                         ("fused", lambda inp: layer(inp, "fused")), ("interpreted", compiled)):
            attn.zero_grad(set_to_none=True)
            inp = x.clone().requires_grad_()
            out = fn(inp)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            results[name] = [out.detach(), inp.grad] + [
                p.grad for p in attn.parameters() if p.grad is not None]  # proj: unused
        for reference in ("fused", "explicit"):
            print(f"{n} tokens, float32 layer: interpreted Triton vs eager {reference}: max "
                  f"relative error over output and gradients {worst_error(results, reference):.1e}",
                  flush=True)

        q, k, v = torch.randn(3, 2, 4, n, 8).to(torch.bfloat16).unbind(0)
        k[:, :, 1::2] = k[:, :, 1:2]  # tied keys: tied logits
        mod = torch.rand(2, 1, n, 1) + 0.5
        leaves = [t.clone().requires_grad_() for t in (q, k, v, mod)]

        def core(q, k, v, mod):
            return fused_attention(q, k, v, 0.6, 6, 0.8, 0.0) * mod

        compiled = interpreted(core)
        results = {}
        for name, fn in (("fused", core), ("interpreted", compiled)):
            for leaf in leaves:
                leaf.grad = None
            out = fn(*leaves)
            (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            results[name] = [out.detach().float()] + [leaf.grad.float() for leaf in leaves]
        print(f"{n} tokens, bf16 core: interpreted Triton vs eager fused: max relative error over "
              f"output and gradients {worst_error(results, 'fused'):.1e}", flush=True)

    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 4, 65, 8).unbind(0)
    out = interpreted(lambda q, k: fused_attention(q, k, torch.ones(2, 4, 65, 1), 1.0, 1, 1.0,
                                                   0.17))(q, k)
    print(f"dropout 0.17, interpreted: keep rate {(out > 0).float().mean():.4f} of {out.numel()} "
          f"(expected 0.83 +- {(0.17 * 0.83 / out.numel()) ** 0.5:.4f}), kept weights "
          f"{out[out > 0].min():.4f}..{out[out > 0].max():.4f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="*", default=[17, 65, 257])
    parser.add_argument("--interpret", action="store_true",
                        help="run the fused core's generated kernels in Triton's interpreter and "
                             "compare them with eager PyTorch (slow: minutes at 257 tokens)")
    args = parser.parse_args()
    if args.interpret:
        if os.environ.get("TRITON_INTERPRET") != "1":
            # triton.jit reads it when Inductor's helpers are first decorated.
            env = dict(os.environ, TRITON_INTERPRET="1")
            return subprocess.run([sys.executable, __file__, *sys.argv[1:]], env=env).returncode
        check_interpreted(args.tokens)
        return 0
    from nkat_search.config import ModelConfig
    from nkat_search.train.model import NKATAttention

    torch.set_num_threads(1)
    cfg = ModelConfig()  # the baseline: top_k 6, top_p 0.8, strength 0.0024, dropout 0.17
    dim, heads = cfg.embed_dim, cfg.num_heads
    for n in args.tokens:
        for path in ("explicit", "fused"):
            attn = NKATAttention(dim, heads, layer_index=0, cfg=cfg, path=path).train()
            x = torch.randn(2, n, dim, requires_grad=True)

            def layer(inp, attn=attn):
                # q, k, v in bf16 as autocast gives them; the rest as NKATAttention.forward.
                q, k, v = (t.to(torch.bfloat16) for t in attn._qkv(inp))
                if attn.nkat_path() == "fused":
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
