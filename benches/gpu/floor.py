#!/usr/bin/env python3
"""The floor of a QLoRA training step in bf16 on this GPU, measured with the fastest library kernels.

Issue 10 asks for >= 1.5x Unsloth's QLoRA tokens/s. Every bf16 QLoRA step without activation
checkpointing (peftpipe's and Unsloth's, as measured by engine.sh) must at least:
  * multiply every frozen base linear and the head forward (Y = X W^T) and back to the input
    (dX = dY W): 2 x 2 x tokens x params FLOPs, in bf16 on the tensor cores;
  * run causal attention forward and backward;
and, in every stack that exists today (bitsandbytes, Unsloth, PEFT, peftpipe), dequantize each 4-bit
weight to bf16 once forward and once backward.
This script times exactly that work, nothing else (no LoRA, norms, RoPE, SwiGLU, loss, optimizer),
with PyTorch's kernels: cuBLAS(Lt) for the GEMMs, the fastest SDPA backend available (flash /
cuDNN / efficient) for attention, and bitsandbytes' dequantize_4bit (NF4, double quant). The sum is a
lower bound on any such step on this GPU with these kernels; a stack 1.5x Unsloth's tokens/s must run
its whole step in Unsloth's step / 1.5.

usage: python3 floor.py --shape 8b|1b [--batch B --seq T] [--reps N] [--fp8] [--json FILE]
"""
import argparse
import json
import statistics
import sys

import torch

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, head_dim, vocab
    "8b": dict(hidden=4096, inter=14336, layers=32, heads=32, kv=8, head_dim=128, vocab=128256,
               batch=1, seq=4096),
    "1b": dict(hidden=2048, inter=8192, layers=16, heads=32, kv=8, head_dim=64, vocab=128256,
               batch=8, seq=512),
}


