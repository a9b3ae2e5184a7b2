/* Packed 1-bit sign matrix times activations, without materialising the ±1 matrix.
 *
 * y[t, o] = sum_i x[t, i] * s(o, i) for x (n, in) fp32 row-major and y (n, out) fp32 row-major, where
 * s(o, i) = +1 when bit (o * in + i) of the row-major packed bits is set (bits least significant first
 * within a byte) and -1 otherwise. Requires in % 8 == 0 (every matrix row starts on a byte boundary).
 *
 * Few rows (decoding), deltakit_sign_matmul_tiles: the bits are first laid out in tiles of 16 matrix
 * rows (ops/signmm.py sign_tiles: tiles[(b * groups + g) * 16 + j] = byte g of matrix row 16 b + j, zero
 * past the last row; groups = in / 8). Per activation row t and 4-column group q (columns 4q .. 4q+3) a
 * table of 16 values T_q[v] = ((s0 x0 + s1 x1) + s2 x2) + s3 x3, s_k = +1 when bit k of v is set, else -1.
 * Nibble v of matrix row o for group q (the low nibble of its byte for even q, the high one for odd q)
 * selects T_q[v]; y[t, o] = (a0 + a1) + (a2 + a3), where a_m sums T_q[nibble] over the groups q with
 * q % 4 == m in order of q, starting from +0. With AVX-512 a tile's 16 rows are one vector and the
 * lookup is one permute; the portable form performs the same additions lane by lane, so the bits depend
 * neither on the instruction set, nor on the number of threads (threads split the tiles, never a sum),
 * nor on the rows batched together.
 *
 * deltakit_sign_matmul_lut takes many rows (prefill) 16 at a time: for each 8-column group g a table
 * holds, for every byte value b, the 16 rows' sums of ±x over the group's columns (+ where b's bit is
 * set), built in a fixed order; y[t, o] is then the sum over g of table[g][byte (o, g)] (one 16-row
 * vector load and add per 8 columns), partial sums taken in a fixed order (group chunks in order;
 * within a chunk g % 4 into four partials, combined pairwise). Its bits are independent of the thread
 * count and of the other rows, but differ in rounding from the tile form.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include <pthread.h>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

typedef float v16 __attribute__((vector_size(64)));

#define TILE 16 /* matrix rows per tile */

/* s_k[v] = +1 when bit k of v is set, else -1 */
static const v16 nibble_signs[4] = {
    {-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1},
    {-1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1},
    {-1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1},
    {-1, -1, -1, -1, -1, -1, -1, -1, 1, 1, 1, 1, 1, 1, 1, 1},
};

/* the 16-entry tables of one activation row: tables[q] for the in / 4 groups of 4 columns */
static void nibble_tables(const float *x, int64_t in, v16 *tables) {
    const v16 s0 = nibble_signs[0], s1 = nibble_signs[1], s2 = nibble_signs[2], s3 = nibble_signs[3];
    for (int64_t q = 0; q < in / 4; q++) {
        const float *c = x + 4 * q;
        v16 x0 = c[0] - (v16){0}, x1 = c[1] - (v16){0}, x2 = c[2] - (v16){0}, x3 = c[3] - (v16){0};
        tables[q] = ((s0 * x0 + s1 * x1) + s2 * x2) + s3 * x3; /* ±x is exact: one rounding per add */
    }
}

#define TILE_PASS 4 /* activation rows sharing one pass over a tile */

#ifdef __AVX512F__
/* partial sums a[t][m] of rows t < nt (nt known at compile time: the accumulators stay in registers) over
 * the groups g0 .. g1 - 1 of one tile; the bytes' nibbles widened once and used by every row */
static inline __attribute__((always_inline)) void tile_pass(const v16 *tables, int64_t quads, const uint8_t *tile,
                                                             int64_t groups, v16 a[TILE_PASS][4], const int nt) {
    __m512 r[TILE_PASS][4];
    for (int t = 0; t < nt; t++)
        for (int m = 0; m < 4; m++) r[t][m] = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 2 <= groups; g += 2) { /* groups g, g + 1: 4-column groups 2g .. 2g + 3, partials 0 .. 3 */
        __m512i i0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(tile + g * TILE)));
        __m512i i1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(tile + (g + 1) * TILE)));
        __m512i h0 = _mm512_srli_epi32(i0, 4), h1 = _mm512_srli_epi32(i1, 4); /* permutes read 4 index bits */
        for (int t = 0; t < nt; t++) {
            const v16 *tab = tables + t * quads + 2 * g;
            r[t][0] = _mm512_add_ps(r[t][0], _mm512_permutexvar_ps(i0, (__m512)tab[0]));
            r[t][1] = _mm512_add_ps(r[t][1], _mm512_permutexvar_ps(h0, (__m512)tab[1]));
            r[t][2] = _mm512_add_ps(r[t][2], _mm512_permutexvar_ps(i1, (__m512)tab[2]));
            r[t][3] = _mm512_add_ps(r[t][3], _mm512_permutexvar_ps(h1, (__m512)tab[3]));
        }
    }
    if (g < groups) { /* an odd last group: 4-column groups 2g, 2g + 1 (2g % 4 == 0) */
        __m512i i0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(tile + g * TILE)));
        __m512i h0 = _mm512_srli_epi32(i0, 4);
        for (int t = 0; t < nt; t++) {
            const v16 *tab = tables + t * quads + 2 * g;
            r[t][0] = _mm512_add_ps(r[t][0], _mm512_permutexvar_ps(i0, (__m512)tab[0]));
            r[t][1] = _mm512_add_ps(r[t][1], _mm512_permutexvar_ps(h0, (__m512)tab[1]));
        }
    }
    for (int t = 0; t < nt; t++)
        for (int m = 0; m < 4; m++) a[t][m] = (v16)r[t][m];
}
#else
/* the same partial sums lane by lane */
static void tile_pass(const v16 *tables, int64_t quads, const uint8_t *tile, int64_t groups,
                      v16 a[TILE_PASS][4], const int nt) {
    for (int t = 0; t < nt; t++) {
        const v16 *tab = tables + t * quads;
        for (int m = 0; m < 4; m++) a[t][m] = (v16){0};
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *bytes = tile + g * TILE;
            int m = (int)((2 * g) % 4);
            for (int j = 0; j < TILE; j++) {
                a[t][m][j] = a[t][m][j] + tab[2 * g][bytes[j] & 15];
                a[t][m + 1][j] = a[t][m + 1][j] + tab[2 * g + 1][bytes[j] >> 4];
            }
        }
    }
}
#endif

