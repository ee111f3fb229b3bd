"""Atomic loads, stores and adds on int64 array elements for numba code running on several threads
at once (runtime/kernels/cpu_cocompute.py): numba has no volatile or atomic access of its own, and
a plain load in a spin loop may be hoisted out of it by LLVM. Each is one LLVM atomic instruction
(acquire load, release store, sequentially consistent add), so they also order the plain loads and
stores around them on every architecture, not only on x86's strong memory model."""

from __future__ import annotations

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _int64_vector(array) -> bool:
    return isinstance(array, types.Array) and array.dtype == types.int64 and array.ndim == 1


def _element_pointer(context, builder, signature, args):
    array_type = signature.args[0]
    array = context.make_array(array_type)(context, builder, args[0])
    return cgutils.get_item_pointer(context, builder, array_type, array, [args[1]])


@intrinsic
def load_acquire(typingctx, array, index):
    """``array[index]`` (int64), read atomically with acquire order."""
    if not _int64_vector(array):
        return None

    def codegen(context, builder, signature, args):
        return builder.load_atomic(_element_pointer(context, builder, signature, args), "acquire", 8)

    return types.int64(array, index), codegen


@intrinsic
def store_release(typingctx, array, index, value):
    """``array[index] = value`` (int64), written atomically with release order."""
    if not _int64_vector(array):
        return None

    def codegen(context, builder, signature, args):
        value = context.cast(builder, args[2], signature.args[2], types.int64)
        builder.store_atomic(value, _element_pointer(context, builder, signature, args), "release", 8)
        return context.get_dummy_value()

    return types.void(array, index, value), codegen


@intrinsic
def fetch_add(typingctx, array, index, value):
    """``array[index] += value`` (int64) atomically; returns the value before the add."""
    if not _int64_vector(array):
        return None

    def codegen(context, builder, signature, args):
        value = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", _element_pointer(context, builder, signature, args), value, "seq_cst")

    return types.int64(array, index, value), codegen
