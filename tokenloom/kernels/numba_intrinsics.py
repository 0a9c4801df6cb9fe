"""LLVM building blocks for the numba sampling kernel (``numba_sampling.py``).

Why these are hand-written: numba exposes neither a single-rounding ``fma`` (needed for guided logits
bit-equal to the reference), nor NaN-propagating ``maximum``/``minimum`` that LLVM vectorises (numba's
``max`` is a compare-and-select it does not), nor a vector compress-store. Each function here is one LLVM
intrinsic (or a short formula over them), compiled into the caller.

* :func:`fma`, :func:`maximum`, :func:`minimum`, :func:`rint` — float32 scalar intrinsics.
* :func:`expf` — ``exp`` of a float32 ``d <= 0``, Sleef's u10 polynomial (≤ 1 ulp; vectorisable).
* :func:`order_key` — an int32 whose order is the float order (for exact ties and threshold search).
* :func:`compress16` — ``llvm.masked.compressstore`` of 16 lanes: one AVX-512 ``vcompressps`` where the
  CPU has it (LLVM expands it to scalar code elsewhere: still correct, slower).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16  # compress16's vector width


def _float_intrinsic(name: str, arity: int):
    """codegen calling the float32 LLVM intrinsic ``name`` on the arguments."""
    def codegen(context, builder, signature, llargs):
        f = ir.FloatType()
        callee = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f, [f] * arity), name)
        return builder.call(callee, llargs)

    return codegen


@intrinsic
def fma(typingctx, a, b, c):
    """``a·b + c`` rounded once."""
    return types.float32(types.float32, types.float32, types.float32), _float_intrinsic("llvm.fma.f32", 3)


@intrinsic
def maximum(typingctx, a, b):
    """NaN-propagating max (a NaN input makes the reduction NaN; LLVM vectorises the reduction)."""
    return types.float32(types.float32, types.float32), _float_intrinsic("llvm.maximum.f32", 2)


@intrinsic
def minimum(typingctx, a, b):
    """NaN-propagating min."""
    return types.float32(types.float32, types.float32), _float_intrinsic("llvm.minimum.f32", 2)


@intrinsic
def rint(typingctx, a):
    """Round to nearest, ties to even."""
    return types.float32(types.float32), _float_intrinsic("llvm.rint.f32", 1)


@intrinsic
def as_float(typingctx, i):
    """The float32 with the bits of int32 ``i``."""
    def codegen(context, builder, signature, llargs):
        return builder.bitcast(llargs[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def as_int(typingctx, f):
    """The int32 with the bits of float32 ``f``."""
    def codegen(context, builder, signature, llargs):
        return builder.bitcast(llargs[0], ir.IntType(32))

    return types.int32(types.float32), codegen


_F = np.float32
_R_LN2, _L2U, _L2L = _F(1.4426950408889634), _F(0.693145751953125), _F(1.428606765330187045e-06)
_C0, _C1, _C2, _C3, _C4, _C5 = (_F(0.000198527617612853646278381), _F(0.00139304355252534151077271),
                                _F(0.00833336077630519866943359), _F(0.0416664853692054748535156),
                                _F(0.166666671633720397949219), _F(0.5))


@numba.njit(inline="always")
def expf(d):
    """``exp(d)`` for float32 ``d <= 0`` (Sleef's u10 algorithm; 0 below −104)."""
    qf = rint(d * _R_LN2)
    q = np.int32(qf)
    s = fma(qf, -_L2U, d)
    s = fma(qf, -_L2L, s)
    u = fma(_C0, s, _C1)
    u = fma(u, s, _C2)
    u = fma(u, s, _C3)
    u = fma(u, s, _C4)
    u = fma(u, s, _C5)
    u = _F(1.0) + fma(s * s, u, s)
    q1 = q >> 1
    u = u * as_float(np.int32((q1 + 127) << 23)) * as_float(np.int32((q - q1 + 127) << 23))
    return u if d >= _F(-104.0) else _F(0.0)


@numba.njit(inline="always")
def order_key(z):
    """Order-preserving int32 key of float32 ``z`` (+0.0 and −0.0 share key 0)."""
    b = as_int(z + _F(0.0))
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@intrinsic
def compress16(typingctx, z, i, t, idx, val, n):
    """Append the lanes of ``z[i:i+16]`` that are ``>= t`` to ``val[n:]`` and their indices to ``idx[n:]``,
    in index order; returns how many. ``z``/``val``: float32 arrays, ``idx``: int32 array, C-contiguous."""
    sig = types.int64(z, types.int64, types.float32, idx, val, types.int64)

    def codegen(context, builder, signature, args):
        z_arg, i_arg, t_arg, idx_arg, val_arg, n_arg = args
        f32, i32 = ir.FloatType(), ir.IntType(32)
        vf, vi, vm = ir.VectorType(f32, LANES), ir.VectorType(i32, LANES), ir.VectorType(ir.IntType(1), LANES)
        zeros = ir.Constant(vi, [0] * LANES)

        def splat(value, vtype):
            one = builder.insert_element(ir.Constant(vtype, ir.Undefined), value, ir.Constant(i32, 0))
            return builder.shuffle_vector(one, one, zeros)

        def data(k, arg):
            return context.make_array(signature.args[k])(context, builder, arg).data

        src = builder.bitcast(builder.gep(data(0, z_arg), [i_arg]), vf.as_pointer())
        lanes = builder.load(src, align=4)
        mask = builder.fcmp_ordered(">=", lanes, splat(t_arg, vf))
        module = builder.module
        store_f = cgutils.get_or_insert_function(
            module, ir.FunctionType(ir.VoidType(), [vf, f32.as_pointer(), vm]), "llvm.masked.compressstore.v16f32")
        store_i = cgutils.get_or_insert_function(
            module, ir.FunctionType(ir.VoidType(), [vi, i32.as_pointer(), vm]), "llvm.masked.compressstore.v16i32")
        builder.call(store_f, [lanes, builder.gep(data(4, val_arg), [n_arg]), mask])
        positions = builder.add(splat(builder.trunc(i_arg, i32), vi), ir.Constant(vi, list(range(LANES))))
        builder.call(store_i, [positions, builder.gep(data(3, idx_arg), [n_arg]), mask])
        bits = builder.bitcast(mask, ir.IntType(LANES))
        popcount = cgutils.get_or_insert_function(
            module, ir.FunctionType(ir.IntType(LANES), [ir.IntType(LANES)]), "llvm.ctpop.i16")
        return builder.zext(builder.call(popcount, [bits]), ir.IntType(64))

    return sig, codegen
