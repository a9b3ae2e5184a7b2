/* Low-rank shares of several deltas, each against its own activation rows, from factors at their stored
 * width (runtime/multidelta.py, through ops/lowrank_group.py).
 *
 * For every part p and every row index k in offsets[p] .. offsets[p + 1], with t = rows[k]:
 *
 *     y[t, :] += (x[t, :] Aᵀ) B        A = first[p] (rank_p, in), B = second[p] (rank_p, out)
 *
 * x (N, in) and y (N, out) row-major at `act_kind`; A (rank_p, in) row-major; B in column tiles of
 * TILE_COLS = 32 columns, tile t (columns 32 t .. 32 t + width - 1, the last one narrower) stored at element
 * 32 t rank_p as a (rank_p, width) row-major block, so that the second stage streams contiguous memory.
 * Each part's pair at its own kinds[p]: 0 = fp32, 1 = fp16, 2 = bf16 (first[p] and second[p] point at the
 * values), 3 = quantized (they point at a qdesc, below). 16-bit factors are widened to fp32 in registers: a
 * 16-bit factor costs half the memory traffic of an fp32 copy. 16-bit activations are widened (exactly)
 * once per call into an fp32 copy of the rows up to the last one a part reads.
 *
 * Kind 3 keeps group-quantized factors (ops/quant.py, codes of at most 4 bits) as 4-bit codes, about a
 * sixth of an fp32 copy's bytes with the groups' grids, and decodes each value in registers to
 * code * step + origin, the product and the sum each rounded (step and origin: the group's, in fp32, as
 * ops/quant.dequantize widens them): dequantize's operations, so the decoded value, and everything after
 * it, has the bits of the fp32 kind fed the dequantized factor. The codes are laid out in chunks of 16
 * values of a row (A: row j's chunk c at byte j row_bytes + 8 c; B: inside its column tile, a full tile's
 * row at 16 bytes, the last tile's at 8 per started chunk), value m of a chunk at nibble QNIBBLE(m). A
 * group holds 16 << shift values of a row, so chunk c of row j (A: columns, B: output columns counted
 * from 0) is in group c >> shift of row j, whose (step, origin) is stored row by row for A and group
 * by group for B (a column tile reads every row's entry of one group: adjacent, not a cache line
 * apart); lowrank_group.GroupFactors lays them out. A chunk is decoded by looking its codes up in its
 * group's 16 levels, computed once per group as above: with AVX-512 a broadcast load, a variable shift
 * and a permute per 16 values. Parts of more than TILE_ROWS rows (a prefill) take the first stage in
 * blocks of rank components whose A rows are decoded or widened once into a buffer (first_block), and
 * decode B's tile once per call into a buffer (QBUF_VALUES); both are then read as the fp32 kind.
 *
 * Operations, all in fp32, with fma(a, b, c) the fused multiply-add a * b + c rounded once (fma16 and
 * fmaf: the same bits on every CPU, computed in software by libm's fmaf on an x86 without FMA; the files
 * are built with -ffp-contract=off, so nothing else fuses):
 * - h[t, j] = x[t] · A[j]: 64 lanes, lane c starts at 0 and takes lane = fma(x, a, lane) for columns
 *   64 m + c in order of m, then for the tail's columns i (in % 64 of them) into lane i - full; the
 *   lanes are combined by a fixed pairwise tree of separate adds (dot_tile);
 * - s[t, o] = h[t,0] B[0,o] (one rounded product), then s = fma(h[t,k], B[k,o], s) for k = 1, 2, ... over
 *   the rank in order, then y[t, o] = y[t, o] + (0 + s[t, o]), rounded to nearest even into a 16-bit y (a
 *   NaN becomes 0x7FC0 in bf16). That last step is, bit for bit, torch's `y.add_(share)` of an fp32
 *   `share` that started as zeros and took `share += s`, so a 16-bit layer output can take the share
 *   directly, with no fp32 buffer.
 * A fused multiply-add does the work of a multiply and an add in one operation: in a SmolLM2 mixed batch
 * of 4 svd deltas x 2 rows (32 tokens) the kernel's calls took 0.62-0.64 s against 0.73-0.74 s with the
 * product and the sum rounded on their own (4-bit factors), 0.38 against 0.43 s (fp16 factors).
 * Each element's arithmetic is fixed: the bits depend neither on the number of threads (they split the
 * rank components of the first stage and the output columns of the second, never a sum), nor on the other
 * rows or parts of the call, nor on the vector width the compiler picks. Rows of different parts must
 * differ (a row is written by its own part only). Returns 0, 1 for bad sizes, kinds or descriptors, 2 when
 * the intermediate cannot be allocated.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

typedef float f32x16 __attribute__((vector_size(64)));
typedef _Float16 f16x16 __attribute__((vector_size(32)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

#define LANES 16
#define DOT_LANES (4 * LANES) /* lanes of the first stage's dot products */
#define TILE_ROWS 4 /* activation rows sharing each load of a factor */
#define TILE_COLS (2 * LANES) /* output columns per second-stage tile: B is stored tile by tile */

static inline __attribute__((always_inline)) f32x16 load16(const void *p, const int kind, int64_t i) {
    if (kind == 0) {
        f32x16 v;
        memcpy(&v, (const float *)p + i, sizeof v);
        return v;
    }
    if (kind == 1) { /* the hardware conversion where there is one: the compiler's generic one is scalar */
#if defined(__AVX512F__)
        __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)));
        f32x16 r;
        memcpy(&r, &v, sizeof r);
        return r;
#elif defined(__F16C__)
        __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
        __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i + 8)));
        f32x16 r;
        memcpy(&r, &lo, sizeof lo);
        memcpy((char *)&r + sizeof lo, &hi, sizeof hi);
        return r;