/* y[t, 16 b + j] for the rows t < n of one tile b (tile: its groups x 16 bytes), written where 16 b + j < out */
static void tile_rows(const v16 *tables, int64_t n, int64_t in, const uint8_t *tile, int64_t b, int64_t out,
                      float *y) {
    int64_t groups = in / 8, quads = in / 4;
    int64_t lanes = out - TILE * b < TILE ? out - TILE * b : TILE;
    for (int64_t t0 = 0; t0 < n; t0 += TILE_PASS) {
        v16 a[TILE_PASS][4];
        const v16 *tab = tables + t0 * quads;
        int nt = n - t0 < TILE_PASS ? (int)(n - t0) : TILE_PASS;
        switch (nt) {
            case 1: tile_pass(tab, quads, tile, groups, a, 1); break;
            case 2: tile_pass(tab, quads, tile, groups, a, 2); break;
            case 3: tile_pass(tab, quads, tile, groups, a, 3); break;
            default: tile_pass(tab, quads, tile, groups, a, TILE_PASS); break;
        }
        for (int t = 0; t < nt; t++) {
            v16 sum = (a[t][0] + a[t][1]) + (a[t][2] + a[t][3]);
            memcpy(y + (t0 + t) * out + TILE * b, &sum, (size_t)lanes * sizeof(float));
        }
    }
}

int deltakit_sign_matmul_tiles(const float *x, int64_t n, int64_t in, const uint8_t *tiles, int64_t out, float *y,
                               int threads) {
    if (in % 8 != 0 || n < 0 || out < 0) return 1;
    if (threads < 1) threads = 1;
    if (n == 0 || out == 0) return 0;
    v16 *tables = aligned_alloc(64, (size_t)(n * (in / 4) > 0 ? n * (in / 4) : 1) * sizeof(v16));
    if (!tables) return 2;
    for (int64_t t = 0; t < n; t++) nibble_tables(x + t * in, in, tables + t * (in / 4));
    int64_t count = (out + TILE - 1) / TILE;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < count; b++) tile_rows(tables, n, in, tiles + b * (in / 8) * TILE, b, out, y);
    free(tables);
    return 0;
}

#define LUT_ROWS 16
#define CHUNK 32 /* 8-column groups per table chunk: 32 x 256 x 64 bytes = 512 KiB */

/* table[b] for one group: the LUT_ROWS rows' sum of s_k * x_k over the group's 8 columns, s_k = +1
 * when bit k of b is set, else -1 (xt: 8 columns x LUT_ROWS, column-major per row vector) */
static void build_table(const v16 *xt, v16 *table) {
    v16 twice[8];
    for (int k = 0; k < 8; k++) twice[k] = xt[k] + xt[k];
    table[0] = -(((xt[0] + xt[1]) + (xt[2] + xt[3])) + ((xt[4] + xt[5]) + (xt[6] + xt[7])));
    for (int b = 1; b < 256; b++) table[b] = table[b & (b - 1)] + twice[__builtin_ctz(b)];
}

/* acc[o - o0] for o in o0 .. o1 - 1: the sums over all groups for one block of LUT_ROWS rows (xt), the
 * tables built chunk by chunk into this thread's own `table` (a table read by another core would cross
 * between the cores' caches on every lookup) */
static void lut_block(const v16 *xt, int64_t groups, const uint8_t *packed, int64_t o0, int64_t o1, v16 *acc,
                      v16 *table) {
    memset(acc, 0, (o1 - o0) * sizeof(v16));
    for (int64_t c0 = 0; c0 < groups; c0 += CHUNK) {
        int64_t gc = groups - c0 < CHUNK ? groups - c0 : CHUNK;
        for (int64_t g = 0; g < gc; g++) build_table(xt + (c0 + g) * 8, table + g * 256);
        for (int64_t o = o0; o < o1; o++) {
            const uint8_t *p = packed + o * groups + c0;
            v16 a[4] = {{0}, {0}, {0}, {0}};
            int64_t g = 0;
            for (; g + 4 <= gc; g += 4) {
                a[0] += table[g * 256 + p[g]];
                a[1] += table[(g + 1) * 256 + p[g + 1]];
                a[2] += table[(g + 2) * 256 + p[g + 2]];
                a[3] += table[(g + 3) * 256 + p[g + 3]];
            }
            for (; g < gc; g++) a[g % 4] += table[g * 256 + p[g]];
            acc[o - o0] += (a[0] + a[1]) + (a[2] + a[3]);
        }
    }
}

/* Work items: (block of LUT_ROWS rows, slice of the outputs). With as many blocks as threads or more, a
 * block is one item; with fewer, each block's outputs are cut into slices so every thread has work (each
 * slice builds the block's tables again: more arithmetic, no table shared between cores). */
int deltakit_sign_matmul_lut(const float *x, int64_t n, int64_t in, const uint8_t *packed, int64_t out,
                             float *y, int threads) {
    if (in % 8 != 0 || n < 0 || out < 0) return 1;
    if (threads < 1) threads = 1;
    int64_t groups = in / 8, blocks = (n + LUT_ROWS - 1) / LUT_ROWS;
    int64_t slices = blocks >= threads ? 1 : (threads + blocks - 1) / blocks;
    if (slices > out) slices = out > 0 ? out : 1;
    int64_t items = blocks * slices;
    int code = 0;
#pragma omp parallel num_threads(threads < items ? threads : (items > 0 ? (int)items : 1))
    {
        v16 *table = aligned_alloc(64, CHUNK * 256 * sizeof(v16));
        v16 *xt = aligned_alloc(64, (in > 0 ? in : 1) * sizeof(v16));
        v16 *acc = aligned_alloc(64, (out > 0 ? out : 1) * sizeof(v16));
        int mine = (table && xt && acc) ? 0 : 2;
        if (mine) {
#pragma omp atomic write
            code = mine;
        }
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; item++) {
            if (mine) continue;
            int64_t t0 = (item / slices) * LUT_ROWS, k = item % slices;
            int64_t o0 = out * k / slices, o1 = out * (k + 1) / slices;
            int nr = n - t0 < LUT_ROWS ? (int)(n - t0) : LUT_ROWS;
            for (int64_t i = 0; i < in; i++)
                for (int r = 0; r < LUT_ROWS; r++) xt[i][r] = r < nr ? x[(t0 + r) * in + i] : 0.0f;
            lut_block(xt, groups, packed, o0, o1, acc, table);
            for (int r = 0; r < nr; r++)
                for (int64_t o = o0; o < o1; o++) y[(t0 + r) * out + o] = acc[o - o0][r];
        }
        free(table);
        free(xt);
        free(acc);
    }
    return code;
}

