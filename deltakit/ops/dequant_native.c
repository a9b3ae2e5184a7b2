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
