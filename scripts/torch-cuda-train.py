#!/usr/bin/env python3
"""The PyTorch baseline of `phalanx bench train --device cuda`: training steps per second on a CUDA GPU.

The same models as the Swift presets (byte vocabulary 256, embedding tied to the head, pre-norm
blocks x + mixer(norm(x)) then x + mlp(norm(x)), RMSNorm eps 1e-5 with a weight, SwiGLU without
biases, attention with q/k/v/o projections without bias, rotate-half RoPE with base 10000 on q and
k, grouped key/value heads allowed, a final norm), the pattern tiled over depth (block i uses
pattern[i % len(pattern)]):

    A  full causal attention: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    S  sliding-window attention (a query at i sees keys j with i - window < j <= i):
       torch.compile(flex_attention) with a block mask from create_block_mask, built once per shape
    P  the Phalanx layer: no PyTorch implementation here; its presets are skipped with a note

A training step: float32 weights, the forward pass under torch.autocast("cuda", bfloat16), cross
entropy in float32 on the logits, backward, clip_grad_norm_(1.0), fused AdamW (lr 1e-4, betas
(0.9, 0.95), weight decay 0.1 on the matrices; the embedding and norms are not decayed, as in the
Swift AdamW). Eager mode unless --compile (torch.compile of the whole model). Each measurement
takes `--tokens-per-step` tokens a step (batch = tokens // context), runs --warmup steps, then
times --steps steps one by one (torch.cuda.synchronize around each, time.perf_counter) and reports
the median step, tokens per second, the parameter count (checked against the Swift formula) and
the peak allocated memory of the steps (weights, gradients, AdamW's moments, activations). An
out-of-memory shape is printed and recorded as {"error": "out of memory"}; the run goes on.

Data parallel (DistributedDataParallel, NCCL): run under torchrun, one process per GPU, e.g.
    python3 -m torch.distributed.run --standalone --nproc-per-node 2 torch-cuda-train.py --presets transformer-large --contexts 8192
Each GPU then takes --tokens-per-step tokens a step (the global batch is that times the number of
GPUs); DDP all-reduces the gradients in its default 25 MB buckets during backward. Rank 0 prints;
tokens_per_second counts all GPUs' tokens, and each row says "gpus".

Usage:
    torch-cuda-train.py --presets transformer-medium swa-hybrid-medium --contexts 4096 8192 --out torch.json
    torch-cuda-train.py --check      (each preset at a tiny shape on the CPU, float32, a couple of
                                      steps; RoPE, SDPA and flex_attention against their definitions)
    torch-cuda-train.py --device cpu --presets transformer-tiny --contexts 256 --tokens-per-step 512
                                     (the benchmark path on the CPU, bfloat16 autocast: a smoke test;
                                      flex_attention has no backward on the CPU: SDPA with a mask there)

Prints one line per measurement, then one JSON line (also written to --out):
    {"torch": version, "device": name, "results": [{"preset", "context", "batch",
     "tokens_per_second", "ms_per_step", "parameters", "peak_memory_gb"}, ...]}
peak_memory_gb is torch.cuda.max_memory_allocated in GiB (2^30 bytes); null on the CPU.
"""
import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # older torch: the sliding window falls back to SDPA with an explicit mask
    create_block_mask = flex_attention = None

VOCABULARY = 256
PHALANX_HEAD_DIM = 16  # PhalanxLayer.headDim, for the parameter count of the skipped presets
FAMILIES = {"transformer": "A", "swa-hybrid": "SSSA", "phalanx-hybrid": "PPPA"}
SIZES = {  # (dim, depth, attention heads, mlp hidden), as ModelConfiguration.preset
    "tiny": (128, 4, 2, 344),
    "small": (256, 4, 4, 688),
    "medium": (1024, 12, 8, 2752),
    "large": (2048, 8, 16, 5440),
}
DEFAULT_PRESETS = [f"{family}-{size}" for size in ["medium", "large"] for family in FAMILIES]