/* Several sign matrices of one shape (out, in), each against its own rows of x, accumulated into y:
 * y[rows[k], :] += scales[p] * (x[rows[k], :] S_pᵀ) for the rows k in offsets[p] .. offsets[p + 1].
 * x (rows of x, in) fp32, y (rows of y, out) fp32; packed[p] the address of part p's row-major bits and
 * tiles[p] of the same bits in tiles (sign_tiles). A part of lut_min rows or more takes the table-lookup
 * form, fewer the tile form (the tiles of all such parts in one parallel loop); each part's product has
 * the bits of a single call on its gathered rows. Rows of different parts must differ. */
int deltakit_sign_matmul_multi(const float *x, int64_t in, int64_t out, int64_t nparts, const int64_t *packed,
                               const int64_t *tiles, const int64_t *offsets, const int64_t *rows,
                               const float *scales, float *y, int64_t lut_min, int threads) {
    if (in % 8 != 0 || out < 0 || nparts < 0) return 1;
    if (threads < 1) threads = 1;
    int64_t total = offsets[nparts] - offsets[0], quads = in / 4, count = (out + TILE - 1) / TILE;
    if (total <= 0 || out == 0) return 0;
    float *xs = malloc((size_t)(total * in) * sizeof(float));
    float *ys = malloc((size_t)(total * out) * sizeof(float));
    v16 *tables = aligned_alloc(64, (size_t)(total * quads > 0 ? total * quads : 1) * sizeof(v16));
    int code = (xs && ys && tables) ? 0 : 2;
    int64_t few = 0; /* parts of the tile form */
    for (int64_t p = 0; code == 0 && p < nparts; p++) {
        int64_t first = offsets[p] - offsets[0], n = offsets[p + 1] - offsets[p];
        if (n <= 0) continue;
        for (int64_t r = 0; r < n; r++)
            memcpy(xs + (first + r) * in, x + rows[offsets[p] + r] * in, (size_t)in * sizeof(float));
        if (n >= lut_min) {
            code = deltakit_sign_matmul_lut(xs + first * in, n, in, (const uint8_t *)(uintptr_t)packed[p], out,
                                            ys + first * out, threads);
        } else {
            for (int64_t r = 0; r < n; r++) nibble_tables(xs + (first + r) * in, in, tables + (first + r) * quads);
            few++;
        }
    }
    if (code == 0 && few > 0) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t item = 0; item < nparts * count; item++) {
            int64_t p = item / count, b = item % count;
            int64_t first = offsets[p] - offsets[0], n = offsets[p + 1] - offsets[p];
            if (n <= 0 || n >= lut_min) continue;
            const uint8_t *tile = (const uint8_t *)(uintptr_t)tiles[p] + b * (in / 8) * TILE;
            tile_rows(tables + first * quads, n, in, tile, b, out, ys + first * out);
        }
    }
    for (int64_t k = 0; code == 0 && k < nparts; k++)
        for (int64_t r = offsets[k]; r < offsets[k + 1]; r++) {
            float *yr = y + rows[r] * out;
            const float *src = ys + (r - offsets[0]) * out;
            for (int64_t o = 0; o < out; o++) yr[o] += scales[k] * src[o];
        }
    free(xs);
    free(ys);
    free(tables);
    return code;
}

/* Rows r0 .. r1 - 1 of the low-rank product up @ down (ops/lowrank.py): up (rows, rank) and down (rank, cols)
 * fp32 row-major, out (r1 - r0, cols) fp32 row-major.
 *
 * out[i, j] = (...((u[i,0] d[0,j] + u[i,1] d[1,j]) + u[i,2] d[2,j]) + ...) + u[i,rank-1] d[rank-1,j]:
 * every product and every sum rounded to fp32 on its own (the library is built with -ffp-contract=off, so no
 * fused multiply-add), the rank in order. Each element's arithmetic is fixed, so the bits depend neither on
 * the rows asked for, nor on the number of threads (threads split rows), nor on the vector width; the torch
 * form in ops/lowrank.py performs the same operations. rank 0 gives zeros. Returns 0, or 1 for bad sizes.
 * The fused rebuild below runs the same loops with fused multiply-adds where every product is exact
 * (lr_madd), which gives the same bits.
 */
#define LR_ROWS 4       /* rows sharing each load of down */
#define LR_ROWS_EXACT 8 /* the same with fused multiply-adds (lr_madd), which leave registers for more */
#ifdef __AVX512F__
typedef float lrv __attribute__((vector_size(64))); /* one vector of the low-rank kernel */
#else
typedef float lrv __attribute__((vector_size(32)));
#endif
#define LR_LANES ((int64_t)(sizeof(lrv) / sizeof(float)))
#define LR_COLS (2 * LR_LANES) /* output columns per row kept in registers over the rank */

static inline lrv splat(float x) { return x - (lrv){0}; } /* x in every lane (x - +0 is x, -0 included) */

