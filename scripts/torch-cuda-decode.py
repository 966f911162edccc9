#!/usr/bin/env python3
"""The PyTorch baseline of `phalanx bench decode --device cuda`: prefill and decode tokens/s of the
transformer presets on a CUDA GPU.

The same model as the Swift transformer presets and scripts/torch-cuda-train.py (whose preset
table, parameter count, RoPE tables and SwiGLU it imports): byte vocabulary 256, tied head,
pre-norm blocks, RMSNorm eps 1e-5, rotate-half RoPE base 10000, full causal attention with
q/k/v/o projections. Inference in bfloat16 (weights, activations and the key/value cache; the
matrix products accumulate in float32, RMSNorm is computed in float32), eager mode.

Key/value cache: pre-allocated per layer, [batch, kv heads, context + steps, head dim] bfloat16;
a step writes its key and value at its position and attends with
F.scaled_dot_product_attention over the filled prefix (one query: no mask needed). The prefill of
the whole prompt from empty is the parallel forward (SDPA with is_causal=True) filling the cache.
SDPA runs with the FlashAttention and memory-efficient backends only: the cuDNN backend builds a
plan for every new key length, which costs milliseconds per layer and step when decoding.

Per preset, context and batch: a prefill of `context` random tokens at batch 1 (median of 3), its
cache copied to every sequence of the batch, then `--steps` greedy one-token steps timed together,
each ending with the tokens on the host (as the Swift side, which samples on the host).

Usage:
    torch-cuda-decode.py --presets transformer-large --contexts 1024 32768 --batches 1 32 --steps 32
    torch-cuda-decode.py --device cpu --presets transformer-tiny --contexts 64 --batches 1 2 --steps 2
                         (a smoke test of the same path on the CPU)

Prints one line per measurement, then one JSON line:
    {"torch": version, "device": name, "results": [{"preset", "context", "batch",
     "prefill_tokens_per_second", "decode_tokens_per_second"}, ...]}
An out-of-memory shape is recorded as {"error": "out of memory"}; the run goes on.
"""
import argparse
import gc
import importlib.util
import json
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_spec = importlib.util.spec_from_file_location("torch_cuda_train", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                               "torch-cuda-train.py"))
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)