def preset(name, window):
    """The configuration of the Swift preset `name` (attention heads of dim / heads channels, as
    many key/value heads as query heads, RoPE base 10000, tied head)."""
    family, _, size = name.rpartition("-")
    if family not in FAMILIES or size not in SIZES:
        raise SystemExit(f"unknown preset '{name}'; choose one of "
                         + ", ".join(f"{f}-{s}" for f in FAMILIES for s in SIZES))
    dim, depth, heads, hidden = SIZES[size]
    return dict(dim=dim, depth=depth, pattern=FAMILIES[family], heads=heads, kv_heads=heads,
                head_dim=dim // heads, hidden=hidden, window=window, rope_base=10000.0)


def parameter_count(c):
    """ModelConfiguration.parameterCount: embedding, final norm, and per block two norms, the
    SwiGLU and the mixer (attention: q, o and k, v; Phalanx: its fused projections and proj_out)."""
    dim = c["dim"]
    attention = 2 * dim * c["heads"] * c["head_dim"] + 2 * dim * c["kv_heads"] * c["head_dim"]
    D = PHALANX_HEAD_DIM
    h = kv = dim // D
    phalanx = dim * (2 * D * kv + D * h + h) + (h + 2 * D * kv) + dim * dim
    total = VOCABULARY * dim + dim
    for i in range(c["depth"]):
        mixer = phalanx if c["pattern"][i % len(c["pattern"])] == "P" else attention
        total += 2 * dim + 3 * dim * c["hidden"] + mixer
    return total


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in float32 and returned in x's type (float32 in
    training, where the residual stream is float32; bfloat16 in torch-cuda-decode.py)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_tables(length, head_dim, base, device):
    """cos and sin [length, head_dim / 2] of the angles p * base^(-2i / head_dim), computed in
    float64 (as the Swift table) and kept in float32."""
    frequencies = base ** (-2 * torch.arange(head_dim // 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * frequencies[None, :]
    return angles.cos().float().to(device), angles.sin().float().to(device)


def rope(x, cos, sin):
    """Rotate-half RoPE of x [B, H, L, D]: channel i pairs with i + D/2.
        y[i] = x[i] cos - x[i + D/2] sin,   y[i + D/2] = x[i + D/2] cos + x[i] sin"""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def sliding_window(window):
    """flex_attention's mask_mod of the sliding window: key kv_idx visible from query q_idx."""
    def visible(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx < window) & (kv_idx <= q_idx)
    return visible


class Shape:
    """What the model needs per sequence length, built once per shape outside the timed steps:
    the RoPE tables and the sliding window's mask (a flex BlockMask, or a boolean [L, L] mask for
    the SDPA fallback)."""

    def __init__(self, length, c, device, window_backend):
        self.length = length
        self.cos, self.sin = rope_tables(length, c["head_dim"], c["rope_base"], device)
        self.window_mask = None
        window = c["window"]
        if "S" in c["pattern"] and window < length:
            if window_backend == "flex":
                self.window_mask = create_block_mask(sliding_window(window), B=None, H=None, Q_LEN=length,
                                                     KV_LEN=length, device=device)
            else:
                i = torch.arange(length, device=device)[:, None]
                j = torch.arange(length, device=device)[None, :]
                self.window_mask = (j <= i) & (i - j < window)


class Attention(nn.Module):
    """Causal attention with grouped key/value heads and RoPE; full (window None) or sliding."""

    def __init__(self, c, window=None, flex=None):
        super().__init__()
        dim, self.heads, self.kv_heads, self.head_dim = c["dim"], c["heads"], c["kv_heads"], c["head_dim"]
        self.window, self.flex = window, flex
        self.q_proj = nn.Linear(dim, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, dim, bias=False)

    def forward(self, x, shape):
        B, L, _ = x.shape
        split = lambda t, heads: t.view(B, L, heads, self.head_dim).transpose(1, 2)   # [B, H, L, D]
        q = rope(split(self.q_proj(x), self.heads), shape.cos, shape.sin)
        k = rope(split(self.k_proj(x), self.kv_heads), shape.cos, shape.sin)
        v = split(self.v_proj(x), self.kv_heads)
        grouped = self.kv_heads != self.heads
        if self.window is None or shape.window_mask is None:   # full causal, or a window >= L
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)
        elif self.flex is not None:
            # flex_attention is outside autocast: q, k, v come out of the projections in bfloat16
            # under autocast; v is cast in case the projections ran in another precision.
            y = self.flex(q, k, v.to(q.dtype), block_mask=shape.window_mask, enable_gqa=grouped)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=shape.window_mask, enable_gqa=grouped)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, self.heads * self.head_dim))


