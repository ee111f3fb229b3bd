// SwiGLU's gate: out = silu(gate) * up, elementwise (the routed and shared experts; the DeltaNet's
// gated norm uses it too, with the normed output as "up").
//
// inputs:   gate [n] float32, up [n] float32
// outputs:  out [n] float32
// launch:   grid (n, 1, 1), threadgroup (256, 1, 1)
// ---- body ----
const uint i = thread_position_in_grid.x;
if (i >= gate_shape[0]) {
    return;
}
const float g = gate[i];
out[i] = g / (1.0f + metal::exp(-g)) * up[i];  // exp(-g) = inf for very negative g: silu = -0
