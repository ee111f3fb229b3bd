// Partial NeoX RoPE: in each head the pair (i, i + HALF) rotates by the angle whose cosine and sine
// are cos_table[t, i], sin_table[t, i] (computed on the host in float64, so long positions keep their
// precision); dims from 2 * HALF on pass through.
//
// inputs:   x [T, H, D] float32, cos_table [T, HALF] float32, sin_table [T, HALF] float32
// outputs:  out [T, H, D] float32
// launch:   grid (D, H, T), threadgroup (D, 1, 1) (or a divisor of D)
// ---- body ----
const uint i = thread_position_in_grid.x;
const uint h = thread_position_in_grid.y;
const uint t = thread_position_in_grid.z;
const uint d = x_shape[2];
const uint half_dim = cos_table_shape[1];
const size_t base = (size_t(t) * x_shape[1] + h) * d;
const float v = x[base + i];
if (i < half_dim) {
    const float c = cos_table[t * half_dim + i];
    const float s = sin_table[t * half_dim + i];
    out[base + i] = v * c - x[base + i + half_dim] * s;
} else if (i < 2 * half_dim) {
    const uint j = i - half_dim;
    const float c = cos_table[t * half_dim + j];
    const float s = sin_table[t * half_dim + j];
    out[base + i] = v * c + x[base + j] * s;
} else {
    out[base + i] = v;
}