class SwiGLU(nn.Module):
    """y = down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c, kind, flex):
        super().__init__()
        self.mixer_norm = RMSNorm(c["dim"])
        self.mixer = Attention(c, window=c["window"] if kind == "S" else None, flex=flex)
        self.mlp_norm = RMSNorm(c["dim"])
        self.mlp = SwiGLU(c["dim"], c["hidden"])

    def forward(self, x, shape):
        x = x + self.mixer(self.mixer_norm(x), shape)
        return x + self.mlp(self.mlp_norm(x))


class Model(nn.Module):
    """Embedding, the blocks, the final norm, logits = h @ E^T (tied head). Names as the Swift
    checkpoints: embed_tokens, layers.{i}.mixer_norm / mixer.{q,k,v,o}_proj / mlp_norm /
    mlp.{gate,up,down}_proj, norm."""

    def __init__(self, c, flex=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCABULARY, c["dim"])
        nn.init.normal_(self.embed_tokens.weight, std=0.02)
        kinds = [c["pattern"][i % len(c["pattern"])] for i in range(c["depth"])]
        if "P" in kinds:
            raise ValueError("the Phalanx layer has no PyTorch implementation in this script")
        self.layers = nn.ModuleList(Block(c, kind, flex) for kind in kinds)
        self.norm = RMSNorm(c["dim"])

    def forward(self, tokens, shape):
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, shape)
        return self.norm(x) @ self.embed_tokens.weight.t()


def make_optimizer(model, fused):
    """AdamW as the Swift trainer's: weight decay only on the matrices."""
    decayed = [p for n, p in model.named_parameters() if p.ndim == 2 and not n.startswith("embed_tokens")]
    others = [p for n, p in model.named_parameters() if not (p.ndim == 2 and not n.startswith("embed_tokens"))]
    groups = [{"params": decayed, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=fused)


def is_out_of_memory(error):
    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(error, out_of_memory) or "out of memory" in str(error).lower()


BACKENDS = {}


def window_backend(device, compiled_model):
    key = (device.type, compiled_model)
    if key not in BACKENDS:
        BACKENDS[key] = choose_window_backend(device, compiled_model)
    return BACKENDS[key]


def choose_window_backend(device, compiled_model):
    """The sliding window's attention: (backend name, flex function or None). On CUDA the
    compiled flex_attention (the raw one inside a compiled model, which compiles it with the rest);
    on the CPU the same if it runs here, else SDPA with an explicit mask."""
    if flex_attention is None:
        return "sdpa-mask", None
    flex = flex_attention if compiled_model else torch.compile(flex_attention, dynamic=False)
    if device.type == "cuda":
        return "flex", flex
    try:  # a small probe: compiled flex attention on the CPU needs inductor's C++ backend
        q = torch.randn(1, 1, 256, 16, requires_grad=True)
        mask = create_block_mask(sliding_window(64), None, None, 256, 256, device="cpu")
        flex(q, q, q, block_mask=mask).sum().backward()
        return "flex", flex
    except Exception as error:  # noqa: BLE001 (any failure means: fall back)
        print(f"  (flex_attention does not run on the CPU here: {type(error).__name__}: "
              f"{str(error).splitlines()[0] if str(error) else ''}; the sliding window uses SDPA with a mask)")
        return "sdpa-mask", None


def world_size():
    """The number of data-parallel processes (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def measure(name, context, arguments, device, backend, flex):
    """One preset at one context: the row of the JSON results (an error row when out of memory)."""
    c = preset(name, arguments.window)
    batch = arguments.tokens_per_step // context
    row = {"preset": name, "context": context, "batch": batch, "gpus": world_size()}
    if batch < 1:
        row["error"] = f"tokens per step {arguments.tokens_per_step} < context {context}"
        return row, []
    cuda = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda and not arguments.check \
        else (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if not arguments.check \
        else contextlib.nullcontext
    losses, failure = [], None
    try:
        torch.manual_seed(1)
        with device:
            model = Model(c, flex=flex if backend == "flex" else None)
        row["parameters"] = sum(p.numel() for p in model.parameters())
        parameters = list(model.parameters())
        optimizer = make_optimizer(model, fused=arguments.fused)
        forward = torch.compile(model) if arguments.compile else model
        if world_size() > 1:
            forward = torch.nn.parallel.DistributedDataParallel(forward, device_ids=[device.index])
        shape = Shape(context, c, device, backend)
        tokens = torch.randint(0, VOCABULARY, (batch, context + 1), device=device)
        if cuda:  # the peak from here: weights, AdamW's moments, the steps; not create_block_mask's scratch
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:].reshape(-1)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                logits = forward(inputs, shape)
            loss = F.cross_entropy(logits.float().view(-1, VOCABULARY), targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            return loss

        synchronize = torch.cuda.synchronize if cuda else (lambda: None)
        for _ in range(arguments.warmup):
            losses.append(step().item())
        samples = []
        for _ in range(arguments.steps):
            synchronize()
            start = time.perf_counter()
            loss = step()
            synchronize()
            samples.append(time.perf_counter() - start)
            losses.append(loss.item())
        seconds = statistics.median(samples)
        row.update(tokens_per_second=batch * context * world_size() / seconds, ms_per_step=1e3 * seconds)
        row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    except Exception as error:  # noqa: BLE001 (torch.compile may wrap the allocator's error in its own)
        if not is_out_of_memory(error):
            raise
        failure = str(error).splitlines()[0]
    if failure is not None:  # outside the except block: the traceback no longer holds the tensors
        print(f"{name:24} context {context:6} batch {batch:4}: out of memory ({failure})", flush=True)
        row = {"preset": name, "context": context, "batch": batch, "error": "out of memory"}
    return row, losses


def describe(row):
    if "error" in row:
        return f"{row['preset']:24} context {row['context']:6} batch {row['batch']:4}: {row['error']}"
    peak = "" if row["peak_memory_gb"] is None else f"  peak {row['peak_memory_gb']:6.1f} GiB"
    return (f"{row['preset']:24} context {row['context']:6} batch {row['batch']:4}: {row['ms_per_step']:9.1f} ms/step "
            f"{row['tokens_per_second']:12,.0f} tokens/s  {row['parameters'] / 1e6:7.1f}M parameters{peak}")


def run(arguments, device):
    backend, flex = window_backend(device, arguments.compile)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    precision = "float32" if arguments.check else "float32 weights, bfloat16 autocast"
    print(f"PyTorch {torch.__version__} on {name}: {precision}, {'torch.compile' if arguments.compile else 'eager'}, "
          f"sliding window {arguments.window} by {backend}, {arguments.tokens_per_step} tokens a step, "
          f"{arguments.warmup} warm-up + {arguments.steps} timed steps (median)", flush=True)
    presets, skipped = [], []
    for preset_name in arguments.presets:
        c = preset(preset_name, arguments.window)
        count = parameter_count(c)
        if "P" in c["pattern"]:
            skipped.append(preset_name)
            print(f"{preset_name:24} skipped: no PyTorch implementation of the Phalanx layer here "
                  f"({count:,} parameters in Swift)")
        else:
            with torch.device("meta"):
                built = sum(p.numel() for p in Model(c).parameters())
            same = "equal to" if built == count else "DIFFERENT FROM"
            print(f"{preset_name:24} {built:,} parameters ({built / 1e6:.1f}M), {same} ModelConfiguration.parameterCount {count:,}")
            if built != count:
                raise SystemExit(f"{preset_name}: the PyTorch model has {built} parameters, the Swift formula {count}")
            presets.append(preset_name)
    results, all_losses = [], {}
    for context in arguments.contexts:
        for preset_name in presets:
            if arguments.compile:
                torch._dynamo.reset()  # drop the previous model's compiled graphs (and what they hold)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            row, losses = measure(preset_name, context, arguments, device, backend, flex)
            all_losses[(preset_name, context)] = losses
            results.append(row)
            if row.get("error") != "out of memory":  # measure printed that one, with the allocator's message
                print(describe(row), flush=True)
    output = {"torch": torch.__version__, "device": name, "compile": arguments.compile, "window": arguments.window,
              "window_attention": backend, "tokens_per_step": arguments.tokens_per_step, "results": results}
    if skipped:
        output["skipped"] = skipped
    return output, all_losses


def reference_attention(q, k, v, window=None):
    """softmax(q k^T / sqrt(D) + mask) v, key/value heads repeated: the definition."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    L = q.shape[-2]
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    visible = (j <= i) if window is None else (j <= i) & (i - j < window)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


def component_checks(arguments):
    """RoPE and both attentions against their definitions on small float32 tensors, values and
    gradients; the model's two attentions as the Attention module runs them."""
    torch.manual_seed(0)
    checks = []
    # flex_attention with the block mask, forward only (it has no backward on the CPU): the mask
    # and the call the CUDA runs use, against the definition; windows across flex's 128-blocks.
    # First: a failed compilation (the backend probe's backward) leaves flex_attention to eager.
    if flex_attention is not None:
        for flex, label in [(torch.compile(flex_attention, dynamic=False), "compiled"), (flex_attention, "eager")]:
            try:
                errors = []
                for heads, kv_heads, L, window in [(4, 4, 512, 200), (4, 2, 384, 128), (2, 1, 300, 24)]:
                    q = torch.randn(2, heads, L, 16)
                    k, v = torch.randn(2, kv_heads, L, 16), torch.randn(2, kv_heads, L, 16)
                    mask = create_block_mask(sliding_window(window), B=None, H=None, Q_LEN=L, KV_LEN=L, device="cpu")
                    with torch.no_grad():
                        y = flex(q, k, v, block_mask=mask, enable_gqa=heads != kv_heads)
                    expected = reference_attention(q, k, v, window)
                    errors.append(((y - expected).abs().max() / expected.abs().max()).item())
                error = max(errors)
                checks.append((f"flex_attention ({label}) with the sliding-window block mask, forward, grouped heads, "
                               f"against the definition", error, error < 1e-4))
                # The Attention module's flex path (RoPE, the casts, the call) against its SDPA-mask
                # path, in float32 and under bfloat16 autocast as the CUDA runs (forward only).
                c = dict(dim=64, heads=4, kv_heads=2, head_dim=16, window=100, pattern="S", rope_base=10000.0)
                flexed, masked = Attention(c, window=100, flex=flex), Attention(c, window=100)
                masked.load_state_dict(flexed.state_dict())
                x = torch.randn(2, 384, 64)
                for autocast, tolerance in [(contextlib.nullcontext, 1e-4),
                                            (lambda: torch.autocast("cpu", dtype=torch.bfloat16), 3e-2)]:
                    with torch.no_grad(), autocast():
                        y = flexed(x, Shape(384, c, "cpu", "flex")).float()
                        expected = masked(x, Shape(384, c, "cpu", "sdpa-mask")).float()
                    error = ((y - expected).abs().max() / expected.abs().max()).item()
                    precision = "float32" if autocast is contextlib.nullcontext else "bfloat16 autocast"
                    checks.append((f"Attention module, window 100 by flex_attention ({label}) against SDPA with the "
                                   f"mask, forward, {precision}", error, error < tolerance))
                break
            except Exception as error:  # noqa: BLE001
                print(f"  ({label} flex_attention forward does not run on the CPU here: {type(error).__name__}: "
                      f"{str(error).splitlines()[0] if str(error) else ''})")
    # RoPE: one position at a time, from the formula.
    B, H, L, D = 2, 3, 40, 8
    x = torch.randn(B, H, L, D, dtype=torch.float64)
    cos, sin = rope_tables(L, D, 10000.0, "cpu")
    expected = torch.empty_like(x)
    for p in range(L):
        for i in range(D // 2):
            theta = p * 10000.0 ** (-2 * i / D)
            a, b = x[..., p, i], x[..., p, i + D // 2]
            expected[..., p, i] = a * math.cos(theta) - b * math.sin(theta)
            expected[..., p, i + D // 2] = b * math.cos(theta) + a * math.sin(theta)
    error = (rope(x, cos.double(), sin.double()) - expected).abs().max().item()
    checks.append(("rope (rotate half) against its formula", error, error < 1e-6))
    # Attention: full causal and sliding window, grouped heads, through Attention.forward's paths.
    backend, flex = window_backend(torch.device("cpu"), False)
    for heads, kv_heads in [(4, 4), (4, 2)]:
        c = dict(dim=heads * 16, heads=heads, kv_heads=kv_heads, head_dim=16, window=24, pattern="S", rope_base=10000.0)
        layer = Attention(c, window=24, flex=flex if backend == "flex" else None)
        full = Attention(c, window=None)
        full.load_state_dict(layer.state_dict())
        for module, window, label in [(full, None, "full causal (SDPA)"), (layer, 24, f"window 24 ({backend})")]:
            x = torch.randn(2, 256, c["dim"], requires_grad=True)
            shape = Shape(256, c, "cpu", backend)
            y = module(x, shape)
            gradient = torch.randn_like(y)
            (dx,) = torch.autograd.grad(y, x, gradient)
            B, L = x.shape[:2]
            split = lambda t, n: t.view(B, L, n, 16).transpose(1, 2)
            xr = x.detach().clone().requires_grad_(True)
            q = rope(split(module.q_proj(xr), heads), shape.cos, shape.sin)
            k = rope(split(module.k_proj(xr), kv_heads), shape.cos, shape.sin)
            v = split(module.v_proj(xr), kv_heads)
            yr = module.o_proj(reference_attention(q, k, v, window).transpose(1, 2).reshape(B, L, heads * 16))
            (dxr,) = torch.autograd.grad(yr, xr, gradient)
            error = max(((y - yr).abs().max() / yr.abs().max()).item(), ((dx - dxr).abs().max() / dxr.abs().max()).item())
            checks.append((f"attention {label}, {heads} heads / {kv_heads} kv heads, value and input gradient "
                           f"against the definition", error, error < 1e-4))
    return checks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS)
    parser.add_argument("--contexts", nargs="+", type=int, help="default 4096 8192 16384 32768 (--check: 64)")
    parser.add_argument("--tokens-per-step", type=int, help="batch x context; default 65536 (--check: 128)")
    parser.add_argument("--steps", type=int, help="timed steps; default 10 (--check: 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first; default 3 (--check: 1)")
    parser.add_argument("--window", type=int, help="sliding window of S blocks; default 512 (--check: 16)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the whole model")
    parser.add_argument("--check", action="store_true",
                        help="each preset at a tiny shape on the CPU in float32, and the attentions and RoPE against their definitions")
    parser.add_argument("--device", default=None, help="default cuda (--check: cpu); cpu runs the benchmark path there (a smoke test)")
    parser.add_argument("--no-fused", dest="fused", action="store_false", help="AdamW without fused=True")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--out", help="also write the JSON line to this file")
    arguments = parser.parse_args()
    tiny = arguments.check
    defaults = dict(contexts=[64] if tiny else [4096, 8192, 16384, 32768], tokens_per_step=128 if tiny else 65536,
                    steps=2 if tiny else 10, warmup=1 if tiny else 3, window=16 if tiny else 512,
                    device="cpu" if tiny else "cuda")
    for key, value in defaults.items():
        if getattr(arguments, key) is None:
            setattr(arguments, key, value)
    if arguments.threads > 0:
        torch.set_num_threads(arguments.threads)
    for limit in ["recompile_limit", "cache_size_limit"]:  # one flex compilation per shape and head count
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 64)
    device = torch.device(arguments.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available to this torch (--check runs on the CPU)")
    if world_size() > 1:  # under torchrun: this process's GPU, NCCL, and only rank 0 speaks
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl", device_id=device)
        if torch.distributed.get_rank() != 0:
            sys.stdout = open(os.devnull, "w")

    checks = component_checks(arguments) if arguments.check else []
    for label, error, passed in checks:
        print(f"check: {label}: max relative error {error:.2e} {'ok' if passed else 'FAILED'}")
    output, losses = run(arguments, device)
    if arguments.check:
        for (preset_name, context), values in losses.items():
            finite = len(values) > 1 and all(math.isfinite(v) for v in values)
            # Logits of the 0.02-scale tied embedding against unit-RMS rows have a spread of about
            # 0.02 sqrt(dim): the first loss is near ln 256 = 5.545 (plus about 0.0002 dim); the
            # same batch every step, so the last is below the first.
            passed = finite and abs(values[0] - math.log(VOCABULARY)) < 0.5 and values[-1] < values[0]
            print(f"check: {preset_name} context {context}: losses {', '.join(f'{v:.4f}' for v in values)} "
                  f"{'ok' if passed else 'FAILED'}")
            checks.append((f"{preset_name} training losses finite, first near ln 256, last below it", 0.0, passed))
        output["checks"] = [{"check": label, "max_relative_error": error, "passed": passed} for label, error, passed in checks]
    line = json.dumps(output)
    print(line)
    if arguments.out:
        with open(arguments.out, "w") as file:
            file.write(line + "\n")
    if world_size() > 1:
        torch.distributed.destroy_process_group()
    if arguments.check and not all(passed for _, _, passed in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
