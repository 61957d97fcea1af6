"""Compile the EP exchange kernels for sm_90 (H100/H200) without a GPU (Triton's bundled ptxas); run as a script
by tests/test_ep_exchange.py (outside the interpreter that the test process decorates the kernels with)."""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
sys.path.insert(0, os.getcwd())
from backend.ops.triton import kernels as K
tgt = GPUTarget("cuda", 90, 32)
def comp(fn, sig, consts):
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    k = triton.compile(src, target=tgt)
    print(fn.__name__, "ok", len(k.asm.get("cubin", b"")), "bytes cubin")
for ll in (False, True):
    comp(K.ep_index_kernel, {"ids_ptr": "*i64", "map_ptr": "*i32", "counts_ptr": "*i32", "ret_ptr": "*i32", "T": "i32",
         "K_TOP": "i32", "E_LOCAL": "i32", "CHUNK": "i32", "NK": "i32", "stride_ids": "i32", "R": "constexpr",
         "R_PAD": "constexpr", "KP": "constexpr", "BLOCK_T": "constexpr", "LL": "constexpr"},
         {"R": 2, "R_PAD": 2, "KP": 8, "BLOCK_T": 512, "LL": ll})
for exact in (False, True):
    comp(K.ep_pack_kernel, {"x_ptr": "*i32", "s_ptr": "*i32", "ids_ptr": "*i32", "w_ptr": "*i32", "map_ptr": "*i32",
         "counts_ptr": "*i32", "pos_ptr": "*i32", "send_ptr": "*i32", "T": "i32", "XW": "i32", "SW": "i32",
         "K_TOP": "i32", "ROW_W": "i32", "CHUNK": "i32", "stride_x": "i32", "stride_s": "i32", "stride_i": "i32",
         "stride_w": "i32", "R": "constexpr", "R_PAD": "constexpr", "KP2": "constexpr", "EXACT": "constexpr",
         "BLOCK": "constexpr"},
         {"R": 2, "R_PAD": 2, "KP2": 16, "EXACT": exact, "BLOCK": 1024})
    comp(K.ep_unpack_kernel, {"recv_ptr": "*i32", "cnt_ptr": "*i32", "x_ptr": "*i32", "s_ptr": "*i32", "ids_ptr": "*i64",
         "w_ptr": "*fp32", "XW": "i32", "SW": "i32", "K_TOP": "i32", "ROW_W": "i32", "E_LOCAL": "i32",
         "ME": "i32", "R": "i32", "EXACT": "constexpr", "R_PAD": "constexpr", "KP": "constexpr", "BLOCK": "constexpr"},
         {"EXACT": exact, "R_PAD": 2, "KP": 8, "BLOCK": 1024})
