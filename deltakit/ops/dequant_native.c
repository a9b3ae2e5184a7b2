/* Dequantization of packed codes (deltakit/ops/quant.py: dequantize), one thread.
 *
 * deltakit_dequantize: codes of `lanes` lanes of `length` values each, packed as one least-significant-bit
 * first stream of `bits`-bit codes (deltakit/ops/intpack.py), lane after lane. Value i of lane l is
 *     out[l * lane_stride + i * value_stride] = (float)code * step[l * groups + g] + origin[l * groups + g]
 * with g = i / group, the product and the sum each rounded to fp32 (built with -ffp-contract=off: no fused
 * multiply-add), as torch computes `codes.float() * step + origin`. With value_stride 1 each lane is
 * written as one run; otherwise (a lane is a column of out) in tiles of TILE_LANES lanes x TILE_VALUES
 * values, decoded into a buffer and written row by row. The caller checks that `packed` holds
 * ceil(lanes * length * bits / 8) bytes, that step and origin hold lanes * groups values and that out holds
 * every index written; returns 0, or 1 for arguments out of range.
 */
#include <math.h>
#include <stdint.h>

#define TILE_LANES 16
#define TILE_VALUES 64

/* values i0 .. i0 + n of lane l (inside one lane) into run[0 .. n) */
static void decode_run(const uint8_t *packed, int64_t nbytes, int64_t bits, int64_t length, int64_t group,
                       const float *step, const float *origin, int64_t l, int64_t i0, int64_t n,
                       float *run) {
    const uint32_t mask = (1u << bits) - 1;
    const int64_t first = l * length; /* code index of the lane's first value */
    for (int64_t i = i0; i < i0 + n;) {
        const int64_t g = i / group, end = (g + 1) * group < i0 + n ? (g + 1) * group : i0 + n;
        const float sg = step[g], og = origin[g];
        float *o = run + (i - i0);
        if (bits == 4 && (first + i) % 2 == 0) { /* two whole codes a byte */
            const uint8_t *b = packed + (first + i) / 2;
            const int64_t count = end - i, pairs = count / 2;
            for (int64_t k = 0; k < pairs; k++) {
                const uint32_t v = b[k];
                o[2 * k] = (float)(v & 15) * sg + og;
                o[2 * k + 1] = (float)(v >> 4) * sg + og;
            }
            if (count % 2) o[count - 1] = (float)(b[pairs] & 15) * sg + og;
        } else {
            for (int64_t m = 0; m < end - i; m++) {
                int64_t bit = (first + i + m) * bits, byte = bit >> 3;
                uint32_t word = packed[byte];
                if (byte + 1 < nbytes) word |= (uint32_t)packed[byte + 1] << 8;
                o[m] = (float)((word >> (bit & 7)) & mask) * sg + og;
            }
        }
        i = end;
    }
}

int deltakit_dequantize(const uint8_t *packed, int64_t nbytes, int64_t bits, int64_t lanes, int64_t length,
                        int64_t group, int64_t groups, const float *step, const float *origin, float *out,
                        int64_t lane_stride, int64_t value_stride) {
    if (bits < 1 || bits > 8 || lanes < 0 || length < 0 || group < 1 || groups < 0) return 1;
    if (lanes * length > 0 && (groups * group < length || (lanes * length * bits + 7) / 8 > nbytes)) return 1;
    if (value_stride == 1) {
        for (int64_t l = 0; l < lanes; l++)
            decode_run(packed, nbytes, bits, length, group, step + l * groups, origin + l * groups, l, 0,
                       length, out + l * lane_stride);
        return 0;
    }
    float tile[TILE_LANES][TILE_VALUES];
    for (int64_t l0 = 0; l0 < lanes; l0 += TILE_LANES) {
        const int64_t nl = lanes - l0 < TILE_LANES ? lanes - l0 : TILE_LANES;
        for (int64_t i0 = 0; i0 < length; i0 += TILE_VALUES) {
            const int64_t ni = length - i0 < TILE_VALUES ? length - i0 : TILE_VALUES;
            for (int64_t t = 0; t < nl; t++) {
                const int64_t l = l0 + t;
                decode_run(packed, nbytes, bits, length, group, step + l * groups, origin + l * groups, l,
                           i0, ni, tile[t]);
            }
            for (int64_t m = 0; m < ni; m++)
                for (int64_t t = 0; t < nl; t++) out[(l0 + t) * lane_stride + (i0 + m) * value_stride] = tile[t][m];
        }
    }
    return 0;
}

/* The clip search of deltakit/ops/quant.py (_best_of_ratios): for each group of `size` values of x
 * (lanes, groups, size), fp32, padded past `length` values a lane), the grid r of `nratios` with the least
 * squared error, the first on ties. Grid r of group (l, g) is step[(r * lanes + l) * groups + g] and origin
 * likewise; a value's code is clamp(rint((x - origin) / safe), 0, top) with safe the step, or 1 where the
 * step is 0, and its error ((code * step + origin) - x)^2, each operation rounded to fp32; a group's error
 * is the sum of its values' in fp64 (values past `length` left out): value j into lane j % 8 in order,
 * then ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)). Writes best[l * groups + g]
 * and the chosen codes into codes (lanes, groups, size); returns 0, or 1 for arguments out of range. */
#define CLIP_LANES 8 /* fp64 partial sums of a group's error */

int deltakit_clip_search(const float *x, int64_t lanes, int64_t groups, int64_t size, int64_t length,
                         int64_t nratios, const float *step, const float *origin, float top, int64_t *best,
                         uint8_t *codes) {
    if (lanes < 0 || groups < 0 || size < 1 || nratios < 1 || length > groups * size || top < 1 || top > 255)
        return 1;
    for (int64_t l = 0; l < lanes; l++)
        for (int64_t g = 0; g < groups; g++) {
            const float *v = x + (l * groups + g) * size;
            const int64_t n = length - g * size < size ? length - g * size : size; /* values that count */
            int64_t pick = 0;
            double least = 0;
            for (int64_t r = 0; r < nratios; r++) {
                const float s = step[(r * lanes + l) * groups + g], o = origin[(r * lanes + l) * groups + g];
                const float safe = s > 0 ? s : 1.0f;
                double lane[CLIP_LANES] = {0};
                int64_t j = 0;
                for (; j + CLIP_LANES <= n; j += CLIP_LANES)
                    for (int k = 0; k < CLIP_LANES; k++) {
                        float c = rintf((v[j + k] - o) / safe);
                        c = c < 0 ? 0 : (c > top ? top : c);
                        const float d = c * s + o - v[j + k];
                        lane[k] += (double)(d * d);
                    }
                for (; j < n; j++) {
                    float c = rintf((v[j] - o) / safe);
                    c = c < 0 ? 0 : (c > top ? top : c);
                    const float d = c * s + o - v[j];
                    lane[j % CLIP_LANES] += (double)(d * d);
                }
                double err = ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
                if (r == 0 || err < least) {
                    least = err;
                    pick = r;
                }
            }
            best[l * groups + g] = pick;
            const float s = step[(pick * lanes + l) * groups + g], o = origin[(pick * lanes + l) * groups + g];
            const float safe = s > 0 ? s : 1.0f;
            uint8_t *out = codes + (l * groups + g) * size;
            for (int64_t j = 0; j < size; j++) {
                float c = rintf((v[j] - o) / safe);
                out[j] = (uint8_t)(c < 0 ? 0 : (c > top ? top : c));
            }
        }
    return 0;
}
