/* spectool's native kernel for few-row fp32 products: y[M][N] = x[M][K] @ w[N][K]^T, w row-major (nn.Linear's).

   Speculative decoding multiplies each weight by 1 to ~16 token rows. At those shapes a CPU is bound by reading
   the weight from memory, and the BLAS kernels either read it at a fraction of the bandwidth (one row) or spend
   their time on compute that does not overlap the reads (several rows). This kernel reads each weight once per
   call, in tiles of R weight rows x M token rows held in vector registers, and prefetches the weight stream far
   enough ahead that the multiplications hide behind the reads: eight rows cost little more than one.

   Every output is the same sum in the same order whatever M and R are (eight lanes over k = j mod 8, then a fixed
   tree over the lanes, then the k tail), so one token's results are bit-identical whether it is multiplied alone
   or beside others: a verify of n tokens reads exactly what n plain steps would. (That needs -ffp-contract=off:
   a compiler free to fuse multiply-adds fuses them in some tile shapes and not in others.)

   Built by spectool/decoding/native.py with the machine's C compiler (-O3 -march=native -ffp-contract=off
   -fopenmp) and called
   through ctypes; OpenMP's threads are torch's own when both use the same libgomp. */

#include <string.h>

typedef float v8 __attribute__((vector_size(32)));

#define ROWS_PER_CALL 8           /* token rows per pass over the weight; more rows run in passes of 8 */
#define PREFETCH_AHEAD 4096       /* floats (16 KiB) ahead in the weight stream */

static inline v8 load8(const float *p)
{
    v8 v;
    memcpy(&v, p, sizeof v); /* an unaligned load */
    return v;
}

static inline float lanes_sum(v8 a)
{
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

/* R weight rows from n0 times M token rows: R * M accumulators, all constants after inlining. */
static inline __attribute__((always_inline)) void tile(const float *restrict x, const float *restrict w,
                                                       float *restrict y, long n0, const int R, const int M,
                                                       long K, long ldy)
{
    v8 acc[8][8];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++)
            acc[r][m] = (v8){0, 0, 0, 0, 0, 0, 0, 0};
    long k = 0;
    for (; k + 8 <= K; k += 8) {
        v8 xs[8];
        for (int m = 0; m < M; m++)
            xs[m] = load8(x + m * K + k);
        for (int r = 0; r < R; r++) {
            const float *row = w + (n0 + r) * K + k;
            __builtin_prefetch(row + PREFETCH_AHEAD, 0, 1); /* into L2: measured best */
            v8 ws = load8(row);
            for (int m = 0; m < M; m++)
                acc[r][m] += ws * xs[m];
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) {
            float s = lanes_sum(acc[r][m]);
            for (long t = k; t < K; t++)
                s += w[(n0 + r) * K + t] * x[m * K + t];
            y[m * ldy + n0 + r] = s;
        }
}

/* Tiles of R rows over all N (the last N % R rows one at a time), split between the threads. */
#define PASS(R, M)                                                                       \
    do {                                                                                 \
        long tiles = N / (R);                                                            \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                \
        for (long b = 0; b < tiles; b++)                                                 \
            tile(x, w, y, b * (R), (R), (M), K, N);                                      \
        for (long n = tiles * (R); n < N; n++)                                           \
            tile(x, w, y, n, 1, (M), K, N);                                              \
    } while (0)

/* With 32 vector registers (AVX-512VL) tiles may hold 16 accumulators; with 16 registers, 8. */
#if defined(__AVX512VL__)
#define WIDE 2
#else
#define WIDE 1
#endif

static void pass(const float *x, const float *w, float *y, long M, long N, long K, int threads)
{
    switch (M) {
    case 1: PASS(8, 1); break;
    case 2: PASS(4 * WIDE, 2); break;
    case 3: PASS(2 * WIDE, 3); break;
    case 4: PASS(2 * WIDE, 4); break;
    case 5: PASS(1 * WIDE, 5); break;
    case 6: PASS(1 * WIDE, 6); break;
    case 7: PASS(1 * WIDE, 7); break;
    default: PASS(1 * WIDE, 8); break;
    }
}

/* The entry point: any M >= 1, in passes of up to ROWS_PER_CALL token rows. x, w, y contiguous. */
void spectool_few_rows(const float *x, const float *w, float *y, long M, long N, long K, int threads)
{
    for (long m0 = 0; m0 < M; m0 += ROWS_PER_CALL) {
        long rows = M - m0 < ROWS_PER_CALL ? M - m0 : ROWS_PER_CALL;
        pass(x + m0 * K, w, y + m0 * N, rows, N, K, threads);
    }
}

/* Which kernel this build is: lets the loader check it opened what it compiled. */
int spectool_few_rows_version(void) { return 1; }
