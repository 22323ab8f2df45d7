/* Fused shrink + expand for every task slot of a step, in one call (kernels/native.py loads it).
 *
 * For slot j with rows order[off_j .. off_j + n_j):
 *   h[k][n]  = sum over stored e of vt row k:  val[e] * x[row_n][col[e]]      (k < K_j)
 *   y[row_n][o] += sum over stored e of u row o: val[e] * h[col[e]][n]        (o < out)
 * A slot's factors are either both CSR (int32 indices, float32 values, s folded into vt) or both
 * dense float32: vt [K][in] row-major and u stored K-major ([K][out]: column k of u is contiguous), so
 * the shrink is K dot products and the expand K axpys, both unit-stride (`omp simd`, no OpenMP
 * runtime: the build passes -fopenmp-simd only). Activations are float32 or bfloat16; accumulation
 * is float32. Single-threaded on purpose: no second OpenMP runtime next to torch's, and one call per
 * product keeps per-call costs to microseconds.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The slot table (one int64 row per slot: SLOT_COLS columns, indices SLOT_VT_CROW .. SLOT_KIND) and the
 * slot kinds (KIND_CSR, KIND_DENSE) are defined once, in kernels/native.py, which passes them as -D flags. */
#if !defined(SLOT_COLS) || !defined(SLOT_KIND) || !defined(KIND_CSR) || !defined(KIND_DENSE)
#error "build through kernels/native.py: it defines the slot table's layout and the slot kinds"
#endif

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                             /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* xt[c][n] = x[rows[n]][c] as float32: the slot's rows, transposed so the inner loop runs over n. */
static void gather_rows_t(const void *x, int x_bf16, int64_t x_stride, const int32_t *rows, int64_t n,
                          int64_t in, float *xt) {
    for (int64_t i = 0; i < n; i++) {
        for (int64_t c = 0; c < in; c++) {
            int64_t at = rows[i] * x_stride + c;
            xt[c * n + i] = x_bf16 ? bf16_to_f32(((const uint16_t *)x)[at]) : ((const float *)x)[at];
        }
    }
}

/* out[r] = sum_e val[e] * inp[col[e]] for every CSR row r (one activation row: a sparse dot per row). */
static void csr_times_vector(const int32_t *restrict crow, const int32_t *restrict col, const float *restrict val,
                             int64_t num_rows, const float *restrict inp, float *restrict out) {
    for (int64_t r = 0; r < num_rows; r++) {
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
        int32_t e = crow[r];
        const int32_t end = crow[r + 1];
        for (; e + 4 <= end; e += 4) {
            a0 += val[e] * inp[col[e]];
            a1 += val[e + 1] * inp[col[e + 1]];
            a2 += val[e + 2] * inp[col[e + 2]];
            a3 += val[e + 3] * inp[col[e + 3]];
        }
        for (; e < end; e++) a0 += val[e] * inp[col[e]];
        out[r] = (a0 + a1) + (a2 + a3);
    }
}

/* out[r][n] = sum_e val[e] * inp[col[e]][n] for every CSR row r (n activation rows, inner loop over n).
 * Inlined with a constant n for the small decode cases so the inner loop unrolls into registers. */
static inline __attribute__((always_inline)) void csr_rows_n(const int32_t *restrict crow, const int32_t *restrict col,
                                                             const float *restrict val, int64_t num_rows,
                                                             const float *restrict inp, const int64_t n,
                                                             float *restrict out) {
    for (int64_t r = 0; r < num_rows; r++) {
        float acc[8] = {0};
        for (int32_t e = crow[r]; e < crow[r + 1]; e++) {
            const float v = val[e];
            const float *restrict src = inp + (int64_t)col[e] * n;
            for (int64_t i = 0; i < n; i++) acc[i] += v * src[i];
        }
        for (int64_t i = 0; i < n; i++) out[r * n + i] = acc[i];
    }
}

