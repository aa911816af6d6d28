/* spectool's native kernels for the lean decoding forward on CPUs (fp32): few-row products, RMSNorm, the rotary
   embedding with the key/value cache writes, and attention for a few new tokens.

   Few-row products: y[M][N] = x[M][K] @ w[N][K]^T, w row-major (nn.Linear's).

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
   -fopenmp) and called through ctypes; OpenMP's threads are torch's own when both use the same libgomp. */

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));

#define ROWS_PER_CALL 8           /* token rows per pass over the weight; more rows run in passes of 8 */
#define PREFETCH_BYTES 16384      /* how far ahead in the weight stream to prefetch */

static inline v8 load8(const float *p)
{
    v8 v;
    memcpy(&v, p, sizeof v); /* an unaligned load */
    return v;
}

/* Eight bfloat16 values widened to float32 (exact: a bf16 is the top half of a float). */
static inline v8 load8_bf16(const unsigned short *p)
{
    typedef unsigned short u16x8 __attribute__((vector_size(16)));
    typedef unsigned int u32x8 __attribute__((vector_size(32)));
    u16x8 half;
    memcpy(&half, p, sizeof half);
    u32x8 wide = __builtin_convertvector(half, u32x8) << 16;
    v8 v;
    memcpy(&v, &wide, sizeof v);
    return v;
}

static inline float bf16_value(unsigned short h)
{
    unsigned int bits = (unsigned int)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float lanes_sum(v8 a)
{
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

/* R weight rows from n0 times M token rows: R * M accumulators, all constants after inlining. The weight is
   float32, or bfloat16 (`bf16`) widened as it is read: half the bytes, the same products as its float32 copy. */
static inline __attribute__((always_inline)) void tile(const float *restrict x, const void *restrict w,
                                                       const int bf16, float *restrict y, long n0, const int R,
                                                       const int M, long K, long ldy)
{
    const float *w32 = (const float *)w;
    const unsigned short *w16 = (const unsigned short *)w;
    const long ahead = bf16 ? PREFETCH_BYTES / 2 : PREFETCH_BYTES / 4;
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
            long at = (n0 + r) * K + k;
            v8 ws;
            if (bf16) {
                __builtin_prefetch(w16 + at + ahead, 0, 1); /* into L2: measured best */
                ws = load8_bf16(w16 + at);
            } else {
                __builtin_prefetch(w32 + at + ahead, 0, 1);
                ws = load8(w32 + at);
            }
            for (int m = 0; m < M; m++)
                acc[r][m] += ws * xs[m];
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) {
            float s = lanes_sum(acc[r][m]);
            for (long t = k; t < K; t++) {
                long at = (n0 + r) * K + t;
                s += (bf16 ? bf16_value(w16[at]) : w32[at]) * x[m * K + t];
            }
            y[m * ldy + n0 + r] = s;
        }
}

/* Tiles of R rows over all N (the last N % R rows one at a time), split between the threads. */
#define PASS(R, M)                                                                       \
    do {                                                                                 \
        long tiles = N / (R);                                                            \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                \
        for (long b = 0; b < tiles; b++)                                                 \
            tile(x, w, BF16, y, b * (R), (R), (M), K, N);                                \
        for (long n = tiles * (R); n < N; n++)                                           \
            tile(x, w, BF16, y, n, 1, (M), K, N);                                        \
    } while (0)

/* With 32 vector registers (AVX-512VL) tiles may hold 16 accumulators; with 16 registers, 8. */
#if defined(__AVX512VL__)
#define WIDE 2
#else
#define WIDE 1
#endif

#define DEFINE_PASS(name, BF16_FLAG)                                                              \
    static void name(const float *x, const void *w, float *y, long M, long N, long K, int threads) \
    {                                                                                             \
        const int BF16 = (BF16_FLAG);                                                             \
        switch (M) {                                                                              \
        case 1: PASS(8, 1); break;                                                                \
        case 2: PASS(4 * WIDE, 2); break;                                                         \
        case 3: PASS(2 * WIDE, 3); break;                                                         \
        case 4: PASS(2 * WIDE, 4); break;                                                         \
        case 5: PASS(1 * WIDE, 5); break;                                                         \
        case 6: PASS(1 * WIDE, 6); break;                                                         \
        case 7: PASS(1 * WIDE, 7); break;                                                         \
        default: PASS(1 * WIDE, 8); break;                                                        \
        }                                                                                         \
    }

DEFINE_PASS(pass_f32, 0)
DEFINE_PASS(pass_bf16, 1)

/* The entry points: any M >= 1, in passes of up to ROWS_PER_CALL token rows; x, w, y contiguous; w float32 or
   bfloat16 (stored as its 16 bits). */
void spectool_few_rows(const float *x, const float *w, float *y, long M, long N, long K, int threads)
{
    for (long m0 = 0; m0 < M; m0 += ROWS_PER_CALL) {
        long rows = M - m0 < ROWS_PER_CALL ? M - m0 : ROWS_PER_CALL;
        pass_f32(x + m0 * K, w, y + m0 * N, rows, N, K, threads);
    }
}

void spectool_few_rows_bf16(const float *x, const unsigned short *w, float *y, long M, long N, long K, int threads)
{
    for (long m0 = 0; m0 < M; m0 += ROWS_PER_CALL) {
        long rows = M - m0 < ROWS_PER_CALL ? M - m0 : ROWS_PER_CALL;
        pass_bf16(x + m0 * K, w, y + m0 * N, rows, N, K, threads);
    }
}

/* RMSNorm over rows of `width`: y = w * (x * (1 / sqrt(mean(x^2) + eps))) (transformers' order; w NULL: no
   scale). Replaces the ~8 small ops torch runs for one normalisation of a few rows. */
void spectool_rms_norm(const float *x, const float *w, float *y, long rows, long width, float eps)
{
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * width;
        float *yr = y + r * width;
        v8 acc = {0, 0, 0, 0, 0, 0, 0, 0};
        long k = 0;
        for (; k + 8 <= width; k += 8) {
            v8 v = load8(xr + k);
            acc += v * v;
        }
        float sum = lanes_sum(acc);
        for (; k < width; k++)
            sum += xr[k] * xr[k];
        float scale = 1.0f / sqrtf(sum / (float)width + eps);
        if (w)
            for (k = 0; k < width; k++)
                yr[k] = w[k] * (xr[k] * scale);
        else
            for (k = 0; k < width; k++)
                yr[k] = xr[k] * scale;
    }
}