def timed(fn, reps, warmup=2):
    """Median milliseconds of fn() over reps, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times), max(times)


def linears(s):
    h, i, d, kv = s["hidden"], s["inter"], s["head_dim"], s["kv"]
    # (name, in_features, out_features), one decoder layer, in forward order
    return [("q", h, s["heads"] * d), ("k", h, kv * d), ("v", h, kv * d), ("o", s["heads"] * d, h),
            ("gate", h, i), ("up", h, i), ("down", i, h)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("--fp8", action="store_true", help="also time the GEMMs on FP8 tensor cores")
    args = ap.parse_args()
    s = dict(SHAPES[args.shape])
    if args.batch:
        s["batch"] = args.batch
    if args.seq:
        s["seq"] = args.seq
    tokens = s["batch"] * s["seq"]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    bf = torch.bfloat16
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; shape {args.shape} "
          f"{s['batch']}x{s['seq']} ({tokens} tokens)")
    res = {"shape": args.shape, "batch": s["batch"], "seq": s["seq"],
           "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}

    # 0. The tensor cores' sustained rate on one large square GEMM (clock and power context).
    n = 8192
    a, b = torch.randn(n, n, device=dev, dtype=bf), torch.randn(n, n, device=dev, dtype=bf)
    ms, _, _ = timed(lambda: torch.mm(a, b), 20)
    res["square_8192_tflops"] = 2 * n ** 3 / ms / 1e9
    print(f"square 8192^3 bf16 GEMM: {ms:.3f} ms = {res['square_8192_tflops']:.0f} TFLOP/s")
    del a, b

    # 1. The frozen base's GEMMs (every layer's own weights, as in a step) and the head's.
    layer = linears(s)
    weights = [[torch.randn(o, i, device=dev, dtype=bf) * 0.02 for (_, i, o) in layer]
               for _ in range(s["layers"])]
    head = torch.randn(s["vocab"], s["hidden"], device=dev, dtype=bf) * 0.02
    xs = {i: torch.randn(tokens, i, device=dev, dtype=bf) for (_, i, _) in layer}
    gys = {o: torch.randn(tokens, o, device=dev, dtype=bf) for (_, _, o) in layer}
    x_head = torch.randn(tokens, s["hidden"], device=dev, dtype=bf)
    g_head = torch.randn(tokens, s["vocab"], device=dev, dtype=bf)

    def forward_gemms():
        for ws in weights:
            for (_, i, o), w in zip(layer, ws):
                torch.matmul(xs[i], w.t())
        torch.matmul(x_head, head.t())

    def backward_gemms():
        torch.matmul(g_head, head)
        for ws in reversed(weights):
            for (_, i, o), w in reversed(list(zip(layer, ws))):
                torch.matmul(gys[o], w)

    params = s["layers"] * sum(i * o for (_, i, o) in layer) + s["vocab"] * s["hidden"]
    flops = 2 * tokens * params
    fwd, fwd_lo, fwd_hi = timed(forward_gemms, args.reps)
    bwd, bwd_lo, bwd_hi = timed(backward_gemms, args.reps)
    res.update(gemm_forward_ms=fwd, gemm_backward_ms=bwd, gemm_tflop=2 * flops / 1e12,
               gemm_tflops=2 * flops / (fwd + bwd) / 1e9)
    print(f"base + head GEMMs forward: {fwd:.2f} ms ({fwd_lo:.2f}-{fwd_hi:.2f}), "
          f"{flops / fwd / 1e9:.0f} TFLOP/s")
    print(f"base + head GEMMs input gradient: {bwd:.2f} ms ({bwd_lo:.2f}-{bwd_hi:.2f}), "
          f"{flops / bwd / 1e9:.0f} TFLOP/s")
    # 1b. The same products on FP8 tensor cores (torch._scaled_mm, e4m3 weights and inputs, e5m2
    # output gradients, one scale a tensor): not QLoRA's bf16 compute, timed to show what a change of
    # numerics would buy. Scaling and casting the activations is left out.
    if args.fp8:
        f8, f8g = torch.float8_e4m3fn, torch.float8_e5m2
        one = torch.ones((), device=dev)
        w8 = [[w.to(f8) for w in ws] for ws in weights]
        w8t = [[w.t().contiguous().t() for w in ws] for ws in w8]  # column-major for dX = dY W
        h8 = head.to(f8)
        h8t = h8.t().contiguous().t()
        x8 = {i: x.to(f8) for i, x in xs.items()}
        g8 = {o: g.to(f8g) for o, g in gys.items()}
        xh8, gh8 = x_head.to(f8), g_head.to(f8g)

        def mm(a, b):
            return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=bf)

        def forward8():
            for ws in w8:
                for (_, i, o), w in zip(layer, ws):
                    mm(x8[i], w.t())
            mm(xh8, h8.t())

        def backward8():
            mm(gh8, h8t)
            for ws in reversed(w8t):
                for (_, i, o), w in reversed(list(zip(layer, ws))):
                    mm(g8[o], w)
        try:
            f8ms, b8ms = timed(forward8, args.reps)[0], timed(backward8, args.reps)[0]
            res.update(fp8_gemm_forward_ms=f8ms, fp8_gemm_backward_ms=b8ms)
            print(f"FP8 base + head GEMMs: forward {f8ms:.2f} ms ({flops / f8ms / 1e9:.0f} TFLOP/s), "
                  f"input gradient {b8ms:.2f} ms ({flops / b8ms / 1e9:.0f} TFLOP/s)")
        except Exception as e:
            print(f"FP8 GEMMs: unavailable ({type(e).__name__}: {str(e)[:160]})")
        del w8, w8t, h8, h8t, x8, g8, xh8, gh8
    del xs, gys, x_head, g_head, head

    # 2. Causal attention, forward and backward, every layer, the fastest SDPA backend.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    B, T, H, D = s["batch"], s["seq"], s["heads"], s["head_dim"]
    # GQA's K and V repeated to the query heads outside the timing (the repeat and the sum of its
    # gradient over the group are extra work, left out of the floor)
    q = torch.randn(B, H, T, D, device=dev, dtype=bf, requires_grad=True)
    k = torch.randn(B, H, T, D, device=dev, dtype=bf, requires_grad=True)
    v = torch.randn(B, H, T, D, device=dev, dtype=bf, requires_grad=True)
    go = torch.randn(B, H, T, D, device=dev, dtype=bf)
    attn = {}
    for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        def one_layer():
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                torch.autograd.grad(out, (q, k, v), go)

        def step():
            for _ in range(s["layers"]):
                one_layer()
        try:
            attn[name] = timed(step, args.reps)[0]
            print(f"attention forward + backward ({name}): {attn[name]:.2f} ms, "
                  f"{attn[name] / s['layers']:.3f} ms a layer")
        except Exception as e:  # a backend this GPU or build does not have
            print(f"attention ({name}): unavailable ({type(e).__name__}: {str(e)[:120]})")
    if not attn:
        sys.exit("no SDPA backend ran")
    best = min(attn, key=attn.get)
    res.update(attention_ms=attn, attention_best=best)
    del q, k, v, go

    # 3. Dequantizing every 4-bit base weight to bf16, forward and backward (bitsandbytes).
    dq = None
    try:
        import bitsandbytes.functional as BF
        quant = []
        for ws in weights:
            for w in ws:
                quant.append(BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"))
        del weights

        def dequant_all():
            for packed, state in quant:
                BF.dequantize_4bit(packed, state)
        dq = 2 * timed(dequant_all, args.reps)[0]
        print(f"bitsandbytes dequantize_4bit of every base weight, twice: {dq:.2f} ms")
    except Exception as e:
        print(f"dequantize: bitsandbytes unavailable ({type(e).__name__}: {str(e)[:120]})")
    res["dequant_ms"] = dq

    floor = fwd + bwd + attn[best]
    res["floor_gemm_attention_ms"] = floor
    if "fp8_gemm_forward_ms" in res:
        f8floor = res["fp8_gemm_forward_ms"] + res["fp8_gemm_backward_ms"] + attn[best]
        res["fp8_floor_gemm_attention_ms"] = f8floor
        print(f"FP8 FLOOR (FP8 GEMMs + attention[{best}]): {f8floor:.1f} ms a step = "
              f"{tokens / f8floor * 1e3:,.0f} tokens/s")
    print(f"FLOOR (GEMMs + attention[{best}]): {floor:.1f} ms a step = {tokens / floor * 1e3:,.0f} tokens/s")
    if dq is not None:
        res["floor_with_dequant_ms"] = floor + dq
        print(f"FLOOR with dequantization: {floor + dq:.1f} ms a step = "
              f"{tokens / (floor + dq) * 1e3:,.0f} tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