#else
        f16x16 h;
        memcpy(&h, (const _Float16 *)p + i, sizeof h);
        return __builtin_convertvector(h, f32x16);
#endif
    }
    u16x16 h;
    memcpy(&h, (const uint16_t *)p + i, sizeof h);
    u32x16 w = __builtin_convertvector(h, u32x16) << 16;
    f32x16 v;
    memcpy(&v, &w, sizeof v);
    return v;
}

/* v rounded to nearest even into 16 elements of p at kind (0 = fp32 stored as is) */
static inline __attribute__((always_inline)) void store16(void *p, const int kind, int64_t i, f32x16 v) {
    if (kind == 0) {
        memcpy((float *)p + i, &v, sizeof v);
        return;
    }
    if (kind == 1) { /* the hardware conversion where there is one, as in load16 */
#if defined(__AVX512F__)
        __m512 w;
        memcpy(&w, &v, sizeof w);
        _mm256_storeu_si256((__m256i *)((uint16_t *)p + i),
                            _mm512_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
        __m256 lo, hi;
        memcpy(&lo, &v, sizeof lo);
        memcpy(&hi, (const char *)&v + sizeof lo, sizeof hi);
        _mm_storeu_si128((__m128i *)((uint16_t *)p + i), _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT));
        _mm_storeu_si128((__m128i *)((uint16_t *)p + i + 8), _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT));
#else
        f16x16 h = __builtin_convertvector(v, f16x16);
        memcpy((_Float16 *)p + i, &h, sizeof h);
#endif
        return;
    }
    u32x16 u;
    memcpy(&u, &v, sizeof u);
    u32x16 nan = (u32x16)(v != v);
    u32x16 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    u32x16 bits = (rounded & ~nan) | (0x7FC0u & nan);
    u16x16 h = __builtin_convertvector(bits, u16x16);
    memcpy((uint16_t *)p + i, &h, sizeof h);
}