/* Rotary embedding (rotate-half) and cache writes for n new tokens of one sequence. Token t's `heads` query heads
   and `kv_heads` key heads are read from qk + t * qk_stride (head after head, d floats each) and its value heads
   from v + t * v_stride; with that token's cos / sin rows (d floats), q goes to q_out[head][t] (the [heads][n][d]
   layout attention reads) and k to keys[head][start + t], v is copied to values[head][start + t] (caches laid out
   [kv_heads][capacity][d]). Each element is x * cos + (-+x') * sin, the products and the sum torch forms. */
void spectool_rotary_store(const float *qk, long qk_stride, const float *v, long v_stride, const float *cos,
                           const float *sin, long n, long heads, long kv_heads, long d, float *q_out, float *keys,
                           float *values, long capacity, long start)
{
    long half = d / 2;
    for (long t = 0; t < n; t++) {
        const float *c = cos + t * d, *s = sin + t * d, *row = qk + t * qk_stride;
        for (long h = 0; h < heads + kv_heads; h++) {
            const float *src = row + h * d;
            float *dst = h < heads ? q_out + (h * n + t) * d : keys + ((h - heads) * capacity + start + t) * d;
            for (long i = 0; i < half; i++)
                dst[i] = src[i] * c[i] + (-src[i + half]) * s[i];
            for (long i = half; i < d; i++)
                dst[i] = src[i] * c[i] + src[i - half] * s[i];
        }
        for (long h = 0; h < kv_heads; h++)
            memcpy(values + (h * capacity + start + t) * d, v + t * v_stride + h * d, d * sizeof(float));
    }
}

/* Attention of n new queries of one sequence over its first `length` cached positions: query head h reads key
   and value head h / (heads / kv_heads); scores are scale * q.k, softmax over the positions the mask lets the
   query see (mask NULL: all of them; else n x length bytes, nonzero = seen), then the weighted values. q is
   [heads][n][d], the caches [kv_heads][capacity][d], out [n][heads * d] (the layout the o projection reads).
   Each query is computed alone, in a fixed order: its result does not depend on the other queries. */
void spectool_attention(const float *q, const float *keys, const float *values, const unsigned char *mask,
                        float *out, long n, long heads, long kv_heads, long d, long length, long capacity,
                        float scale)
{
    float *weights = malloc((size_t)(length > 0 ? length : 1) * sizeof(float));
    if (!weights)
        return; /* the caller checked the sizes; out of memory here leaves `out` as it was */
    long group = heads / kv_heads;
    for (long h = 0; h < heads; h++) {
        const float *kh = keys + (h / group) * capacity * d, *vh = values + (h / group) * capacity * d;
        for (long t = 0; t < n; t++) {
            const float *qt = q + (h * n + t) * d;
            const unsigned char *seen = mask ? mask + t * length : NULL;
            float top = -INFINITY;
            for (long j = 0; j < length; j++) {
                if (seen && !seen[j])
                    continue;
                const float *kj = kh + j * d;
                v8 acc = {0, 0, 0, 0, 0, 0, 0, 0};
                long i = 0;
                for (; i + 8 <= d; i += 8)
                    acc += load8(qt + i) * load8(kj + i);
                float dot = lanes_sum(acc);
                for (; i < d; i++)
                    dot += qt[i] * kj[i];
                weights[j] = dot * scale;
                if (weights[j] > top)
                    top = weights[j];
            }
            float *o = out + t * heads * d + h * d;
            for (long i = 0; i < d; i++)
                o[i] = 0.0f;
            float total = 0.0f;
            for (long j = 0; j < length; j++) {
                if (seen && !seen[j])
                    continue;
                float e = expf(weights[j] - top);
                total += e;
                const float *vj = vh + j * d;
                for (long i = 0; i < d; i++)
                    o[i] += e * vj[i];
            }
            float inverse = total > 0.0f ? 1.0f / total : 0.0f;
            for (long i = 0; i < d; i++)
                o[i] *= inverse;
        }
    }
    free(weights);
}

/* Which build this is: lets the loader check it opened what it compiled. */
int spectool_native_version(void) { return 4; }