static inline lrv load_lr(const float *p) {
    lrv v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* s * d + a. With `exact` (every product s * d exactly representable in fp32) it is one fused multiply-add
 * where the CPU has one: rounding the exact product before the addition changes nothing then, so the bits
 * are those of the separate multiply and add, at half the instructions. */
static inline __attribute__((always_inline)) lrv lr_madd(lrv s, lrv d, lrv a, const int exact) {
#if defined(__AVX512F__)
    if (exact) return (lrv)_mm512_fmadd_ps((__m512)s, (__m512)d, (__m512)a);
#elif defined(__FMA__)
    if (exact) return (lrv)_mm256_fmadd_ps((__m256)s, (__m256)d, (__m256)a);
#endif
    (void)exact;
    return a + s * d;
}

/* `rows` rows (LR_ROWS or LR_ROWS_EXACT) of u into o (row stride cols), columns j0 .. j0 + LR_COLS - 1;
 * u(r, k) is u[r * rs + k * ks] (row-major up: rs = rank, ks = 1) */
static inline __attribute__((always_inline)) void lr_block(const float *u, int64_t rank, int64_t rs, int64_t ks,
                                                           const float *down, int64_t cols, int64_t j, float *o,
                                                           const int rows, const int exact) {
    lrv a[LR_ROWS_EXACT][2];
    lrv d0 = load_lr(down + j), d1 = load_lr(down + j + LR_LANES);
    for (int r = 0; r < rows; r++) {
        lrv s = splat(u[r * rs]);
        a[r][0] = s * d0;
        a[r][1] = s * d1;
    }
    for (int64_t k = 1; k < rank; k++) {
        d0 = load_lr(down + k * cols + j);
        d1 = load_lr(down + k * cols + j + LR_LANES);
        for (int r = 0; r < rows; r++) {
            lrv s = splat(u[r * rs + k * ks]);
            a[r][0] = lr_madd(s, d0, a[r][0], exact);
            a[r][1] = lr_madd(s, d1, a[r][1], exact);
        }
    }
    for (int r = 0; r < rows; r++) {
        memcpy(o + r * cols + j, &a[r][0], sizeof(lrv));
        memcpy(o + r * cols + j + LR_LANES, &a[r][1], sizeof(lrv));
    }
}

/* one output element, the same operations as lr_block's lanes (u(k) = u[k * ks]) */
static inline float lr_one(const float *u, int64_t rank, int64_t ks, const float *down, int64_t cols, int64_t j) {
    float a = u[0] * down[j];
    for (int64_t k = 1; k < rank; k++) a = a + u[k * ks] * down[k * cols + j];
    return a;
}

/* Cache lines the caller touches right after a low_rank_block: fetched a few at a time between its vector
 * blocks, so that the memory reads overlap the arithmetic (the fused rebuild's base rows, and the output
 * rows it writes). Spread out, they took the compiled share of a SmolLM2-135M swap from 0.054 to 0.051 s
 * (three interleaved runs each); fetched all at once before the block, or for the next block instead of
 * this one, they did not help. Prefetches change no value. */
typedef struct {
    const char *read;
    int64_t read_lines;
    char *write;
    int64_t write_lines;
} prefetch_plan;

/* the lines of part `part` of `parts` of each span, a read and a write line in turn */
static inline __attribute__((always_inline)) void prefetch_part(const prefetch_plan *pf, int64_t part,
                                                                int64_t parts) {
    int64_t from = pf->read_lines * part / parts, to = pf->read_lines * (part + 1) / parts;
    int same = pf->write_lines == pf->read_lines; /* equal spans: one index for both */
    for (int64_t k = from; k < to; k++) {
        __builtin_prefetch(pf->read + k * 64, 0, 3);
        if (same) __builtin_prefetch(pf->write + k * 64, 1, 3);
    }
    if (!same)
        for (int64_t k = pf->write_lines * part / parts; k < pf->write_lines * (part + 1) / parts; k++)
            __builtin_prefetch(pf->write + k * 64, 1, 3);
}

/* rows r0 .. r1 - 1 into out (row r0 first) on one thread, up(i, k) = up[i * rs + k * ks]; pf: lines to
 * fetch on the way, or NULL; exact: see lr_madd */
static inline __attribute__((always_inline)) void low_rank_block_as(const float *up, int64_t rs, int64_t ks,
                                                                    const float *down, int64_t rank,
                                                                    int64_t cols, int64_t r0, int64_t r1,
                                                                    float *out, const prefetch_plan *pf,
                                                                    const int exact) {
    if (rank == 0) {
        memset(out, 0, (size_t)((r1 - r0) * cols) * sizeof(float));
        return;
    }
    const int rows = exact ? LR_ROWS_EXACT : LR_ROWS;
    int64_t full = cols - cols % LR_COLS, count = r1 - r0;
    /* the vector blocks below: `rows` rows at a time, then LR_ROWS, then single rows */
    int64_t parts = (count / rows + count % rows / LR_ROWS) * (full / LR_COLS), part = 0;
    for (int64_t i0 = r0; i0 < r1;) {
        int64_t n = r1 - i0 >= rows ? rows : r1 - i0 >= LR_ROWS ? LR_ROWS : r1 - i0;
        const float *u = up + i0 * rs;
        float *o = out + (i0 - r0) * cols;
        for (int64_t j = 0; n >= LR_ROWS && j < full; j += LR_COLS) {
            if (pf) prefetch_part(pf, part++, parts);
            if (n == rows)
                lr_block(u, rank, rs, ks, down, cols, j, o, rows, exact);
            else
                lr_block(u, rank, rs, ks, down, cols, j, o, LR_ROWS, exact);
        }
        for (int64_t r = 0; r < n; r++)
            for (int64_t j = n >= LR_ROWS ? full : 0; j < cols; j++)
                o[r * cols + j] = lr_one(u + r * rs, rank, ks, down, cols, j);
        i0 += n;
    }
}

static void low_rank_block(const float *up, int64_t rs, int64_t ks, const float *down, int64_t rank, int64_t cols,
                           int64_t r0, int64_t r1, float *out, const prefetch_plan *pf, int exact) {
    if (exact)
        low_rank_block_as(up, rs, ks, down, rank, cols, r0, r1, out, pf, 1);
    else
        low_rank_block_as(up, rs, ks, down, rank, cols, r0, r1, out, pf, 0);
}

/* The range of n fp32 factor values: the smallest nonzero and the largest magnitude, whether all are
 * finite (lo = +inf when all are zero), and at most how many significant bits a value carries (bits: 24
 * minus the fewest trailing zero bits of a significand; counted from the stored bits, so a subnormal value
 * may count more bits than it has, never fewer). */
typedef struct {
    float lo, hi;
    int finite;
    int bits;
} factor_range;

/* significant bits of the widest of the significands whose stored fraction bits are OR-ed in `fractions` */
static inline int significand_bits(uint32_t fractions) {
    return 24 - __builtin_ctz((fractions & 0x7FFFFFu) | 0x800000u);
}

static factor_range range_of(const float *x, int64_t n) {
    factor_range r = {__builtin_inff(), 0.0f, 1, 0};
    uint32_t fractions = 0;
    int64_t i = 0;
#ifdef __AVX512F__
    __m512 lo = _mm512_set1_ps(__builtin_inff()), hi = _mm512_setzero_ps();
    __m512i ored = _mm512_setzero_si512();
    __mmask16 bad = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + i));
        bad |= _mm512_cmp_ps_mask(a, _mm512_set1_ps(__builtin_inff()), _CMP_NLT_UQ); /* inf or NaN */
        hi = _mm512_max_ps(hi, a);
        lo = _mm512_mask_min_ps(lo, _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_NEQ_OQ), lo, a);
        ored = _mm512_or_si512(ored, _mm512_castps_si512(a));
    }
    r.lo = _mm512_reduce_min_ps(lo);
    r.hi = _mm512_reduce_max_ps(hi);
    r.finite = bad == 0;
    fractions = (uint32_t)_mm512_reduce_or_epi32(ored);
#endif
    for (; i < n; i++) {
        float a = __builtin_fabsf(x[i]);
        uint32_t stored;
        memcpy(&stored, &a, sizeof stored);
        fractions |= stored;
        if (!(a < __builtin_inff())) r.finite = 0;
        if (a > r.hi) r.hi = a;
        if (a != 0.0f && a < r.lo) r.lo = a;
    }
    r.bits = significand_bits(fractions);
    return r;
}

/* Whether every product of a value of `a` and one of `b` is exact in fp32: when the two carry at most 24
 * significant bits together (fp16 or bf16 factors widened carry at most 11 each; quantized factors whose
 * scales keep few bits, ops/quant.py, at most 12), a product fits in fp32's 24-bit significand, so it is
 * exact unless it overflows or falls below the normal range. Products with a zero are exact. */
