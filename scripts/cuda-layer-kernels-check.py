# Checks and times the training layers' kernels (Sources/PhalanxCUDA/Kernels/layers.cu) on a GPU
# without Swift: compiles the source with the toolkit's NVRTC, loads it with the driver into
# PyTorch's context, and compares every kernel with a torch float64 (or bit-exact float32) reference
# on ragged sizes in both storages, checks that the reductions give the same bits twice, then times
# each kernel at training sizes against the device-to-device copy bandwidth. The launch plans
# mirror CUDALayerKernels.swift. Prints PASS/FAIL/TIME lines ($OUT/results.txt when OUT is set).
#
#   python3 scripts/cuda-layer-kernels-check.py [FOLDER holding layers.cu]
import ctypes, glob, math, sys, traceback
import numpy as np, torch

HERE = sys.argv[1] if len(sys.argv) > 1 else "Sources/PhalanxCUDA/Kernels"
SRC = open(f"{HERE}/layers.cu", "rb").read()
dev = torch.device("cuda")
torch.zeros(1, device=dev)
nvrtc = ctypes.CDLL(sorted(glob.glob("/usr/local/cuda/targets/x86_64-linux/lib/libnvrtc.so*"))[-1])
cuda = ctypes.CDLL("libcuda.so.1")
cuda.cuInit(0)
_ctx = ctypes.c_void_p(); cuda.cuCtxGetCurrent(ctypes.byref(_ctx))
if not _ctx.value:
    cuda.cuDevicePrimaryCtxRetain(ctypes.byref(_ctx), 0); cuda.cuCtxSetCurrent(_ctx)
prog = ctypes.c_void_p()
assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), SRC, b"layers.cu", 0, None, None) == 0
opts = [b"--gpu-architecture=sm_90", b"-std=c++17"]
r = nvrtc.nvrtcCompileProgram(prog, 2, (ctypes.c_char_p * 2)(*opts))
n = ctypes.c_size_t(); nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
log = ctypes.create_string_buffer(n.value); nvrtc.nvrtcGetProgramLog(prog, log); print(log.value.decode()[:3000])
assert r == 0
nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(n)); cubin = ctypes.create_string_buffer(n.value); nvrtc.nvrtcGetCUBIN(prog, cubin)
module = ctypes.c_void_p()
assert cuda.cuModuleLoadData(ctypes.byref(module), cubin) == 0
FN = {}
def fn(name):
    if name not in FN:
        f = ctypes.c_void_p(); rc = cuda.cuModuleGetFunction(ctypes.byref(f), module, name.encode()); assert rc == 0, name
        regs = ctypes.c_int(); cuda.cuFuncGetAttribute(ctypes.byref(regs), 4, f)  # NUM_REGS
        print(f"  [{name}: {regs.value} registers]"); FN[name] = f
    return FN[name]
def P(t, off=0): return ctypes.c_void_p(t.data_ptr() + off * t.element_size())
I = ctypes.c_int; L = ctypes.c_longlong; F = ctypes.c_float; U = ctypes.c_uint64
def launch(name, grid, block, *args):
    arr = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
    g = grid if isinstance(grid, tuple) else (grid, 1, 1)
    rc = cuda.cuLaunchKernel(fn(name), g[0], g[1], g[2], block, 1, 1, 0, None, arr, None)
    assert rc == 0, (name, rc)

def bf16(t): return t.to(torch.bfloat16)
def store(x, st): return x.float().contiguous() if st == "f32" else x.to(torch.bfloat16).contiguous()
def val(x): return x.double()
RESULTS = []; FAIL = [0]
def report(name, err, tol, extra=""):
    ok = err <= tol
    if not ok: FAIL[0] += 1
    line = f"{'PASS' if ok else 'FAIL'} {name}: err {err:.3g} (tol {tol:.3g}) {extra}"; print(line); RESULTS.append(line)
def relerr(a, b):
    a = a.double(); b = b.double()
    scale = b.abs().max().item() + 1e-30
    return ((a - b).abs() / (b.abs() + scale)).max().item() if a.numel() else 0.0
TOL = {"f32": 2e-6, "bf16": 2 ** -7}
def timeit(f, reps=20):
    f(); torch.cuda.synchronize()
    s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(5):
        s.record()
        for _ in range(reps): f()
        e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e) / reps)
    return sorted(ts)[2]
