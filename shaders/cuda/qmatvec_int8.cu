// Decode matvecs on int8 activations for fmoe's packed matrices (runtime/kernels/cuda_matvec.py).
//
// y[t, r] = sum_g scale[r, g] * dx[t, g] * sum(q[r, g, :] * xq[t, g, :]) + bias[r, g] * xsum[t, g]
//
// W: int32 words [rows, NW], codes of BITS bits low bits first; scales and biases bfloat16 [rows, NG].
// x: a token's int8 input row as runtime/kernels/triton_int8.py writes it (int32 words): J = 8 / BITS
// lane rows [J, NW] (entry [j, w], byte b: the input of word w's code b * J + j), then the NG group
// steps dx and the NG group sums of x as float32 bits, padded to 16 bytes.
//
// Why CUDA C beside the Triton kernels: Triton's matvec loads a program's tile once and then computes,
// so a short matrix (8-30 MB) reads HBM at 34-48% of its rate (docs/PERFORMANCE.md, ninth and fifteenth
// passes). Here a warp owns ROWS rows; each lane issues all of its 16-byte loads (ROWS * VPL) before
// any arithmetic, and the registers they need are fixed by the source, not left to a compiler's tiling.
//
// Compile-time constants (nvrtc -D): BITS (2, 4, 8), GS (group size; GS * BITS a multiple of 128 so
// that a 16-byte vector lies inside one group), NW (words a row, a multiple of 4), X_WORDS (words of an
// input row), ROWS (rows a warp), WARPS (warps a block).

#define J (8 / BITS)
#define WPG (GS * BITS / 32)
#define NG (NW / WPG)
#define NV (NW / 4)
#define VPL ((NV + 31) / 32)
#define ROWS_PER_BLOCK (ROWS * WARPS)

__device__ __forceinline__ int dp4a_us(unsigned int codes, int x, int acc) {
    int d;  // four unsigned 8-bit codes times four signed int8 inputs, added to acc
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(codes), "r"(x), "r"(acc));
    return d;
}

__device__ __forceinline__ unsigned int code_lanes(unsigned int word, int j) {
    // code b * J + j of the word in byte b: for 4 bits codes 0, 2, 4, 6 (j = 0) or 1, 3, 5, 7 (j = 1)
    if (BITS == 8) return word;
    const unsigned int mask = BITS == 4 ? 0x0F0F0F0Fu : 0x03030303u;
    return (word >> (j * BITS)) & mask;
}

__device__ __forceinline__ float bf16_to_float(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

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
    const int4* xv = reinterpret_cast<const int4*>(x + (long long)t * X_WORDS);
    for (int i = threadIdx.x; i < X_WORDS / 4; i += WARPS * 32) xs[i] = xv[i];

    // which matrix this block's rows lie in
    const int c0 = (r0 + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
    const int c1 = c0 + (r1 + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
    const int c2 = c1 + (r2 + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
    int blk = blockIdx.y;
    const int4* w; const unsigned short* s; const unsigned short* b; float* y; int n_out;
    if (blk < c0) { w = w0; s = s0; b = b0; y = y0; n_out = r0; }
    else if (blk < c1) { w = w1; s = s1; b = b1; y = y1; n_out = r1; blk -= c0; }
    else if (blk < c2) { w = w2; s = s2; b = b2; y = y2; n_out = r2; blk -= c1; }
    else { w = w3; s = s3; b = b3; y = y3; n_out = r3; blk -= c2; }

    const int lane = threadIdx.x & 31;
    const int row0 = blk * ROWS_PER_BLOCK + (threadIdx.x >> 5) * ROWS;

    // every load of the warp's rows goes out before any arithmetic (the weights bypass L1: read once)
    int4 words[ROWS][VPL];
    float scale[ROWS][VPL], bias[ROWS][VPL];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int row = row0 + r;
#pragma unroll
        for (int i = 0; i < VPL; ++i) {
            const int v = lane + 32 * i;
            const bool ok = row < n_out && v < NV;
            const long long at = (long long)row * NV + v;
            words[r][i] = ok ? __ldcs(w + at) : make_int4(0, 0, 0, 0);
            const long long g = (long long)row * NG + (v * 4) / WPG;
            scale[r][i] = ok ? bf16_to_float(__ldg(s + g)) : 0.0f;
            bias[r][i] = ok && (v * 4) % WPG == 0 ? bf16_to_float(__ldg(b + g)) : 0.0f;
        }
    }
    __syncthreads();  // the input row is in shared memory

    const int* xw = reinterpret_cast<const int*>(xs);
    float acc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
        const int v = lane + 32 * i;
        if (v >= NV) continue;  // only where NV is not a multiple of 32
        const int g = (v * 4) / WPG;
        const float dx = __int_as_float(xw[J * NW + g]);
        const float xsum = __int_as_float(xw[J * NW + NG + g]);
        int4 xj[J];
#pragma unroll
        for (int j = 0; j < J; ++j) xj[j] = xs[j * NV + v];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            int isum = 0;
#pragma unroll
            for (int j = 0; j < J; ++j) {
                isum = dp4a_us(code_lanes((unsigned int)words[r][i].x, j), xj[j].x, isum);
                isum = dp4a_us(code_lanes((unsigned int)words[r][i].y, j), xj[j].y, isum);
                isum = dp4a_us(code_lanes((unsigned int)words[r][i].z, j), xj[j].z, isum);
                isum = dp4a_us(code_lanes((unsigned int)words[r][i].w, j), xj[j].w, isum);
            }
            acc[r] += (float)isum * (scale[r][i] * dx) + bias[r][i] * xsum;
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        float a = acc[r];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) a += __shfl_xor_sync(0xffffffffu, a, off);
        const int row = row0 + r;
        if (lane == 0 && row < n_out) y[(long long)t * n_out + row] = a;
    }
}