static int products_exact(factor_range a, factor_range b) {
    if (!a.finite || !b.finite) return 0;
    if (a.lo == __builtin_inff() || b.lo == __builtin_inff()) return 1; /* every product is a zero */
    if (a.bits + b.bits > 24) return 0;
    return (double)a.hi * (double)b.hi < 0x1p128 && (double)a.lo * (double)b.lo >= 0x1p-126;
}

int deltakit_low_rank_rows(const float *up, const float *down, int64_t rank, int64_t cols, int64_t r0,
                           int64_t r1, float *out, int threads) {
    if (rank < 0 || cols < 0 || r0 < 0 || r1 < r0) return 1;
    if (threads < 1) threads = 1;
    int64_t blocks = (r1 - r0 + LR_ROWS - 1) / LR_ROWS;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t i0 = r0 + b * LR_ROWS, i1 = r1 - i0 < LR_ROWS ? r1 : i0 + LR_ROWS;
        low_rank_block(up, rank, 1, down, rank, cols, i0, i1, out + (i0 - r0) * cols, NULL, 0);
    }
    return 0;
}

/* Fused rebuild of rows r0 .. r1 - 1 of a matrix (ops/fused.py): out[i] = cast(round(acc_i)),
 * acc_i = (L[i] + s_i * alpha) + base[i] in fp32, the same additions in the same order as the torch path,
 * so the bits are the same:
 *
 * - L: the low-rank product up @ down of deltakit_low_rank_rows (up (rows, rank), down (rank, cols), both at
 *   `factor_kind`: 0 = fp32, 1 = fp16, 2 = bf16; 16-bit factors are widened to fp32 once per call, which
 *   is exact, so their product is that of the widened tensors), computed 8 rows at a time into a
 *   per-thread buffer that stays in cache, or none when up is NULL. A product of two values carrying at
 *   most 24 significant bits together (16-bit factors: 11 each; quantized factors whose scales keep
 *   12 - bits significant bits, ops/quant.py exact_product_bits: 12 each) is exact in fp32 unless it
 *   leaves the normal range: for such blocks (products_exact, checked on the values) each multiply and
 *   add is one fused multiply-add, which rounds once where the separate pair rounds the exact product (no
 *   change) and then the sum: same bits, in about 0.65x the kernel time of the separate operations on
 *   SmolLM2-135M's 4-bit factors (docs/speed.md);
 *   s_i = +1 when bit i of `packed` is set, else -1 (packed may be NULL: no sign part); base: fp32 or bf16
 *   values (exact in fp32);
 * - round: the fine-tune's dtype (0 = fp32, 1 = bf16: round to nearest even, NaN -> 0xFFFF as torch's CPU
 *   conversion); out: the written dtype (0 = fp32, 1 = bf16), so a bf16 value widened into an fp32
 *   parameter is exact;
 * - base, packed and out point at row r0 (packed: r0 * cols is a multiple of 8, so at a byte);
 * - extremes[0..1]: min and max of the fp32 sums (both NaN when a sum is NaN), as torch.aminmax.
 *
 * Elements are independent, so threads (static split of 8-row blocks) do not change any bit. Returns 0,
 * 1 for bad kinds or sizes, 2 when a buffer cannot be allocated.
 */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0xFFFF;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

typedef struct {
    float lo, hi;
    int nan;
} span_stats;

#define SPAN_LOOP(LOAD, ROUND, STORE)                                                                   \
    for (int64_t i = 0; i < n; i++) {                                                                   \
        float acc = low ? low[i] : 0.0f;                                                                \
        if (packed) {                                                                                   \
            float s = ((packed[i >> 3] >> (i & 7)) & 1) ? alpha : -alpha;                               \
            acc = low ? acc + s : s;                                                                    \
        }                                                                                               \
        acc = (low || packed) ? acc + (LOAD) : (LOAD);                                                  \
        st->nan |= acc != acc;                                                                          \
        st->lo = acc < st->lo ? acc : st->lo;                                                           \
        st->hi = acc > st->hi ? acc : st->hi;                                                           \
        float v = ROUND;                                                                                \
        STORE;                                                                                          \
    }

#ifdef __AVX512F__
/* 16 elements from i (a multiple of 16, so the sign bits are the two bytes at i / 8). */
static inline void fused16(const void *base, int base_kind, const float *low, const uint8_t *packed,
                           __m512 alpha, int64_t i, int round_kind, void *out, int out_kind, __m512 *lo,
                           __m512 *hi, __mmask16 *nan) {
    __m512 acc;
    if (packed) {
        __mmask16 m = (__mmask16)(packed[i >> 3] | ((unsigned)packed[(i >> 3) + 1] << 8));
        __m512 s = _mm512_mask_blend_ps(m, _mm512_sub_ps(_mm512_setzero_ps(), alpha), alpha);
        acc = low ? _mm512_add_ps(_mm512_loadu_ps(low + i), s) : s;
    } else {
        acc = _mm512_loadu_ps(low + i);
    }
    __m512 b;
    if (base_kind == 0) {
        b = _mm512_loadu_ps((const float *)base + i);
    } else {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
        b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    acc = _mm512_add_ps(acc, b);
    __mmask16 un = _mm512_cmp_ps_mask(acc, acc, _CMP_UNORD_Q);
    *nan |= un;
    *lo = _mm512_mask_min_ps(*lo, (__mmask16)~un, *lo, acc);
    *hi = _mm512_mask_max_ps(*hi, (__mmask16)~un, *hi, acc);
    if (round_kind == 1 || out_kind == 1) { /* fp32 -> bf16, round to nearest even, NaN -> 0xFFFF */
        __m512i u = _mm512_castps_si512(acc);
        __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                        _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
        r = _mm512_mask_blend_epi32(un, r, _mm512_set1_epi32(0xFFFF));
        if (out_kind == 1) {
            _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), _mm512_cvtepi32_epi16(r));
        } else { /* rounded to bf16, widened into fp32 */
            _mm512_storeu_ps((float *)out + i, _mm512_castsi512_ps(_mm512_slli_epi32(r, 16)));
        }
    } else {
        _mm512_storeu_ps((float *)out + i, acc);
    }
}
#endif

