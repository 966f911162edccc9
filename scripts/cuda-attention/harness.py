#!/usr/bin/env python3
"""Kernel-level check and timing of Sources/PhalanxCUDA/Kernels/attention.cu without Swift.

Compiles the source with NVRTC through ctypes (nvrtc_compile.py beside this; PHALANX_NVRTC or
/usr/local/cuda's libnvrtc), loads it into PyTorch's CUDA context with the driver API and launches
the kernels on torch tensors:
  check  every storage x head dim (16..128) x length (1..1000) x window (1, 7, 64, 100, none) x
         group (1, 2, 4): output, lse, dq, dk, dv against a float64 autograd reference
         (max |err| / max |ref|; dq and dk against at least dv's scale); f32 within 1e-5, bf16 2e-2
  det    two runs bit-identical (bf16 and f32)
  time   bf16 forward and forward+backward TFLOP/s at 32K tokens, width 2048, against
         F.scaled_dot_product_attention (default backend and FLASH_ATTENTION) in the same run
Another version of the source can be checked and timed with ATTENTION_SOURCE_DIR.

  python3 scripts/cuda-attention/harness.py check det time
"""
import ctypes, json, math, os, sys, time
import torch
sys.path.insert(0, os.path.dirname(__file__))
from nvrtc_compile import compile_cu

torch.cuda.init()
torch.zeros(1, device="cuda")
dev = torch.device("cuda")
cu = ctypes.CDLL("libcuda.so.1")
HERE = os.environ.get("ATTENTION_SOURCE_DIR") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "Sources", "PhalanxCUDA", "Kernels")
VARIANT = "attention.cu"
NAMES = ["attn_forward_bf16", "attn_forward_f32", "attn_dot_bf16", "attn_dot_f32", "attn_dkdv_bf16", "attn_dkdv_f32",
         "attn_dq_bf16", "attn_dq_f32"]
MODS = {}

def module(D):
    key = (D, VARIANT)
    if key in MODS: return MODS[key]
    SRC = open(os.path.join(HERE, VARIANT)).read()
    cubin, log = compile_cu(SRC, ["--gpu-architecture=sm_90", "-std=c++17", f"-DATTN_HEAD_DIM={D}"])
    mod = ctypes.c_void_p()
    r = cu.cuModuleLoadData(ctypes.byref(mod), ctypes.c_char_p(cubin)); assert r == 0, ("load", r)
    fns = {}
    for n in NAMES:
        f = ctypes.c_void_p()
        r = cu.cuModuleGetFunction(ctypes.byref(f), mod, n.encode()); assert r == 0, (n, r)
        fns[n] = f
    row = (D + 8) * 2
    shm = {"attn_forward_bf16": 4 * 64 * row, "attn_dq_bf16": 4 * 64 * row,
           "attn_dkdv_bf16": (64 + 4 * (32 if D > 64 else 64)) * row}
    shm = {n: 0 for n in shm}  # static shared memory
    for n, by in shm.items():
        r = cu.cuFuncSetAttribute(fns[n], 8, by); assert r == 0, ("attr", n, r)
    fns["shm"] = shm
    MODS[key] = fns
    return fns

def launch(f, grid, args, shm=0):
    holders = []
    for a in args:
        if isinstance(a, torch.Tensor): holders.append(ctypes.c_uint64(a.data_ptr()))
        elif isinstance(a, float): holders.append(ctypes.c_float(a))
        elif isinstance(a, tuple) and a[0] == "i64": holders.append(ctypes.c_int64(a[1]))
        else: holders.append(ctypes.c_int32(a))
    arr = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.pointer(h), ctypes.c_void_p) for h in holders])
    stream = torch.cuda.current_stream().cuda_stream
    r = cu.cuLaunchKernel(f, grid[0], grid[1], grid[2], 128, 1, 1, shm, ctypes.c_void_p(stream), arr, None)
    assert r == 0, ("launch", r)