static void csr_times_block(const int32_t *restrict crow, const int32_t *restrict col, const float *restrict val,
                            int64_t num_rows, const float *restrict inp, int64_t n, float *restrict out) {
    switch (n) {
    case 1: csr_times_vector(crow, col, val, num_rows, inp, out); return;
    case 2: csr_rows_n(crow, col, val, num_rows, inp, 2, out); return;
    case 3: csr_rows_n(crow, col, val, num_rows, inp, 3, out); return;
    case 4: csr_rows_n(crow, col, val, num_rows, inp, 4, out); return;
    case 5: csr_rows_n(crow, col, val, num_rows, inp, 5, out); return;
    case 6: csr_rows_n(crow, col, val, num_rows, inp, 6, out); return;
    case 7: csr_rows_n(crow, col, val, num_rows, inp, 7, out); return;
    case 8: csr_rows_n(crow, col, val, num_rows, inp, 8, out); return;
    default: break;
    }
    for (int64_t r = 0; r < num_rows; r++) {
        float *restrict acc = out + r * n;
        for (int64_t i = 0; i < n; i++) acc[i] = 0.0f;
        for (int32_t e = crow[r]; e < crow[r + 1]; e++) {
            const float v = val[e];
            const float *restrict src = inp + (int64_t)col[e] * n;
            for (int64_t i = 0; i < n; i++) acc[i] += v * src[i];
        }
    }
}

static void add_into_rows(void *y, int y_bf16, int64_t y_stride, const int32_t *rows, int64_t n, int64_t out,
                          const float *d) {
    for (int64_t i = 0; i < n; i++) {
        for (int64_t o = 0; o < out; o++) {
            int64_t at = rows[i] * y_stride + o;
            if (y_bf16) {
                uint16_t *p = (uint16_t *)y + at;
                *p = f32_to_bf16(bf16_to_f32(*p) + d[o * n + i]);
            } else {
                ((float *)y)[at] += d[o * n + i];
            }
        }
    }
}

/* xr[i][c] = x[rows[i]][c] as float32: the slot's rows, kept row-major for unit-stride dots. */
static void gather_rows(const void *x, int x_bf16, int64_t x_stride, const int32_t *rows, int64_t n, int64_t in,
                        float *xr) {
    for (int64_t i = 0; i < n; i++) {
        const int64_t at = rows[i] * x_stride;
        float *restrict dst = xr + i * in;
        if (x_bf16) {
            const uint16_t *restrict src = (const uint16_t *)x + at;
#pragma omp simd
            for (int64_t c = 0; c < in; c++) dst[c] = bf16_to_f32(src[c]);
        } else {
            memcpy(dst, (const float *)x + at, sizeof(float) * (size_t)in);
        }
    }
}

/* Dense factors: h[i][k] = vt[k] . xr[i], then d[i][:] = sum_k h[i][k] * u_k[:] (u K-major). */
static void dense_shrink_expand(const float *restrict vt, const float *restrict ut, int64_t k, int64_t n, int64_t in,
                                int64_t out, const float *restrict xr, float *restrict h, float *restrict d) {
    for (int64_t kk = 0; kk < k; kk++) {
        const float *restrict v = vt + kk * in;
        for (int64_t i = 0; i < n; i++) {
            const float *restrict xi = xr + i * in;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t c = 0; c < in; c++) acc += v[c] * xi[c];
            h[i * k + kk] = acc;
        }
    }
    memset(d, 0, sizeof(float) * (size_t)(n * out));
    for (int64_t kk = 0; kk < k; kk++) {
        const float *restrict u = ut + kk * out;
        for (int64_t i = 0; i < n; i++) {
            const float a = h[i * k + kk];
            float *restrict di = d + i * out;
#pragma omp simd
            for (int64_t o = 0; o < out; o++) di[o] += a * u[o];
        }
    }
}

/* y[rows[i]][o] += d[i][o] (d row-major [n][out]). */
static void add_rows(void *y, int y_bf16, int64_t y_stride, const int32_t *rows, int64_t n, int64_t out,
                     const float *d) {
    for (int64_t i = 0; i < n; i++) {
        const float *restrict src = d + i * out;
        const int64_t at = rows[i] * y_stride;
        if (y_bf16) {
            uint16_t *restrict dst = (uint16_t *)y + at;
            for (int64_t o = 0; o < out; o++) dst[o] = f32_to_bf16(bf16_to_f32(dst[o]) + src[o]);
        } else {
            float *restrict dst = (float *)y + at;
#pragma omp simd
            for (int64_t o = 0; o < out; o++) dst[o] += src[o];
        }
    }
}