/* n elements on one thread; every pointer at the span's first element (packed: at a byte) */
static void fused_span(const void *base, int base_kind, const float *low, const uint8_t *packed, float alpha,
                       int64_t n, int round_kind, void *out, int out_kind, span_stats *st) {
    const float *bf = (const float *)base;
    const uint16_t *bh = (const uint16_t *)base;
    float *of = (float *)out;
    uint16_t *oh = (uint16_t *)out;
#ifdef __AVX512F__
    if (low || packed) {
        int64_t done = n - n % 16;
        __m512 va = _mm512_set1_ps(alpha), tlo = _mm512_set1_ps(__builtin_inff());
        __m512 thi = _mm512_set1_ps(-__builtin_inff());
        __mmask16 tnan = 0;
        for (int64_t k = 0; k < done; k += 16)
            fused16(base, base_kind, low, packed, va, k, round_kind, out, out_kind, &tlo, &thi, &tnan);
        float l = _mm512_reduce_min_ps(tlo), h = _mm512_reduce_max_ps(thi);
        st->lo = l < st->lo ? l : st->lo;
        st->hi = h > st->hi ? h : st->hi;
        st->nan |= tnan != 0;
        /* the tail below starts at an element index that is a multiple of 16 */
        bf = base_kind == 0 ? bf + done : bf;
        bh = base_kind == 1 ? bh + done : bh;
        of = of + done;
        oh = oh + done;
        low = low ? low + done : low;
        packed = packed ? packed + done / 8 : packed;
        n -= done;
    }
#endif
    if (base_kind == 0 && round_kind == 0 && out_kind == 0) {
        SPAN_LOOP(bf[i], acc, of[i] = v)
    } else if (base_kind == 1 && round_kind == 1 && out_kind == 1) {
        SPAN_LOOP(bf16_to_f32(bh[i]), acc, oh[i] = f32_to_bf16(v))
    } else if (base_kind == 1 && round_kind == 1 && out_kind == 0) {
        SPAN_LOOP(bf16_to_f32(bh[i]), bf16_to_f32(f32_to_bf16(acc)), of[i] = v)
    } else if (base_kind == 0 && round_kind == 1 && out_kind == 0) {
        SPAN_LOOP(bf[i], bf16_to_f32(f32_to_bf16(acc)), of[i] = v)
    } else if (base_kind == 0 && round_kind == 1 && out_kind == 1) {
        SPAN_LOOP(bf[i], acc, oh[i] = f32_to_bf16(v))
    } else if (base_kind == 1 && round_kind == 0 && out_kind == 0) {
        SPAN_LOOP(bf16_to_f32(bh[i]), acc, of[i] = v)
    } else if (base_kind == 1 && round_kind == 0 && out_kind == 1) {
        SPAN_LOOP(bf16_to_f32(bh[i]), acc, oh[i] = f32_to_bf16(v))
    } else {
        SPAN_LOOP(bf[i], acc, oh[i] = f32_to_bf16(v))
    }
}

#define FUSED_ROWS 8 /* rows per block: a block's first sign bit is at a byte */

/* n factor values widened to fp32 (exact): kind 0 = fp32, 1 = fp16, 2 = bf16 */
static void widen_factors(const void *src, int kind, int64_t n, float *dst) {
    if (kind == 1) { /* the hardware conversion where there is one: the compiler's generic one is a call */
        const _Float16 *h = (const _Float16 *)src;
        int64_t i = 0;
#if defined(__AVX512F__)
        for (; i + 16 <= n; i += 16)
            _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + i))));
#elif defined(__F16C__)
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
        for (; i < n; i++) dst[i] = (float)h[i];
    } else if (kind == 2) {
        const uint16_t *h = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(h[i]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

/* Scratch slots of a thread for at least n floats, kept between calls (a fresh block of this size per call
 * would come from mmap and fault in every page) and freed when the thread ends (a pthread key's
 * destructor: short-lived callers, such as a worker pool's threads, leave nothing behind); aligned to cache
 * lines (the kernel's 64-byte vector loads and stores then stay on one line each: unaligned, the widened
 * factors took 1.6x as long on a 576x1536 matrix); grown on demand, NULL when it cannot be. A thread keeps
 * at most its largest request per slot. */
#define SCRATCH_LOW 0     /* a block's low-rank rows */
#define SCRATCH_FACTORS 1 /* widened factors */
typedef struct {
    float *buffers[2];
    int64_t capacity[2];
} scratch_set;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_key_ok = 0;

static int64_t live_scratch_sets = 0; /* threads holding scratch now (deltakit_scratch_sets) */

static void free_scratch_set(void *p) {
    scratch_set *set = p;
    free(set->buffers[0]);
    free(set->buffers[1]);
    free(set);
    __atomic_sub_fetch(&live_scratch_sets, 1, __ATOMIC_RELAXED);
}

/* How many threads hold fused-rebuild scratch now: a thread that ends gives its scratch back. */
int deltakit_scratch_sets(void) { return (int)__atomic_load_n(&live_scratch_sets, __ATOMIC_RELAXED); }

static void make_scratch_key(void) { scratch_key_ok = pthread_key_create(&scratch_key, free_scratch_set) == 0; }

static float *thread_scratch(int slot, int64_t n) {
    static __thread scratch_set *set = NULL;
    if (!set) {
        pthread_once(&scratch_once, make_scratch_key);
        if (!scratch_key_ok) return NULL;
        set = calloc(1, sizeof *set);
        if (!set) return NULL;
        if (pthread_setspecific(scratch_key, set) != 0) {
            free(set);
            set = NULL;
            return NULL;
        }
        __atomic_add_fetch(&live_scratch_sets, 1, __ATOMIC_RELAXED);
    }
    if (n < 1) n = 1; /* rank 0: nothing to widen, but a buffer all the same */
    if (n > set->capacity[slot]) {
        free(set->buffers[slot]);
        void *fresh = NULL;
        set->buffers[slot] = posix_memalign(&fresh, 64, (size_t)n * sizeof(float) + 64) == 0 ? fresh : NULL;
        set->capacity[slot] = set->buffers[slot] ? n : 0;
    }
    return set->buffers[slot];
}

/* A group-quantized factor as stored (ops/quant.py QuantizedTensor, `lsb-stream` packing, as
 * dequant_native.c reads it): `lanes` lanes of `length` codes of `bits` bits, lane after lane; value i of
 * lane l is (float)code * step[l * groups + i / group] + origin[l * groups + i / group], the product and
 * the sum each rounded to fp32, the bits of ops/quant.py dequantize. up (rows, r) is stored along its rows
 * (lane k = column k, length rows), down (r, cols) along its columns (lane k = row k, length cols). The
 * caller checks that packed holds ceil(lanes * length * bits / 8) bytes and step and origin lanes * groups
 * values. The layout matches ops/fused.py's ctypes structure. */
typedef struct {
    const uint8_t *packed;
    int64_t nbytes, bits, lanes, length, group, groups;
    const float *step, *origin;
} quant_factor;

static inline float quant_value(const quant_factor *q, int64_t lane, int64_t i) {
    int64_t bit = (lane * q->length + i) * q->bits, byte = bit >> 3;
    uint32_t word = q->packed[byte];
    if (byte + 1 < q->nbytes) word |= (uint32_t)q->packed[byte + 1] << 8;
    uint32_t code = (word >> (bit & 7)) & ((1u << q->bits) - 1);
    int64_t g = lane * q->groups + i / q->group;
    return (float)code * q->step[g] + q->origin[g];
}

/* values i0 .. i0 + n - 1 of lane `lane` into out[0 .. n), each (float)code * step + origin with the
 * product and the sum rounded on their own (as quant_value): 4-bit codes in runs of 16 starting at a byte
 * and inside a group as one vector, the others one by one */
static void quant_decode(const quant_factor *q, int64_t lane, int64_t i0, int64_t n, float *out) {
    int64_t m = 0;
#if defined(__AVX512F__)
    if (q->bits == 4 && q->group % 16 == 0 && i0 % 16 == 0 && (lane * q->length) % 2 == 0) {
        const uint8_t *codes = q->packed + (lane * q->length + i0) / 2;
        const float *step = q->step + lane * q->groups, *origin = q->origin + lane * q->groups;
        const __m128i nibble = _mm_set1_epi8(15);
        const int64_t runs = q->group / 16; /* runs of 16 a group */
        int64_t g = i0 / q->group, run = i0 % q->group / 16;
        for (; m + 16 <= n; m += 16) {
            __m128i bytes = _mm_loadl_epi64((const __m128i *)(codes + m / 2));
            __m128i c = _mm_unpacklo_epi8(_mm_and_si128(bytes, nibble), _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble));
            __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c));
            _mm512_storeu_ps(out + m, _mm512_add_ps(_mm512_mul_ps(v, _mm512_set1_ps(step[g])), _mm512_set1_ps(origin[g])));
            if (++run == runs) {
                run = 0;
                g++;
            }
        }
    }
