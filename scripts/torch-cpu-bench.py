#!/usr/bin/env python3
"""The PyTorch baseline of `phalanx bench train --pytorch` and `phalanx bench layers --pytorch`.

The same models as the Swift presets (byte vocabulary, RMSNorm, RoPE, SwiGLU, tied head; full
causal attention through scaled_dot_product_attention(is_causal=True), the sliding window as
banded chunks of SDPA, the Phalanx layer with its jagged-window recurrence in the Block Two-Pass
matrix form), float32 on the CPU with the same thread count, measured on this machine in the
same run as the Swift figures. Optional: without torch the caller prints its own figures only.

Usage:
    torch-cpu-bench.py train --presets phalanx-hybrid-small ... --contexts 2048 8192 --steps 3 --window 512 --threads 2
    torch-cpu-bench.py layers --dim 256 --heads 4 --length 4096 --repeats 5 --threads 2
    torch-cpu-bench.py check      (the recurrence here against its definition, float64)

Prints one JSON line: {"torch": version, "capability": the vector code ATen runs ("AVX512",
"AVX2", ...), "threads": n, "results": [...]}.
"""
import argparse
import json
import math
import statistics
import sys
import time

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError as error:  # the caller reports this and goes on without the column
    print(json.dumps({"error": f"torch is not importable: {error}"}))
    sys.exit(0)

BLOCK = 16       # jagged-window block length l
HEAD_DIM = 16    # Phalanx head width D


