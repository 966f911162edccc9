#!/usr/bin/env python3
"""PyTorch's causal attention on a CUDA GPU at the shapes of `phalanx bench cuda --attention-kernels`.

bfloat16, [batch, heads, length, head_dim] operands, batch * length = --tokens (32768), heads =
--width / head_dim (2048), for head dims 128 and 16 and lengths 4K, 8K, 16K, 32K:
  full causal:  F.scaled_dot_product_attention(is_causal=True) with PyTorch's default backend
                choice, and again forced to its FlashAttention-2 backend (sdpa_flash_*)
  window 512:   flex_attention (torch.compile) with a sliding-window block mask (j <= i, i - j < 512)
Forward under torch.no_grad(); forward+backward with autograd and a fixed output gradient. Median
over --repeats samples of --launches calls between CUDA events, after a warm-up.

FLOPs (the convention of `phalanx bench cuda --attention-kernels`): forward 4*B*H*D*pairs (pairs =
visible query-key pairs: L(L+1)/2 full causal, w(w+1)/2 + (L-w)w in a window), forward+backward
3.5 times that. Prints one line per shape, then one JSON line (also written to --out).

  python3 scripts/torch-cuda-attention.py --out torch-attention.json
"""
import argparse
import json

import torch
import torch.nn.functional as F

from cuda_timing import timed


def pairs(length, window):
    w = min(window or length, length)
    return w * (w + 1) // 2 + (length - w) * w


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128, 16])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--windows", type=int, nargs="+", default=[0, 512], help="0: full causal")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--launches", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()

    import torch._dynamo
    torch._dynamo.config.cache_size_limit = 256
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 256
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention, dynamic=False)

    results = []
    for head_dim in args.head_dims:
        heads = args.width // head_dim
        for length in args.lengths:
            batch = args.tokens // length
            for window in args.windows:
                gen = torch.Generator(device="cuda").manual_seed(1)
                q, k, v, dout = (torch.randn(batch, heads, length, head_dim, device="cuda", dtype=torch.bfloat16,
                                             generator=gen) for _ in range(4))
                q, k, v = (x.requires_grad_(True) for x in (q, k, v))
                flops = 4.0 * batch * heads * head_dim * pairs(length, window)
                row = dict(head_dim=head_dim, length=length, batch=batch, heads=heads, window=window)

                def measure(attend, prefix=""):
                    def forward():
                        with torch.no_grad():
                            attend()

                    def both():
                        attend().backward(dout)

                    fwd, all_ = timed(forward, args.launches, args.repeats), timed(both, args.launches, args.repeats)
                    row.update({prefix + "fwd_ms": fwd, prefix + "fwdbwd_ms": all_,
                                prefix + "fwd_tflops": flops / fwd / 1e9, prefix + "fwdbwd_tflops": 3.5 * flops / all_ / 1e9})

                if window == 0:
                    row["impl"] = "sdpa"
                    measure(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
                    try:
                        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                            measure(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), "sdpa_flash_")
                    except RuntimeError as error:
                        row["sdpa_flash_error"] = str(error)[:200]
                else:
                    row["impl"] = "flex_attention"

                    def sliding(b, h, qi, kv):
                        return (kv <= qi) & (qi - kv < window)

                    mask = create_block_mask(sliding, None, None, length, length, device="cuda")
                    measure(lambda: flex(q, k, v, block_mask=mask))
                line = {key: (round(value, 3) if isinstance(value, float) else value) for key, value in row.items()}
                print(json.dumps(line), flush=True)
                results.append(row)
                del q, k, v, dout

    summary = {"benchmark": "torch-attention", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "flops": "fwd 4*B*H*D*pairs, fwd+bwd 3.5x", "results": results}
    text = json.dumps(summary)
    print(text)
    if args.out:
        with open(args.out, "w") as file:
            file.write(text + "\n")


if __name__ == "__main__":
    main()