#endif
    for (; m < n; m++) out[m] = quant_value(q, lane, i0 + m);
}

/* One matrix for the fused kernel: rows r0 .. r1 - 1 of it, base, packed and out pointing at row r0
 * (packed: r0 * cols is a multiple of 8, so at a byte), up at row 0; the other fields as
 * deltakit_fused_rows' arguments. The layout matches ops/fused.py's ctypes structure. */
typedef struct {
    const void *base;
    const void *up;
    const void *down;
    const uint8_t *packed;
    void *out;
    int64_t rank, cols, r0, r1;
    float alpha;
    int32_t base_kind, factor_kind, round_kind, out_kind;
} fused_job;

static int job_invalid(const fused_job *j) {
    if (j->base_kind < 0 || j->base_kind > 1 || j->round_kind < 0 || j->round_kind > 1 || j->out_kind < 0 ||
        j->out_kind > 1 || j->factor_kind < 0 || j->factor_kind > 3)
        return 1;
    return j->rank < 0 || j->cols < 0 || j->r0 < 0 || j->r1 < j->r0 || (j->up && !j->down);
}

/* a thread's buffers for one job: its blocks' low-rank rows and, for 16-bit factors, down widened once
 * and a block's rows of up; for quantized ones (factor_kind 3: up and down point at quant_factor), down
 * and up decoded once, up in 8-row blocks, each column-major (quant_up_blocks); the range of down's
 * values (products_exact) */
typedef struct {
    float *low;
    const float *down;
    float *up_rows;
    factor_range down_range;
} job_scratch;

/* rows r0 .. r1 - 1 of every lane of a quantized up into 8-row blocks: block b holds up(r0 + 8 b + r, k) at
 * out[(b * lanes + k) * FUSED_ROWS + r], rows past r1 zeros; `run` holds r1 - r0 values (a lane is
 * decoded as one run, then dealt out) */
static void quant_up_blocks(const quant_factor *q, int64_t r0, int64_t r1, float *out, float *run) {
    const int64_t n = r1 - r0, blocks = (n + FUSED_ROWS - 1) / FUSED_ROWS;
    for (int64_t k = 0; k < q->lanes; k++) {
        quant_decode(q, k, r0, n, run);
        const int64_t full = n / FUSED_ROWS;
        for (int64_t b = 0; b < full; b++) /* a fixed-size copy: inlined */
            memcpy(out + (b * q->lanes + k) * FUSED_ROWS, run + b * FUSED_ROWS, FUSED_ROWS * sizeof(float));
        if (full < blocks) {
            float *o = out + (full * q->lanes + k) * FUSED_ROWS;
            for (int64_t r = 0; r < FUSED_ROWS; r++) o[r] = full * FUSED_ROWS + r < n ? run[full * FUSED_ROWS + r] : 0.0f;
        }
    }
}

/* 0, or 2 when a buffer cannot be had */
static int job_scratch_for(const fused_job *j, job_scratch *s) {
    s->low = NULL;
    s->down = (const float *)j->down;
    s->up_rows = NULL;
    if (!j->up) return 0;
    s->low = thread_scratch(SCRATCH_LOW, FUSED_ROWS * j->cols);
    if (!s->low) return 2;
    if (j->factor_kind != 0) {
        int64_t rows = j->r1 - j->r0, padded = (rows + FUSED_ROWS - 1) / FUSED_ROWS * FUSED_ROWS;
        int64_t up_values = j->factor_kind == 3 ? padded * j->rank + rows : FUSED_ROWS * j->rank;
        float *scratch = thread_scratch(SCRATCH_FACTORS, j->rank * j->cols + up_values);
        if (!scratch) return 2;
        s->down = scratch;
        s->up_rows = scratch + j->rank * j->cols;
        if (j->factor_kind == 3) {
            for (int64_t k = 0; k < j->rank; k++)
                quant_decode((const quant_factor *)j->down, k, 0, j->cols, scratch + k * j->cols);
            quant_up_blocks((const quant_factor *)j->up, j->r0, j->r1, s->up_rows, s->up_rows + padded * j->rank);
        } else {
            widen_factors(j->down, j->factor_kind, j->rank * j->cols, scratch);
        }
    }
    s->down_range = range_of(s->down, j->rank * j->cols);
    return 0;
}