def preset(name):
    """(dim, depth, pattern, heads, mlp hidden) of the Swift preset `name`."""
    family, size = name.rsplit("-", 1)
    pattern = {"transformer": "A", "swa-hybrid": "SSSA", "phalanx-hybrid": "PPPA"}[family]
    dim, heads, hidden = {"tiny": (128, 2, 344), "small": (256, 4, 688)}[size]
    return dim, 4, pattern, heads, hidden


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def rope(x, base=10000.0):
    """Rotary embedding of x [B, H, L, Dh], pairs (2i, 2i+1)."""
    length, dh = x.shape[-2], x.shape[-1]
    frequencies = base ** (-torch.arange(0, dh, 2, dtype=torch.float32) / dh)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * frequencies[None, :]
    cos, sin = angles.cos(), angles.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    """Causal attention, full (window None) or sliding (each query sees `window` positions)."""

    def __init__(self, dim, heads, window=None):
        super().__init__()
        self.heads, self.window = heads, window
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x):
        B, L, dim = x.shape
        split = lambda t: t.view(B, L, self.heads, dim // self.heads).transpose(1, 2)
        q, k, v = rope(split(self.q(x))), rope(split(self.k(x))), split(self.v(x))
        if self.window is None or self.window >= L:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = self.banded(q, k, v)
        return self.o(y.transpose(1, 2).reshape(B, L, dim))

    def banded(self, q, k, v):
        """Queries in chunks of w, each against the keys of its chunk and the one before (2w),
        masked to the window: O(L w) time and memory, no L x L matrix."""
        w, L = self.window, q.shape[-2]
        outputs = []
        for start in range(0, L, w):
            end = min(start + w, L)
            lo = max(start - w, 0)
            i = torch.arange(start, end)[:, None]
            j = torch.arange(lo, end)[None, :]
            mask = (j <= i) & (j > i - w)
            outputs.append(F.scaled_dot_product_attention(q[..., start:end, :], k[..., lo:end, :], v[..., lo:end, :],
                                                          attn_mask=mask))
        return torch.cat(outputs, dim=-2)


def jagged_window(a, u):
    """y = SWR_jagged(a, u), k = 2: a [B, L, H], u [B, L, H, D], block length BLOCK, in the Block
    Two-Pass matrix form (linear-space transfer matrices, exact for gates in [0, 1])."""
    B, L, H, D = u.shape
    pad = (-L) % BLOCK
    if pad:
        a = F.pad(a, (0, 0, 0, pad))
        u = F.pad(u, (0, 0, 0, 0, 0, pad))
    T = (L + pad) // BLOCK
    a = a.view(B, T, BLOCK, H).permute(0, 1, 3, 2)             # [B, T, H, l]
    u = u.view(B, T, BLOCK, H, D).permute(0, 1, 3, 2, 4)       # [B, T, H, l, D]
    # M[i, j] = prod_{k=j+1..i} a_k (i >= j), 0 above the diagonal.
    strictly_lower = torch.ones(BLOCK, BLOCK, dtype=torch.bool).tril(-1)
    factors = torch.where(strictly_lower, a[..., :, None].expand(*a.shape, BLOCK), torch.ones(()))
    M = torch.cumprod(factors, dim=-2).tril()
    w = M @ u                                                    # local states
    g = M[..., :, 0] * a[..., 0:1]                               # prod_{k=0..i} a_k
    carrier = F.pad(w[:, :-1, :, -1, :], (0, 0, 0, 0, 1, 0))    # previous block's terminal state
    y = w + g[..., None] * carrier[:, :, :, None, :]
    return y.permute(0, 1, 3, 2, 4).reshape(B, T * BLOCK, H, D)[:, :L]


class Phalanx(nn.Module):
    """The Phalanx layer: gates, b * v, the jagged window, s * c + v, proj_out (kv heads = heads)."""

    def __init__(self, dim):
        super().__init__()
        self.heads = dim // HEAD_DIM
        self.proj_a = nn.Linear(dim, self.heads)
        self.proj_b, self.proj_c = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj_v = nn.Linear(dim, dim, bias=False)
        self.proj_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        B, L, dim = x.shape
        heads = lambda t: t.view(B, L, self.heads, HEAD_DIM)
        a = torch.sigmoid(self.proj_a(x))
        b, c, v = heads(torch.sigmoid(self.proj_b(x))), heads(self.proj_c(x)), heads(self.proj_v(x))
        s = jagged_window(a, b * v)
        return self.proj_out((s * c + v).reshape(B, L, dim))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Model(nn.Module):
    def __init__(self, name, window):
        super().__init__()
        dim, depth, pattern, heads, hidden = preset(name)
        self.embed = nn.Embedding(256, dim)
        mixer = {"A": lambda: Attention(dim, heads), "S": lambda: Attention(dim, heads, window), "P": lambda: Phalanx(dim)}
        self.mixers = nn.ModuleList(mixer[pattern[i % len(pattern)]]() for i in range(depth))
        self.mixer_norms = nn.ModuleList(RMSNorm(dim) for _ in range(depth))
        self.mlps = nn.ModuleList(SwiGLU(dim, hidden) for _ in range(depth))
        self.mlp_norms = nn.ModuleList(RMSNorm(dim) for _ in range(depth))
        self.norm = RMSNorm(dim)

    def forward(self, tokens):
        x = self.embed(tokens)
        for mixer, mixer_norm, mlp, mlp_norm in zip(self.mixers, self.mixer_norms, self.mlps, self.mlp_norms):
            x = x + mixer(mixer_norm(x))
            x = x + mlp(mlp_norm(x))
        return self.norm(x) @ self.embed.weight.t()              # tied head


def naive_jagged_window(a, u):
    """The definition, one position at a time in float64 (SWR.md section 3): w and g restart at
    each block start, y_i = w_i + g_i * (the previous block's last w)."""
    a, u = a.double(), u.double()
    B, L, H, D = u.shape
    y = torch.zeros_like(u)
    w = torch.zeros(B, H, D, dtype=torch.float64)
    g = torch.ones(B, H, dtype=torch.float64)
    carrier = torch.zeros(B, H, D, dtype=torch.float64)
    for i in range(L):
        if i % BLOCK == 0:
            carrier = w if i > 0 else carrier
            w, g = torch.zeros_like(w), torch.ones_like(g)
        w = a[:, i, :, None] * w + u[:, i]
        g = a[:, i] * g
        y[:, i] = w + g[..., None] * carrier
    return y


def check(_arguments):
    """The matrix form against the definition on ragged lengths and extreme gates."""
    torch.manual_seed(0)
    worst = 0.0
    for L in [1, 15, 16, 17, 40, 100]:
        for gates in ["random", "zero", "one"]:
            a = {"random": torch.rand(2, L, 3), "zero": torch.zeros(2, L, 3), "one": torch.ones(2, L, 3)}[gates]
            u = torch.randn(2, L, 3, HEAD_DIM)
            expected = naive_jagged_window(a, u)
            error = ((jagged_window(a, u).double() - expected).abs().max() / (expected.abs().max() + 1e-30)).item()
            worst = max(worst, error)
    return [{"check": "jagged window (matrix form) against the definition", "worst_relative_error": worst,
             "passed": worst < 1e-5}]


def median_seconds(body, repeats, warm_up=1):
    for _ in range(warm_up):
        body()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        body()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def train(arguments):
    results = []
    for context in arguments.contexts:
        for name in arguments.presets:
            torch.manual_seed(1)
            model = Model(name, arguments.window)
            optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
            tokens = torch.randint(0, 256, (1, context + 1))

            def step():
                optimizer.zero_grad(set_to_none=True)
                logits = model(tokens[:, :-1])
                F.cross_entropy(logits.view(-1, 256), tokens[:, 1:].reshape(-1)).backward()
                optimizer.step()

            seconds = median_seconds(step, arguments.steps)
            results.append({"preset": name, "context": context, "tokens_per_second": context / seconds})
    return results


def layers(arguments):
    torch.manual_seed(1)
    L, dim = arguments.length, arguments.dim
    x = torch.randn(1, L, dim, requires_grad=True)
    dy = torch.randn(1, L, dim)
    results = []
    for name, layer in [("phalanx", Phalanx(dim)), ("attention", Attention(dim, arguments.heads))]:
        forward = median_seconds(lambda: layer(x), arguments.repeats)

        def both():
            x.grad = None
            layer(x).backward(dy)

        results.append({"layer": name, "length": L, "forward_ms": 1e3 * forward,
                        "forward_backward_ms": 1e3 * median_seconds(both, arguments.repeats)})
    q, k, v = (torch.randn(1, arguments.heads, L, dim // arguments.heads, requires_grad=True) for _ in range(3))
    do = torch.randn(1, arguments.heads, L, dim // arguments.heads)
    with torch.no_grad():
        sdpa = median_seconds(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), arguments.repeats)

    def sdpa_both():
        q.grad = k.grad = v.grad = None
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)

    results.append({"layer": "sdpa kernel, causal", "length": L, "forward_ms": 1e3 * sdpa,
                    "forward_backward_ms": 1e3 * median_seconds(sdpa_both, arguments.repeats)})
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["train", "layers", "check"])
    parser.add_argument("--presets", nargs="+", default=["transformer-small", "swa-hybrid-small", "phalanx-hybrid-small"])
    parser.add_argument("--contexts", nargs="+", type=int, default=[2048])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    arguments = parser.parse_args()
    if arguments.threads > 0:
        torch.set_num_threads(arguments.threads)
    results = {"train": train, "layers": layers, "check": check}[arguments.mode](arguments)
    print(json.dumps({"torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
                      "threads": torch.get_num_threads(), "results": results}))


if __name__ == "__main__":
    main()
