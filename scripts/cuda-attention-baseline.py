#!/usr/bin/env python3
"""Times a causal attention layer in PyTorch on a CUDA GPU: the baseline for `phalanx bench cuda`.

The layer: QKV projection (dim -> 3 * dim, no bias), F.scaled_dot_product_attention(causal) over
`heads` heads of dim / heads channels, output projection (dim -> dim, no bias); bfloat16 weights
and activations. For each BATCHxLENGTH shape it reports the median over --repeats samples (each
--launches calls between two CUDA events, after a warm-up) of
  forward           under torch.no_grad()
  forward_backward  forward with autograd, then backward of a fixed output gradient
and the attention core alone (SDPA forward). Prints one line per shape, then one JSON line (also
written to --out when given).

  python3 scripts/cuda-attention-baseline.py --out attention.json
"""
import argparse
import json

import torch
import torch.nn.functional as F

from cuda_timing import timed


class AttentionLayer(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.out = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        batch, length, dim = x.shape
        # [B, L, 3, H, D] -> three [B, H, L, D]
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(batch, length, dim))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["8x4096", "4x8192", "2x16384", "1x32768"])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--launches", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="also write the JSON result to this file")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device("cuda")
    layer = AttentionLayer(args.dim, args.heads).to(device=device, dtype=torch.bfloat16)
    result = {"benchmark": "attention-layer", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "dim": args.dim, "heads": args.heads, "head_dim": args.dim // args.heads, "dtype": "bf16", "shapes": {}}
    print(f"Attention layer on {result['device']} (torch {torch.__version__}): dim {args.dim}, "
          f"{args.heads} heads x {args.dim // args.heads}, causal SDPA, bf16")
    for shape in args.shapes:
        batch, length = (int(n) for n in shape.split("x"))
        x = torch.randn(batch, length, args.dim, device=device, dtype=torch.bfloat16)
        dy = torch.randn_like(x)
        with torch.no_grad():
            forward = timed(lambda: layer(x), args.launches, args.repeats)
            q = torch.randn(batch, args.heads, length, args.dim // args.heads, device=device, dtype=torch.bfloat16)
            core = timed(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True), args.launches, args.repeats)
        xg = x.clone().requires_grad_(True)

        def step():
            layer(xg).backward(dy)

        forward_backward = timed(step, args.launches, args.repeats)
        layer.zero_grad(set_to_none=True)
        entry = {"batch": batch, "length": length, "forward_ms": forward, "forward_backward_ms": forward_backward,
                 "sdpa_forward_ms": core}
        result["shapes"][f"B{batch}_L{length}"] = entry
        print(f"  B={batch} L={length}: forward {forward:.3f} ms (SDPA alone {core:.3f} ms), "
              f"forward+backward {forward_backward:.3f} ms")
        del x, dy, xg, q
        torch.cuda.empty_cache()
    line = json.dumps(result, sort_keys=True)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