/* One slot: gather its rows, shrink, expand, add. Scratch: rows (in x n), h (K x n), d (out x n). */
static int run_slot(const int64_t *m, const int32_t *rows, int64_t n, const void *x, int x_bf16, int64_t x_stride,
                    int64_t in, void *y, int y_bf16, int64_t y_stride, int64_t out) {
    const int64_t k = m[SLOT_RANK];
    if (m[SLOT_KIND] != KIND_CSR && m[SLOT_KIND] != KIND_DENSE) return -2;
    float *xs = malloc(sizeof(float) * (size_t)(in * n));
    float *h = malloc(sizeof(float) * (size_t)(k * n));
    float *d = malloc(sizeof(float) * (size_t)(out * n));
    int status = (xs && h && d) ? 0 : -1;
    if (status == 0 && m[SLOT_KIND] == KIND_CSR) {
        gather_rows_t(x, x_bf16, x_stride, rows, n, in, xs);
        csr_times_block((const int32_t *)m[SLOT_VT_CROW], (const int32_t *)m[SLOT_VT_COL],
                        (const float *)m[SLOT_VT_VALUES], k, xs, n, h);
        csr_times_block((const int32_t *)m[SLOT_U_CROW], (const int32_t *)m[SLOT_U_COL],
                        (const float *)m[SLOT_U_VALUES], out, h, n, d);
        add_into_rows(y, y_bf16, y_stride, rows, n, out, d);
    } else if (status == 0) {
        gather_rows(x, x_bf16, x_stride, rows, n, in, xs);
        dense_shrink_expand((const float *)m[SLOT_VT_VALUES], (const float *)m[SLOT_U_VALUES], k, n, in, out, xs, h, d);
        add_rows(y, y_bf16, y_stride, rows, n, out, d);
    }
    free(xs), free(h), free(d);
    return status;
}

/* Returns 0, -1 when scratch memory could not be had, -2 on an unknown slot kind. */
int deltaserve_add_delta(int64_t num_slots, const int64_t *meta, const int32_t *order, const void *x, int x_bf16,
                         int64_t x_stride, int64_t in, void *y, int y_bf16, int64_t y_stride, int64_t out) {
    for (int64_t j = 0; j < num_slots; j++) {
        const int64_t *m = meta + j * SLOT_COLS;
        const int status =
            run_slot(m, order + m[SLOT_OFFSET], m[SLOT_COUNT], x, x_bf16, x_stride, in, y, y_bf16, y_stride, out);
        if (status != 0) return status;
    }
    return 0;
}

/* Embedding delta rows: out[row] = sum over stored (k, a) of u row ids[row]:  a * vt[k, :]
 * for the rows of every slot (same slot table as deltaserve_add_delta); out is float32 [N, hidden],
 * zeroed by the caller. Cost per token: nnz(u row) x nnz(vt row), no densified factor. */
void deltaserve_embedding_delta(int64_t num_slots, const int64_t *meta, const int32_t *order, const int64_t *ids,
                                float *out, int64_t hidden) {
    for (int64_t j = 0; j < num_slots; j++) {
        const int64_t *m = meta + j * SLOT_COLS;
        const int32_t *vcrow = (const int32_t *)m[SLOT_VT_CROW], *vcol = (const int32_t *)m[SLOT_VT_COL];
        const float *vval = (const float *)m[SLOT_VT_VALUES];
        const int32_t *ucrow = (const int32_t *)m[SLOT_U_CROW], *ucol = (const int32_t *)m[SLOT_U_COL];
        const float *uval = (const float *)m[SLOT_U_VALUES];
        for (int64_t i = 0; i < m[SLOT_COUNT]; i++) {
            const int64_t row = order[m[SLOT_OFFSET] + i], id = ids[row];
            float *restrict dst = out + row * hidden;
            for (int32_t e = ucrow[id]; e < ucrow[id + 1]; e++) {
                const float a = uval[e];
                const int32_t k = ucol[e];
                for (int32_t f = vcrow[k]; f < vcrow[k + 1]; f++) dst[vcol[f]] += a * vval[f];
            }
        }
    }
}
