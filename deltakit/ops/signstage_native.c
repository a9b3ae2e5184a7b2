/* The sign stage of a sign codec's encode (deltakit/ops/signstage.py), one pass each, one thread.
 *
 * deltakit_sign_stage: for n elements of a base/target pair (kinds: 0 fp32, 1 bf16), writes the fp32
 * delta[i] = (float)target[i] - (float)base[i] and bit i of packed (LSB first within each byte, padding
 * bits zero) set when delta[i] >= 0 (so -0 counts as non-negative). Both conversions are exact and the
 * subtraction is one IEEE fp32 operation, so the delta has the bits of torch's
 * target.float() - base.float(), and the bits those of pack_signs(delta).
 *
 * deltakit_sign_residual: out[i] = delta[i] - scale * s[i] with s[i] = +1 where delta[i] >= 0, else -1,
 * written as delta[i] - scale or delta[i] + scale (multiplying by ±1 and subtracting a negation are
 * exact, so these are the bits of the torch expression).
 *
 * Both return 0, or 1 for a bad kind or size.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline float load_kind(const void *p, int kind, int64_t i) {
    if (kind == 0) return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#ifdef __AVX512F__
static inline __m512 load16(const void *p, int kind, int64_t i) {
    if (kind == 0) return _mm512_loadu_ps((const float *)p + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

int deltakit_sign_stage(const void *base, int base_kind, const void *target, int target_kind, int64_t n,
                        float *delta, uint8_t *packed) {
    if (n < 0 || base_kind < 0 || base_kind > 1 || target_kind < 0 || target_kind > 1) return 1;
    int64_t i = 0;
#ifdef __AVX512F__
    const __m512 zero = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        __m512 d = _mm512_sub_ps(load16(target, target_kind, i), load16(base, base_kind, i));
        _mm512_storeu_ps(delta + i, d);
        __mmask16 m = _mm512_cmp_ps_mask(d, zero, _CMP_GE_OQ);
        packed[i >> 3] = (uint8_t)(m & 0xFF);
        packed[(i >> 3) + 1] = (uint8_t)(m >> 8);
    }
#endif
    for (; i < n; i += 8) {
        uint8_t byte = 0;
        for (int k = 0; k < 8 && i + k < n; k++) {
            float d = load_kind(target, target_kind, i + k) - load_kind(base, base_kind, i + k);
            delta[i + k] = d;
            byte |= (uint8_t)(d >= 0.0f) << k;
        }
        packed[i >> 3] = byte;
    }
    return 0;
}

int deltakit_sign_residual(const float *delta, int64_t n, float scale, float *out) {
    if (n < 0) return 1;
    for (int64_t i = 0; i < n; i++) {
        float d = delta[i];
        out[i] = d >= 0.0f ? d - scale : d + scale;
    }
    return 0;
}
