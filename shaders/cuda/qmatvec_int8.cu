// The dense decode matvec on int8 activations (runtime/kernels/cuda_kernels.py ``matvecs``), after
// int8_rows.cuh: y[t, r] = W[r] . x[t] for up to four matrices of one format and input width.
//
// Why CUDA C beside the Triton kernels: Triton's matvec loads a program's tile once and then computes,
// so a short matrix (8-30 MB) read HBM at 34-48% of its rate on an H200 (docs/PERFORMANCE.md, ninth
// and fifteenth passes). Here a warp owns ROWS * RPW whole rows (RPW at once, ROWS times) and issues
// all of its loads before any arithmetic; its registers are set by the source, not left to a
// compiler's tiling.
// Constants besides int8_rows.cuh's: ROWS (a lane's rows), WARPS (warps a block).

extern "C" __global__ void __launch_bounds__(WARPS * 32)
qmatvec_int8(const int* __restrict__ x,
             const int4* __restrict__ w0, const int4* __restrict__ w1,
             const int4* __restrict__ w2, const int4* __restrict__ w3,
             const unsigned short* __restrict__ s0, const unsigned short* __restrict__ s1,
             const unsigned short* __restrict__ s2, const unsigned short* __restrict__ s3,
             const unsigned short* __restrict__ b0, const unsigned short* __restrict__ b1,
             const unsigned short* __restrict__ b2, const unsigned short* __restrict__ b3,
             float* __restrict__ y0, float* __restrict__ y1, float* __restrict__ y2, float* __restrict__ y3,
             int r0, int r1, int r2, int r3) {
    // grid (tokens, row blocks of the matrices in turn): token fastest, so a row block's programs run
    // together and share its weights in L2
    __shared__ int4 xs[X_WORDS / 4];
    const int t = blockIdx.x;
#if !PDL
    stage_inputs(xs, x + (long long)t * X_WORDS, 1);  // first: measured faster on an H200 than after the weights
#endif

    const int per_block = ROWS * RPW * WARPS;
    const int c0 = (r0 + per_block - 1) / per_block;
    const int c1 = c0 + (r1 + per_block - 1) / per_block;
    const int c2 = c1 + (r2 + per_block - 1) / per_block;
    int blk = blockIdx.y;
    const int4* w; const unsigned short* s; const unsigned short* b; float* y; int n_out;
    if (blk < c0) { w = w0; s = s0; b = b0; y = y0; n_out = r0; }
    else if (blk < c1) { w = w1; s = s1; b = b1; y = y1; n_out = r1; blk -= c0; }
    else if (blk < c2) { w = w2; s = s2; b = b2; y = y2; n_out = r2; blk -= c1; }
    else { w = w3; s = s3; b = b3; y = y3; n_out = r3; blk -= c2; }

    const int l = threadIdx.x % RL;  // the lane's place in its rows
    const int row0 = blk * per_block + (threadIdx.x >> 5) * (ROWS * RPW) + (threadIdx.x & 31) / RL;
    Row rows[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const long long row = row0 + r * RPW;
        load_row(rows[r], w + row * NV, s + row * NG, b + row * NG, row < n_out, l);
    }
#if PDL  // the weights (which no kernel writes) are on their way while the previous kernel finishes
    pdl_wait();
    stage_inputs(xs, x + (long long)t * X_WORDS, 1);
#endif
    __syncthreads();  // the input row is in shared memory
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const float a = row_sum(row_dot(rows[r], xs, l));
        const int row = row0 + r * RPW;
        if (l == 0 && row < n_out) y[(long long)t * n_out + row] = a;
    }
}
