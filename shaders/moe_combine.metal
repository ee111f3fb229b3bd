// MoE combine: out[t] = shared[t] + sum_j w[t, j] * y[t, j], the sum over the choices j in order
// (so the result does not depend on how the experts arrived), one thread per output element.
//
// inputs:   y [T, K, H] float32 (one row per token and choice), w [T, K] float32,
//           shared [T, H] float32 (the gated shared expert)
// outputs:  out [T, H] float32
// launch:   grid (H, T, 1), threadgroup (256, 1, 1)
// ---- body ----
const uint i = thread_position_in_grid.x;
const uint t = thread_position_in_grid.y;
const uint hidden = shared_shape[1];
if (i >= hidden) {
    return;
}
const uint k = w_shape[1];
float acc = shared[size_t(t) * hidden + i];
for (uint j = 0; j < k; ++j) {
    acc += w[t * k + j] * y[(size_t(t) * k + j) * hidden + i];
}
out[size_t(t) * hidden + i] = acc;