static inline __attribute__((always_inline)) void store1(void *p, const int kind, int64_t i, float v) {
    if (kind == 0) {
        ((float *)p)[i] = v;
        return;
    }
    if (kind == 1) {
        ((_Float16 *)p)[i] = (_Float16)v;
        return;
    }
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    ((uint16_t *)p)[i] = v != v ? (uint16_t)0x7FC0u : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline __attribute__((always_inline)) float load1(const void *p, const int kind, int64_t i) {
    if (kind == 0) return ((const float *)p)[i];
    if (kind == 1) return (float)((const _Float16 *)p)[i];
    uint32_t w = (uint32_t)((const uint16_t *)p)[i] << 16;
    float v;
    memcpy(&v, &w, sizeof v);
    return v;
}

typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef float f32x2 __attribute__((vector_size(8)));

/* l[i] + l[i + 8] (i < 8), then a[i] + a[i + 4], a[i] + a[i + 2], a[0] + a[1]: in registers */
static inline float tree16v(f32x16 l) {
    f32x8 a = __builtin_shufflevector(l, l, 0, 1, 2, 3, 4, 5, 6, 7) +
              __builtin_shufflevector(l, l, 8, 9, 10, 11, 12, 13, 14, 15);
    f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    f32x2 c = __builtin_shufflevector(b, b, 0, 1) + __builtin_shufflevector(b, b, 2, 3);
    return c[0] + c[1];
}

/* a * b + c with one rounding, lane by lane (fused multiply-add: the files are built with
 * -ffp-contract=off, so a product and a sum written out are each rounded on their own) */
static inline __attribute__((always_inline)) f32x16 fma16(f32x16 a, f32x16 b, f32x16 c) {
#if defined(__AVX512F__)
    return (f32x16)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#else
    f32x16 r;
    for (int m = 0; m < LANES; m++) r[m] = __builtin_fmaf(a[m], b[m], c[m]);
    return r;
#endif
}

/* v in every lane (v - +0 is v, -0 included) */
static inline __attribute__((always_inline)) f32x16 splat16(float v) { return v - (f32x16){0}; }

/* A factor as the kernel reads it. Kinds 0-2: p holds the values. Kind 3: p holds the codes, and the
 * rest comes from the part's qdesc. */
typedef struct {
    const void *p;
    const float *grid;                   /* kind 3: per group (step, origin) */
    int64_t row_bytes, row_step, group_step; /* kind 3: A's code bytes per row; group g of row j at
                                                grid[2 (j row_step + g group_step)] */
    int shift;                           /* kind 3: chunk c of a row is in group c >> shift */
} factor;

/* kind 3's descriptor as lowrank_group.GroupFactors.prepare_quantized writes it: eight int64 */
enum { QD_CODES, QD_GRID, QD_ROW_BYTES, QD_GROUPS, QD_SHIFT, QD_GROUP_MAJOR, QD_FIELDS = 8 };

/* group g's 16 levels: lut[q] = q * step + origin, the product and the sum each rounded, as
 * ops/quant.dequantize computes them */
static inline __attribute__((always_inline)) f32x16 qlut(const factor *f, int64_t g) {
    const f32x16 iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    return iota * f->grid[2 * g] + f->grid[2 * g + 1];
}

/* nibble of value m of a chunk: value 2 q + h is nibble 8 h + q (bits 4 q .. of the chunk's 32-bit half h),
 * so that one variable shift of the chunk's 8 bytes, read as two 32-bit halves, puts each value's code in
 * its lane's low 4 bits */
#define QNIBBLE(m) (8 * ((m) & 1) + ((m) >> 1))

/* the 16 values of a chunk whose codes are the 8 bytes at c8, from its group's levels */
static inline __attribute__((always_inline)) f32x16 qdecode(const uint8_t *c8, f32x16 lut) {
#if defined(__AVX512F__)
    int64_t word;
    memcpy(&word, c8, sizeof word);
    const __m512i shifts = _mm512_set_epi32(28, 28, 24, 24, 20, 20, 16, 16, 12, 12, 8, 8, 4, 4, 0, 0);
    __m512i idx = _mm512_srlv_epi32(_mm512_set1_epi64(word), shifts); /* the permute reads bits 0-3 only */
    __m512 table, v;
    memcpy(&table, &lut, sizeof table);
    v = _mm512_permutexvar_ps(idx, table);
    f32x16 r;
    memcpy(&r, &v, sizeof r);
    return r;
#else
    uint64_t word;
    memcpy(&word, c8, sizeof word);
    f32x16 r;
    for (int m = 0; m < LANES; m++) r[m] = lut[(word >> (4 * QNIBBLE(m))) & 15];
    return r;
#endif
}

/* one kind-3 value: column col of a code row starting at c8, grid row `row`, chunks counted from chunk0 */
static inline __attribute__((always_inline)) float qone(const factor *f, const uint8_t *c8, int64_t row,
                                                        int64_t chunk0, int64_t col) {
    uint64_t word;
    memcpy(&word, c8 + (col >> 4) * 8, sizeof word);
    float q = (float)((word >> (4 * QNIBBLE(col & 15))) & 15);
    int64_t g = row * f->row_step + ((chunk0 + (col >> 4)) >> f->shift) * f->group_step;
    return q * f->grid[2 * g] + f->grid[2 * g + 1];
}

/* A's row j, column i */
static inline __attribute__((always_inline)) float a_load1(const factor *a, const int kind, int64_t in,
                                                           int64_t j, int64_t i) {
    if (kind == 3) return qone(a, (const uint8_t *)a->p + j * a->row_bytes, j, 0, i);
    return load1(a->p, kind, j * in + i);
}

/* B's row k, column j0 + j of a tile of `width` columns (the last, narrower one) */
static inline __attribute__((always_inline)) float b_load1(const factor *b, const int kind, const void *tile,
                                                           int64_t width, int64_t j0, int64_t k, int64_t j) {
    if (kind == 3) return qone(b, (const uint8_t *)tile + k * ((width + 15) >> 4) * 8, k, j0 >> 4, j);
    return load1(tile, kind, k * width + j);
}

/* h[r * hstride] = x[rows[r]] · A[j] for the nt (1 .. TILE_ROWS) rows of one tile. DOT_LANES = 64 lanes,
 * four independent vectors per row (one would make the loop wait on each fused multiply-add's latency):
 * lane c takes fma(x, a, lane) for columns 64 m + c in order of m, the tail's columns i go into lanes
 * i - full the same way, then
 * (l[i] + l[i + 32]) + (l[i + 16] + l[i + 48]) for i < 16, then the 16-lane tree of tree16v. */
static inline __attribute__((always_inline)) void dot_tile(const float *x, int64_t in, const int64_t *rows, const factor *a, const int kind,
                                                           int64_t j, float *h, int64_t hstride, const int nt) {
    int64_t xr[TILE_ROWS];
    f32x16 acc[TILE_ROWS][4];
    for (int r = 0; r < nt; r++) {
        xr[r] = rows[r] * in;
        for (int v = 0; v < 4; v++) acc[r][v] = (f32x16){0};
    }
    int64_t full = in - in % DOT_LANES;
    const uint8_t *codes = kind == 3 ? (const uint8_t *)a->p + j * a->row_bytes : NULL;
    int64_t group = -1; /* kind 3: the group whose levels are in lut */
    f32x16 lut = {0};
    for (int64_t i = 0; i < full; i += DOT_LANES) {
        f32x16 av[4];
        for (int v = 0; v < 4; v++) {
            if (kind == 3) {
                int64_t chunk = (i >> 4) + v, g = j * a->row_step + (chunk >> a->shift) * a->group_step;
                if (g != group) {
                    group = g;
                    lut = qlut(a, g);
                }
                av[v] = qdecode(codes + chunk * 8, lut);
            } else
                av[v] = load16(a->p, kind, j * in + i + v * LANES);
        }
        for (int r = 0; r < nt; r++)
            for (int v = 0; v < 4; v++) {
                f32x16 xv = load16(x, 0, xr[r] + i + v * LANES);
                acc[r][v] = fma16(xv, av[v], acc[r][v]);
            }
    }
    for (int r = 0; r < nt; r++) {
        if (full < in) { /* the tail, element by element */
            float lanes[DOT_LANES];
            memcpy(lanes, acc[r], sizeof lanes);
            for (int64_t i = full; i < in; i++)
                lanes[i - full] = __builtin_fmaf(x[xr[r] + i], a_load1(a, kind, in, j, i), lanes[i - full]);
            memcpy(acc[r], lanes, sizeof lanes);
        }
        h[r * hstride] = tree16v((acc[r][0] + acc[r][2]) + (acc[r][1] + acc[r][3]));
    }
}

/* B's row k inside the full column tile `tile` that starts at output column j0: its 32 values */
static inline __attribute__((always_inline)) void b_row(const factor *b, const int kind, const void *tile,
                                                        int64_t j0, int64_t k, f32x16 *b0, f32x16 *b1) {
    if (kind == 3) {
        const uint8_t *codes = (const uint8_t *)tile + k * 16;
        int64_t g0 = k * b->row_step + ((j0 >> 4) >> b->shift) * b->group_step;
        int64_t g1 = k * b->row_step + (((j0 >> 4) + 1) >> b->shift) * b->group_step;
        f32x16 lut = qlut(b, g0);
        *b0 = qdecode(codes, lut);
        *b1 = qdecode(codes + 8, g1 == g0 ? lut : qlut(b, g1));
        return;
    }
    *b0 = load16(tile, kind, k * TILE_COLS);
    *b1 = load16(tile, kind, k * TILE_COLS + LANES);
}

/* y[rows[r], j0 .. j0 + TILE_COLS) += h[r] B for the nt rows of one full column tile; tile: B's (rank,
 * TILE_COLS) block of it, contiguous, so the rank is streamed in one pass with the sums in registers */
static inline __attribute__((always_inline)) void axpy_tile(const float *h, int64_t rank, const factor *bf,
                                                            const void *tile, const int kind, int64_t out,
                                                            int64_t j0, void *y, const int ykind,
                                                            const int64_t *rows, const int nt) {
    f32x16 acc[TILE_ROWS][2];
    f32x16 b0, b1;
    b_row(bf, kind, tile, j0, 0, &b0, &b1);
    for (int r = 0; r < nt; r++) {
        acc[r][0] = h[r * rank] * b0;
        acc[r][1] = h[r * rank] * b1;
    }
    for (int64_t k = 1; k < rank; k++) {
        b_row(bf, kind, tile, j0, k, &b0, &b1);
        for (int r = 0; r < nt; r++) {
            const f32x16 s = splat16(h[r * rank + k]);
            acc[r][0] = fma16(s, b0, acc[r][0]);
            acc[r][1] = fma16(s, b1, acc[r][1]);
        }
    }
    const f32x16 zero = {0};
    for (int r = 0; r < nt; r++) {
        int64_t yr = rows[r] * out + j0;
        f32x16 y0 = load16(y, ykind, yr), y1 = load16(y, ykind, yr + LANES);
        store16(y, ykind, yr, y0 + (zero + acc[r][0]));
        store16(y, ykind, yr + LANES, y1 + (zero + acc[r][1]));
    }
}

/* one output element y[yi]: column j of the last tile, `width` columns from j0 (the same operations as
 * axpy_tile's lanes) */
static inline __attribute__((always_inline)) void axpy_one(const float *h, int64_t rank, const factor *bf,
                                                           const void *tile, const int kind, int64_t width,
                                                           int64_t j0, int64_t j, void *y, const int ykind,
                                                           int64_t yi) {
    float s = h[0] * b_load1(bf, kind, tile, width, j0, 0, j);
    for (int64_t k = 1; k < rank; k++) s = __builtin_fmaf(h[k], b_load1(bf, kind, tile, width, j0, k, j), s);
    store1(y, ykind, yi, load1(y, ykind, yi) + (0.0f + s));
}

typedef struct {
    const float *x; /* fp32: 16-bit activations are widened once per call */
    void *y;
    int64_t in, out, nparts;
    const int64_t *ranks, *kinds, *offsets, *rows, *h_offsets, *starts;
    const factor *first, *second;
    float *h;
    float *blocks; /* per thread BLOCK_COMPONENTS A rows of ceil(in / 16) * 16 fp32 values (first_block) */
} job;

/* the cache lines of n bytes from p fetched ahead (no value changes) */
static inline __attribute__((always_inline)) void prefetch_bytes(const void *p, int64_t n) {
    for (int64_t k = 0; k < n; k += 64) __builtin_prefetch((const char *)p + k, 0, 3);
}

/* How far ahead each stage fetches: the first stage A's row of the rank component two after the current
 * one, the second stage each part's next column tile. A decoding step reads every layer's factors from
 * beyond the caches, and each call is a few hundred KB in runs the hardware prefetcher does not follow
 * (the second stage steps between parts every 2-3 KB). In a SmolLM2 mixed batch (4 svd deltas x 2 rows,
 * 32 tokens) the kernel's calls took 0.41 s against 0.46 s without; fetching further ahead (4
 * components and 2 tiles, or 8 and 3) took 0.42-0.44 s. */
#define LR_AHEAD_COMPONENTS 2
#define LR_AHEAD_TILES 1

/* bytes of `values` consecutive values of a row at kind (kind 3: the codes, whole chunks) */
static inline int64_t row_bytes_of(const int kind, int64_t values) {
    return kind == 3 ? ((values + 15) >> 4) * 8 : values * (kind == 0 ? 4 : 2);
}

/* where A's row j of part p starts */
static inline const char *a_row(const job *w, int64_t p, int64_t j) {
    const factor *a = &w->first[p];
    int kind = (int)w->kinds[p];
    return (const char *)a->p + j * (kind == 3 ? a->row_bytes : row_bytes_of(kind, w->in));
}

/* A's row of stacked component c, fetched ahead (the caller's next components); p: a part at or
 * before c's (where the search starts) */
static inline __attribute__((always_inline)) void prefetch_component(const job *w, int64_t p, int64_t c) {
    if (c >= w->starts[w->nparts]) return;
    while (c >= w->starts[p + 1]) p++;
    prefetch_bytes(a_row(w, p, c - w->starts[p]), row_bytes_of((int)w->kinds[p], w->in));
}

/* A quantized B read by more than TILE_ROWS rows (a prefill) is decoded once per call and column tile
 * into a thread's buffer, which every row tile then reads as fp32 (the same values, so the same bits),
 * rather than decoded again for every 4 rows; tiles of a rank above QBUF_VALUES / TILE_COLS are decoded
 * per row tile. (A's rows go through first_block.) */
#define QBUF_VALUES 8192

/* first stage for component j of part p (at most TILE_ROWS rows; more go through first_block), its
 * factor at kind */
static inline __attribute__((always_inline)) void first_rows(const job *w, int64_t p, int64_t j, const int kind) {
    const factor *a = &w->first[p];
    int64_t rank = w->ranks[p];
    const int64_t *rows = w->rows + w->offsets[p];
    int64_t n = w->offsets[p + 1] - w->offsets[p];
    float *h = w->h + w->h_offsets[p] + j;
    for (int64_t r = 0; r < n; r += TILE_ROWS) {
        int64_t nt = n - r < TILE_ROWS ? n - r : TILE_ROWS;
        switch (nt) {
            case 4: dot_tile(w->x, w->in, rows + r, a, kind, j, h + r * rank, rank, 4); break;
            case 3: dot_tile(w->x, w->in, rows + r, a, kind, j, h + r * rank, rank, 3); break;
            case 2: dot_tile(w->x, w->in, rows + r, a, kind, j, h + r * rank, rank, 2); break;
            default: dot_tile(w->x, w->in, rows + r, a, kind, j, h + r * rank, rank, 1); break;
        }
    }
}

/* first stage for component c of the stacked ranks (part p, component j) */
static inline __attribute__((always_inline)) void first_stage(const job *w, int64_t c) {
    int64_t p = 0;
    while (c >= w->starts[p + 1]) p++;
    int64_t j = c - w->starts[p];
    prefetch_component(w, p, c + LR_AHEAD_COMPONENTS);
    switch (w->kinds[p]) {
        case 0: first_rows(w, p, j, 0); break;
        case 1: first_rows(w, p, j, 1); break;
        case 2: first_rows(w, p, j, 2); break;
        default: first_rows(w, p, j, 3); break;
    }
}

/* A part of more than TILE_ROWS rows (a prefill) takes its first stage in blocks of up to BLOCK_COMPONENTS
 * rank components: their A rows are decoded or widened once into the thread's buffer (job.blocks), and
 * each x load then serves every component of the block and each A load every row of a tile, where the
 * per-component path loads every row's x again for each component. In a SmolLM2 mixed batch prefill
 * (4 svd deltas x 64 rows, 4-bit factors) the calls took 0.21-0.22 s against 0.27-0.28 s per component
 * (two threads). */
#define BLOCK_COMPONENTS 4

/* h[r * hstride + c] = x[rows[r]] · a_c for nt rows and nc components, x (., in) and the a_c (in values at
 * a + c * astride) fp32. Each sum takes dot_tile's operations: the 64 lanes are independent sums over m
 * (lane 16 v + l sums columns 64 m + 16 v + l), taken here one lane vector v at a time so that the
 * block's nt x nc sums fit in registers; then the tail and the same tree. */
static inline __attribute__((always_inline)) void dot_block(const float *x, int64_t in, const int64_t *rows,
                                                            const float *a, int64_t astride, float *h,
                                                            int64_t hstride, const int nt, const int nc) {
    f32x16 lanes[TILE_ROWS][BLOCK_COMPONENTS][4];
    const float *xr[TILE_ROWS];
    int64_t full = in - in % DOT_LANES;
#pragma GCC unroll 4
    for (int r = 0; r < nt; r++) xr[r] = x + rows[r] * in;
    for (int v = 0; v < 4; v++) {
        f32x16 acc[TILE_ROWS][BLOCK_COMPONENTS];
#pragma GCC unroll 4
        for (int r = 0; r < nt; r++)
#pragma GCC unroll 4
            for (int c = 0; c < nc; c++) acc[r][c] = (f32x16){0};
        for (int64_t i = v * LANES; i < full; i += DOT_LANES) {
            f32x16 xv[TILE_ROWS], av[BLOCK_COMPONENTS];
#pragma GCC unroll 4
            for (int r = 0; r < nt; r++) xv[r] = load16(xr[r], 0, i);
#pragma GCC unroll 4
            for (int c = 0; c < nc; c++) av[c] = load16(a, 0, c * astride + i);
#pragma GCC unroll 4
            for (int r = 0; r < nt; r++)
#pragma GCC unroll 4
                for (int c = 0; c < nc; c++) acc[r][c] = fma16(xv[r], av[c], acc[r][c]);
        }
#pragma GCC unroll 4
        for (int r = 0; r < nt; r++)
#pragma GCC unroll 4
            for (int c = 0; c < nc; c++) lanes[r][c][v] = acc[r][c];
    }
    for (int r = 0; r < nt; r++)
        for (int c = 0; c < nc; c++) {
            f32x16 *l = lanes[r][c];
            if (full < in) { /* the tail, element by element, into lanes i - full */
                float flat[DOT_LANES];
                memcpy(flat, l, sizeof flat);
                for (int64_t i = full; i < in; i++)
                    flat[i - full] = __builtin_fmaf(x[rows[r] * in + i], a[c * astride + i], flat[i - full]);
                memcpy(l, flat, sizeof flat);
            }
            h[r * hstride + c] = tree16v((l[0] + l[2]) + (l[1] + l[3]));
        }
}

/* first stage of part p for its components j0 .. j0 + nc - 1 (nc <= BLOCK_COMPONENTS, factor at kind),
 * every row of the part (kept out of line: inlined, its frame slowed the per-component calls) */
static __attribute__((noinline)) void first_block(const job *w, int64_t p, int64_t j0, int nc, const int kind) {
    const factor *a = &w->first[p];
    int64_t in = w->in, chunks = (in + 15) >> 4, astride = chunks * LANES, rank = w->ranks[p];
    float *buf = w->blocks + (int64_t)omp_get_thread_num() * BLOCK_COMPONENTS * astride;
    for (int c = 0; c < nc; c++) { /* A's rows as fp32: decoded (kind 3) or widened, the same values */
        int64_t j = j0 + c;
        float *row = buf + c * astride;
        if (kind == 3) {
            const uint8_t *codes = (const uint8_t *)a->p + j * a->row_bytes;
            for (int64_t k = 0; k < chunks; k++) {
                f32x16 v = qdecode(codes + k * 8, qlut(a, j * a->row_step + (k >> a->shift) * a->group_step));
                memcpy(row + k * LANES, &v, sizeof v);
            }
            continue;
        }
        int64_t i = 0;
        for (; i + LANES <= in; i += LANES) {
            f32x16 v = load16(a->p, kind, j * in + i);
            memcpy(row + i, &v, sizeof v);
        }
        for (; i < in; i++) row[i] = load1(a->p, kind, j * in + i);
    }
    const int64_t *rows = w->rows + w->offsets[p];
    int64_t n = w->offsets[p + 1] - w->offsets[p];
    float *h = w->h + w->h_offsets[p] + j0;
    const float *x = w->x;
    for (int64_t r = 0; r < n; r += TILE_ROWS) {
        int64_t nt = n - r < TILE_ROWS ? n - r : TILE_ROWS;
        if (nt == TILE_ROWS && nc == BLOCK_COMPONENTS)
            dot_block(x, in, rows + r, buf, astride, h + r * rank, rank, TILE_ROWS, BLOCK_COMPONENTS);
        else
            dot_block(x, in, rows + r, buf, astride, h + r * rank, rank, (int)nt, nc);
    }
}

/* first-stage unit u: (stacked component, count); a count of 0 is one component on the per-component
 * path, a count of 1 .. BLOCK_COMPONENTS a block of first_block */
static inline __attribute__((always_inline)) void first_unit(const job *w, const int64_t *unit) {
    int64_t c = unit[0];
    if (unit[1] == 0) {
        first_stage(w, c);
        return;
    }
    int64_t p = 0;
    while (c >= w->starts[p + 1]) p++;
    switch (w->kinds[p]) {
        case 0: first_block(w, p, c - w->starts[p], (int)unit[1], 0); break;
        case 1: first_block(w, p, c - w->starts[p], (int)unit[1], 1); break;
        case 2: first_block(w, p, c - w->starts[p], (int)unit[1], 2); break;
        default: first_block(w, p, c - w->starts[p], (int)unit[1], 3); break;
    }
}

/* whether part p's first stage goes by blocks */
static inline int by_blocks(const job *w, int64_t p) { return w->offsets[p + 1] - w->offsets[p] > TILE_ROWS; }

/* the first stage's units (pairs as first_unit reads them) of every part with rows; returns their count */
static int64_t first_units(const job *w, int64_t *units) {
    int64_t count = 0;
    for (int64_t p = 0; p < w->nparts; p++) {
        int64_t rank = w->starts[p + 1] - w->starts[p]; /* 0 for a part without rows */
        int block = by_blocks(w, p);
        for (int64_t j = 0; j < rank; j += block ? BLOCK_COMPONENTS : 1) {
            units[2 * count] = w->starts[p] + j;
            units[2 * count + 1] = block ? (rank - j < BLOCK_COMPONENTS ? rank - j : BLOCK_COMPONENTS) : 0;
            count++;
        }
    }
    return count;
}

/* second stage of part p for the column tile `tile` (columns j0 .. j0 + width) of `bf`, at kind */
static inline __attribute__((always_inline)) void second_rows(const job *w, int64_t p, int64_t j0, int64_t width,
                                                              const factor *bf, const void *tile, const int kind,
                                                              const int akind) {
    int64_t rank = w->ranks[p], n = w->offsets[p + 1] - w->offsets[p];
    const int64_t *rows = w->rows + w->offsets[p];
    const float *h = w->h + w->h_offsets[p];
    for (int64_t r = 0; r < n; r += TILE_ROWS) {
        int64_t nt = n - r < TILE_ROWS ? n - r : TILE_ROWS;
        if (width == TILE_COLS) {
            switch (nt) {
                case 4: axpy_tile(h + r * rank, rank, bf, tile, kind, w->out, j0, w->y, akind, rows + r, 4); break;
                case 3: axpy_tile(h + r * rank, rank, bf, tile, kind, w->out, j0, w->y, akind, rows + r, 3); break;
                case 2: axpy_tile(h + r * rank, rank, bf, tile, kind, w->out, j0, w->y, akind, rows + r, 2); break;
                default: axpy_tile(h + r * rank, rank, bf, tile, kind, w->out, j0, w->y, akind, rows + r, 1); break;
            }
            continue;
        }
        for (int64_t q = 0; q < nt; q++)
            for (int64_t j = 0; j < width; j++)
                axpy_one(h + (r + q) * rank, rank, bf, tile, kind, width, j0, j, w->y, akind,
                         rows[r + q] * w->out + j0 + j);
    }
}

/* second stage of part p for column tile t (columns j0 .. j0 + width), its factor at kind; B is stored
 * tile by tile: tile t at value TILE_COLS * t * rank, (rank, width) row-major (lowrank_group.tile_columns;
 * kind 3 at byte 16 t rank) */
static inline __attribute__((always_inline)) void second_part(const job *w, int64_t p, int64_t j0,
                                                              int64_t width, const int kind, const int akind) {
    int64_t rank = w->ranks[p];
    const factor *bf = &w->second[p];
    const void *tile = (const char *)bf->p + rank * row_bytes_of(kind, j0);
    int64_t ahead = j0 + LR_AHEAD_TILES * TILE_COLS; /* this part's tile a few ahead */
    if (ahead < w->out) {
        int64_t ahead_width = w->out - ahead < TILE_COLS ? w->out - ahead : TILE_COLS;
        prefetch_bytes((const char *)bf->p + rank * row_bytes_of(kind, ahead),
                       rank * row_bytes_of(kind, ahead_width));
    }
    if (kind == 3 && w->offsets[p + 1] - w->offsets[p] > TILE_ROWS && width == TILE_COLS &&
        rank * TILE_COLS <= QBUF_VALUES) {
        float buf[QBUF_VALUES] __attribute__((aligned(64)));
        for (int64_t k = 0; k < rank; k++) {
            f32x16 b0, b1;
            b_row(bf, kind, tile, j0, k, &b0, &b1);
            memcpy(buf + k * TILE_COLS, &b0, sizeof b0);
            memcpy(buf + k * TILE_COLS + LANES, &b1, sizeof b1);
        }
        const factor plain = {buf, NULL, 0, 0, 0};
        second_rows(w, p, j0, width, &plain, buf, 0, akind);
        return;
    }
    second_rows(w, p, j0, width, bf, tile, kind, akind);
}

/* second stage for column tile t (columns TILE_COLS t .. + width) of every part */
static inline __attribute__((always_inline)) void second_stage(const job *w, int64_t t, const int akind) {
    int64_t j0 = t * TILE_COLS, width = w->out - j0 < TILE_COLS ? w->out - j0 : TILE_COLS;
    for (int64_t p = 0; p < w->nparts; p++) {
        if (w->ranks[p] == 0) { /* a zero share, added all the same: y + (0 + 0) turns -0.0 into +0.0 as add_ does */
            const int64_t *rows = w->rows + w->offsets[p];
            for (int64_t r = 0; r < w->offsets[p + 1] - w->offsets[p]; r++)
                for (int64_t j = 0; j < width; j++) {
                    int64_t yi = rows[r] * w->out + j0 + j;
                    store1(w->y, akind, yi, load1(w->y, akind, yi) + (0.0f + 0.0f));
                }
            continue;
        }
        switch (w->kinds[p]) {
            case 0: second_part(w, p, j0, width, 0, akind); break;
            case 1: second_part(w, p, j0, width, 1, akind); break;
            case 2: second_part(w, p, j0, width, 2, akind); break;
            default: second_part(w, p, j0, width, 3, akind); break;
        }
    }
}

/* one entry per output kind, so that it is a constant inside the parallel region (each part's factor
 * kind is switched on per component and per tile); x is fp32 (16-bit activations are widened once per
 * call: the first stage reads each x value once per rank component, and a 16-bit load's widening takes
 * the same execution ports as the multiplies and adds) */
#define DEFINE_RUN(NAME, YKIND)                                                                 \
    static void NAME(const job *w, const int64_t *units, int64_t nunits, int threads) {        \
        int64_t tiles = (w->out + TILE_COLS - 1) / TILE_COLS;                                   \
        _Pragma("omp parallel num_threads(threads)") {                                          \
            _Pragma("omp for schedule(static)") for (int64_t u = 0; u < nunits; u++)            \
                first_unit(w, units + 2 * u);                                                   \
            _Pragma("omp for schedule(static)") for (int64_t t = 0; t < tiles; t++)             \
                second_stage(w, t, YKIND);                                                      \
        }                                                                                       \
    }
DEFINE_RUN(run_fp32, 0)
DEFINE_RUN(run_fp16, 1)
DEFINE_RUN(run_bf16, 2)
typedef void (*run_fn)(const job *, const int64_t *, int64_t, int);
static const run_fn RUNS[3] = {run_fp32, run_fp16, run_bf16};

/* x's rows 0 .. nrows - 1 (n, in) at act_kind widened to fp32 (exact) into a new buffer; NULL when it
 * cannot be allocated */
static float *widen_rows(const void *x, int act_kind, int64_t nrows, int64_t in) {
    int64_t nx = nrows * in, i = 0;
    float *xf = malloc((size_t)(nx > 0 ? nx : 1) * sizeof(float));
    if (!xf) return NULL;
    for (; i + LANES <= nx; i += LANES) {
        f32x16 v = load16(x, act_kind, i);
        memcpy(xf + i, &v, sizeof v);
    }
    for (; i < nx; i++) xf[i] = load1(x, act_kind, i);
    return xf;
}

/* part p's factor at kind from its pointer (kind 3: its qdesc, checked against `values` per row: row
 * bytes when `a_side`, groups enough for every chunk; rank: the part's, for a group-major grid); 0, or 1
 * for a bad kind or descriptor */
static int read_factor(int64_t pointer, int64_t kind, int64_t values, int a_side, int64_t rank, factor *f) {
    memset(f, 0, sizeof *f);
    if (kind < 0 || kind > 3) return 1;
    if (kind < 3) {
        f->p = (const void *)(uintptr_t)pointer;
        return 0;
    }
    const int64_t *d = (const int64_t *)(uintptr_t)pointer;
    int64_t chunks = (values + 15) >> 4;
    if (!d || !d[QD_CODES] || !d[QD_GRID] || d[QD_SHIFT] < 0 || d[QD_SHIFT] > 40 || d[QD_GROUPS] < 0) return 1;
    if ((a_side && d[QD_ROW_BYTES] != chunks * 8) || (chunks > 0 && d[QD_GROUPS] < ((chunks - 1) >> d[QD_SHIFT]) + 1))
        return 1;
    f->p = (const void *)(uintptr_t)d[QD_CODES];
    f->grid = (const float *)(uintptr_t)d[QD_GRID];
    f->row_bytes = d[QD_ROW_BYTES];
    f->row_step = d[QD_GROUP_MAJOR] ? 1 : d[QD_GROUPS];
    f->group_step = d[QD_GROUP_MAJOR] ? rank : 1;
    f->shift = (int)d[QD_SHIFT];
    return 0;
}

int deltakit_low_rank_multi(const void *x, int64_t in, int64_t out, int64_t nparts, const int64_t *first,
                            const int64_t *second, const int64_t *ranks, const int64_t *kinds,
                            const int64_t *offsets, const int64_t *rows, void *y, int act_kind, int threads) {
    if (in < 0 || out < 0 || nparts < 0 || act_kind < 0 || act_kind > 2) return 1;
    if (threads < 1) threads = 1;
    size_t np = (size_t)(nparts > 0 ? nparts : 1);
    int64_t *starts = malloc((size_t)(nparts + 1) * sizeof(int64_t));
    int64_t *h_offsets = malloc((size_t)(nparts + 1) * sizeof(int64_t));
    factor *fa = malloc(np * sizeof(factor)), *fb = malloc(np * sizeof(factor));
    float *h = NULL;
    int code = starts && h_offsets && fa && fb ? 0 : 2;
    if (code == 0) {
        starts[0] = h_offsets[0] = 0;
        for (int64_t p = 0; p < nparts && code == 0; p++) {
            int64_t n = offsets[p + 1] - offsets[p];
            if (ranks[p] < 0 || n < 0 || read_factor(first[p], kinds[p], in, 1, ranks[p], &fa[p]) ||
                read_factor(second[p], kinds[p], out, 0, ranks[p], &fb[p]))
                code = 1;
            else {
                starts[p + 1] = starts[p] + (n > 0 ? ranks[p] : 0);
                h_offsets[p + 1] = h_offsets[p] + n * ranks[p];
            }
        }
    }
    if (code == 0) {
        h = malloc((size_t)(h_offsets[nparts] > 0 ? h_offsets[nparts] : 1) * sizeof(float));
        if (!h) code = 2;
    }
    float *xf = NULL;
    if (code == 0 && act_kind != 0) { /* the rows any part reads, widened once */
        int64_t nrows = 0;
        for (int64_t k = 0; k < (nparts > 0 ? offsets[nparts] : 0); k++)
            if (rows[k] + 1 > nrows) nrows = rows[k] + 1;
        xf = widen_rows(x, act_kind, nrows, in);
        if (!xf) code = 2;
    }
    int64_t *units = NULL;
    float *blocks = NULL;
    job w = {xf ? xf : (const float *)x, y, in, out, nparts, ranks, kinds, offsets, rows, h_offsets, starts, fa, fb, h, NULL};
    if (code == 0) {
        units = malloc((size_t)(starts[nparts] > 0 ? starts[nparts] : 1) * 2 * sizeof(int64_t));
        int any = 0;
        for (int64_t p = 0; p < nparts; p++) any |= ranks[p] > 0 && by_blocks(&w, p);
        int64_t per_thread = BLOCK_COMPONENTS * ((in + 15) >> 4) * LANES; /* 0 for in == 0: malloc(0) may be NULL */
        if (any) w.blocks = blocks = malloc((size_t)threads * (size_t)(per_thread > 0 ? per_thread : 1) * sizeof(float));
        if (!units || (any && !blocks)) code = 2;
    }
    if (code == 0) RUNS[act_kind](&w, units, first_units(&w, units), threads);
    free(blocks);
    free(units);
    free(xf);
    free(h);
    free(fa);
    free(fb);
    free(starts);
    free(h_offsets);
    return code;
}

/* signmm_native.c, compiled into the same library */
int deltakit_sign_matmul_multi(const float *x, int64_t in, int64_t out, int64_t nparts, const int64_t *packed,
                               const int64_t *tiles, const int64_t *offsets, const int64_t *rows,
                               const float *scales, float *y, int64_t lut_min, int threads);

/* The sign and low-rank shares of several deltas added into a layer's output in one call (runtime/multidelta.py
 * through ops/mixed_shares.py). x (n, in) and y (n, out) row-major at act_kind (0 = fp32, 1 = fp16,
 * 2 = bf16), y mutated. The same operations, in the same order, as
 *
 *     xf = x widened to fp32 (exact); share = zeros (n, out) fp32;
 *     deltakit_low_rank_multi(xf, ..., share, act_kind 0)      (the low-rank group, nlr parts; 0: none)
 *     deltakit_sign_matmul_multi(xf, ..., share)               (the sign group, nsg parts; 0: none)
 *     y.add_(share)                                            (every row: rows of no part add +0)
 *
 * so the bits are those of the separate calls and torch's add (a 16-bit y rounded to nearest even, a NaN
 * becoming 0x7FC0 in bf16, as store16). The arguments of each group are those of its own entry point.
 * Returns 0, 1 for bad sizes or kinds, 2 when a buffer cannot be allocated, or the failing call's code. */
int deltakit_mixed_shares(const void *x, int act_kind, int64_t n, int64_t in, int64_t out, int64_t nlr,
                          const int64_t *first, const int64_t *second, const int64_t *ranks, const int64_t *kinds,
                          const int64_t *lr_offsets, const int64_t *lr_rows, int64_t nsg, const int64_t *packed,
                          const int64_t *tiles, const int64_t *sg_offsets, const int64_t *sg_rows,
                          const float *scales, int64_t lut_min, void *y, int threads) {
    if (n < 0 || in < 0 || out < 0 || nlr < 0 || nsg < 0 || act_kind < 0 || act_kind > 2) return 1;
    int64_t ny = n * out;
    float *xf = widen_rows(x, act_kind, n, in);
    float *share = calloc((size_t)(ny > 0 ? ny : 1), sizeof(float));
    int code = xf && share ? 0 : 2;
    if (code == 0) {
        if (nlr > 0)
            code = deltakit_low_rank_multi(xf, in, out, nlr, first, second, ranks, kinds, lr_offsets, lr_rows, share,
                                           0, threads);
        if (code == 0 && nsg > 0)
            code = deltakit_sign_matmul_multi(xf, in, out, nsg, packed, tiles, sg_offsets, sg_rows,
                                              scales, share, lut_min, threads);
    }
    if (code == 0) {
        int64_t i = 0;
        for (; i + LANES <= ny; i += LANES) {
            f32x16 s;
            memcpy(&s, share + i, sizeof s);
            store16(y, act_kind, i, load16(y, act_kind, i) + s);
        }
        for (; i < ny; i++) store1(y, act_kind, i, load1(y, act_kind, i) + share[i]);
    }
    free(xf);
    free(share);
    return code;
}
