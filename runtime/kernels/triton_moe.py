"""Triton kernels for fmoe's affine-quantised matrices (the NVIDIA fast path): dequantise in registers
and multiply in one pass, to float32 precision.

Format (fmoe/formats/quant.py): ``W [out, in]`` at ``bits`` in {2, 4, 8} is int32 words
``[out, in * bits / 32]`` holding the codes low bits first, and bf16 scales and biases
``[out, in / group_size]``; ``W[o, i] = scale * q + bias``. Groups must start on word boundaries
(``group_size * bits % 32 == 0``). Experts live in a *slab*: a uint8 device tensor ``[S, file_size]``,
one expert file (fmoe/formats/packed.py ``ExpertLayout``) per slot row; the kernels read its nine
arrays in place at their byte offsets (:class:`ExpertOffsets`), through int32 and int16 views.

- :func:`experts_gate_up`: ``h[p] = silu(gate_p . x[token[p]]) * (up_p . x[token[p]])`` for every
  (expert slot, input row) pair: grid (pairs, blocks of ``inter`` rows); gate and up are one
  ``[2, rows]`` tile, so each loaded piece of ``x`` serves both.
- :func:`experts_down_combine`: ``out[t] = shared[t] + sum_j weights[t, j] * (down_{slots[t, j]} . h[t*K + j])``
  summed in choice order inside one program: grid (tokens, blocks of ``hidden`` rows); no atomics.
  The K slots are read together up front and each choice's loads go out before the previous
  choice's arithmetic (20.4 -> 18.9 us a 397B token at 4 bits on an H200).
  Both take the shared expert, when it is in the experts' format, as one more pair per token (its
  matrices addressed at element offsets from the slab), its gate's sigmoid applied in the combine.
- :func:`qmatvec`: ``x @ W.T`` for a dense :class:`TorchQuant`: per-token matvec programs (grid
  (tokens, row blocks), token fastest so a row block's programs run together and share it in L2)
  up to ``_MATVEC_MAX_TOKENS`` tokens; above, tiles of tokens through the grouped kernel below (the
  matrix as a single expert), as :func:`dense_gate_up` does for many tokens. :func:`qmatvecs`: up
  to four matrices of one format that read one input (a layer's projections of its normed input)
  in one launch on one prepared input.
- :func:`rms_norm_prepared`: a hidden state's RMSNorm (with the residual add) that also writes the
  normed rows as the matvecs' input, so the matvecs reading them launch no preparation; likewise
  :func:`gated_rms_norm_prepared` (the DeltaNet's gated norm) and :func:`sigmoid_gate_prepared`
  (the attention's output gate) for the output projections. :func:`embed_rows`: a quantised
  embedding's rows.
- :func:`experts_grouped`: prefill; the (token, choice) pairs sorted by slot on the device, tiles of
  one expert's pairs through tiled ``tl.dot`` GEMMs on float16 tensor cores (gate/up with SwiGLU
  fused, then down), then the weighted combine in choice order.

A negative slot (directly or through a slot map) is an expert that is not on the device, computed
elsewhere (the host's share of the misses, runtime/experts/device.py): its pairs add nothing here.

``int8=True`` on the matvec wrappers (``--int8-dot``): the same kernels read the input row rounded to
int8 per group (runtime/kernels/triton_int8.py) and multiply four codes by four inputs in one ``dp4a``
(``INT8`` constexpr; the float path compiles as before). Faster decode (1.2-1.25x on an H200) for the
rounding's error. On a CUDA device the decode wrappers (:func:`qmatvec` / :func:`qmatvecs`,
:func:`experts_gate_up` with ``token`` an int, :func:`experts_down_combine`) first offer the call to
their CUDA C twins (runtime/kernels/cuda_kernels.py: 1.07-1.41x faster a kernel on an H200, the whole
2-bit 397B 1.17x) and launch the Triton kernel where those decline. A prefill's routed experts
(:func:`experts_grouped`) round their inputs alike, in column order, onto int8 tensor cores (``INT8`` of
the grouped kernel: 1.3x on an H200); its dense GEMMs stay on float inputs, where int8 measured slower.
Long prefills (from ``_DEQUANT_MIN_TOKENS`` tokens a dense matrix, ``_DEQUANT_MIN_PAIRS`` pairs an
expert) take neither: with ``int8`` the weights are dequantised to bfloat16 once
(runtime/kernels/triton_dequant.py) and multiplied by cuBLAS (dense) or ``torch._grouped_mm`` (experts,
CUTLASS on sm_90), whose tensor-core GEMMs the unpacking tiles cannot match; bfloat16 inputs round no
worse than int8 activations do.

Matvec inner loop: a row's words are read contiguously, a group's words by one thread (vector
loads), and a code is isolated in place, never shifted down or converted: ``word & field`` read as
a float is the subnormal ``code * 2**(shift - 149)`` exactly (the field lies in the word's low 16
bits; the high half is shifted down once per word), and the matching ``x`` is pre-scaled by
``2**(A - shift)``, A per input row so that every product is a normal float; power-of-two scalings
are exact, so each product is ``code * x * 2**(A - 149)`` rounded once: one AND and one FMA per
code. Per group: ``scale * sum(code * x) + bias * sum(x)`` (the CPU kernels' factoring), the
scaled group sums of x ready in the input. The input is prepared by a small kernel per row
(:func:`_permute_kernel`: code c of every word side by side, so loads of x are contiguous runs,
pre-scaled; then the group sums and the factors that undo 2**(A - 149)), or by the RMSNorm that
produced the row (:func:`rms_norm_prepared`: the same writes in the norm's launch, the prepared
input handed over with the normed tensor and used while that tensor is unchanged). Against the kernels before
(a magic-number float per code, ``(word & field) | 0x4B000000`` less 2**23, and scales per word),
a 4-bit program compiles to 3.25 instead of 6.31 instructions per weight for sm_90
(scripts/kernel_sass.py). Reading the prefill tiles' codes as float16 subnormals the same way lost
accuracy on an H200's tensor cores (2-bit errors of 2e-5): they convert.

Grouped GEMM tiles: the weights are never dequantised to floats. Per column step inside one group,
``x . W = scale * (x . codes) + bias * sum(x)``, and the codes (integers below 256) are exact in
float16; ``x`` goes in as two float16 halves of ``x * 2**e`` (e per row of the tile, so neither
overflows), which hold it to about 2**-22 of its row's largest value, and every product of a half
and a code is exact in the float32 accumulator. So two float16 tensor-core products per step, at
float32's accuracy (the 3xTF32 tiles this replaced were 14x slower on an H200 and dequantised every
weight to float32 first).

Precision: float32 or better throughout. The matvecs are float32 FMA; the grouped tiles as above
(measured 5e-7 relative to float64). Tests bound the error against float64 by 1e-5 relative.
Results are deterministic: fixed reduction orders, no atomics.

No wrapper reads device data on the host (no ``.item()``, no data-dependent Python loops), so calls
can be captured in CUDA graphs (all four were, for timing); slot and token indices must be in range
(unchecked on the device).

Measured (H200, Triton 3.6, CUDA-graph replay, 397B shapes at 4 bits: hidden 4096, inter 1024, K 10;
scripts/matvec_sweep.py, HBM read 4466 GB/s in the same run; each call with its input's
preparation): experts_gate_up over 10 pairs 25 us (1.9 TB/s of packed weights; 28 us before its
register cap) and experts_down_combine for one token 21 us (1.1 TB/s); qmatvec 12288x4096 16 us,
8192x4096 12 us, 4096x8192 14 us (17 us before steps of 256 words), the 248320x4096 lm_head 219 us
(2.6 TB/s). Nsight Compute on these (docs/PERFORMANCE.md, ninth pass): latency-bound, not
instruction-bound: 128-167 registers a thread hold occupancy to 19-25%, DRAM at 22-38% of its peak.
Prefill of 512 tokens (scripts/prefill_sweep.py): experts_grouped over 512 experts 4.9 ms (26 TFLOP/s; 70 ms before),
qmatvec 12288x4096 0.59 ms (87 TFLOP/s; 1.15 ms dequantised + cuBLAS float32), the shared expert's
dense_gate_up 0.18 ms (1.6 ms as per-token matvecs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import triton
import triton.language as tl

from fmoe.formats.packed import EXPERT_PROJECTIONS, ExpertLayout
from fmoe.runtime.kernels import cuda_kernels, triton_dequant, triton_int8, triton_ops
from fmoe.runtime.kernels.pdl import pdl, pdl_start
from fmoe.runtime.kernels.triton_steps import (
    bf16,
    home,
    int8_factors,
    int8_round,
    qdot_int8,
    row_tile_args,
    step_factors,
    step_index,
    step_words,
    write_int8_row,
)

if TYPE_CHECKING:
    from fmoe.runtime.backends.torch_backend import TorchQuant

# ---- launch configuration (every block-size choice is here) -------------------------------------
# Chosen by sweeps of the 397B shapes on an H200 (Triton 3.6).
_TARGET_PROGRAMS = 512  # matvec grids: at least ~4 programs per SM of an H200 (132 SMs)
_MATVEC_WORDS = 512  # packed words per row per step (2 KiB: a 4096-wide row at 4 bits) ...
_MATVEC_LONG_WORDS = 256  # ... or for rows longer than that (an 8192-wide row at 4 bits: 1.2x on an H200)
_MATVEC_TILE = 4096  # packed words per program per step, over its rows and matrices (32 per thread)
_MATVEC_MAX_TOKENS = 4  # qmatvec, dense_gate_up: per-token matvecs up to here, the grouped kernel above
# register cap of the experts' gate+up per bit width: at 4 bits it compiled to 129, 3 programs an SM
# instead of 4 (1.12x capped); at 2 bits a cap of 128 spills (2x slower), so none
_GATE_UP_REGISTERS = {4: 128}
# ... and of the dense matvec on int8 inputs: at 2 bits its 16-row blocks compiled to 129 (capped: 125,
# no spills); at 4 bits 80 uncapped (a cap of 128 gives 122)
_INT8_MATVEC_REGISTERS = {2: 128}
_MATVEC_MAX_MATRICES = 4  # matrices of one qmatvecs launch (the kernel's R0..R3)
_GROUPED_ROWS = 128  # the grouped kernel's output rows per program (scripts/prefill_sweep.py)
_GROUPED_MIN_COLS = 16  # ... its column steps (tl.dot's K) lie inside one group: smaller groups take the matvecs
_GROUPED_MIN_ROWS = 256  # ... dense matrices with fewer output rows take the matvecs (a grid of a few programs)
_GROUPED_MIN_PROGRAMS = 128  # ... smaller token tiles until its grid has this many programs (about one per SM)
_GROUPED_TOKENS = 128  # the grouped kernel's most pairs a tile (one accumulator) ...
_GROUPED_GLU_TOKENS = 32  # ... and with GLU's two (gate and up)
_SPLIT_ROWS = 16  # rows per program of _halves_kernel
# --int8-dot's long prefills: weights dequantised to bfloat16 once, then a library GEMM (triton_dequant.py)
_DEQUANT_MIN_TOKENS = 64  # a dense matrix: at least this many tokens (scripts/prefill_sweep.py)
_DEQUANT_MIN_PAIRS = 32  # routed experts: at least this many pairs per expert the layer may name
_DEQUANT_SCRATCH = 1 << 30  # bytes of bf16 weights at once (in experts/device.py's DEVICE_MARGIN of free memory)
_PREPARED = "_fmoe_matvec_input"  # attribute of a tensor that comes with its matvec input (rms_norm_prepared)


class _MatvecBlocks(NamedTuple):
    rows: int  # output rows per program
    words: int  # packed words per row per step
    warps: int


class _GemmBlocks(NamedTuple):
    tokens: int  # input rows per tile (tl.dot's M, at least 16)
    rows: int  # output rows per program (N)
    cols: int  # input columns per step (K)
    warps: int
    stages: int = 3  # software-pipelining stages of the column loop (Triton's default)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _matvec_blocks(n_out: int, n_words: int, programs: int, matrices: int = 1) -> _MatvecBlocks:
    """Blocks of a matvec over ``n_out`` rows of ``n_words`` words, with ``programs`` programs per
    block of rows (pairs or tokens) and ``matrices`` matrices read per program: up to
    ``_MATVEC_TILE`` words per step (rows longer than one step of ``_MATVEC_WORDS`` in smaller steps),
    fewer rows per program (down to 8) until the grid has ``_TARGET_PROGRAMS`` programs."""
    words = _pow2(n_words) if n_words <= _MATVEC_WORDS else _MATVEC_LONG_WORDS
    rows = max(1, min(64, _pow2(n_out), _MATVEC_TILE // (words * matrices)))
    while rows > 8 and programs * triton.cdiv(n_out, rows) < _TARGET_PROGRAMS:
        rows //= 2
    return _MatvecBlocks(rows, words, 4)


def _grouped_blocks(
    pairs: int, weight_tiles: int, n_out: int, group_size: int, glu: bool, int8: bool = False
) -> _GemmBlocks:
    """Blocks of the grouped kernel for ``pairs`` input rows over ``weight_tiles`` matrices of
    ``n_out`` rows: a token tile for the expected rows per matrix (16 to ``_GROUPED_TOKENS``; with GLU's
    two accumulators to ``_GROUPED_GLU_TOKENS``), halved while the grid would have fewer than
    ``_GROUPED_MIN_PROGRAMS`` programs; column steps inside one group (64, 32 or 16 columns; on int8
    inputs 128, 64 or 32). From scripts/prefill_sweep.py on an H200 at 397B's prefill shapes."""
    tokens = min(_GROUPED_GLU_TOKENS if glu else _GROUPED_TOKENS, max(16, _pow2(math.ceil(pairs / weight_tiles))))
    while tokens > 16 and triton.cdiv(pairs, tokens) * triton.cdiv(n_out, _GROUPED_ROWS) < _GROUPED_MIN_PROGRAMS:
        tokens //= 2
    cols = next(c for c in ((128, 64, 32) if int8 else (64, 32, 16)) if group_size % c == 0)
    return _GemmBlocks(tokens, _GROUPED_ROWS, cols, 8)