/* block b of a job (rows r0 + 8 b .. at most r0 + 8 b + 7) on this thread */
static void job_block(const fused_job *j, const job_scratch *s, int64_t b, span_stats *st) {
    size_t base_size = j->base_kind == 0 ? 4 : 2, out_size = j->out_kind == 0 ? 4 : 2;
    size_t factor_size = j->factor_kind == 0 ? 4 : 2;
    int64_t cols = j->cols, rank = j->rank, first = b * FUSED_ROWS;
    int64_t rows = j->r1 - j->r0 - first < FUSED_ROWS ? j->r1 - j->r0 - first : FUSED_ROWS;
    size_t at = (size_t)(first * cols), count = (size_t)(rows * cols);
    if (j->up) {
        const float *up;
        int64_t rs = rank, ks = 1; /* up(r, k) = up[r * rs + k * ks] */
        int64_t scanned = rows * rank;
        if (j->factor_kind == 3) {
            up = s->up_rows + first * rank; /* block b = first / FUSED_ROWS */
            rs = 1;
            ks = FUSED_ROWS;
            scanned = rank * FUSED_ROWS; /* rows past the block's are zeros: they count nothing */
        } else {
            const char *up_block = (const char *)j->up + (size_t)((j->r0 + first) * rank) * factor_size;
            up = (const float *)up_block;
            if (j->factor_kind != 0) {
                widen_factors(up_block, j->factor_kind, rows * rank, s->up_rows);
                up = s->up_rows;
            }
        }
        int exact = products_exact(range_of(up, scanned), s->down_range); /* see lr_madd */
        prefetch_plan pf = {(const char *)j->base + at * base_size, (int64_t)(count * base_size / 64),
                            (char *)j->out + at * out_size, (int64_t)(count * out_size / 64)};
        low_rank_block(up, rs, ks, s->down, rank, cols, 0, rows, s->low, &pf, exact);
    }
    fused_span((const char *)j->base + at * base_size, j->base_kind, s->low, j->packed ? j->packed + at / 8 : NULL,
               j->alpha, rows * cols, j->round_kind, (char *)j->out + at * out_size, j->out_kind, st);
}

static int64_t job_blocks(const fused_job *j) { return (j->r1 - j->r0 + FUSED_ROWS - 1) / FUSED_ROWS; }

int deltakit_fused_rows(const void *base, int base_kind, const void *up_in, const void *down_in, int factor_kind,
                        int64_t rank, int64_t cols, int64_t r0, int64_t r1, const uint8_t *packed, float alpha,
                        int round_kind, void *out, int out_kind, float *extremes, int threads) {
    fused_job job = {base,  up_in, down_in,   packed,      out,        rank,       cols,
                     r0,    r1,    alpha,     base_kind,   factor_kind, round_kind, out_kind};
    if (job_invalid(&job)) return 1;
    if (threads < 1) threads = 1;
    int64_t blocks = job_blocks(&job);
    float lo = __builtin_inff(), hi = -__builtin_inff();
    int nan = 0, failed = 0;
#pragma omp parallel num_threads(threads)
    {
        span_stats st = {__builtin_inff(), -__builtin_inff(), 0};
        job_scratch scratch;
        int ready = -1; /* set up on this thread's first block: a thread with none widens nothing */
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            if (ready < 0) {
                ready = job_scratch_for(&job, &scratch) == 0;
                if (!ready) {
#pragma omp atomic write
                    failed = 1;
                }
            }
            if (ready) job_block(&job, &scratch, b, &st);
        }
#pragma omp critical
        {
            lo = st.lo < lo ? st.lo : lo;
            hi = st.hi > hi ? st.hi : hi;
            nan |= st.nan;
        }
    }
    if (failed) return 2;
    extremes[0] = nan ? __builtin_nanf("") : lo;
    extremes[1] = nan ? __builtin_nanf("") : hi;
    return 0;
}

/* The estimated cost of one block of a job, in multiply-add units: the low-rank arithmetic, and the memory
 * pass counted as 8 multiply-adds per element (only the split of work between threads depends on it). */
static double block_cost(const fused_job *j) { return (double)FUSED_ROWS * (double)j->cols * (double)(j->rank + 8); }

/* The first block of job j that thread t of `threads` owns: blocks are dealt out in job order, each thread
 * a contiguous run of about equal estimated cost (a block goes to the thread whose share holds its middle). */
static int64_t first_owned(double start, double cost, int64_t blocks, double total, int t, int threads) {
    if (cost <= 0.0) return t == 0 ? 0 : blocks;
    double at = (double)t * total / (double)threads; /* the share of thread t starts here */
    double i = (at - start) / cost - 0.5;            /* the block whose middle is at `at` */
    if (i <= 0.0) return 0;
    int64_t first = (int64_t)i + ((double)(int64_t)i < i ? 1 : 0);
    return first < blocks ? first : blocks;
}

/* Several matrices in one parallel region (a hot swap writes every touched matrix of a model at once):
 * each job as deltakit_fused_rows would write it, the same operations per element, so the same bits for
 * any number of threads. extremes: (n, 2), each job's min and max (both NaN when a sum is NaN; +inf, -inf
 * for a job with no rows). Returns 0, 1 for a bad job (nothing written), 2 when a buffer cannot be had. */
int deltakit_fused_batch(const fused_job *jobs, int64_t n, float *extremes, int threads) {
    if (n < 0) return 1;
    for (int64_t k = 0; k < n; k++)
        if (job_invalid(&jobs[k])) return 1;
    if (threads < 1) threads = 1;
    double *start = malloc((size_t)(n + 1) * sizeof(double));
    int *nans = calloc((size_t)(n > 0 ? n : 1), sizeof(int));
    if (!start || !nans) {
        free(start);
        free(nans);
        return 2;
    }
    start[0] = 0.0;
    for (int64_t k = 0; k < n; k++) {
        start[k + 1] = start[k] + block_cost(&jobs[k]) * (double)job_blocks(&jobs[k]);
        extremes[2 * k] = __builtin_inff();
        extremes[2 * k + 1] = -__builtin_inff();
    }
    double total = start[n];
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), count = omp_get_num_threads();
        for (int64_t k = 0; k < n; k++) {
            const fused_job *j = &jobs[k];
            int64_t blocks = job_blocks(j);
            double cost = block_cost(j);
            int64_t b0 = first_owned(start[k], cost, blocks, total, t, count);
            int64_t b1 = t + 1 == count ? blocks : first_owned(start[k], cost, blocks, total, t + 1, count);
            if (b0 >= b1) continue;
            job_scratch scratch;
            if (job_scratch_for(j, &scratch) != 0) {
#pragma omp atomic write
                failed = 1;
                break;
            }
            span_stats st = {__builtin_inff(), -__builtin_inff(), 0};
            for (int64_t b = b0; b < b1; b++) job_block(j, &scratch, b, &st);
#pragma omp critical
            {
                extremes[2 * k] = st.lo < extremes[2 * k] ? st.lo : extremes[2 * k];
                extremes[2 * k + 1] = st.hi > extremes[2 * k + 1] ? st.hi : extremes[2 * k + 1];
                nans[k] |= st.nan;
            }
        }
    }
    for (int64_t k = 0; k < n; k++)
        if (nans[k]) extremes[2 * k] = extremes[2 * k + 1] = __builtin_nanf("");
    free(start);
    free(nans);
    return failed ? 2 : 0;
}
