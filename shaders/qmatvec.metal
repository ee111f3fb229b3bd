// Dequantise-matvec in the seed's FMA form: out[t, n] = sum_i W[n, i] * x[t, i] for an affine
// group-quantised W (fmoe's format = MLX's mx.quantize: uint32 words, codes low bits first, bf16
// scales and biases per GROUP inputs), every weight as fma(code, scale * x, bias * x).
//
// inputs:   x [T, K] float32, w [N, K * BITS / 32] uint32, scales, biases [N, K / GROUP] bfloat16
// outputs:  out [T, N] float32
// template: BITS (2, 4 or 8), GROUP (64)
// launch:   grid (32, N, T), threadgroup (32, R, 1): one simdgroup per output row, its 32 lanes
//           stride over the row's words and meet in simd_sum.
// ---- body ----
constexpr uint PER_WORD = 32 / BITS;
constexpr uint MASK = (1u << BITS) - 1u;
constexpr uint WORDS_PER_GROUP = GROUP / PER_WORD;
const uint lane = thread_position_in_threadgroup.x;
const uint row = thread_position_in_grid.y;
const uint t = thread_position_in_grid.z;
const uint n_out = w_shape[0];
if (row >= n_out) {
    return;  // the whole simdgroup leaves together: it is one row
}
const uint k_in = x_shape[1];
const uint words = k_in / PER_WORD;
const uint groups = k_in / GROUP;
const device uint32_t* wrow = w + size_t(row) * words;
const device float* xrow = x + size_t(t) * k_in;
float acc = 0.0f;
for (uint wi = lane; wi < words; wi += 32) {
    const uint g = row * groups + wi / WORDS_PER_GROUP;
    const float s = static_cast<float>(scales[g]);
    const float b = static_cast<float>(biases[g]);
    uint word = wrow[wi];
    const device float* xs = xrow + wi * PER_WORD;
    for (uint i = 0; i < PER_WORD; ++i) {
        const float xv = xs[i];
        acc += metal::fma(float(word & MASK), s * xv, b * xv);  // dequantise and multiply: one FMA
        word >>= BITS;
    }
}
acc = simd_sum(acc);
if (lane == 0) {
    out[size_t(t) * n_out + row] = acc;
}
