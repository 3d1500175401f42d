import ctypes, sys
lib = ctypes.CDLL("/opt/cudalocal/nvidia/cu13/lib/libnvrtc.so.13")
src = open(sys.argv[1]).read().encode()
out = sys.argv[2]
prog = ctypes.c_void_p()
assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"k.cu", 0, None, None) == 0
opts = [b"--gpu-architecture=compute_90a", b"-std=c++17", b"-lineinfo", b"-I/opt/cudalocal/nvidia/cu13/include"]
arr = (ctypes.c_char_p * len(opts))(*opts)
r = lib.nvrtcCompileProgram(prog, len(opts), arr)
n = ctypes.c_size_t()
lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
log = ctypes.create_string_buffer(n.value)
lib.nvrtcGetProgramLog(prog, log)
if log.value.strip(): print(log.value.decode())
if r != 0: sys.exit("compile failed")
lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
ptx = ctypes.create_string_buffer(n.value)
lib.nvrtcGetPTX(prog, ptx)
open(out, "wb").write(ptx.value)
