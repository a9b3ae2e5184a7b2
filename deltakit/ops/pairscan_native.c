/* One pass over a fine-tune tensor and its base before encoding (deltakit/ops/finite.py: scan_pair).
 *
 * deltakit_scan_pair: for n elements of two tensors of one kind (0 fp32, 1 bf16, 2 fp16), sets
 * flags[0] = 1 when every value of a is finite (its exponent field is not all ones), flags[1] the same for
 * b, and flags[2] = 1 when a[i] == b[i] as numbers for every i: equal bits, or zeros of either sign. The
 * last flag is torch.equal's answer whenever both tensors are finite (a NaN makes a finiteness flag 0, and
 * the caller refuses the pair before using it). Reads each element once, on one thread; returns 0, or 1 for
 * a bad kind or size.
 */
#include <stdint.h>

#define SCAN(TYPE, EXPONENT, MAGNITUDE)                                                        \
    {                                                                                           \
        const TYPE *ua = (const TYPE *)a, *ub = (const TYPE *)b;                                \
        TYPE bad_a = 0, bad_b = 0, differ = 0;                                                  \
        for (int64_t i = 0; i < n; i++) {                                                       \
            TYPE x = ua[i], y = ub[i];                                                          \
            bad_a |= (TYPE)((x & EXPONENT) == EXPONENT);                                        \
            bad_b |= (TYPE)((y & EXPONENT) == EXPONENT);                                        \
            differ |= (TYPE)((x != y) & (((x | y) & MAGNITUDE) != 0));                          \
        }                                                                                       \
        flags[0] = !bad_a;                                                                      \
        flags[1] = !bad_b;                                                                      \
        flags[2] = !differ;                                                                     \
        return 0;                                                                               \
    }

int deltakit_scan_pair(const void *a, const void *b, int kind, int64_t n, int32_t *flags) {
    if (n < 0) return 1;
    switch (kind) {
        case 0: SCAN(uint32_t, UINT32_C(0x7F800000), UINT32_C(0x7FFFFFFF))
        case 1: SCAN(uint16_t, (uint16_t)0x7F80, (uint16_t)0x7FFF)
        case 2: SCAN(uint16_t, (uint16_t)0x7C00, (uint16_t)0x7FFF)
        default: return 1;
    }
}
