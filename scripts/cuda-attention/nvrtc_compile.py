# Compile attention.cu with NVRTC through ctypes; returns the CUBIN bytes (no GPU needed).
import ctypes, os, sys, glob

def find_nvrtc():
    env = os.environ.get("PHALANX_NVRTC")
    if env: return env
    c = sorted(glob.glob("/usr/local/cuda/targets/x86_64-linux/lib/libnvrtc.so*"))
    c = [x for x in c if "builtins" not in x]
    return c[0]

def compile_cu(src, options, name="attention.cu"):
    lib = ctypes.CDLL(find_nvrtc())
    prog = ctypes.c_void_p()
    r = lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None)
    assert r == 0, r
    opts = [o.encode() for o in options]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    r = lib.nvrtcCompileProgram(prog, len(opts), arr)
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    if r != 0:
        raise RuntimeError("NVRTC failed:\n" + log.value.decode())
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetCUBIN(prog, buf)
    return buf.raw, log.value.decode()

if __name__ == "__main__":
    src = open(sys.argv[1]).read()
    for d in [16, 32, 64, 128]:
        cubin, log = compile_cu(src, ["--gpu-architecture=sm_90", "-std=c++17", f"-DATTN_HEAD_DIM={d}", "-Xptxas=-v"])
        print(d, len(cubin))
        for line in log.splitlines():
            if "registers" in line or "spill" in line or "Compiling" in line or "warning" in line.lower(): print("  ", line)