def vecok(st, *ts_offs):
    return all((t.data_ptr() + o * t.element_size()) % 16 == 0 for t, o in ts_offs)

# ---- launch plans (mirror CUDALayerKernels.swift) ----
def rowplan(units_per_row, per_thread):
    T = max(32, -(-units_per_row // per_thread))
    if T <= 256: T = 1 << (T - 1).bit_length(); T = max(T, 32)
    else: T = -(-T // 32) * 32
    assert T <= 1024
    B = max(T, 256)
    return T, B, B // T

def rmsnorm_fwd(st, x, w, y, rows, dim, eps=1e-5):
    vn = 16 // (4 if st == "f32" else 2)
    vec = dim % vn == 0 and vecok(st, (x, 0), (w, 0), (y, 0))
    N = vn if vec else 1
    T, B, G = rowplan(dim // N, 32 // N)
    grid = min(-(-rows // G), 65536)
    launch(f"rmsnorm_forward_{st}_{'vec' if vec else 'scalar'}", grid, B, P(x), P(w), P(y), I(rows), I(dim), F(eps), I(T))

def rmsnorm_bwd(st, x, w, dy, dx, dw, rows, dim, eps=1e-5):
    vn = 16 // (4 if st == "f32" else 2)
    vec = dim % vn == 0 and vecok(st, (x, 0), (w, 0), (dy, 0), (dx, 0))
    N = vn if vec else 1
    T, B, G = rowplan(dim // N, 32 // N)
    grid = min(-(-rows // G), 1024)
    partial = torch.empty(grid * dim, device=dev)
    launch(f"rmsnorm_backward_{st}_{'vec' if vec else 'scalar'}", grid, B, P(x), P(w), P(dy), P(dx), P(partial), I(rows), I(dim), F(eps), I(T))
    launch("rmsnorm_weight_grad", -(-dim // 256), 256, P(partial), P(dw), I(grid), I(dim))

def check_rmsnorm():
    for st in ["f32", "bf16"]:
        for rows in [1, 7, 33, 1000]:
            for dim in [16, 48, 1000, 1001]:
                g = torch.Generator(device="cpu").manual_seed(rows * 7 + dim)
                x = torch.randn(rows, dim, generator=g) * 3; w = 1 + 0.3 * torch.randn(dim, generator=g); dy = torch.randn(rows, dim, generator=g)
                xs, dys = store(x, st).to(dev), store(dy, st).to(dev); wd = w.to(dev)
                y = torch.empty_like(xs); rmsnorm_fwd(st, xs, wd, y, rows, dim)
                xd = val(xs); wdd = w.double().to(dev); dyd = val(dys)
                r = 1 / torch.sqrt((xd * xd).mean(1, keepdim=True) + 1e-5)
                yref = xd * r * wdd
                dx = torch.empty_like(xs); dw = torch.full((dim,), 0.5, device=dev)
                rmsnorm_bwd(st, xs, wd, dys, dx, dw, rows, dim)
                xhat = xd * r; gg = dyd * wdd
                dxref = r * (gg - xhat * (gg * xhat).mean(1, keepdim=True)); dwref = 0.5 + (dyd * xhat).sum(0)
                report(f"rmsnorm {st} {rows}x{dim} y", relerr(y, yref), TOL[st])
                report(f"rmsnorm {st} {rows}x{dim} dx", relerr(dx, dxref), TOL[st] * 4)
                report(f"rmsnorm {st} {rows}x{dim} dw", relerr(dw, dwref), 2e-5)
        # determinism of dw
        rows, dim = 4096, 2048
        x = store(torch.randn(rows, dim), st).to(dev); dy = store(torch.randn(rows, dim), st).to(dev); w = torch.randn(dim, device=dev)
        outs = []
        for _ in range(2):
            dx = torch.empty_like(x); dw = torch.zeros(dim, device=dev); rmsnorm_bwd(st, x, w, dy, dx, dw, rows, dim); outs.append((dx.clone(), dw.clone()))
        report(f"rmsnorm {st} backward bit-identical twice", 0.0 if all(torch.equal(a, b) for a, b in zip(*outs)) else 1.0, 0.0)

def time_rmsnorm():
    for st in ["bf16", "f32"]:
        rows, dim = 65536, 2048
        x = store(torch.randn(rows, dim), st).to(dev); y = torch.empty_like(x); w = torch.randn(dim, device=dev)
        dy = torch.randn_like(y); dx = torch.empty_like(x); dw = torch.zeros(dim, device=dev)
        b = x.numel() * x.element_size()
        t = timeit(lambda: rmsnorm_fwd(st, x, w, y, rows, dim)); perf(f"rmsnorm forward {st} {rows}x{dim}", t, 2 * b)
        t = timeit(lambda: rmsnorm_bwd(st, x, w, dy, dx, dw, rows, dim)); perf(f"rmsnorm backward {st} {rows}x{dim}", t, 3 * b)

COPY = [None]
def perf(name, ms, bytes_):
    gbs = bytes_ / ms / 1e6
    line = f"TIME {name}: {ms*1000:.1f} us, {gbs:.0f} GB/s, {gbs / COPY[0] * 100:.0f}% of copy"; print(line); RESULTS.append(line)

def rope_table(D, base, positions):
    half = D // 2
    i = np.arange(half); freq = np.power(float(base), -2.0 * i / D)
    ang = np.arange(positions)[:, None] * freq[None, :]
    return torch.tensor(np.cos(ang), dtype=torch.float32).to(dev).contiguous(), torch.tensor(np.sin(ang), dtype=torch.float32).to(dev).contiguous()

def rope_launch(st, x, c, s, rows, length, heads, D, start, inverse):
    K = (4 if st == "f32" else 8)
    vec = (D // 2) % K == 0 and vecok(st, (x, 0))
    K = K if vec else 1
    units = rows * heads * (D // 2 // K)
    launch(f"rope_{st}_{'vec' if vec else 'scalar'}", min(-(-units // 256), 8192), 256, P(x), P(c), P(s), L(rows), I(length), I(heads), I(D), I(start), I(inverse))

def check_rope():
    for st in ["f32", "bf16"]:
        for (B, Lh, H, D, start) in [(1, 1, 1, 16, 0), (2, 7, 3, 48, 0), (3, 33, 2, 16, 5), (1, 100, 4, 128, 0), (2, 9, 1, 6, 3)]:
            c, s = rope_table(D, 10000, start + Lh)
            x = store(torch.randn(B, Lh, H, D), st).to(dev); x0 = val(x).clone()
            rope_launch(st, x, c, s, B * Lh, Lh, H, D, start, 0)
            half = D // 2; pos = (start + torch.arange(Lh, device=dev)).double()
            freq = torch.pow(torch.tensor(10000.0, dtype=torch.float64), -2 * torch.arange(half, dtype=torch.float64) / D).to(dev)
            ang = pos[:, None] * freq[None, :]; cc = torch.cos(ang)[None, :, None, :]; ss = torch.sin(ang)[None, :, None, :]
            a, b = x0[..., :half], x0[..., half:]
            ref = torch.cat([a * cc - b * ss, b * cc + a * ss], -1)
            report(f"rope {st} {B}x{Lh}x{H}x{D} start {start}", relerr(x, ref), TOL[st])
            rope_launch(st, x, c, s, B * Lh, Lh, H, D, start, 1)
            report(f"rope inverse {st} {B}x{Lh}x{H}x{D}", relerr(x, x0), TOL[st] * 2)

def time_rope():
    for st in ["bf16", "f32"]:
        B, Lh, H, D = 2, 32768, 16, 128
        c, s = rope_table(D, 10000, Lh); x = store(torch.randn(B, Lh, H, D), st).to(dev)
        t = timeit(lambda: rope_launch(st, x, c, s, B * Lh, Lh, H, D, 0, 0)); perf(f"rope {st} {B}x{Lh}x{H}x{D}", t, 2 * x.numel() * x.element_size())

def elem_plan(st, cols, *ptrs):
    vec = cols % 8 == 0 and vecok(st, *ptrs)
    return vec, (8 if vec else 1)

def swiglu_fwd(st, gate, up, ldin, h, ldout, rows, cols, goff=0, uoff=0):
    vec, K = elem_plan(st, cols, (gate, goff), (up, uoff), (h, 0))
    vec = vec and ldin % 8 == 0 and ldout % 8 == 0; K = 8 if vec else 1
    units = rows * (cols // K)
    launch(f"swiglu_forward_{st}_{'vec' if vec else 'scalar'}", min(-(-units // 256), 8192), 256, P(gate, goff), P(up, uoff), L(ldin), P(h), L(ldout), L(rows), I(cols))

def swiglu_bwd(st, gate, up, ldin, dh, lddh, dg, du, ldout, rows, cols, goff=0, uoff=0, dgoff=0, duoff=0):
    vec, K = elem_plan(st, cols, (gate, goff), (up, uoff), (dh, 0), (dg, dgoff), (du, duoff))
    vec = vec and ldin % 8 == 0 and ldout % 8 == 0 and lddh % 8 == 0; K = 8 if vec else 1
    units = rows * (cols // K)
    launch(f"swiglu_backward_{st}_{'vec' if vec else 'scalar'}", min(-(-units // 256), 8192), 256, P(gate, goff), P(up, uoff), L(ldin), P(dh), L(lddh), P(dg, dgoff), P(du, duoff), L(ldout), L(rows), I(cols))

def check_swiglu():
    for st in ["f32", "bf16"]:
        for rows, hid in [(1, 16), (7, 48), (33, 1000), (1000, 1001)]:
            z = store(torch.randn(rows, 2 * hid) * 3, st).to(dev)  # fused gate | up
            h = store(torch.zeros(rows, hid), st).to(dev)
            swiglu_fwd(st, z, z, 2 * hid, h, hid, rows, hid, 0, hid)
            zd = val(z); gd, ud = zd[:, :hid], zd[:, hid:]; sg = torch.sigmoid(gd)
            report(f"swiglu fwd {st} {rows}x{hid}", relerr(h, gd * sg * ud), TOL[st])
            dh = store(torch.randn(rows, hid), st).to(dev); dhd = val(dh)
            dz = store(torch.zeros(rows, 2 * hid), st).to(dev)
            swiglu_bwd(st, z, z, 2 * hid, dh, hid, dz, dz, 2 * hid, rows, hid, 0, hid, 0, hid)
            dgref = dhd * ud * sg * (1 + gd * (1 - sg)); duref = dhd * gd * sg
            report(f"swiglu bwd {st} {rows}x{hid} dg", relerr(dz[:, :hid], dgref), TOL[st] * 2)
            report(f"swiglu bwd {st} {rows}x{hid} du", relerr(dz[:, hid:], duref), TOL[st] * 2)

def time_swiglu():
    for st in ["bf16", "f32"]:
        rows, hid = 65536, 2048
        g = store(torch.randn(rows, hid), st).to(dev); u = torch.empty_like(g).copy_(g); h = torch.empty_like(g); dh = torch.empty_like(g).copy_(g)
        du = torch.empty_like(g); e = g.element_size() * g.numel()
        t = timeit(lambda: swiglu_fwd(st, g, u, hid, h, hid, rows, hid)); perf(f"swiglu forward {st} {rows}x{hid}", t, 3 * e)
        t = timeit(lambda: swiglu_bwd(st, g, u, hid, dh, hid, dh, du, hid, rows, hid)); perf(f"swiglu backward {st} {rows}x{hid}", t, 5 * e)

def emb_fwd(st, tokens, table, y, rows, dim, V):
    vec = dim % 8 == 0 and vecok(st, (table, 0), (y, 0)); K = 8 if vec else 1
    units = rows * (dim // K)
    launch(f"embedding_forward_{st}_{'vec' if vec else 'scalar'}", min(-(-units // 256), 8192), 256, P(tokens), P(table), P(y), L(rows), I(dim), I(V))

def emb_plan(tokens_np, V):
    order = np.argsort(tokens_np, kind="stable").astype(np.int32)
    counts = np.bincount(tokens_np, minlength=V)
    used = np.nonzero(counts)[0].astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts[used])]).astype(np.int32)
    return [torch.tensor(a, device=dev) for a in (used, offsets, order)]

def emb_bwd(st, plan, dy, dw, dim):
    used, offsets, positions = plan
    vec = dim % 8 == 0 and vecok(st, (dy, 0), (dw, 0)); K = 8 if vec else 1
    tiles = -(-(dim // K) // 128)
    launch(f"embedding_backward_{st}_{'vec' if vec else 'scalar'}", (used.numel(), tiles, 1), 128, P(used), P(offsets), P(positions), P(dy), P(dw), I(dim))

def check_embedding():
    for st in ["f32", "bf16"]:
        for rows, dim, V in [(1, 16, 256), (7, 48, 1001), (33, 1000, 256), (1000, 1001, 50257)]:
            rng = np.random.default_rng(rows + dim)
            tok = rng.integers(0, min(V, 300), rows).astype(np.int32)
            table = torch.randn(V, dim, device=dev) * 0.02
            y = store(torch.zeros(rows, dim), st).to(dev); t = torch.tensor(tok, device=dev)
            emb_fwd(st, t, table, y, rows, dim, V)
            report(f"embedding fwd {st} {rows}x{dim} V {V}", relerr(y, store(table[t.long()], st)), 0.0)
            dy = store(torch.randn(rows, dim), st).to(dev); dw = torch.randn(V, dim, device=dev) * 0.1; dw0 = dw.clone()
            emb_bwd(st, emb_plan(tok, V), dy, dw, dim)
            ref = dw0.clone()
            for i, tk in enumerate(tok): ref[tk] += dy[i].float()   # the CPU's order, float32
            report(f"embedding bwd {st} {rows}x{dim} V {V} (bit-exact vs sequential f32)", (dw - ref).abs().max().item(), 0.0)

def time_embedding():
    st = "bf16"; rows, dim, V = 65536, 2048, 256
    tok = np.random.default_rng(0).integers(0, V, rows).astype(np.int32); t = torch.tensor(tok, device=dev)
    table = torch.randn(V, dim, device=dev); y = store(torch.zeros(rows, dim), st).to(dev)
    tm = timeit(lambda: emb_fwd(st, t, table, y, rows, dim, V)); perf(f"embedding forward {st} {rows}x{dim}", tm, y.numel() * 2 + 0)
    plan = emb_plan(tok, V); dw = torch.zeros(V, dim, device=dev)
    tm = timeit(lambda: emb_bwd(st, plan, y, dw, dim)); perf(f"embedding backward {st} {rows}x{dim} V {V}", tm, y.numel() * 2)

M64 = (1 << 64) - 1
def mix(z):
    z = np.uint64(z)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))
def dropout_params(rate, seed, step, micro, block, branch):
    inner = ((step * 0x9E3779B97F4A7C15) & M64) ^ ((micro << 48) & M64) ^ ((block << 8) & M64) ^ branch
    stream = int(mix(np.uint64(seed ^ int(mix(np.uint64(inner))))))
    threshold = int(math.floor(float(np.float32(rate)) * (1 << 24) + 0.5))
    keep = float(np.float32(1) / (np.float32(1) - np.float32(rate)))
    return stream, threshold, keep
def dropout_launch(st, x, count, stream, thr, keep, index=0):
    vec = vecok(st, (x, 0)); nv = (count // 8) * 8 if vec else 0
    if nv: launch(f"dropout_{st}_vec", min(-(-(nv // 8) // 256), 8192), 256, P(x), L(nv), U(stream), U(thr), F(keep), U(index))
    if count - nv: launch(f"dropout_{st}_scalar", min(-(-(count - nv) // 256), 8192), 256, P(x, nv), L(count - nv), U(stream), U(thr), F(keep), U(index + nv))

def check_dropout():
    for st in ["f32", "bf16"]:
        for count in [1, 7, 1000, 33 * 1001]:
            stream, thr, keep = dropout_params(0.1, 1234567, 17, 2, 3, 1)
            x = store(torch.randn(count), st).to(dev); x0 = x.clone().float()
            dropout_launch(st, x, count, stream, thr, keep)
            i = np.arange(count, dtype=np.uint64)
            with np.errstate(over="ignore"):
                h = mix(np.uint64(stream) + i * np.uint64(0xD1B54A32D192ED03)) >> np.uint64(40)
            k = torch.tensor((h >= np.uint64(thr)).astype(np.float32), device=dev)
            ref = store(x0 * keep * k, st)
            report(f"dropout {st} {count} (bit-exact)", (x.float() - ref.float()).abs().max().item(), 0.0, f"kept {k.mean().item():.3f}")

def time_dropout():
    for st in ["bf16", "f32"]:
        count = 65536 * 2048; x = store(torch.randn(count), st).to(dev); s, t, k = dropout_params(0.1, 1, 2, 0, 3, 0)
        tm = timeit(lambda: dropout_launch(st, x, count, s, t, k)); perf(f"dropout {st} {count}", tm, 2 * x.numel() * x.element_size())

def xent_T(V):
    T = 1 << (max(1, -(-V // 128)) - 1).bit_length()
    return min(max(T, 32), 1024)
def xent(st, logits, targets, losses, rows, V, scale):
    T = xent_T(V); B = max(T, 256); G = B // T
    launch(f"cross_entropy_{st}", min(-(-rows // G), 65536), B, P(logits), P(targets), P(losses), I(rows), I(V), F(scale), I(T))
def mean_loss(losses, count, out):
    launch("mean_loss", 1, 1024, P(losses), L(count), L(count), P(out))

def check_xent():
    for st in ["f32", "bf16"]:
        for rows, V in [(1, 256), (7, 1001), (33, 50257), (1000, 256), (1000, 1001), (33, 65536), (5, 7)]:
            g = torch.Generator().manual_seed(rows * 3 + V)
            z = store(torch.randn(rows, V, generator=g) * 4, st).to(dev); zd = val(z)
            tgt = torch.randint(0, V, (rows,), generator=g, dtype=torch.int32).to(dev)
            losses = torch.empty(rows, device=dev); out = torch.zeros(1, device=dev)
            scale = 1.0 / rows
            xent(st, z, tgt, losses, rows, V, scale); mean_loss(losses, rows, out)
            lse = torch.logsumexp(zd, 1); lref = lse - zd[torch.arange(rows), tgt.long()]
            gref = torch.softmax(zd, 1) * scale; gref[torch.arange(rows), tgt.long()] -= scale
            report(f"xent {st} {rows}x{V} loss", relerr(losses, lref), 2e-6)
            report(f"xent {st} {rows}x{V} mean", abs(out.item() - lref.mean().item()) / abs(lref.mean().item()), 2e-6)
            report(f"xent {st} {rows}x{V} grad", relerr(z, gref), TOL[st] if st == "bf16" else 1e-5)
        z = store(torch.randn(4096, 50257), st).to(dev); tgt = torch.randint(0, 50257, (4096,), dtype=torch.int32).to(dev)
        outs = []
        for _ in range(2):
            zz = z.clone(); losses = torch.empty(4096, device=dev); out = torch.zeros(1, device=dev)
            xent(st, zz, tgt, losses, 4096, 50257, 1 / 4096); mean_loss(losses, 4096, out); outs.append((zz, losses, out))
        report(f"xent {st} bit-identical twice", 0.0 if all(torch.equal(a, b) for a, b in zip(*outs)) else 1.0, 0.0)

def time_xent():
    for st in ["bf16", "f32"]:
        for rows, V in [(65536, 256), (8192, 50257)]:
            z = store(torch.randn(rows, V), st).to(dev); tgt = torch.randint(0, V, (rows,), dtype=torch.int32).to(dev); losses = torch.empty(rows, device=dev)
            tm = timeit(lambda: xent(st, z, tgt, losses, rows, V, 1.0 / rows)); perf(f"cross-entropy {st} {rows}x{V}", tm, 2 * z.numel() * z.element_size())

def clip(segments, maxnorm, state, chunk=65536):
    slots = [-(-c // chunk) for _, c in segments]
    partial = torch.empty(max(sum(slots), 1), dtype=torch.float64, device=dev)
    o = 0
    for (t, c), sl in zip(segments, slots):
        if sl: launch("sum_squares", sl, 256, P(t), L(c), L(chunk), P(partial, o))
        o += sl
    launch("clip_state", 1, 1024, P(partial), I(sum(slots)), F(maxnorm), P(state))

def adamw(w, g, m, v, copy, count, state, lr, b1, b2, eps, decay, c1, c2):
    vec = all(t.data_ptr() % 16 == 0 for t in (w, g, m, v)) and (copy is None or copy.data_ptr() % 8 == 0)
    nv = (count // 4) * 4 if vec else 0
    cp = lambda off: P(copy, off) if copy is not None else ctypes.c_void_p(0)
    if nv: launch("adamw_vec", min(-(-(nv // 4) // 256), 8192), 256, P(w), P(g), P(m), P(v), cp(0), L(nv), P(state), F(lr), F(b1), F(b2), F(eps), F(decay), F(c1), F(c2))
    if count - nv: launch("adamw_scalar", min(-(-(count - nv) // 256), 8192), 256, P(w, nv), P(g, nv), P(m, nv), P(v, nv), cp(nv), L(count - nv), P(state), F(lr), F(b1), F(b2), F(eps), F(decay), F(c1), F(c2))

def check_optimizer():
    sizes = [1, 7, 1000, 33 * 1001, 3_000_001]
    gs = [torch.randn(n, device=dev) * 0.01 for n in sizes]
    state = torch.zeros(4, device=dev)
    for maxn in [0.1, 1e6]:
        clip([(g, g.numel()) for g in gs], maxn, state)
        tot = sum((g.double() ** 2).sum().item() for g in gs); norm = math.sqrt(tot)
        report(f"clip norm (maxNorm {maxn})", abs(state[0].item() - norm) / norm, 1e-6)
        n32 = np.float32(state[0].item())
        expect = float(np.float32(maxn) / n32) if n32 > np.float32(maxn) else 1.0
        report(f"clip scale (maxNorm {maxn})", abs(state[1].item() - expect), 0.0)
    outs = []
    for _ in range(2):
        clip([(g, g.numel()) for g in gs], 1.0, state); outs.append(state.clone())
    report("clip bit-identical twice", 0.0 if torch.equal(outs[0], outs[1]) else 1.0, 0.0)
    bad = [g.clone() for g in gs]; bad[3][5] = float("nan"); clip([(g, g.numel()) for g in bad], 1.0, state)
    report("clip nonfinite flag on NaN", 0.0 if state[2].view(torch.int32).item() == 1 else 1.0, 0.0)
    # AdamW bit-exact against a numpy float32 sequential evaluation
    b1, b2, eps, lr, wd = np.float32(0.9), np.float32(0.95), np.float32(1e-8), np.float32(3e-4), np.float32(0.1)
    for n in [1, 7, 1000, 33 * 1001]:
        for step in [1, 10]:
            rng = np.random.default_rng(n + step)
            w = rng.standard_normal(n).astype(np.float32); g = (rng.standard_normal(n) * 0.01).astype(np.float32)
            m = (rng.standard_normal(n) * 0.01).astype(np.float32); v = np.abs(rng.standard_normal(n) * 1e-4).astype(np.float32)
            c1 = np.float32(1) - np.float32(b1 ** np.float32(step)); c2 = np.float32(1) - np.float32(b2 ** np.float32(step))
            clipstate = torch.tensor([1.0, 0.5, 0.0, 0.0], device=dev)
            W, G, Mm, Vv = [torch.tensor(a, device=dev) for a in (w, g, m, v)]; copy = torch.zeros(n, dtype=torch.bfloat16, device=dev)
            adamw(W, G, Mm, Vv, copy, n, clipstate, lr, b1, b2, eps, wd, c1, c2)
            gg = g * np.float32(0.5)
            mr = b1 * m + (np.float32(1) - b1) * gg; vr = b2 * v + (np.float32(1) - b2) * gg * gg
            wr = w - lr * ((mr / c1) / (np.sqrt(vr / c2) + eps) + wd * w)
            e = max(np.abs(W.cpu().numpy() - wr).max(), np.abs(Mm.cpu().numpy() - mr).max(), np.abs(Vv.cpu().numpy() - vr).max())
            report(f"adamw {n} step {step} (bit-exact vs float32 sequence)", float(e), 0.0)
            report(f"adamw {n} bf16 copy", (copy.float() - W.to(torch.bfloat16).float()).abs().max().item(), 0.0)
            W0 = W.clone(); clipstate[2] = torch.tensor([1], dtype=torch.int32).view(torch.float32)[0].to(dev)
            adamw(W, G, Mm, Vv, None, n, clipstate, lr, b1, b2, eps, wd, c1, c2)
            report(f"adamw {n} skipped when non-finite", 0.0 if torch.equal(W, W0) else 1.0, 0.0)

def time_optimizer():
    n = 400_000_000
    w, g, m, v = [torch.randn(n, device=dev) for _ in range(4)]; copy = torch.empty(n, dtype=torch.bfloat16, device=dev); state = torch.tensor([1.0, 1.0, 0.0, 0.0], device=dev)
    t = timeit(lambda: clip([(g, n)], 1.0, state), 5); perf(f"grad norm {n}", t, 4 * n)
    t = timeit(lambda: adamw(w, g, m, v, copy, n, state, 1e-4, .9, .95, 1e-8, .1, .1, .05), 5); perf(f"adamw {n} + bf16 copy", t, n * (16 + 12 + 2))
    del w, g, m, v, copy

def check_helpers():
    for ys in ["f32", "bf16"]:
        for xs in ["f32", "bf16"]:
            for count in [1, 7, 1001, 65536 + 3]:
                y = store(torch.randn(count), ys).to(dev); x = store(torch.randn(count), xs).to(dev); y0 = y.clone()
                vec = y.data_ptr() % 16 == 0 and x.data_ptr() % 16 == 0; nv = (count // 8) * 8 if vec else 0
                if nv: launch(f"add_{ys}_{xs}_vec", -(-(nv // 8) // 256), 256, P(y), P(x), L(nv))
                if count - nv: launch(f"add_{ys}_{xs}_scalar", -(-(count - nv) // 256), 256, P(y, nv), P(x, nv), L(count - nv))
                ref = store(y0.float() + x.float(), ys)
                report(f"add {ys}+={xs} {count} (bit-exact)", (y.float() - ref.float()).abs().max().item(), 0.0)
                if ys != xs:
                    z = store(torch.zeros(count), ys).to(dev)
                    if nv: launch(f"convert_{ys}_{xs}_vec", -(-(nv // 8) // 256), 256, P(z), P(x), L(nv))
                    if count - nv: launch(f"convert_{ys}_{xs}_scalar", -(-(count - nv) // 256), 256, P(z, nv), P(x, nv), L(count - nv))
                    report(f"convert {xs}->{ys} {count} (bit-exact)", (z.float() - store(x.float(), ys).float()).abs().max().item(), 0.0)
        x = store(torch.randn(1001), ys).to(dev); x0 = x.clone()
        launch(f"scale_{ys}_vec", 1, 256, P(x), L(1000), F(0.3)); launch(f"scale_{ys}_scalar", 1, 256, P(x, 1000), L(1), F(0.3))
        report(f"scale {ys} (bit-exact)", (x.float() - store(x0.float() * np.float32(0.3), ys).float()).abs().max().item(), 0.0)
        launch(f"fill_{ys}_vec", 1, 256, P(x), L(1000), F(1.5)); launch(f"fill_{ys}_scalar", 1, 256, P(x, 1000), L(1), F(1.5))
        report(f"fill {ys}", (x.float() - 1.5).abs().max().item(), 0.0)
    count = 65536 * 2048; y = torch.randn(count, device=dev); x = torch.randn(count, device=dev).to(torch.bfloat16)
    t = timeit(lambda: launch("add_f32_bf16_vec", min(count // 8 // 256, 8192), 256, P(y), P(x), L(count))); perf("add f32 += bf16", t, count * 10)
    t = timeit(lambda: launch("convert_bf16_f32_vec", min(count // 8 // 256, 8192), 256, P(x), P(y), L(count))); perf("convert f32 -> bf16", t, count * 6)

def main():
    a = torch.empty(1 << 28, dtype=torch.uint8, device=dev); b = torch.empty_like(a)
    t = timeit(lambda: b.copy_(a)); COPY[0] = 2 * a.numel() / t / 1e6; print(f"copy {COPY[0]:.0f} GB/s"); RESULTS.append(f"copy {COPY[0]:.0f} GB/s")
    del a, b
    for f in [check_rmsnorm, check_rope, check_swiglu, check_embedding, check_dropout, check_xent, check_optimizer, check_helpers,
              time_rmsnorm, time_rope, time_swiglu, time_embedding, time_dropout, time_xent, time_optimizer]:
        try: f()
        except Exception: FAIL[0] += 1; traceback.print_exc(); RESULTS.append(f"ERROR in {f.__name__}: {traceback.format_exc()[-800:]}")
        torch.cuda.synchronize()
    print(f"\n{FAIL[0]} failures")
    import os
    if os.environ.get("OUT"): open(os.environ["OUT"] + "/results.txt", "w").write("\n".join(RESULTS) + f"\n{FAIL[0]} failures\n")

main()