def _grouped_int8(int8: bool, bits: int, group_size: int) -> bool:
    """Whether the grouped kernel runs on int8 inputs for ``int8`` (``--int8-dot``) in this format: codes
    that fit an int8 (below 8 bits) and groups of whole 32-column steps (the int8 tensor cores' depth)."""
    return int8 and bits < 8 and group_size % 32 == 0


def _grouped_input(x: torch.Tensor, group_size: int, cols: int, int8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The grouped kernel's input rows from ``x [R, N]``: int8 rows and each group's step and sum
    (:func:`_int8_rows_kernel`), or :func:`_split`'s float16 halves and factors."""
    if not int8:
        return _split(x, cols)
    rows, n = x.shape
    xq = torch.empty((rows, n), dtype=torch.int8, device=x.device)
    xf = torch.empty((rows, 2 * (n // group_size)), dtype=torch.float32, device=x.device)
    if rows:
        _int8_rows_kernel[(triton.cdiv(rows, _SPLIT_ROWS), n // group_size)](
            x, xq, xf, rows, n, group_size, _SPLIT_ROWS, _pow2(group_size), **pdl(x.device)
        )
    return xq, xf


# ---- geometry -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertOffsets:
    """Where an expert file's nine arrays lie in a slab row (byte offsets) and the expert's geometry."""

    file_size: int
    bits: int
    group_size: int
    hidden: int
    inter: int
    gate: tuple[int, int, int]  # byte offsets of (weight, scales, biases)
    up: tuple[int, int, int]
    down: tuple[int, int, int]

    def __post_init__(self) -> None:
        _check_format(self.bits, self.group_size, "ExpertOffsets")
        if self.hidden % self.group_size or self.inter % self.group_size:
            raise ValueError(
                f"ExpertOffsets: hidden {self.hidden} and inter {self.inter} must be multiples of the group size"
            )
        if self.file_size % 4 or any(o[0] % 4 or o[1] % 2 or o[2] % 2 for o in (self.gate, self.up, self.down)):
            raise ValueError(
                "ExpertOffsets: file size and weight offsets must be multiples of 4, scale/bias offsets of 2"
            )

    @classmethod
    def from_layout(cls, layout: ExpertLayout) -> ExpertOffsets:
        comp = layout.components
        inter, hidden = comp["gate_proj.scales"].shape[0], comp["down_proj.scales"].shape[0]
        want = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        for proj in EXPERT_PROJECTIONS:
            n_out, n_in = want[proj]
            shapes = (comp[f"{proj}.weight"].shape, comp[f"{proj}.scales"].shape)
            if shapes != ((n_out, n_in * layout.bits // 32), (n_out, n_in // layout.group_size)):
                raise ValueError(f"ExpertOffsets: {proj} does not have the shape [{n_out}, {n_in}] of a SwiGLU expert")

        def at(proj: str) -> tuple[int, int, int]:
            return (comp[f"{proj}.weight"].offset, comp[f"{proj}.scales"].offset, comp[f"{proj}.biases"].offset)

        g, u, d = at("gate_proj"), at("up_proj"), at("down_proj")
        return cls(layout.file_size, layout.bits, layout.group_size, hidden, inter, g, u, d)

    def shape_of(self, proj: str) -> tuple[int, int]:
        """An expert matrix's shape: ``gate`` and ``up`` ``[inter, hidden]``, ``down`` ``[hidden, inter]``."""
        return (self.hidden, self.inter) if proj == "down" else (self.inter, self.hidden)

    def holds(self, w: Any, proj: str) -> bool:
        """Whether a dense matrix is quantised as these experts are and has their ``proj``'s shape:
        the expert kernels can then read it as one more expert (the shared expert)."""
        fmt = (getattr(w, "shape", None), getattr(w, "bits", None), getattr(w, "group_size", None))
        return fmt == (self.shape_of(proj), self.bits, self.group_size)


def _units(parts: tuple[int, int, int]) -> tuple[int, int, int]:
    """Byte offsets of (weight, scales, biases) as offsets into the slab's int32 and int16 views."""
    return parts[0] // 4, parts[1] // 2, parts[2] // 2


def _check_format(bits: int, group_size: int, fn: str) -> None:
    if bits not in (2, 4, 8):
        raise ValueError(f"{fn}: unsupported bit width {bits}")
    if group_size <= 0 or group_size * bits % 32:
        raise ValueError(f"{fn}: group size {group_size} does not start groups on 32-bit words at {bits} bits")


# ---- device helpers -----------------------------------------------------------------------------
@triton.jit
def _code_dot(word, x_scaled, J: tl.constexpr, BITS: tl.constexpr):
    """Code ``J`` of the low 16 bits of ``word`` [M, N, G, W] times ``x`` [G, W], given ``x_scaled = x *
    2**(A - J*BITS)``. The code stays in place, its bits read as a float: ``word & field`` is the
    subnormal ``code * 2**(J*BITS - 149)``, exactly, and the product ``code * x * 2**(A - 149)`` is
    rounded once, as ``code * x`` would be (power-of-two scalings; A keeps it a normal float)."""
    field = ((1 << BITS) - 1) << (J * BITS)
    return (word & field).to(tl.float32, bitcast=True) * x_scaled[None, None, :, :]


@triton.jit
def _code_products(words, x_ptr, w, wm, NW: tl.constexpr, BITS: tl.constexpr):
    """``code * x`` summed over each word's codes, for a step's words [M, N, G, WPG_P] (``w``, ``wm``:
    their indices [G, WPG_P] in a row and mask, :func:`step_index`), still scaled by 2**(A - 149).
    The caller sums each group's words after its next loads: summed here, the matvec compiled to 130
    registers on Triton 3.6 instead of 128, and an H200 runs 3 of its programs an SM instead of 4."""
    hi = words >> 16
    qx = tl.zeros(words.shape, dtype=tl.float32)
    for j in tl.static_range(16 // BITS):  # code j of each 16-bit half: columns j and j + 16 / BITS of the word
        x_lo = tl.load(x_ptr + j * NW + w, mask=wm, other=0.0)  # rows j and 16 / BITS + j of the permuted x
        x_hi = tl.load(x_ptr + (16 // BITS + j) * NW + w, mask=wm, other=0.0)
        qx += _code_dot(words, x_lo, j, BITS)  # two updates: each one fused multiply-add
        qx += _code_dot(hi, x_hi, j, BITS)
    return qx


@triton.jit
def _unscale(acc, x_ptr, NW: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr):
    """The row sums of group results ``acc`` [M, N, G] with 2**(A - 149) undone: two factors, as the
    scaling may lie beyond one float's exponent range."""
    NG: tl.constexpr = NW // (GS * BITS // 32)
    return tl.sum(acc, axis=2) * tl.load(x_ptr + NW * (32 // BITS) + NG) * tl.load(x_ptr + NW * (32 // BITS) + NG + 1)


@triton.jit
def _qdot(
    w_ptr,
    s_ptr,
    b_ptr,
    x_ptr,
    w_row,
    s_row,
    b_row,
    mask,
    M: tl.constexpr,
    N: tl.constexpr,
    NW: tl.constexpr,
    BITS: tl.constexpr,
    GS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    WPG_P: tl.constexpr,
    INT8: tl.constexpr,
    ASM: tl.constexpr,
):
    """Row dot products ``W[r] . x`` for an [M, N] block of rows: ``w_row`` (int64 [M, N]) are the word
    offsets of the rows from ``w_ptr``, ``s_row``/``b_row`` those of their scales/biases from
    ``s_ptr``/``b_ptr`` (int16 views); ``x_ptr`` the row's input of ``NW * 32 / BITS`` columns as
    :func:`_permute_kernel` writes it (every load a contiguous run of words; its group sums and
    unscaling factors after).
    BLOCK_G groups a step, each group's words one tile row (WPG_P: their number up to a power of two),
    so a group's scale and bias apply once to its partial sum. Returns float32 [M, N]; masked-off rows give 0.
    INT8: ``x_ptr`` is an int8 input row instead (runtime/kernels/triton_int8.py), ASM its ``dp4a`` in PTX."""
    if INT8:
        return qdot_int8(w_ptr, s_ptr, b_ptr, x_ptr, w_row, s_row, b_row, mask, NW, BITS, GS, BLOCK_G, WPG_P, ASM)
    NG: tl.constexpr = NW // (GS * BITS // 32)
    acc = tl.zeros((M, N, BLOCK_G), dtype=tl.float32)
    for g0 in range(0, NG, BLOCK_G):
        g, w, wm = step_index(g0, NW, BITS, GS, BLOCK_G, WPG_P)
        qx = _code_products(step_words(w_ptr, w_row, mask, g0, NW, BITS, GS, BLOCK_G, WPG_P), x_ptr, w, wm, NW, BITS)
        scale, bias = step_factors(s_ptr, b_ptr, s_row, b_row, mask, g0, NW, BITS, GS, BLOCK_G)
        xsum = tl.load(x_ptr + NW * (32 // BITS) + g, mask=g < NG, other=0.0)
        acc += tl.sum(qx, axis=3) * scale + bias * xsum[None, None, :]
    return _unscale(acc, x_ptr, NW, BITS, GS)


# ---- kernels ------------------------------------------------------------------------------------
@triton.jit
def _gate_up_kernel(
    slab_w,
    slab_h,
    slots,
    token,
    x,
    h,
    row_words,
    row_halves,
    gate_w,
    gate_s,
    gate_b,
    up_w,
    up_s,
    up_b,
    slot_map,
    n_routed,
    sg_w,
    sg_s,
    sg_b,
    su_w,
    su_s,
    su_b,
    host_w,
    host_h,
    X_ROW: tl.constexpr,
    INTER: tl.constexpr,
    HIDDEN: tl.constexpr,
    BITS: tl.constexpr,
    GS: tl.constexpr,
    SLOTS: tl.constexpr,
    HOST: tl.constexpr,
    TOKEN_DIV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    WPG_P: tl.constexpr,
    PDL: tl.constexpr = False,
    INT8: tl.constexpr = False,
    ASM: tl.constexpr = False,
):
    """SLOTS: 0 one matrix pair at the given offsets (slot 0), 1 slot ``slots[p]``, 2 slot
    ``slot_map[slots[p]]`` (expert ids in ``slots``). TOKEN_DIV > 0: input row ``p // TOKEN_DIV``,
    else ``token[p]``. Pairs from ``n_routed`` on are the shared expert's, on token ``p - n_routed``,
    its gate and up at ``sg_*`` / ``su_*`` (weight, scales, biases: element offsets from the slab's
    views). HOST: slots <= -2 are rows of the host slab ``host_w`` / ``host_h`` (triton_steps.py's ``home``).
    INT8: ``x`` holds int8 input rows (runtime/kernels/triton_int8.py), ASM its ``dp4a`` in PTX."""
    pdl_start(PDL)
    p = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    shared = p >= n_routed
    slot = p * 0
    if SLOTS >= 1:
        slot = tl.load(slots + p, mask=p < n_routed, other=0).to(tl.int64)
    if SLOTS == 2:
        slot = tl.load(slot_map + slot, mask=p < n_routed, other=0).to(tl.int64)
    w_base, h_base, row, here = home(slot, slab_w, slab_h, host_w, host_h, HOST)  # the shared expert: slot 0
    is_up = tl.arange(0, 2)[:, None] == 1  # the tile's [2, BLOCK_N] rows: gate's, then up's
    r = rows.to(tl.int64)[None, :]
    w0 = tl.where(shared, tl.where(is_up, su_w, sg_w), row * row_words + tl.where(is_up, up_w, gate_w))
    s0 = tl.where(shared, tl.where(is_up, su_s, sg_s), row * row_halves + tl.where(is_up, up_s, gate_s))
    b0 = tl.where(shared, tl.where(is_up, su_b, sg_b), row * row_halves + tl.where(is_up, up_b, gate_b))
    w_row = w0 + r * (HIDDEN * BITS // 32)
    s_row = s0 + r * (HIDDEN // GS)
    b_row = b0 + r * (HIDDEN // GS)
    # an expert not here (computed elsewhere): its pair's h is 0
    mask = (r < INTER) & (tl.arange(0, 2)[:, None] < 2) & (here | shared)
    if TOKEN_DIV > 0:
        tok = p // TOKEN_DIV
    else:
        tok = tl.load(token + p, mask=p < n_routed, other=0).to(tl.int64)
    xp = x + tl.where(shared, p - n_routed, tok) * X_ROW
    nw = HIDDEN * BITS // 32
    y = _qdot(w_base, h_base, h_base, xp, w_row, s_row, b_row, mask, 2, BLOCK_N, nw, BITS, GS, BLOCK_G, WPG_P, INT8,
              ASM)  # fmt: skip
    g = tl.sum(tl.where(is_up, 0.0, y), axis=0)
    u = tl.sum(tl.where(is_up, y, 0.0), axis=0)
    # g / (1 + exp(-g)): for very negative g, exp overflows to inf and silu is -0, as in the reference
    tl.store(h + p * INTER + rows, g / (1.0 + tl.exp(-g)) * u, mask=rows < INTER)


@triton.jit
def _down_combine_kernel(
    slab_w,
    slab_h,
    slots,
    h,
    weights,
    shared,
    out,
    row_words,
    row_halves,
    down_w,
    down_s,
    down_b,
    slot_map,
    sd_w,
    sd_s,
    sd_b,
    host_w,
    host_h,
    X_ROW: tl.constexpr,
    K: tl.constexpr,
    INTER: tl.constexpr,
    HIDDEN: tl.constexpr,
    BITS: tl.constexpr,
    GS: tl.constexpr,
    MAPPED: tl.constexpr,
    HOST: tl.constexpr,
    SHARED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    WPG_P: tl.constexpr,
    K_P: tl.constexpr,
    PDL: tl.constexpr = False,
    INT8: tl.constexpr = False,
    ASM: tl.constexpr = False,
):
    """SHARED: the shared expert's down projection (at ``sd_*``: element offsets from the slab's
    views) on ``h``'s row ``T*K + t``, times the sigmoid of its gate's logit ``shared[t]``, starts
    the sum; else ``shared[t]`` (its output) does. HOST, INT8, ASM: as in :func:`_gate_up_kernel`.

    The K choices' slots and weights are loaded together first, so no choice waits on its slot's
    load; when a row is one step (``NG <= BLOCK_G``, the decode shapes), the next choice's loads go
    out before a choice's arithmetic (two choices ahead measured no faster on an H200)."""
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < HIDDEN
    r = rows.to(tl.int64)[None, :]
    nw: tl.constexpr = INTER * BITS // 32
    NG: tl.constexpr = INTER // GS
    ks = tl.arange(0, K_P)
    slot_all = tl.load(slots + t * K + ks, mask=ks < K, other=0).to(tl.int64)
    if MAPPED:  # slots holds expert ids: their slots are slot_map's entries
        slot_all = tl.load(slot_map + slot_all, mask=ks < K, other=0).to(tl.int64)
    weight_all = tl.load(weights + t * K + ks, mask=ks < K, other=0.0)
    ONE_STEP: tl.constexpr = NG <= BLOCK_G and not INT8
    if ONE_STEP and K > 0:
        nxt = _down_tiles(_pick_k(slot_all, ks, 0), slab_w, slab_h, host_w, host_h, row_words, row_halves, down_w,
                          down_s, down_b, r, rmask, HOST, nw, BITS, GS, BLOCK_G, WPG_P)  # fmt: skip
    if SHARED:
        y = _qdot(slab_w, slab_h, slab_h, h + (tl.num_programs(0) * K + t) * X_ROW, sd_w + r * nw,
                  sd_s + r * NG, sd_b + r * NG, rmask[None, :], 1, BLOCK_N, nw, BITS, GS, BLOCK_G,
                  WPG_P, INT8, ASM)  # fmt: skip
        acc = tl.sum(y, axis=0) / (1.0 + tl.exp(-tl.load(shared + t)))
    else:
        acc = tl.load(shared + t * HIDDEN + rows, mask=rmask, other=0.0)
    for j in tl.static_range(K):  # choice order: the sum is the same whatever the grid
        xp = h + (t * K + j) * X_ROW
        if ONE_STEP:
            words, scale, bias = nxt
            if j + 1 < K:  # the next choice's loads go out before this choice's arithmetic
                nxt = _down_tiles(_pick_k(slot_all, ks, j + 1), slab_w, slab_h, host_w, host_h, row_words,
                                  row_halves, down_w, down_s, down_b, r, rmask, HOST, nw, BITS, GS, BLOCK_G,
                                  WPG_P)  # fmt: skip
            g, w, wm = step_index(0, nw, BITS, GS, BLOCK_G, WPG_P)
            qx = _code_products(words, xp, w, wm, nw, BITS)
            xsum = tl.load(xp + nw * (32 // BITS) + g, mask=g < NG, other=0.0)
            y = _unscale(tl.sum(qx, axis=3) * scale + bias * xsum[None, None, :], xp, nw, BITS, GS)
        else:
            w_base, h_base, w_row, s_row, b_row, mask = _down_rows(_pick_k(slot_all, ks, j), slab_w, slab_h, host_w,
                                                                   host_h, row_words, row_halves, down_w, down_s,
                                                                   down_b, r, rmask, HOST, nw, BITS, GS)  # fmt: skip
            y = _qdot(w_base, h_base, h_base, xp, w_row, s_row, b_row, mask, 1, BLOCK_N, nw, BITS, GS, BLOCK_G,
                      WPG_P, INT8, ASM)  # fmt: skip
        acc += _pick_k(weight_all, ks, j) * tl.sum(y, axis=0)
    tl.store(out + t * HIDDEN + rows, acc, mask=rmask)


@triton.jit
def _pick_k(values, ks, j: tl.constexpr):
    """Entry ``j`` of a small vector held in registers."""
    return tl.sum(tl.where(ks == j, values, 0), axis=0)


@triton.jit
def _down_rows(
    slot, slab_w, slab_h, host_w, host_h, row_words, row_halves, down_w, down_s, down_b, r, rmask,
    HOST: tl.constexpr, NW: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr,
):  # fmt: skip
    """Where the down projection's rows ``r`` of the expert at ``slot`` lie: the words' and halves'
    bases, the rows' word, scale and bias offsets, and their mask (all off for an expert not here,
    computed elsewhere: it adds nothing)."""
    NG: tl.constexpr = NW * 32 // BITS // GS
    w_base, h_base, row, here = home(slot, slab_w, slab_h, host_w, host_h, HOST)
    halves = row * row_halves + r * NG
    return w_base, h_base, row * row_words + down_w + r * NW, halves + down_s, halves + down_b, rmask[None, :] & here


@triton.jit
def _down_tiles(
    slot, slab_w, slab_h, host_w, host_h, row_words, row_halves, down_w, down_s, down_b, r, rmask,
    HOST: tl.constexpr, NW: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, BLOCK_G: tl.constexpr,
    WPG_P: tl.constexpr,
):  # fmt: skip
    """The loads of :func:`_down_rows`'s rows when a row is one step: words, scales and biases
    (zeros for an expert not here)."""
    w_base, h_base, w_row, s_row, b_row, mask = _down_rows(slot, slab_w, slab_h, host_w, host_h, row_words,
                                                           row_halves, down_w, down_s, down_b, r, rmask, HOST, NW,
                                                           BITS, GS)  # fmt: skip
    words = step_words(w_base, w_row, mask, 0, NW, BITS, GS, BLOCK_G, WPG_P)
    scale, bias = step_factors(h_base, h_base, s_row, b_row, mask, 0, NW, BITS, GS, BLOCK_G)
    return words, scale, bias


@triton.jit
def _pick(in1, in2, in3, v0, v1, v2, v3):
    """``v_m`` for the matrix m that a program's row block lies in (``in_k``: the block is past matrix k - 1)."""
    return tl.where(in3, v3, tl.where(in2, v2, tl.where(in1, v1, v0)))


@triton.jit
def _qmatvec_kernel(
    x,
    w,
    halves,
    out,
    w1,
    w2,
    w3,
    s1,
    s2,
    s3,
    b0,
    b1,
    b2,
    b3,
    o1,
    o2,
    o3,
    X_ROW: tl.constexpr,
    N_IN: tl.constexpr,
    BITS: tl.constexpr,
    GS: tl.constexpr,
    R0: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    R3: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    WPG_P: tl.constexpr,
    PDL: tl.constexpr = False,
    INT8: tl.constexpr = False,
    ASM: tl.constexpr = False,
):
    """Up to four matrices of one input width and format, ``R0..R3`` rows (0: absent), addressed from
    matrix 0's words ``w`` and scales ``halves`` by element offsets (``w1``, ``s1``, ``b1``, ...; ``b0``:
    matrix 0's biases), outputs from ``out`` (``o1``, ...): grid (tokens, row blocks of all matrices
    in turn), so one launch and one prepared input serve a layer's projections of one input.
    INT8, ASM: as in :func:`_gate_up_kernel`."""
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    B0: tl.constexpr = (R0 + BLOCK_N - 1) // BLOCK_N
    B1: tl.constexpr = (R1 + BLOCK_N - 1) // BLOCK_N
    B2: tl.constexpr = (R2 + BLOCK_N - 1) // BLOCK_N
    in1, in2, in3 = blk >= B0, blk >= B0 + B1, blk >= B0 + B1 + B2
    n_out = _pick(in1, in2, in3, R0, R1, R2, R3)
    rows = (blk - _pick(in1, in2, in3, 0, B0, B0 + B1, B0 + B1 + B2)) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n_out
    r = rows.to(tl.int64)[None, :]
    y = _qdot(
        w,
        halves,
        halves,
        x + t * X_ROW,
        _pick(in1, in2, in3, 0, w1, w2, w3) + r * (N_IN * BITS // 32),
        _pick(in1, in2, in3, 0, s1, s2, s3) + r * (N_IN // GS),
        _pick(in1, in2, in3, b0, b1, b2, b3) + r * (N_IN // GS),
        rmask[None, :],
        1,
        BLOCK_N,
        N_IN * BITS // 32,
        BITS,
        GS,
        BLOCK_G,
        WPG_P,
        INT8,
        ASM,
    )
    o = _pick(in1, in2, in3, 0, o1, o2, o3) + t * n_out
    tl.store(out + o + rows, tl.sum(y, axis=0), mask=rmask)


@triton.jit
def _code_tile(w_ptr, w_row, row_mask, k0, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
               DTYPE: tl.constexpr = tl.float16):  # fmt: skip
    """The codes of ``W[rows, k0 : k0 + BLOCK_K]`` transposed, ``[BLOCK_K, len(rows)]`` float16 (exact:
    integers below 256) or DTYPE (int8: codes below 128); ``w_row`` the rows' word offsets from
    ``w_ptr``. Each word is loaded once and its codes spread by a reshape (loading each code's word
    instead was 2.5-13x slower on an H200)."""
    P: tl.constexpr = 32 // BITS
    kw = k0 // P + tl.arange(0, BLOCK_K // P)
    word = tl.load(w_ptr + w_row[None, :] + kw[:, None], mask=row_mask[None, :], other=0)
    codes = (word[:, None, :] >> (tl.arange(0, P) * BITS)[None, :, None]) & ((1 << BITS) - 1)
    return tl.reshape(codes, (BLOCK_K, w_row.shape[0])).to(DTYPE)


@triton.jit
def _int8_group(isum, dx, xsum, s_ptr, s_row, wmask, g, s_off, b_off):
    """A group's part of the grouped kernel's int8 dot: ``scale * dx * isum + bias * sum(x)``."""
    scale = bf16(tl.load(s_ptr + s_row + s_off + g, mask=wmask, other=0))[None, :]
    bias = bf16(tl.load(s_ptr + s_row + b_off + g, mask=wmask, other=0))[None, :]
    return isum.to(tl.float32) * dx[:, None] * scale + xsum[:, None] * bias


@triton.jit
def _f16_halves(xt):
    """float32 ``xt [M, K]`` as ``hi + lo`` float16 parts of ``xt * 2**e`` with e per row (the row's
    largest magnitude scaled into [2**14, 2**15): no overflow, nothing of note subnormal), and ``2**-e``
    [M]. ``hi + lo`` holds each element to about 2**-22 of its row's largest, about float32's
    precision, and a product with a code is exact in the float32 accumulator."""
    amax = tl.max(tl.abs(xt), axis=1)
    e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent of the row's largest
    k = tl.minimum(141 - e, 126)  # 2**k scales it to 2**14: exponent 127 + 14 - e
    up = ((k + 127) << 23).to(tl.float32, bitcast=True)
    down = ((127 - k) << 23).to(tl.float32, bitcast=True)
    xs = xt * up[:, None]
    hi = xs.to(tl.float16)
    lo = (xs - hi.to(tl.float32)).to(tl.float16)
    return hi, lo, down


@triton.jit
def _group_step(
    w_ptr, s_ptr, w_row, s_row, wmask, hi, lo, down, xsum, k0, BITS: tl.constexpr, GS: tl.constexpr,
    BLOCK_K: tl.constexpr, w_off, s_off, b_off,
):  # fmt: skip
    """One column step of :func:`_grouped_kernel` for one matrix (its parts at ``*_off``):
    ``scale * (x . codes) + bias * sum(x)`` over the step, ``[BLOCK_T, len(rows)]``."""
    q = _code_tile(w_ptr, w_row + w_off, wmask, k0, BITS, BLOCK_K)
    part = tl.dot(lo, q, tl.dot(hi, q))
    scale = bf16(tl.load(s_ptr + s_row + s_off + k0 // GS, mask=wmask, other=0))[None, :]
    bias = bf16(tl.load(s_ptr + s_row + b_off + k0 // GS, mask=wmask, other=0))[None, :]
    return part * down[:, None] * scale + xsum * bias


@triton.jit
def _grouped_kernel(
    xh,
    xf,
    w_ptr,
    s_ptr,
    out,
    tile_start,
    sorted_slots,
    order,
    n_pairs,
    row_words,
    row_halves,
    w_off,
    s_off,
    b_off,
    w2_off,
    s2_off,
    b2_off,
    host_w,
    host_h,
    ROW_DIV: tl.constexpr,
    N_OUT: tl.constexpr,
    N_IN: tl.constexpr,
    BITS: tl.constexpr,
    GS: tl.constexpr,
    GLU: tl.constexpr,
    HOST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr = False,
    INT8: tl.constexpr = False,
):
    """One tile of the pairs sorted by slot: it starts at ``tile_start[pid0]`` (``n_pairs``: no
    tile) and covers the following pairs of the same slot, at most BLOCK_T. Pair ``order[i]`` writes
    ``out[order[i]] = x[order[i] // ROW_DIV] @ W.T`` for W in that slot's slab row (``*_off``:
    offsets of its words from ``w_ptr``, of its scales and biases from ``s_ptr``), or with GLU
    ``silu(x W.T) * (x W2.T)``; the input rows ``x`` come as :func:`_split` makes them (``xh``, ``xf``).
    HOST: slots <= -2 are rows of the host slab ``host_w`` / ``host_h`` (triton_steps.py's ``home``).

    On float16 tensor cores: per column step (inside one group: BLOCK_K divides GS) ``x . W =
    scale * (x . codes) + bias * sum(x)``, ``x . codes`` two float16 products (:func:`_f16_halves`)
    of exact integer codes, accumulated in float32. INT8: on int8 tensor cores instead, the input
    rows rounded to int8 per group (:func:`_int8_rows_kernel`: ``xh`` int8, ``xf`` each group's step
    and sum): per group the codes' int32 dot with the rounded activations, then ``scale * dx * isum
    + bias * sum(x)`` (BITS < 8; BLOCK_K divides GS)."""
    pdl_start(PDL)
    NS: tl.constexpr = N_IN // BLOCK_K  # column steps: xf rows hold NS down factors, then NS sums
    start = tl.load(tile_start + tl.program_id(0))
    if start >= n_pairs:
        return
    slot = tl.load(sorted_slots + start)
    i = start + tl.arange(0, BLOCK_T)
    valid = i < n_pairs
    valid = valid & (tl.load(sorted_slots + i, mask=valid, other=-1) == slot)
    dst = tl.load(order + i, mask=valid, other=0)
    src = dst // ROW_DIV
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N_OUT
    w_base, s_base, row, here = home(slot, w_ptr, s_ptr, host_w, host_h, HOST)
    wmask = rmask & here  # an expert not here (computed elsewhere): its pairs' outputs are 0
    r = rows.to(tl.int64)
    w_row = row * row_words + r * (N_IN * BITS // 32)
    s_row = row * row_halves + r * (N_IN // GS)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    if INT8:  # a group a pass
        GROUPS: tl.constexpr = N_IN // GS
        for g0 in range(0, N_IN, GS):
            isum = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.int32)
            isum2 = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.int32)
            for kk in tl.static_range(0, GS, BLOCK_K):
                cols = g0 + kk + tl.arange(0, BLOCK_K)
                xt = tl.load(xh + src[:, None] * N_IN + cols[None, :], mask=valid[:, None], other=0)
                q = _code_tile(w_base, w_row + w_off, wmask, g0 + kk, BITS, BLOCK_K, tl.int8)
                isum = tl.dot(xt, q, isum, out_dtype=tl.int32)
                if GLU:
                    q2 = _code_tile(w_base, w_row + w2_off, wmask, g0 + kk, BITS, BLOCK_K, tl.int8)
                    isum2 = tl.dot(xt, q2, isum2, out_dtype=tl.int32)
            dx = tl.load(xf + src * (2 * GROUPS) + g0 // GS, mask=valid, other=0.0)
            xsum = tl.load(xf + src * (2 * GROUPS) + GROUPS + g0 // GS, mask=valid, other=0.0)
            acc += _int8_group(isum, dx, xsum, s_base, s_row, wmask, g0 // GS, s_off, b_off)
            if GLU:
                acc2 += _int8_group(isum2, dx, xsum, s_base, s_row, wmask, g0 // GS, s2_off, b2_off)
    else:
        for k0 in range(0, N_IN, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            hi = tl.load(xh + src[:, None] * (2 * N_IN) + cols[None, :], mask=valid[:, None], other=0.0)
            lo = tl.load(xh + src[:, None] * (2 * N_IN) + N_IN + cols[None, :], mask=valid[:, None], other=0.0)
            down = tl.load(xf + src * (2 * NS) + k0 // BLOCK_K, mask=valid, other=0.0)
            xsum = tl.load(xf + src * (2 * NS) + NS + k0 // BLOCK_K, mask=valid, other=0.0)[:, None]
            acc += _group_step(
                w_base, s_base, w_row, s_row, wmask, hi, lo, down, xsum, k0, BITS, GS, BLOCK_K, w_off, s_off, b_off
            )
            if GLU:  # the same x tile feeds the second matrix
                acc2 += _group_step(
                    w_base, s_base, w_row, s_row, wmask, hi, lo, down, xsum, k0, BITS, GS, BLOCK_K, w2_off, s2_off,
                    b2_off,
                )  # fmt: skip
    if GLU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc2
    tl.store(out + dst[:, None] * N_OUT + rows[None, :], acc, mask=valid[:, None] & rmask[None, :])


@triton.jit
def _int8_rows_kernel(
    x, xq, xf, R, N: tl.constexpr, GS: tl.constexpr, BLOCK_R: tl.constexpr, GS_P: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    """For :func:`_grouped_kernel` with INT8: rows ``r`` of ``x [R, N]``, group ``g`` (pid1) rounded
    to int8 in ``xq [R, N]`` and ``xf[r] = [dx | sum]`` (``N / GS`` each): the rounding of
    runtime/kernels/triton_int8.py (``dx = max|x| * (1/127)``, half away from zero), in column order."""
    pdl_start(PDL)
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    g = tl.program_id(1)
    cols = g * GS + tl.arange(0, GS_P)
    m = (r < R)[:, None] & (tl.arange(0, GS_P) < GS)[None, :]
    v = tl.load(x + r[:, None] * N + cols[None, :], mask=m, other=0.0)
    inv, dx = int8_factors(tl.max(tl.abs(v), axis=1))
    tl.store(xq + r[:, None] * N + cols[None, :], int8_round(v, inv[:, None]).to(tl.int8), mask=m)
    NG: tl.constexpr = N // GS
    tl.store(xf + r * (2 * NG) + g, dx, mask=r < R)
    tl.store(xf + r * (2 * NG) + NG + g, tl.sum(v, axis=1), mask=r < R)


@triton.jit
def _halves_kernel(
    x, xh, xf, R, N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False
):
    """For :func:`_grouped_kernel`: rows ``r`` of ``x [R, N]``, column step ``s``
    (pid1): ``xh[r] = [hi | lo]`` float16 ``[2N]`` and ``xf[r] = [down | xsum]`` float32 ``[2 N/BLOCK_K]``
    (:func:`_f16_halves` of the step's tile, and its sum), so the GEMM's programs do not each redo it."""
    pdl_start(PDL)
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    s = tl.program_id(1)
    cols = s * BLOCK_K + tl.arange(0, BLOCK_K)
    m = r < R
    xt = tl.load(x + r[:, None] * N + cols[None, :], mask=m[:, None], other=0.0)
    hi, lo, down = _f16_halves(xt)
    tl.store(xh + r[:, None] * (2 * N) + cols[None, :], hi, mask=m[:, None])
    tl.store(xh + r[:, None] * (2 * N) + N + cols[None, :], lo, mask=m[:, None])
    ns = N // BLOCK_K
    tl.store(xf + r * (2 * ns) + s, down, mask=m)
    tl.store(xf + r * (2 * ns) + ns + s, tl.sum(xt, axis=1), mask=m)


@triton.jit
def _permute_kernel(
    x, xp, N: tl.constexpr, X_ROW: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, NG_P: tl.constexpr,
    WPG_P: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    """Row r of ``x [R, N]`` into the matvecs' form, a row of ``xp [R, X_ROW]`` (:func:`_write_input`)."""
    pdl_start(PDL)
    r = tl.program_id(0).to(tl.int64)
    col, m = _row_tile(N, BITS, GS, NG_P, WPG_P)
    _write_input(tl.load(x + r * N + col, mask=m, other=0.0), xp + r * X_ROW, m, N, BITS, GS, NG_P, WPG_P)


@triton.jit
def _norm_permute_kernel(
    x, res, w, s_out, out, xp, eps, N: tl.constexpr, X_ROW: tl.constexpr, HAS_RES: tl.constexpr,
    PREPARE: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, NG_P: tl.constexpr, WPG_P: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    """RMSNorm of row r, and with PREPARE its matvec input: ``s = x[r] (+ res[r])`` (stored in ``s_out``
    with a residual), ``out[r] = s * rsqrt(mean(s^2) + eps) * w``, and ``out[r]`` in the matvecs' form
    in ``xp[r]`` (:func:`_write_input`) from the same registers: the norm's consumers need no
    preparation launch."""
    pdl_start(PDL)
    r = tl.program_id(0).to(tl.int64)
    col, m = _row_tile(N, BITS, GS, NG_P, WPG_P)
    s = tl.load(x + r * N + col, mask=m, other=0.0)
    if HAS_RES:
        s += tl.load(res + r * N + col, mask=m, other=0.0)
        tl.store(s_out + r * N + col, s, mask=m)
    inv = 1.0 / tl.sqrt(tl.sum(tl.sum(tl.sum(s * s, axis=2), axis=1), axis=0) / N + eps)
    v = s * inv * tl.load(w + col, mask=m, other=0.0)
    tl.store(out + r * N + col, v, mask=m)
    _prepare(v, out + r * N, xp + r * X_ROW, m, PREPARE, N, BITS, GS, NG_P, WPG_P)


@triton.jit
def _gate_permute_kernel(
    x, gate, out, xp, N: tl.constexpr, X_ROW: tl.constexpr, PREPARE: tl.constexpr, BITS: tl.constexpr,
    GS: tl.constexpr, NG_P: tl.constexpr, WPG_P: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    """``out[r] = x[r] * sigmoid(gate[r])`` (the attention's output gate), with PREPARE also in the
    matvecs' form in ``xp[r]`` (:func:`_write_input`) from the same registers."""
    pdl_start(PDL)
    r = tl.program_id(0).to(tl.int64)
    col, m = _row_tile(N, BITS, GS, NG_P, WPG_P)
    v = tl.load(x + r * N + col, mask=m, other=0.0) / (1.0 + tl.exp(-tl.load(gate + r * N + col, mask=m, other=0.0)))
    tl.store(out + r * N + col, v, mask=m)
    _prepare(v, out + r * N, xp + r * X_ROW, m, PREPARE, N, BITS, GS, NG_P, WPG_P)


@triton.jit
def _gated_norm_permute_kernel(
    x, w, gate, out, xp, eps, H: tl.constexpr, D: tl.constexpr, H_P: tl.constexpr, D_P: tl.constexpr,
    X_ROW: tl.constexpr, PREPARE: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, NG_P: tl.constexpr,
    WPG_P: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    """Row r of ``H`` heads of ``D``: ``out[r, h] = x[r, h] * rsqrt(mean(x[r, h]^2) + eps) * w *
    silu(gate[r, h])`` (the DeltaNet's gated norm), then with PREPARE the row in the matvecs' form
    in ``xp[r]``: read back from ``out`` after a barrier, as the heads' tile is not the row tile."""
    pdl_start(PDL)
    r = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, D_P)[None, :]
    hm = (tl.arange(0, H_P)[:, None] < H) & (d < D)
    at = r * (H * D) + tl.arange(0, H_P)[:, None] * D + d
    v = tl.load(x + at, mask=hm, other=0.0)
    inv = 1.0 / tl.sqrt(tl.sum(v * v, axis=1) / D + eps)
    z = tl.load(gate + at, mask=hm, other=0.0)
    y = v * inv[:, None] * tl.load(w + d, mask=d < D, other=0.0) * (z / (1.0 + tl.exp(-z)))
    tl.store(out + at, y, mask=hm)
    if PREPARE == 1:
        tl.debug_barrier()  # the block's stores of out are visible to all its threads
        col, m = _row_tile(H * D, BITS, GS, NG_P, WPG_P)
        _write_input(tl.load(out + r * (H * D) + col, mask=m, other=0.0), xp + r * X_ROW, m, H * D, BITS, GS, NG_P,
                     WPG_P)  # fmt: skip
    if PREPARE == 2:
        tl.debug_barrier()
        write_int8_row(out + r * (H * D), xp + r * X_ROW, H * D, BITS, GS, NG_P, WPG_P)


@triton.jit
def _prepare(v, out_row, xp_row, m, PREPARE: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr,
             NG_P: tl.constexpr, WPG_P: tl.constexpr):  # fmt: skip
    """A row the kernel has just stored at ``out_row`` (``v``, a :func:`_row_tile` tile) as the matvecs'
    input at ``xp_row``: PREPARE 1 the float form from the same registers (:func:`_write_input`), 2 the
    int8 rows (``--int8-dot``), read back after a barrier as their lanes are not the row tile's."""
    if PREPARE == 1:
        _write_input(v, xp_row, m, N, BITS, GS, NG_P, WPG_P)
    if PREPARE == 2:
        tl.debug_barrier()  # the block's stores of out are visible to all its threads
        write_int8_row(out_row, xp_row, N, BITS, GS, NG_P, WPG_P)


@triton.jit
def _row_tile(N: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, NG_P: tl.constexpr, WPG_P: tl.constexpr):
    """A row of N columns as a [groups, a group's words, codes per word] tile (NG_P, WPG_P: the
    groups and a group's words up to powers of two): the column of each element, and the mask."""
    P: tl.constexpr = 32 // BITS
    g = tl.arange(0, NG_P)[:, None, None]
    i = tl.arange(0, WPG_P)[None, :, None]
    w = g * (GS // P) + i
    return w * P + tl.arange(0, P)[None, None, :], (g < N // GS) & (i < GS // P)


@triton.jit
def _write_input(
    v, xp_row, m, N: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, NG_P: tl.constexpr, WPG_P: tl.constexpr
):
    """Write a row ``v`` (a :func:`_row_tile` tile) in the matvecs' form at ``xp_row``: with P = 32 /
    BITS codes per word, NW = N / P words and A = 252 - e (e the biased exponent of the row's largest
    magnitude, kept in [1, 253]), ``xp[c * NW + w] = v[w * P + c] * 2**(A - (c % (P / 2)) * BITS)``
    (code c of every word side by side, scaled for :func:`_code_dot`: below 2**126, and exact,
    powers of two), then the N / GS group sums times 2**(A - 149), then two factors whose product is
    2**(149 - A)."""
    P: tl.constexpr = 32 // BITS
    NW: tl.constexpr = N // P
    NG: tl.constexpr = N // GS
    g = tl.arange(0, NG_P)[:, None, None]
    c = tl.arange(0, P)[None, None, :]
    w = g * (GS // P) + tl.arange(0, WPG_P)[None, :, None]
    e = tl.max(tl.max(tl.max(tl.abs(v), axis=2), axis=1), axis=0).to(tl.int32, bitcast=True) >> 23
    e = tl.minimum(tl.maximum(e & 0xFF, 1), 253)
    a = 252 - e  # A, in [-1, 251]: applied as two powers of two, each a normal float
    up1 = ((a // 2 + 127) << 23).to(tl.float32, bitcast=True)
    up2 = ((a - a // 2 + 127) << 23).to(tl.float32, bitcast=True)
    shift = ((127 - (c % (P // 2)) * BITS) << 23).to(tl.float32, bitcast=True)  # 2**-(code's shift)
    tl.store(xp_row + c * NW + w, v * up1 * up2 * shift, mask=m)
    sum_scale = ((254 - e) << 23).to(tl.float32, bitcast=True)  # 2**(127 - e); times 2**-24: 2**(A - 149)
    sums = tl.sum(tl.sum(v, axis=2), axis=1) * sum_scale * (1.0 / (1 << 24))
    gs = tl.arange(0, NG_P)
    tl.store(xp_row + N + gs, sums, mask=gs < NG)
    down = 149 - a  # in [-102, 150]
    tl.store(xp_row + N + NG, ((down // 2 + 127) << 23).to(tl.float32, bitcast=True))
    tl.store(xp_row + N + NG + 1, ((down - down // 2 + 127) << 23).to(tl.float32, bitcast=True))


@triton.jit
def _embed_kernel(ids, w, halves, bias_at, out, N: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr,
                  BLOCK: tl.constexpr, PDL: tl.constexpr = False):  # fmt: skip
    """``out[r] = scale * code + bias`` of table row ``ids[r]``, columns of program 1's block: code c
    of word w is column ``w * (32 / BITS) + c``, as formats/quant.py packs it. ``halves`` holds the
    scales (int16 view) and, ``bias_at`` elements on, the biases."""
    pdl_start(PDL)
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < N
    row = tl.load(ids + r).to(tl.int64)
    word = tl.load(w + row * (N * BITS // 32) + c // (32 // BITS), mask=m, other=0)
    code = ((word >> ((c % (32 // BITS)) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
    g = row * (N // GS) + c // GS
    scale = bf16(tl.load(halves + g, mask=m, other=0))
    tl.store(out + r * N + c, code * scale + bf16(tl.load(halves + bias_at + g, mask=m, other=0)), mask=m)


@triton.jit
def _combine_kernel(
    y, weights, shared, out, rows, K: tl.constexpr, HIDDEN: tl.constexpr, BLOCK: tl.constexpr,
    INDEXED: tl.constexpr = False, PDL: tl.constexpr = False,
):  # fmt: skip
    """``out[t] = shared[t] + sum_j weights[t, j] * y[t*K + j]``, j in order; INDEXED: ``y[rows[t*K +
    j]]`` instead, y bfloat16 bits (int16; the grouped GEMMs' results in their sorted order)."""
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < HIDDEN
    acc = tl.load(shared + t * HIDDEN + cols, mask=m, other=0.0)
    for j in tl.static_range(K):
        if INDEXED:
            v = bf16(tl.load(y + tl.load(rows + t * K + j) * HIDDEN + cols, mask=m, other=0))
        else:
            v = tl.load(y + (t * K + j) * HIDDEN + cols, mask=m, other=0.0)
        acc += tl.load(weights + t * K + j) * v
    tl.store(out + t * HIDDEN + cols, acc, mask=m)


# ---- wrappers -----------------------------------------------------------------------------------
def experts_gate_up(
    slab: torch.Tensor,
    offsets: ExpertOffsets,
    slots: torch.Tensor,
    x: torch.Tensor,
    token: torch.Tensor | int,
    out: torch.Tensor | None = None,
    slot_map: torch.Tensor | None = None,
    shared: tuple[TorchQuant, TorchQuant] | None = None,
    host: torch.Tensor | None = None,
    int8: bool = False,
) -> torch.Tensor:
    """``h[p] = silu(gate_p . x[token[p]]) * (up_p . x[token[p]])``, expert p in slab row ``slots[p]``.

    ``slab`` uint8 ``[S, file_size]``; ``slots``, ``token`` int32/int64 ``[P]``, or ``token`` an
    int K: pair p reads row ``p // K`` (K choices per token); ``x`` float32 ``[N, hidden]``. With
    ``slot_map`` (int ``[E]``), ``slots`` holds expert ids and expert e is in slab row ``slot_map[e]``.
    With ``shared`` (the shared expert's gate and up, dense in the experts' format and shape), N
    more pairs in the same launch: ``h[P + n]``, the shared expert on row n.
    With ``host`` (uint8 ``[R, file_size]``: on a CUDA slab, page-locked host memory), slot ``-2 - r``
    is row r of it, read over the link in place; slot -1 is an expert computed elsewhere (h 0).
    ``int8``: on x rounded to int8 per group (runtime/kernels/triton_int8.py).
    Returns float32 ``[P (+ N), inter]`` (written into ``out`` when given)."""
    fn = "experts_gate_up"
    words, halves = _slab_views(slab, offsets, fn)
    host_views = _host_views(host, offsets, slab.device, fn)
    n_pairs = _index(slots, 1, fn, "slots", slab.device).shape[0]
    x = _floats(x, (None, offsets.hidden), fn, "x", slab.device)
    if isinstance(token, int):
        if token < 1 or n_pairs > token * x.shape[0]:
            raise ValueError(f"{fn}: {n_pairs} pairs at {token} per token need more than the {x.shape[0]} rows of x")
        token_div, token_arg = token, slots
    else:
        if _index(token, 1, fn, "token", slab.device).shape[0] != n_pairs:
            raise ValueError(f"{fn}: token {tuple(token.shape)} and slots {tuple(slots.shape)} differ in length")
        token_div, token_arg = 0, token.contiguous()
    if slot_map is not None:
        _index(slot_map, 1, fn, "slot_map", slab.device)
    at = [(0, 0, 0)] * 2  # the shared expert's gate and up, when given: pairs n_pairs.. in the same launch
    if shared is not None:
        pairs = zip(shared, ("gate", "up"), strict=True)
        at = [_as_expert_matrix(w, words, halves, offsets, name, fn) for w, name in pairs]
    total = n_pairs + (0 if shared is None else x.shape[0])
    h = _output(out, (total, offsets.inter), fn, slab.device)
    if total:
        other = _rows_made_for_others(x, offsets.bits, offsets.group_size) if int8 and token_div else None
        if other is not None and cuda_kernels.experts_gate_up(other[0], slab, offsets, slots, token_div, h, slot_map,
                                                              shared, host, x_bits=other[1]):  # fmt: skip
            return h  # the CUDA C twin, on rows handed over for other matrices
        xp = _matvec_input(x, offsets.bits, offsets.group_size, int8)
        if int8 and token_div and cuda_kernels.experts_gate_up(xp, slab, offsets, slots, token_div, h, slot_map,
                                                               shared, host):  # fmt: skip
            return h  # the CUDA C twin took them
        blk = _matvec_blocks(offsets.inter, offsets.hidden * offsets.bits // 32, total, matrices=2)
        grid = (total, triton.cdiv(offsets.inter, blk.rows))
        _gate_up_kernel[grid](
            words, halves, slots.contiguous(), token_arg, xp, h, offsets.file_size // 4, offsets.file_size // 2,
            *_units(offsets.gate), *_units(offsets.up), slot_map, n_pairs, *at[0], *at[1], *host_views, xp.shape[1],
            offsets.inter, offsets.hidden, offsets.bits, offsets.group_size,
            1 if slot_map is None else 2, host is not None, token_div, blk.rows,
            *_group_tile(blk, offsets.bits, offsets.group_size),
            num_warps=blk.warps, maxnreg=_GATE_UP_REGISTERS.get(offsets.bits),
            **pdl(h.device), **_int8_args(int8, h.device),
        )  # fmt: skip
    return h


def _as_expert_matrix(
    w: TorchQuant,
    words: torch.Tensor,
    halves: torch.Tensor,
    offsets: ExpertOffsets,
    proj: str,
    fn: str,
) -> tuple[int, int, int]:
    """Element offsets of a dense matrix's weight, scales and biases from the slab's int32 / int16
    views, for the expert kernels to read it as one more expert: it must have expert ``proj``'s
    shape and format (:meth:`ExpertOffsets.holds`) and lie on the slab's device."""
    _check_dense(w, fn, f"shared {proj}")
    if not offsets.holds(w, proj) or w.weight.device != words.device:
        raise ValueError(
            f"{fn}: shared {proj} {w.shape} at {w.bits} bits, groups of {w.group_size}, is not an expert matrix "
            f"{offsets.shape_of(proj)} in the experts' format ({offsets.bits} bits, groups of {offsets.group_size}) "
            f"on {words.device}"
        )
    return _apart(w.weight, words), _apart(w.scales, halves), _apart(w.biases, halves)


def embed_rows(table: TorchQuant, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` (int ``[T]``, on the table's device, each in range: the runner checks token ids)
    of a quantised embedding table ``[vocab, hidden]`` dequantised to float32 ``[T, hidden]``, in one
    launch (``TorchQuant.dequantize`` of the gathered rows is about eight)."""
    fn = "embed_rows"
    _check_dense(table, fn, "table")
    n = table.shape[1]
    ids = _index(ids, 1, fn, "ids", table.weight.device).contiguous()
    out = torch.empty((ids.shape[0], n), dtype=torch.float32, device=ids.device)
    if ids.shape[0] and n:
        block = min(1024, _pow2(n))
        halves = table.scales.view(torch.int16)
        _embed_kernel[(ids.shape[0], triton.cdiv(n, block))](
            ids, table.weight, halves, _apart(table.biases, table.scales), out, n, table.bits, table.group_size, block,
            **pdl(out.device),
        )  # fmt: skip
    return out


def dense_gate_up(x: torch.Tensor, gate: TorchQuant, up: TorchQuant, int8: bool = False) -> torch.Tensor:
    """``silu(x @ gate.T) * (x @ up.T)`` for two dense quantised matrices of one shape and format
    (the shared expert's): one launch of the experts' gate+up kernel, which addresses both
    matrices from ``gate``'s tensors by element offsets. ``x`` float32 ``[T, in]``; float32 ``[T, out]``.
    ``int8``: the matvec kernel on int8 activations (runtime/kernels/triton_int8.py), as in :func:`qmatvec`."""
    fn = "dense_gate_up"
    for name, w in (("gate", gate), ("up", up)):
        _check_dense(w, fn, name)
    fmt = lambda w: (w.shape, w.bits, w.group_size, w.weight.device)  # noqa: E731
    if fmt(up) != fmt(gate):
        raise ValueError(f"{fn}: gate {gate.shape} and up {up.shape} differ in shape, format or device")
    inter, hidden = gate.shape
    x = _floats(x, (None, hidden), fn, "x", gate.weight.device)
    h = torch.empty((x.shape[0], inter), dtype=torch.float32, device=x.device)
    if x.shape[0] == 0 or inter == 0:
        return h
    halves = gate.scales.view(torch.int16)
    if x.shape[0] > _MATVEC_MAX_TOKENS and inter >= _GROUPED_MIN_ROWS and gate.group_size % _GROUPED_MIN_COLS == 0:
        return _dense_grouped(x, gate, up, h)
    blk = _matvec_blocks(inter, hidden * gate.bits // 32, x.shape[0], matrices=2)
    xp = _matvec_input(x, gate.bits, gate.group_size, int8)
    _gate_up_kernel[(x.shape[0], triton.cdiv(inter, blk.rows))](
        gate.weight, halves, xp, xp, xp, h, 0, 0,
        0, 0, _apart(gate.biases, gate.scales),
        _apart(up.weight, gate.weight), _apart(up.scales, gate.scales), _apart(up.biases, gate.scales), xp,
        x.shape[0], 0, 0, 0, 0, 0, 0, gate.weight, halves, xp.shape[1], inter, hidden, gate.bits, gate.group_size, 0,
        False, 1,
        blk.rows, *_group_tile(blk, gate.bits, gate.group_size), num_warps=blk.warps,
        **pdl(h.device), **_int8_args(int8, h.device),
    )  # fmt: skip
    return h


def experts_down_combine(
    slab: torch.Tensor,
    offsets: ExpertOffsets,
    slots: torch.Tensor,
    h: torch.Tensor,
    weights: torch.Tensor,
    shared: torch.Tensor,
    out: torch.Tensor | None = None,
    slot_map: torch.Tensor | None = None,
    shared_down: TorchQuant | None = None,
    host: torch.Tensor | None = None,
    int8: bool = False,
) -> torch.Tensor:
    """``out[t] = shared[t] + sum_j weights[t, j] * (down_{slots[t, j]} . h[t*K + j])``, j = 0..K-1 in order.

    ``slots`` int32/int64 ``[T, K]`` (expert ids with ``slot_map``, as in :func:`experts_gate_up`);
    ``h`` float32 ``[T*K, inter]``; ``weights`` float32 ``[T, K]``; ``shared`` float32 ``[T, hidden]``.
    With ``shared_down`` (the shared expert's down projection, dense in the experts' format and
    shape) the shared expert is computed here too: ``h`` has T more rows (its SwiGLU per token, as
    :func:`experts_gate_up` with ``shared`` gives them), ``shared`` is its gate's logit ``[T, 1]``,
    and ``sigmoid(shared[t]) * (shared_down . h[T*K + t])`` takes the place of ``shared[t]``.
    ``host``, ``int8``: as in :func:`experts_gate_up`. Returns float32 ``[T, hidden]``."""
    fn = "experts_down_combine"
    words, halves = _slab_views(slab, offsets, fn)
    host_views = _host_views(host, offsets, slab.device, fn)
    n_tok, k = _index(slots, 2, fn, "slots", slab.device).shape
    if slot_map is not None:
        _index(slot_map, 1, fn, "slot_map", slab.device)
    fused = shared_down is not None
    h = _floats(h, (n_tok * (k + fused), offsets.inter), fn, "h", slab.device)
    weights = _floats(weights, (n_tok, k), fn, "weights", slab.device)
    shared = _floats(shared, (n_tok, 1 if fused else offsets.hidden), fn, "shared", slab.device)
    at = (0, 0, 0)
    if shared_down is not None:
        at = _as_expert_matrix(shared_down, words, halves, offsets, "down", fn)
    y = _output(out, (n_tok, offsets.hidden), fn, slab.device)
    if n_tok:
        if k == 0 and not fused:
            return y.copy_(shared)
        hp = _matvec_input(h, offsets.bits, offsets.group_size, int8)
        if int8 and cuda_kernels.experts_down_combine(hp, slab, offsets, slots, weights, shared, y, slot_map,
                                                      shared_down, host):  # fmt: skip
            return y  # the CUDA C twin took them
        blk = _matvec_blocks(offsets.hidden, offsets.inter * offsets.bits // 32, n_tok)
        grid = (n_tok, triton.cdiv(offsets.hidden, blk.rows))
        _down_combine_kernel[grid](
            words, halves, slots.contiguous(), hp, weights, shared, y, offsets.file_size // 4, offsets.file_size // 2,
            *_units(offsets.down), slot_map, *at, *host_views, hp.shape[1], k, offsets.inter, offsets.hidden,
            offsets.bits, offsets.group_size, slot_map is not None, host is not None, fused, blk.rows,
            *_group_tile(blk, offsets.bits, offsets.group_size), _pow2(k), num_warps=blk.warps,
            **pdl(y.device), **_int8_args(int8, y.device),
        )  # fmt: skip
    return y


def qmatvec(x: torch.Tensor, w: TorchQuant, out: torch.Tensor | None = None, int8: bool = False) -> torch.Tensor:
    """``x @ W.T`` for a dense quantised ``W [out, in]`` (:class:`TorchQuant`: int32 words, bf16
    scales and biases, contiguous, on x's device); ``x`` float32 ``[T, in]``, returns float32 ``[T, out]``.
    ``int8``: the per-token matvecs on x rounded to int8 (runtime/kernels/triton_int8.py); the tiled
    GEMM that takes many tokens (prefill) stays on float inputs (:func:`_dense_grouped`), and from
    ``_DEQUANT_MIN_TOKENS`` tokens ``W`` is dequantised for a bfloat16 GEMM (:func:`_dense_dequantised`)."""
    fn = "qmatvec"
    _check_dense(w, fn, "w")
    n_out, n_in = w.shape
    x = _floats(x, (None, n_in), fn, "x", w.weight.device)
    n_tok = x.shape[0]
    matvecs = n_tok <= _MATVEC_MAX_TOKENS or n_out < _GROUPED_MIN_ROWS or w.group_size % _GROUPED_MIN_COLS
    dequantised = int8 and not matvecs and n_tok >= _DEQUANT_MIN_TOKENS and triton_dequant.AVAILABLE
    if dequantised and out is None:  # the GEMM's own result: no copy
        return _dense_dequantised(x, w)
    y = _output(out, (n_tok, n_out), fn, x.device)
    if n_tok == 0 or n_out == 0:
        return y
    if matvecs:
        _matvecs_of(x, [w], [y], int8)
        return y
    if dequantised:
        return y.copy_(_dense_dequantised(x, w))
    return _dense_grouped(x, w, None, y)


def qmatvecs(x: torch.Tensor, ws: list[TorchQuant], int8: bool = False) -> list[torch.Tensor]:
    """``x @ W.T`` for each of several dense quantised matrices of one input width and format (a
    layer's projections of one normed input): up to ``_MATVEC_MAX_TOKENS`` tokens, the input is
    prepared once and every ``_MATVEC_MAX_MATRICES`` matrices are one launch; above, :func:`qmatvec`
    each. ``int8``: as :func:`qmatvec`'s. Returns one float32 ``[T, out]`` tensor per matrix."""
    fn = "qmatvecs"
    for i, w in enumerate(ws):
        _check_dense(w, fn, f"ws[{i}]")
    if len({(w.shape[1], w.bits, w.group_size, w.weight.device) for w in ws}) > 1:
        raise ValueError(f"{fn}: the matrices are not of one input width and format: {[(w.shape, w.bits) for w in ws]}")
    if not ws:
        return []
    x = _floats(x, (None, ws[0].shape[1]), fn, "x", ws[0].weight.device)
    if x.shape[0] > _MATVEC_MAX_TOKENS:
        return [qmatvec(x, w, int8=int8) for w in ws]
    outs = [torch.empty((x.shape[0], w.shape[0]), dtype=torch.float32, device=x.device) for w in ws]
    if x.shape[0]:
        _matvecs_of(x, ws, outs, int8)
    return outs


def _matvecs_of(x: torch.Tensor, ws: list[TorchQuant], outs: list[torch.Tensor], int8: bool) -> None:
    """``outs[m] = x @ ws[m].T`` for matrices of one format, every ``_MATVEC_MAX_MATRICES`` one launch:
    with ``int8``, on rows handed over with ``x`` for matrices of other bits where the CUDA C kernel
    reads them in place (:func:`_rows_made_for_others`), else on ``x``'s own input (made once)."""
    bits, group_size = ws[0].bits, ws[0].group_size
    other = _rows_made_for_others(x, bits, group_size) if int8 else None
    xp = None
    for i in range(0, len(ws), _MATVEC_MAX_MATRICES):
        chunk, chunk_outs = ws[i : i + _MATVEC_MAX_MATRICES], outs[i : i + _MATVEC_MAX_MATRICES]
        if other is not None and cuda_kernels.matvecs(other[0], chunk, chunk_outs, x_bits=other[1]):
            continue
        xp = _matvec_input(x, bits, group_size, int8) if xp is None else xp
        _matvecs(xp, chunk, chunk_outs, int8)


def _rows_made_for_others(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, int] | None:
    """``(xq, x_bits)``: int8 input rows handed over with ``x`` for matrices of other bits and the same
    groups, which the CUDA C kernels read for ``bits`` matrices in place (the router at 8 bits, experts
    at 2, after a norm that made the 4-bit projections' rows), so no int8-input launch; None where
    there are none (the caller makes its own, or finds them handed over in its format)."""
    handed = triton_int8.handed_over(x)
    if (bits, group_size) in handed:  # its own are there
        return None
    for (x_bits, x_group_size), xq in handed.items():
        if x_group_size == group_size and cuda_kernels.reads_rows_made_for(bits, x_bits):
            return xq, x_bits
    return None


def _matvecs(xp: torch.Tensor, ws: list[TorchQuant], outs: list[torch.Tensor], int8: bool = False) -> None:
    """One launch of :func:`_qmatvec_kernel`: ``outs[m] = x @ ws[m].T`` for the prepared input ``xp``
    (:func:`_matvec_input`, its int8 rows with ``int8``) and up to ``_MATVEC_MAX_MATRICES`` matrices
    of one format; the others addressed from the first's tensors by element offsets."""
    if int8 and cuda_kernels.matvecs(xp, ws, outs):  # the CUDA C kernel where it takes them
        return
    w0, n_tok = ws[0], xp.shape[0]
    n_in, bits, gs = w0.shape[1], w0.bits, w0.group_size
    rows = [w.shape[0] for w in ws] + [0] * (_MATVEC_MAX_MATRICES - len(ws))
    blk = _matvec_blocks(sum(rows), n_in * bits // 32, n_tok)
    pad = lambda seq: [*seq, *[seq[0]] * (_MATVEC_MAX_MATRICES - len(seq))]  # noqa: E731
    ws, outs = pad(ws), pad(outs)
    _qmatvec_kernel[(n_tok, sum(triton.cdiv(r, blk.rows) for r in rows))](
        xp, w0.weight, w0.scales.view(torch.int16), outs[0],
        *(_apart(w.weight, w0.weight) for w in ws[1:]), *(_apart(w.scales, w0.scales) for w in ws[1:]),
        *(_apart(w.biases, w0.scales) for w in ws), *(_apart(o, outs[0]) for o in outs[1:]),
        xp.shape[1], n_in, bits, gs, *rows, blk.rows, *_group_tile(blk, bits, gs), num_warps=blk.warps,
        maxnreg=_INT8_MATVEC_REGISTERS.get(bits) if int8 else None, **pdl(xp.device), **_int8_args(int8, xp.device),
    )  # fmt: skip


def rms_norm_prepared(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    bits: int,
    group_size: int,
    residual: torch.Tensor | None = None,
    int8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of the rows of ``x [T, N]`` (float32, contiguous) as runtime/kernels/triton_ops.py's
    ``rms_norm``: ``(s, s * rsqrt(mean(s^2) + eps) * weight)`` with ``s = x + residual`` (``x`` itself
    without one). Up to ``_MATVEC_MAX_TOKENS`` rows the same launch also writes the normed rows as the
    matvecs' input for ``bits`` / ``group_size`` and hands it over with the result, so the matvecs of
    that format that read it (a layer's projections, router, experts) launch no preparation. ``int8``:
    the int8 input rows instead (runtime/kernels/triton_int8.py), for matvecs with ``int8=True``."""
    fn = "rms_norm_prepared"
    _check_format(bits, group_size, fn)
    if x.dim() != 2 or x.shape[1] % group_size:
        raise ValueError(f"{fn}: x {tuple(x.shape)} is not rows of whole groups of {group_size} columns")
    n = x.shape[1]
    x = _floats(x, (None, n), fn, "x", x.device)
    weight = _floats(weight, (n,), fn, "weight", x.device)
    out = torch.empty_like(x)
    s = x if residual is None else torch.empty_like(x)
    if residual is not None:
        residual = _floats(residual, tuple(x.shape), fn, "residual", x.device)
    prepare = x.shape[0] <= _MATVEC_MAX_TOKENS
    xp = _handover_buffer(out, group_size, int8) if prepare else out
    if x.shape[0]:
        consts, warps = row_tile_args(n, bits, group_size)
        _norm_permute_kernel[(x.shape[0],)](
            x, residual, weight, s, out, xp, float(eps), n, xp.shape[1], residual is not None,
            _prepare_mode(prepare, int8), *consts, num_warps=warps,
            **pdl(out.device),
        )  # fmt: skip
    if prepare:
        _hand_over(out, xp, bits, group_size, int8)
    return s, out


def sigmoid_gate_prepared(
    x: torch.Tensor, gate: torch.Tensor, bits: int, group_size: int, int8: bool = False
) -> torch.Tensor:
    """``x * sigmoid(gate)`` of rows ``x``, ``gate [T, N]`` (float32; the attention's output gate),
    as runtime/kernels/triton_ops.py's ``sigmoid_gate``; up to ``_MATVEC_MAX_TOKENS`` rows the same
    launch writes the result as the matvecs' input for ``bits`` / ``group_size`` and hands it over
    (as :func:`rms_norm_prepared`, ``int8`` too), so the output projection launches no preparation."""
    fn = "sigmoid_gate_prepared"
    _check_format(bits, group_size, fn)
    if x.dim() != 2 or x.shape[1] % group_size:
        raise ValueError(f"{fn}: x {tuple(x.shape)} is not rows of whole groups of {group_size} columns")
    x = _floats(x, (None, x.shape[1]), fn, "x", x.device)
    gate = _floats(gate, tuple(x.shape), fn, "gate", x.device)
    out = torch.empty_like(x)
    prepare = x.shape[0] <= _MATVEC_MAX_TOKENS
    xp = _handover_buffer(out, group_size, int8) if prepare else out
    if x.shape[0]:
        consts, warps = row_tile_args(x.shape[1], bits, group_size)
        _gate_permute_kernel[(x.shape[0],)](
            x, gate, out, xp, x.shape[1], xp.shape[1], _prepare_mode(prepare, int8), *consts, num_warps=warps,
            **pdl(out.device),
        )  # fmt: skip
    if prepare:
        _hand_over(out, xp, bits, group_size, int8)
    return out


def gated_rms_norm_prepared(
    x: torch.Tensor,
    weight: torch.Tensor,
    gate: torch.Tensor,
    eps: float,
    bits: int,
    group_size: int,
    int8: bool = False,
) -> torch.Tensor:
    """The DeltaNet's gated norm: ``rms_norm(x[t, h]) * weight * silu(gate[t, h])`` per head of ``x
    [T, H, D]`` (float32, contiguous), ``gate [T, H*D]``; returns ``[T, H*D]``. Up to
    ``_MATVEC_MAX_TOKENS`` rows the same launch writes the result as the matvecs' input for ``bits``
    / ``group_size`` and hands it over (as :func:`rms_norm_prepared`, ``int8`` too): the output
    projection launches no preparation."""
    fn = "gated_rms_norm_prepared"
    _check_format(bits, group_size, fn)
    if x.dim() != 3:
        raise ValueError(f"{fn}: x must be [tokens, heads, head dim], got {tuple(x.shape)}")
    t, h, d = x.shape
    if h * d % group_size:
        raise ValueError(f"{fn}: x {tuple(x.shape)}: rows of {h * d} are not whole groups of {group_size} columns")
    x = _floats(x, (t, h, d), fn, "x", x.device)
    weight = _floats(weight, (d,), fn, "weight", x.device)
    gate = _floats(gate, (t, h * d), fn, "gate", x.device)
    out = torch.empty((t, h * d), dtype=torch.float32, device=x.device)
    prepare = t <= _MATVEC_MAX_TOKENS
    xp = _handover_buffer(out, group_size, int8) if prepare else out
    if t:
        consts, warps = row_tile_args(h * d, bits, group_size)
        _gated_norm_permute_kernel[(t,)](
            x, weight, gate, out, xp, float(eps), h, d, _pow2(h), _pow2(d), xp.shape[1],
            _prepare_mode(prepare, int8), *consts, num_warps=warps,
            **pdl(out.device),
        )  # fmt: skip
    if prepare:
        _hand_over(out, xp, bits, group_size, int8)
    return out


def delta_rule_int8(
    qkv: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    a_log: torch.Tensor,
    dt_bias: torch.Tensor,
    heads: tuple[int, int, int, int],
    state: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """A decode step's DeltaNet from its conv output to its output projection's input in one launch:
    runtime/kernels/triton_ops.py's ``delta_rule`` (same arguments, ``state`` updated in place), a
    program a value head, then the head's gated norm (``z [T, Hv*Dv]``, ``weight [Dv]``: as
    :func:`gated_rms_norm_prepared`), whose int8 input rows for ``bits`` / ``group_size`` the same
    program writes and hands over (``--int8-dot``): two launches fewer than delta_rule, gated norm.
    Returns ``[T, Hv*Dv]``. Above ``_MATVEC_MAX_TOKENS`` tokens, or where a head's Dv columns are not
    whole groups, the two launches."""
    fn = "delta_rule_int8"
    _check_format(bits, group_size, fn)
    hv, dv = heads[2:]
    t = qkv.shape[0]
    if t > _MATVEC_MAX_TOKENS or dv % group_size:
        o = triton_ops.delta_rule(qkv, a, b, a_log, dt_bias, heads, state)
        return gated_rms_norm_prepared(o, weight, z, eps, bits, group_size, int8=True)
    z = _floats(z, (t, hv * dv), fn, "z", qkv.device)
    weight = _floats(weight, (dv,), fn, "weight", qkv.device)
    out = torch.empty((t, hv * dv), dtype=torch.float32, device=qkv.device)
    xp = _handover_buffer(out, group_size, True)
    (_, gs, ng_p, wpg_p), _ = row_tile_args(dv, bits, group_size)  # a head's groups
    # 4 warps: 5.2 us a call at the 397B's heads on an H200, 6.9 at 8 and 9.3 at 16 (docs/PERFORMANCE.md)
    triton_ops.delta_rule(
        qkv, a, b, a_log, dt_bias, heads, state, out=out, whole_heads=True, z=z, norm_w=weight, eps=float(eps),
        xp=xp, X_ROW=xp.shape[1], NORM=True, BITS=bits, GS=gs, NG_P=ng_p, WPG_P=wpg_p, num_warps=4,
    )  # fmt: skip
    _hand_over(out, xp, bits, group_size, True)
    return out


def _handover_buffer(out: torch.Tensor, group_size: int, int8: bool) -> torch.Tensor:
    """The buffer a norm writes ``out``'s rows into as the matvecs' input: float, or int8 rows."""
    if int8:
        words = triton_int8.input_row_words(out.shape[1], group_size)
        return torch.empty((out.shape[0], words), dtype=torch.int32, device=out.device)
    return _input_buffer(out, group_size)


def _prepare_mode(prepare: bool, int8: bool) -> int:
    """The norm kernels' PREPARE: 0 none, 1 the float input, 2 the int8 rows."""
    return 0 if not prepare else 2 if int8 else 1


def _hand_over(out: torch.Tensor, xp: torch.Tensor, bits: int, group_size: int, int8: bool = False) -> None:
    """Attach ``xp``, ``out``'s rows in the matvecs' form for ``bits`` / ``group_size`` (int8 rows with
    ``int8``), to ``out``: :func:`_matvec_input` takes it instead of preparing ``out`` again, unless
    ``out`` was changed in place since (its version counter)."""
    if int8:
        triton_int8.hand_over(out, xp, bits, group_size)
    else:
        setattr(out, _PREPARED, ((bits, group_size, out._version), xp))


def experts_grouped(
    slab: torch.Tensor,
    offsets: ExpertOffsets,
    slots: torch.Tensor,
    x: torch.Tensor,
    weights: torch.Tensor,
    shared: torch.Tensor,
    out: torch.Tensor | None = None,
    host: torch.Tensor | None = None,
    int8: bool = False,
    experts: int | None = None,
) -> torch.Tensor:
    """The whole routed MoE for many tokens: ``out[t] = shared[t] + sum_j weights[t, j] * expert_{slots[t, j]}(x[t])``
    (j in order). ``slots`` int32/int64 ``[T, K]``, ``x`` and ``shared`` float32 ``[T, hidden]``,
    ``weights`` float32 ``[T, K]``; returns float32 ``[T, hidden]``.

    The T*K pairs are sorted by slot on the device and cut into tiles of one slot's pairs; the grid
    has room for the most tiles possible (``ceil(P / tile) + min(P, S)``), and tiles that turn out
    not to exist return at once, so nothing is read back to the host. ``host``: as in :func:`experts_gate_up`.
    ``int8``: on int8 tensor cores, the inputs rounded to int8 per group (runtime/kernels/triton_int8.py)
    where the format allows (:func:`_grouped_int8`); from ``_DEQUANT_MIN_PAIRS`` pairs a slot the pairs
    may name, dequantised experts on bfloat16 grouped GEMMs instead (:func:`_experts_dequantised`).
    ``experts``: the most distinct slots ``slots`` can name (a layer's routed experts, when the slab
    holds every layer's): the tiles then fit the pairs each expert can expect (default: the slab's
    and the host's rows)."""
    fn = "experts_grouped"
    words, halves = _slab_views(slab, offsets, fn)
    host_views = _host_views(host, offsets, slab.device, fn)
    n_tok, k = _index(slots, 2, fn, "slots", slab.device).shape
    x = _floats(x, (n_tok, offsets.hidden), fn, "x", slab.device)
    weights = _floats(weights, (n_tok, k), fn, "weights", slab.device)
    shared = _floats(shared, (n_tok, offsets.hidden), fn, "shared", slab.device)
    res = _output(out, (n_tok, offsets.hidden), fn, slab.device)
    n_pairs = n_tok * k
    if n_pairs == 0:
        return res.copy_(shared)
    if offsets.group_size % _GROUPED_MIN_COLS:  # groups too small for a tensor-core step: the matvecs
        h = experts_gate_up(slab, offsets, slots.reshape(-1), x, k, host=host, int8=int8)
        return experts_down_combine(slab, offsets, slots, h, weights, shared, out=res, host=host, int8=int8)
    if experts is not None and experts < 1:
        raise ValueError(f"{fn}: experts must be at least 1, got {experts}")
    rows_here = slab.shape[0] + (0 if host is None else host.shape[0])  # distinct slots a pair may have
    distinct = min(n_pairs, rows_here, experts or rows_here)  # slots the pairs can name
    runs = min(n_pairs, experts or rows_here + 1)  # distinct slot values, -1 (computed elsewhere) among them
    if int8 and n_pairs >= _DEQUANT_MIN_PAIRS * runs and triton_dequant.AVAILABLE:
        views = host_views if host is not None else None
        return _experts_dequantised(words, halves, views, offsets, slots, x, weights, shared, res, runs)
    int8 = _grouped_int8(int8, offsets.bits, offsets.group_size)
    # gate+up holds two accumulators a tile, down one: down takes tiles of more tokens when its
    # experts have them (each weight tile's unpacking then serves more of them)
    g = _grouped_blocks(n_pairs, distinct, offsets.inter, offsets.group_size, glu=True, int8=int8)
    gd = _grouped_blocks(n_pairs, distinct, offsets.hidden, offsets.group_size, glu=False, int8=int8)
    sorted_slots, order = torch.sort(slots.reshape(-1).to(torch.int64), stable=True)
    first = _slot_runs(sorted_slots)
    h = torch.empty((n_pairs, offsets.inter), dtype=torch.float32, device=slab.device)
    y = torch.empty((n_pairs, offsets.hidden), dtype=torch.float32, device=slab.device)
    common = (sorted_slots, order, n_pairs, offsets.file_size // 4, offsets.file_size // 2)
    fmt = (offsets.bits, offsets.group_size)
    down = _units(offsets.down)
    xs = _grouped_input(x, offsets.group_size, g.cols, int8)
    tile_start = _tile_starts(first, g.tokens, distinct)
    _grouped_kernel[(tile_start.shape[0] - 1, triton.cdiv(offsets.inter, g.rows))](
        *xs, words, halves, h, tile_start, *common, *_units(offsets.gate), *_units(offsets.up), *host_views,
        k, offsets.inter, offsets.hidden, *fmt, True, host is not None, g.tokens, g.rows, g.cols,
        num_warps=g.warps, num_stages=g.stages, INT8=int8,
        **pdl(h.device),
    )  # fmt: skip
    hs = _grouped_input(h, offsets.group_size, gd.cols, int8)
    if gd.tokens != g.tokens:
        tile_start = _tile_starts(first, gd.tokens, distinct)
    _grouped_kernel[(tile_start.shape[0] - 1, triton.cdiv(offsets.hidden, gd.rows))](
        *hs, words, halves, y, tile_start, *common, *down, *down, *host_views,
        1, offsets.hidden, offsets.inter, *fmt, False, host is not None, gd.tokens, gd.rows, gd.cols,
        num_warps=gd.warps, num_stages=gd.stages, INT8=int8,
        **pdl(y.device),
    )  # fmt: skip
    block = min(1024, _pow2(offsets.hidden))
    _combine_kernel[(n_tok, triton.cdiv(offsets.hidden, block))](
        y, weights, shared, res, y, k, offsets.hidden, block, **pdl(res.device)
    )
    return res


def _slot_runs(sorted_slots: torch.Tensor) -> torch.Tensor:
    """For pairs sorted by slot: the position where each pair's run of one slot begins (on the device)."""
    pos = torch.arange(sorted_slots.shape[0], device=sorted_slots.device)
    run_start = torch.ones(sorted_slots.shape[0], dtype=torch.bool, device=sorted_slots.device)
    run_start[1:] = sorted_slots[1:] != sorted_slots[:-1]
    return torch.cummax(torch.where(run_start, pos, 0), dim=0).values


def _tile_starts(first: torch.Tensor, tokens: int, slots: int) -> torch.Tensor:
    """The grouped kernel's tiles of at most ``tokens`` pairs of one slot, for pairs sorted by slot
    whose runs begin at ``first`` (:func:`_slot_runs`), at most ``slots`` distinct: each tile's first
    pair, room for the most tiles there can be (``ceil(P / tokens) + slots``), the rest ``P`` (no tile),
    and one spare entry at the end. Nothing is read back to the host."""
    n_pairs = first.shape[0]
    pos = torch.arange(n_pairs, device=first.device)
    begins = (pos - first) % tokens == 0
    max_tiles = triton.cdiv(n_pairs, tokens) + slots
    tile_start = torch.full((max_tiles + 1,), n_pairs, dtype=torch.int64, device=first.device)
    tile_id = torch.where(begins, torch.cumsum(begins, 0) - 1, max_tiles)  # pairs that begin no tile: the spare
    return tile_start.scatter_(0, tile_id, pos)


def _dense_grouped(x: torch.Tensor, w: TorchQuant, up: TorchQuant | None, out: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` (or with ``up``, ``silu(x @ w.T) * (x @ up.T)``) for many tokens by the grouped
    kernel: one "expert" at ``w``'s tensors (``up``'s addressed by element offsets from
    them), every token a pair, in tiles of consecutive tokens. On float inputs also with
    ``--int8-dot``: the int8 tensor cores measured slower here (a 12288 x 4096 matrix, 512 tokens,
    on an H200: 868 against 595 us), unlike for the routed experts."""
    n_tok, (n_out, n_in) = x.shape[0], w.shape
    g = _grouped_blocks(n_tok, 1, n_out, w.group_size, glu=up is not None)
    halves = w.scales.view(torch.int16)
    parts = second = (0, 0, _apart(w.biases, w.scales))
    if up is not None:
        second = (_apart(up.weight, w.weight), _apart(up.scales, w.scales), _apart(up.biases, w.scales))
    order = torch.arange(n_tok, device=x.device)
    tiles = torch.arange(0, n_tok, g.tokens, device=x.device)
    _grouped_kernel[(tiles.shape[0], triton.cdiv(n_out, g.rows))](
        *_split(x, g.cols), w.weight, halves, out, tiles, torch.zeros_like(order), order, n_tok, 0, 0, *parts,
        *second, w.weight, halves, 1, n_out, n_in, w.bits, w.group_size, up is not None, False, g.tokens, g.rows,
        g.cols,
        num_warps=g.warps, num_stages=g.stages,
        **pdl(out.device),
    )  # fmt: skip
    return out


def _dense_dequantised(x: torch.Tensor, w: TorchQuant) -> torch.Tensor:
    """:func:`_dense_grouped`'s ``x @ w.T`` for ``--int8-dot``'s long prefills: ``w`` dequantised to
    bfloat16, then one GEMM on bfloat16 inputs into float32 (triton_dequant.py). (The shared expert's
    smaller gate+up measured no faster so: dense_gate_up keeps the tiles.)"""
    wb = torch.empty((1, *w.shape), dtype=torch.bfloat16, device=x.device)
    words, halves = w.weight.reshape(1, -1), w.scales.view(torch.int16).reshape(1, -1)
    parts, fmt = (0, 0, _apart(w.biases, w.scales)), (w.bits, w.group_size)
    triton_dequant.dequantize(words, halves, _slot_zero(x.device), parts, w.shape, fmt, wb)
    return triton_dequant.matmul_f32(x.to(torch.bfloat16), wb[0].T)


_SLOT_ZERO: dict[torch.device, torch.Tensor] = {}


def _slot_zero(device: torch.device) -> torch.Tensor:
    """A one-slot list ``[0]`` on ``device`` (a dense matrix as slab row 0), made once: not a launch a call."""
    t = _SLOT_ZERO.get(device)
    if t is None:
        t = _SLOT_ZERO[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return t


def _experts_dequantised(
    words: torch.Tensor,
    halves: torch.Tensor,
    host: tuple[torch.Tensor, torch.Tensor] | None,
    offsets: ExpertOffsets,
    slots: torch.Tensor,
    x: torch.Tensor,
    weights: torch.Tensor,
    shared: torch.Tensor,
    res: torch.Tensor,
    groups: int,
) -> torch.Tensor:
    """:func:`experts_grouped` for ``--int8-dot``'s long prefills. The pairs sorted by slot form at most
    ``groups`` runs, one an expert (found on the device: nothing read back); each run's gate and up,
    then its down, dequantised to bfloat16 (triton_dequant.py) and multiplied by ``torch._grouped_mm``
    (CUTLASS on sm_90: bfloat16 inputs and results), ``_DEQUANT_SCRATCH`` bytes of weights at a time
    (every run's rows of one block of output columns), then the combine. Runs past the last hold no
    pairs; their weights are zeros (slot -1), as are those of an expert computed elsewhere."""
    n_tok, k = slots.shape
    hidden, inter, fmt, dev = offsets.hidden, offsets.inter, (offsets.bits, offsets.group_size), x.device
    sorted_slots, order = torch.sort(slots.reshape(-1).to(torch.int64), stable=True)
    starts = torch.ones(order.shape[0], dtype=torch.int64, device=dev)
    starts[1:] = sorted_slots[1:] != sorted_slots[:-1]
    run = torch.cumsum(starts, 0) - 1  # each sorted pair's run
    run_slot = torch.full((groups,), -1, dtype=torch.int64, device=dev).scatter_(0, run, sorted_slots)
    # each run's end: the pairs of runs up to it (runs past the last end at P); bincount would read back
    ends = torch.searchsorted(run, torch.arange(groups, device=dev), right=True).to(torch.int32)
    xs = x.to(torch.bfloat16)[order // k]
    h = torch.empty((order.shape[0], inter), dtype=torch.bfloat16, device=dev)

    def block(n_out: int, n_in: int, mats: int) -> int:  # output rows a step: multiples of 64, within the scratch
        return min(n_out, max(64, _DEQUANT_SCRATCH // (groups * mats * n_in * 2) // 64 * 64))

    step = block(inter, hidden, 2)
    scratch = torch.empty(groups * max(2 * step * hidden, block(hidden, inter, 1) * inter), dtype=torch.bfloat16,
                          device=dev)  # fmt: skip

    def dequantized(proj: tuple[int, int, int], r0: int, rows: int, n_in: int, w: torch.Tensor, at: int) -> None:
        w_off, s_off, b_off = _units(proj)
        parts = (w_off + r0 * n_in * offsets.bits // 32, s_off + r0 * n_in // offsets.group_size,
                 b_off + r0 * n_in // offsets.group_size)  # fmt: skip
        triton_dequant.dequantize(words, halves, run_slot, parts, (rows, n_in), fmt, w, at, host)

    for r0 in range(0, inter, step):  # gate and up rows r0 : r1 of every run's expert, then SwiGLU
        rows = min(step, inter - r0)
        w = scratch[: groups * 2 * rows * hidden].view(groups, 2 * rows, hidden)
        dequantized(offsets.gate, r0, rows, hidden, w, 0)
        dequantized(offsets.up, r0, rows, hidden, w, rows)
        triton_dequant.swiglu(torch._grouped_mm(xs, w.transpose(1, 2), offs=ends), h[:, r0 : r0 + rows])
    step = block(hidden, inter, 1)
    ys = None if step == hidden else torch.empty((order.shape[0], hidden), dtype=torch.bfloat16, device=dev)
    for r0 in range(0, hidden, step):
        rows = min(step, hidden - r0)
        w = scratch[: groups * rows * inter].view(groups, rows, inter)
        dequantized(offsets.down, r0, rows, inter, w, 0)
        y = torch._grouped_mm(h, w.transpose(1, 2), offs=ends)
        if ys is None:  # one block: its result is the whole
            ys = y
        else:
            ys[:, r0 : r0 + rows] = y
    assert ys is not None
    position = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=dev))  # of pair p
    block_cols = min(1024, _pow2(hidden))
    _combine_kernel[(n_tok, triton.cdiv(hidden, block_cols))](
        ys.view(torch.int16), weights, shared, res, position, k, hidden, block_cols, INDEXED=True, **pdl(res.device)
    )
    return res


def _split(x: torch.Tensor, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The grouped kernel's input made once from ``x [R, N]`` by :func:`_halves_kernel`: float16
    halves ``[R, 2N]`` and float32 factors ``[R, 2 N/cols]`` (splitting in each of the GEMM's
    programs instead was 1.3-1.5x slower for the dense matrices on an H200)."""
    rows, n = x.shape
    xh = torch.empty((rows, 2 * n), dtype=torch.float16, device=x.device)
    xf = torch.empty((rows, 2 * (n // cols)), dtype=torch.float32, device=x.device)
    if rows:
        _halves_kernel[(triton.cdiv(rows, _SPLIT_ROWS), n // cols)](
            x, xh, xf, rows, n, _SPLIT_ROWS, cols, **pdl(x.device)
        )
    return xh, xf


def _apart(t: torch.Tensor, base: torch.Tensor) -> int:
    """How many elements ``t`` starts after ``base`` (tensors of one element size: always whole
    elements apart), for kernels that address several tensors from one pointer."""
    return (t.data_ptr() - base.data_ptr()) // t.element_size()


def _matvec_input(x: torch.Tensor, bits: int, group_size: int, int8: bool = False) -> torch.Tensor:
    """A matvec's input rows ``x [R, N]`` (contiguous float32) as its kernels read them:
    :func:`_permute_kernel`'s rows (one small launch), ``N + N / group_size + 2`` floats padded
    to 16-byte multiples so that every row starts aligned for vector loads. None launched when ``x``
    came with it (:func:`_hand_over`) for this format and was not changed in place since. ``int8``:
    the int8 input rows of runtime/kernels/triton_int8.py instead."""
    if int8:
        return triton_int8.int8_input(x, bits, group_size)
    ready = getattr(x, _PREPARED, None)
    if ready is not None and ready[0] == (bits, group_size, x._version):
        return ready[1]
    xp = _input_buffer(x, group_size)
    if x.shape[0]:
        consts, warps = row_tile_args(x.shape[1], bits, group_size)
        _permute_kernel[(x.shape[0],)](x, xp, x.shape[1], xp.shape[1], *consts, num_warps=warps, **pdl(x.device))
    return xp


def _int8_args(int8: bool, device: torch.device) -> dict[str, bool]:
    """The expert kernels' INT8 and ASM constexprs: ``dp4a`` in PTX on a GPU, from bytes in the interpreter."""
    return {"INT8": True, "ASM": device.type == "cuda"} if int8 else {}


def _input_buffer(x: torch.Tensor, group_size: int) -> torch.Tensor:
    n = x.shape[1]
    return torch.empty((x.shape[0], -(-(n + n // group_size + 2) // 4) * 4), dtype=torch.float32, device=x.device)


def _group_tile(blk: _MatvecBlocks, bits: int, group_size: int) -> tuple[int, int]:
    """The matvec kernels' step for ``blk``: groups per step and words per group up to a power of two."""
    wpg = _pow2(group_size * bits // 32)
    return max(1, blk.words // wpg), wpg


# ---- argument checks ----------------------------------------------------------------------------
def _check_dense(w: TorchQuant, fn: str, name: str) -> None:
    """``w`` is a 2-D quantised matrix the kernels read: int32 words, bf16 scales and biases of its
    groups, contiguous, on one device."""
    _check_format(w.bits, w.group_size, fn)
    if w.weight.dim() != 2 or w.weight.dtype != torch.int32:
        got = f"{w.weight.dtype} {tuple(w.weight.shape)}"
        raise ValueError(f"{fn}: {name} weight must be a 2-D int32 tensor, got {got}")
    n_out, n_in = w.shape
    groups = (n_out, n_in // w.group_size)
    for part, t in (("scales", w.scales), ("biases", w.biases)):
        if t.dtype != torch.bfloat16 or tuple(t.shape) != groups:
            raise ValueError(f"{fn}: {name} {part} must be bfloat16 {groups}, got {t.dtype} {tuple(t.shape)}")
    if n_in % w.group_size or any(not t.is_contiguous() for t in (w.weight, w.scales, w.biases)):
        raise ValueError(f"{fn}: {name} [{n_out}, {n_in}] must be contiguous with whole groups of {w.group_size}")
    if any(t.device != w.weight.device for t in (w.scales, w.biases)):
        raise ValueError(f"{fn}: {name} weight, scales and biases must be on one device")


def _slab_views(slab: torch.Tensor, offsets: ExpertOffsets, fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The slab as int32 words and int16 halves (same memory)."""
    if not isinstance(offsets, ExpertOffsets):
        raise ValueError(f"{fn}: offsets must be an ExpertOffsets (ExpertOffsets.from_layout(layout))")
    if slab.dtype != torch.uint8 or slab.dim() != 2 or slab.shape[1] != offsets.file_size or not slab.is_contiguous():
        got = f"{slab.dtype} {tuple(slab.shape)}"
        raise ValueError(f"{fn}: slab must be a contiguous uint8 [slots, {offsets.file_size}] tensor, got {got}")
    if slab.storage_offset() % 4:
        raise ValueError(f"{fn}: slab must start on a 4-byte boundary")
    return slab.view(torch.int32), slab.view(torch.int16)


def _host_views(
    host: torch.Tensor | None, offsets: ExpertOffsets, device: torch.device, fn: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The host slab's int32 and int16 views for the kernels (a slab on ``device`` itself, or on a CUDA
    device page-locked host memory, which the kernels read over the link); without one, placeholders
    that the kernels never read."""
    if host is None:
        return torch.empty(0, dtype=torch.int32, device=device), torch.empty(0, dtype=torch.int16, device=device)
    where = host.device == device or (device.type == "cuda" and host.device.type == "cpu" and host.is_pinned())
    if not where:
        raise ValueError(f"{fn}: a host slab on {host.device} cannot be read on {device} (not page-locked)")
    return _slab_views(host, offsets, f"{fn} (host slab)")


def _index(t: torch.Tensor, dim: int, fn: str, name: str, device: torch.device) -> torch.Tensor:
    if t.dtype not in (torch.int32, torch.int64) or t.dim() != dim or t.device != device:
        got = f"{t.dtype} {tuple(t.shape)} on {t.device}"
        raise ValueError(f"{fn}: {name} must be a {dim}-D int32 or int64 tensor on {device}, got {got}")
    return t


def _floats(t: torch.Tensor, shape: tuple[int | None, ...], fn: str, name: str, device: torch.device) -> torch.Tensor:
    """``t`` checked (float32, ``shape`` with None for any size, on ``device``), made contiguous."""
    if t.dtype != torch.float32 or t.dim() != len(shape) or t.device != device:
        got = f"{t.dtype} {tuple(t.shape)} on {t.device}"
        raise ValueError(f"{fn}: {name} must be a float32 {len(shape)}-D tensor on {device}, got {got}")
    if any(want is not None and n != want for n, want in zip(t.shape, shape, strict=True)):
        raise ValueError(
            f"{fn}: {name} has shape {tuple(t.shape)}, expected {tuple('*' if s is None else s for s in shape)}"
        )
    return t.contiguous()


def _output(out: torch.Tensor | None, shape: tuple[int, ...], fn: str, device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    if out.dtype != torch.float32 or tuple(out.shape) != shape or out.device != device or not out.is_contiguous():
        raise ValueError(
            f"{fn}: out must be a contiguous float32 {shape} tensor on {device}, got {out.dtype} {tuple(out.shape)}"
        )
    return out