class Attention(nn.Module):
    """Full causal attention with RoPE, continuing from a pre-allocated key/value cache."""

    def __init__(self, c):
        super().__init__()
        dim, self.heads, self.kv_heads, self.head_dim = c["dim"], c["heads"], c["kv_heads"], c["head_dim"]
        self.q_proj = nn.Linear(dim, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, dim, bias=False)

    def forward(self, x, cache, start, cos, sin):
        """x [B, n, dim] at positions start ..< start + n; cache (keys, values) [B, KVH, capacity, D]."""
        B, n, _ = x.shape
        split = lambda t, heads: t.view(B, n, heads, self.head_dim).transpose(1, 2)
        cos, sin = cos[start:start + n], sin[start:start + n]
        q = train.rope(split(self.q_proj(x), self.heads), cos, sin)
        k = train.rope(split(self.k_proj(x), self.kv_heads), cos, sin)
        v = split(self.v_proj(x), self.kv_heads)
        keys, values = cache
        keys[:, :, start:start + n] = k
        values[:, :, start:start + n] = v
        grouped = self.kv_heads != self.heads
        if start == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)
        else:
            assert n == 1, "a chunk after the prompt: one token per step"
            y = F.scaled_dot_product_attention(q, keys[:, :, :start + 1], values[:, :, :start + 1], enable_gqa=grouped)
        return self.o_proj(y.transpose(1, 2).reshape(B, n, self.heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.mixer_norm = train.RMSNorm(c["dim"])
        self.mixer = Attention(c)
        self.mlp_norm = train.RMSNorm(c["dim"])
        self.mlp = train.SwiGLU(c["dim"], c["hidden"])

    def forward(self, x, cache, start, cos, sin):
        x = x + self.mixer(self.mixer_norm(x), cache, start, cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Model(nn.Module):
    """Embedding, the blocks, the final norm, logits of the last position = h @ E^T (tied head)."""

    def __init__(self, c):
        super().__init__()
        if set(c["pattern"]) != {"A"}:
            raise ValueError("this baseline decodes the transformer presets (full attention) only")
        self.c = c
        self.embed_tokens = nn.Embedding(train.VOCABULARY, c["dim"])
        nn.init.normal_(self.embed_tokens.weight, std=0.02)
        self.layers = nn.ModuleList(Block(c) for _ in range(c["depth"]))
        self.norm = train.RMSNorm(c["dim"])

    def empty_cache(self, batch, capacity, device):
        shape = (batch, self.c["kv_heads"], capacity, self.c["head_dim"])
        return [(torch.empty(shape, dtype=torch.bfloat16, device=device), torch.empty(shape, dtype=torch.bfloat16, device=device))
                for _ in self.layers]

    def forward(self, tokens, cache, start, cos, sin):
        """Logits [B, V] of the last position of tokens [B, n] at positions start ..< start + n."""
        x = self.embed_tokens(tokens)
        for layer, layer_cache in zip(self.layers, cache):
            x = layer(x, layer_cache, start, cos, sin)
        return self.norm(x[:, -1]) @ self.embed_tokens.weight.t()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
@sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
def measure(model, context, batch, steps, device):
    """Prefill tokens/s (batch 1, median of 3) and decode tokens/s at `batch` after it."""
    cos, sin = train.rope_tables(context + steps + 1, model.c["head_dim"], model.c["rope_base"], device)
    prompt = torch.randint(0, train.VOCABULARY, (1, context), device=device)
    times = []
    for _ in range(3):
        cache = model.empty_cache(1, context + steps, device)
        synchronize(device)
        began = time.perf_counter()
        logits = model(prompt, cache, 0, cos, sin)
        logits.float().cpu()
        times.append(time.perf_counter() - began)
    prefill = context / statistics.median(times)
    full = model.empty_cache(batch, context + steps, device)
    for (keys, values), (k1, v1) in zip(full, cache):
        keys[:, :, :context] = k1[:, :, :context]
        values[:, :, :context] = v1[:, :, :context]
    del cache
    tokens = logits.argmax(-1).repeat(batch)[:, None]
    synchronize(device)
    began = time.perf_counter()
    for step in range(steps):
        logits = model(tokens, full, context + step, cos, sin)
        tokens = torch.tensor(logits.argmax(-1).tolist(), device=device)[:, None]
    decode = batch * steps / (time.perf_counter() - began)
    return prefill, decode


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["transformer-large"])
    parser.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096, 16384, 32768])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--device", default="cuda")
    arguments = parser.parse_args()
    device = torch.device(arguments.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "torch sees no CUDA device"}))
        return
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results = []
    for preset in arguments.presets:
        c = train.preset(preset, window=512)
        torch.manual_seed(0)
        model = Model(c).to(device=device, dtype=torch.bfloat16).eval()
        measure(model, 64, 2, 2, device)  # warm-up
        for context in arguments.contexts:
            for batch in arguments.batches:
                row = {"preset": preset, "context": context, "batch": batch}
                try:
                    prefill, decode = measure(model, context, batch, arguments.steps, device)
                    row.update(prefill_tokens_per_second=prefill, decode_tokens_per_second=decode)
                    print(f"{preset:20s} context {context:6d} batch {batch:3d}: prefill {prefill:10.0f} tok/s, decode {decode:9.1f} tok/s",
                          flush=True)
                except torch.OutOfMemoryError:
                    row["error"] = "out of memory"
                    print(f"{preset:20s} context {context:6d} batch {batch:3d}: out of memory", flush=True)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                results.append(row)
        del model
    print(json.dumps({"torch": torch.__version__, "device": name, "results": results}))


if __name__ == "__main__":
    main()