def forward(q, k, v, window, st):
    B, L, H, D = q.shape; KVH = k.shape[2]
    fns = module(D)
    o = torch.full_like(q, float("nan"))
    lse = torch.full((B, H, L), float("nan"), device=dev, dtype=torch.float32)
    sc = 1.0 / math.sqrt(D)
    if st == "bf16":
        launch(fns["attn_forward_bf16"], ((L + 63) // 64, H, B), [q, k, v, o, lse, L, H, KVH, window or 0, sc], fns["shm"]["attn_forward_bf16"])
    else:
        launch(fns["attn_forward_f32"], ((L + 3) // 4, H, B), [q, k, v, o, lse, L, H, KVH, window or 0, sc])
    return o, lse

def backward(q, k, v, o, lse, do, window, st):
    B, L, H, D = q.shape; KVH = k.shape[2]
    fns = module(D); sc = 1.0 / math.sqrt(D)
    dots = torch.empty((B, H, L), device=dev, dtype=torch.float32)
    dq = torch.full_like(q, float("nan")); dk = torch.full_like(k, float("nan")); dv = torch.full_like(v, float("nan"))
    rows = B * L * H
    launch(fns[f"attn_dot_{st}"], ((rows + 3) // 4, 1, 1), [o, do, dots, L, H, ("i64", rows)])
    w = window or 0
    if st == "bf16":
        launch(fns["attn_dkdv_bf16"], ((L + 63) // 64, KVH, B), [q, k, v, do, lse, dots, dk, dv, L, H, KVH, w, sc], fns["shm"]["attn_dkdv_bf16"])
        launch(fns["attn_dq_bf16"], ((L + 63) // 64, H, B), [q, k, v, do, lse, dots, dq, L, H, KVH, w, sc], fns["shm"]["attn_dq_bf16"])
    else:
        launch(fns["attn_dkdv_f32"], ((L + 3) // 4, KVH, B), [q, k, v, do, lse, dots, dk, dv, L, H, KVH, w, sc])
        launch(fns["attn_dq_f32"], ((L + 3) // 4, H, B), [q, k, v, do, lse, dots, dq, L, H, KVH, w, sc])
    return dq, dk, dv

def reference(q, k, v, do, window):
    # float64, [B, L, H, D]
    B, L, H, D = q.shape; KVH = k.shape[2]; G = H // KVH
    q, k, v, do = [t.double().requires_grad_(True) for t in (q, k, v, do)]
    kk = k.repeat_interleave(G, dim=2); vv = v.repeat_interleave(G, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, kk) / math.sqrt(D)
    i = torch.arange(L, device=dev)[:, None]; j = torch.arange(L, device=dev)[None, :]
    vis = j <= i
    if window: vis = vis & (j > i - window)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    o = torch.einsum("bhij,bjhd->bihd", p, vv)
    o.backward(do.detach())
    return o.detach(), lse.detach(), q.grad, k.grad, v.grad

def rel(a, b, floor=0.0):
    return ((a.double() - b).abs().max() / max(b.abs().max().item(), floor, 1e-30)).item() if b.numel() else 0.0

def check_all():
    worst = {}
    fails = []
    n = 0
    t0 = time.time()
    for st in ["f32", "bf16"]:
        dt = torch.float32 if st == "f32" else torch.bfloat16
        for D in [16, 32, 64, 128]:
            for L in [1, 15, 16, 17, 63, 100, 257, 1000]:
                for window in [None, 1, 7, 64, 100]:
                    for (H, KVH) in [(2, 2), (4, 2), (4, 1)]:
                        if L == 1000 and (H, KVH) != (4, 1) and window not in (None, 100): continue
                        B = 2 if L < 1000 else 1
                        g = torch.Generator(device=dev).manual_seed(n)
                        q = torch.randn(B, L, H, D, device=dev, generator=g).to(dt)
                        k = torch.randn(B, L, KVH, D, device=dev, generator=g).to(dt)
                        v = torch.randn(B, L, KVH, D, device=dev, generator=g).to(dt)
                        do = torch.randn(B, L, H, D, device=dev, generator=g).to(dt)
                        o, lse = forward(q, k, v, window, st)
                        dq, dk, dv = backward(q, k, v, o, lse, do, window, st)
                        torch.cuda.synchronize()
                        ro, rl, rdq, rdk, rdv = reference(q, k, v, do, window)
                        fl = rdv.abs().max().item()
                        errs = dict(o=rel(o, ro), lse=rel(lse, rl), dq=rel(dq, rdq, fl), dk=rel(dk, rdk, fl), dv=rel(dv, rdv))
                        tol = 1e-5 if st == "f32" else 2e-2
                        bad = [kname for kname, e in errs.items() if not (e <= tol)]
                        key = f"{st}/D{D}"
                        for kname, e in errs.items():
                            worst[(key, kname)] = max(worst.get((key, kname), 0), e if e == e else 1e9)
                        if bad: fails.append((st, D, L, window, H, KVH, {x: errs[x] for x in bad}))
                        n += 1
    print(f"checked {n} cases in {time.time()-t0:.1f}s, {len(fails)} failures")
    for f in fails[:40]: print("FAIL", f)
    for key in sorted(set(k for k, _ in worst)):
        print(key, " ".join(f"{kn}={worst[(key, kn)]:.2e}" for kn in ["o", "lse", "dq", "dk", "dv"]))
    return len(fails)

def determinism():
    ok = True
    for st in ["bf16", "f32"]:
        dt = torch.float32 if st == "f32" else torch.bfloat16
        B, L, H, KVH, D = (2, 2048, 8, 2, 128) if st == "bf16" else (1, 600, 4, 2, 64)
        g = torch.Generator(device=dev).manual_seed(7)
        q, do = [torch.randn(B, L, H, D, device=dev, generator=g).to(dt) for _ in range(2)]
        k, v = [torch.randn(B, L, KVH, D, device=dev, generator=g).to(dt) for _ in range(2)]
        outs = []
        for _ in range(3):
            o, lse = forward(q, k, v, 300, st)
            outs.append([x.clone() for x in (o, lse) + backward(q, k, v, o, lse, do, 300, st)])
        torch.cuda.synchronize()
        same = all(torch.equal(a.view(torch.int16) if a.dtype == torch.bfloat16 else a.view(torch.int32),
                               b.view(torch.int16) if b.dtype == torch.bfloat16 else b.view(torch.int32))
                   for r in outs[1:] for a, b in zip(outs[0], r))
        print(f"determinism {st}: {'bit-identical' if same else 'DIFFERENT'}")
        ok &= same
    return ok

def bench_ms(fn, reps=10):
    fn(); torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]

def pairs(L, w):
    w = min(w or L, L)
    return w * (w + 1) // 2 + (L - w) * w

def timing():
    import torch.nn.functional as F
    results = []
    for D in [128, 16]:
        H = 2048 // D
        for L in [4096, 8192, 16384, 32768]:
            B = 32768 // L
            for window in [None, 512]:
                g = torch.Generator(device=dev).manual_seed(1)
                q, do = [torch.randn(B, L, H, D, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(2)]
                k, v = [torch.randn(B, L, H, D, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(2)]
                fw = 4.0 * B * H * D * pairs(L, window)
                state = {}
                def f_fwd():
                    state["o"], state["lse"] = forward(q, k, v, window, "bf16")
                def f_all():
                    o, lse = forward(q, k, v, window, "bf16")
                    backward(q, k, v, o, lse, do, window, "bf16")
                t_f = bench_ms(f_fwd); t_a = bench_ms(f_all)
                row = dict(D=D, L=L, B=B, H=H, window=window, ours_fwd_ms=t_f, ours_fwdbwd_ms=t_a,
                           ours_fwd_tflops=fw / t_f / 1e9, ours_fwdbwd_tflops=3.5 * fw / t_a / 1e9)
                qt, kt, vt, dot = [x.transpose(1, 2).contiguous().requires_grad_(True) for x in (q, k, v, do)]
                if window is None:
                    def t_fwd():
                        with torch.no_grad(): F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
                    def t_all():
                        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
                        out.backward(dot)
                    try:
                        a = bench_ms(t_fwd); c = bench_ms(t_all)
                        row.update(sdpa_fwd_ms=a, sdpa_fwdbwd_ms=c, sdpa_fwd_tflops=fw / a / 1e9, sdpa_fwdbwd_tflops=3.5 * fw / c / 1e9)
                        from torch.nn.attention import SDPBackend, sdpa_kernel
                        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                            a = bench_ms(t_fwd); c = bench_ms(t_all)
                        row.update(fa2_fwd_tflops=fw / a / 1e9, fa2_fwdbwd_tflops=3.5 * fw / c / 1e9)
                    except Exception as e:
                        row["sdpa_error"] = str(e)[:200]
                print(json.dumps({k: (round(x, 3) if isinstance(x, float) else x) for k, x in row.items()}), flush=True)
                results.append(row)
                del q, k, v, do, qt, kt, vt, dot
    return results

if __name__ == "__main__":
    what = sys.argv[1:] or ["check", "det", "time"]
    if "check" in what: check_all()
    if "det" in what: determinism()
    if "time" in what:
        res = timing()
        out = os.environ.get("OUT")
        if out: json.dump(res, open(os.path.join(out, "timing.json"), "w"))
