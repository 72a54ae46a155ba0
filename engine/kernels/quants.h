// quants.h - the device layout of weight matrices, the helpers that decode it, and the matmul driver
// shared by matmul_<type>.cl and get_rows.cl.
//
// Tile layout (built on the host by engine/ops/weights.py::repack):
//     A weight [n_rows, n_cols] is cut into tiles of TILE_ROWS = 16 consecutive rows (the last tile padded
//     with zero rows). A tile is stored block after block (a GGUF block: 32 columns for Q8_0, Q4_0, Q4_1,
//     Q5_0, Q5_1 and IQ4_NL, 256 for the K-quants and IQ4_XS, 1 column for F32/F16/BF16). One tile block
//     holds the GGUF block of each of the 16 rows, field by field in GGUF order, and inside a field
//     element-major, row-minor:
//         field f, element k, row lane l  at byte  16 * off_f + (k * 16 + l) * elsize_f
//     so one 16-byte load (or a 32-byte ushort16 load for halves) gives the same element of all 16 rows.
//     A tile block is exactly 16 GGUF blocks long: the device holds the file's bytes, only reordered.
//
// Why: on a CPU (PoCL) a work-item that owns a tile keeps the 16 rows in the 16 lanes of a float16 and
// does rank-1 updates, s += w_col * x[col] with x broadcast from memory (an FMA operand, no shuffle), so one
// decoded column serves every token of the batch and lane l ends as row l (no horizontal sum per row).
// x stays float32: the row-per-work-item alternative measured here (DESIGN.md's 21.7 GB/s Q8_0 kernel)
// needs x quantized to int8 to be fast, which costs ~0.5% per product and makes the mat-vec disagree
// with the multi-token paths; this layout streams as fast with x exact, and its multi-token products
// run at 100-240 GFLOP/s instead of repeating the mat-vec per token.

#ifndef NEXTN_QUANTS_H
#define NEXTN_QUANTS_H

#define TILE_ROWS 16

// Bytes of one tile block (16 rows x one GGUF block) per type.
#define TB_F32 64      // 16 x float
#define TB_F16 32      // 16 x half
#define TB_BF16 32     // 16 x bfloat16
#define TB_Q8_0 544    // d[16] half | qs[32][16] int8
#define TB_Q4_0 288    // d[16] half | qs[16][16] uint8 (low nibble: column j, high nibble: column j + 16)
#define TB_Q4_1 320    // d[16] | m[16] half | qs[16][16]
#define TB_Q5_0 352    // d[16] half | qh[4][16] (fifth bits, 8 columns a byte) | qs[16][16]
#define TB_Q5_1 384    // d[16] | m[16] half | qh[4][16] | qs[16][16]
#define TB_IQ4_NL 288  // d[16] half | qs[16][16] (4-bit indices into IQ4_LEVELS, nibbles as Q4_0)
#define TB_IQ4_XS 2176 // d[16] | scales_h[16] ushort | scales_l[4][16] | qs[128][16]
#define TB_Q2_K 1344   // scales[16][16] (scale | min << 4) | qs[64][16] (2-bit) | d[16] | dmin[16] half
#define TB_Q3_K 1760   // hmask[32][16] | qs[64][16] (2-bit) | scales[12][16] (6-bit packed) | d[16] half
#define TB_Q4_K 2304   // d[16] | dmin[16] half | scales[12][16] (6-bit packed) | qs[128][16]
#define TB_Q5_K 2816   // d[16] | dmin[16] half | scales[12][16] | qh[32][16] | qs[128][16]
#define TB_Q6_K 3360   // ql[128][16] | qh[64][16] | scales[16][16] int8 | d[16] half

// Field offsets inside a tile block (bytes).
#define Q8_0_QS 32
#define Q4_0_QS 32
#define Q4_1_M 32
#define Q4_1_QS 64
#define Q5_0_QH 32
#define Q5_0_QS 96
#define Q5_1_M 32
#define Q5_1_QH 64
#define Q5_1_QS 128
#define IQ4_NL_QS 32
#define IQ4_XS_SH 32
#define IQ4_XS_SL 64
#define IQ4_XS_QS 128
#define QK_DMIN 32     // Q4_K / Q5_K
#define QK_SCALES 64
#define Q4_K_QS 256
#define Q5_K_QH 256
#define Q5_K_QS 768
#define Q6_K_QH 2048
#define Q6_K_SC 3072
#define Q6_K_D 3328
#define Q2_K_QS 256
#define Q2_K_D 1280
#define Q2_K_DMIN 1312
#define Q3_K_QS 512
#define Q3_K_SC 1536
#define Q3_K_D 1728

// Aligned vector loads. Every field of a tile block starts at a multiple of 16 bytes (32 for the halves)
// and buffers are aligned far beyond that, so the kernels dereference vector pointers: with vload16 from a
// char pointer LLVM sometimes assembles the vector from 2-byte pieces.
#define LD_C16(p, i) (((__global const char16 *)(p))[i])
#define LD_UC16(p, i) (((__global const uchar16 *)(p))[i])
#define LD_US16(p, i) (((__global const ushort16 *)(p))[i])
#define LD_F16(p, i) (((__global const float16 *)(p))[i])

// Software prefetch of the weight stream, MM_PREFETCH_BYTES ahead of the tile block being decoded (the
// host defines it for CPU devices). A mat-vec decodes as it streams, and the hardware prefetcher alone
// left it well below the copy bandwidth; a prefetch never faults, so running past the buffer is harmless.
#if defined(MM_PREFETCH_BYTES) && defined(__clang__)
#define MM_PREFETCH(p, nbytes)                                                                              \
    _Pragma("unroll") for (int o_ = 0; o_ < (nbytes); o_ += 64) {                                          \
        __builtin_prefetch((p) + MM_PREFETCH_BYTES + o_);                                                   \
    }
#else
#define MM_PREFETCH(p, nbytes)
#endif

// 16 IEEE halves -> floats. Neither path needs cl_khr_fp16 (halves are only stored, never computed with).
// Clang-based compilers (PoCL, ROCm, Intel, Mesa) convert a vector of clang's storage-only __fp16, which
// becomes one vcvtph2ps on an x86 CPU with F16C; PoCL's own vload_half is scalar software. Elsewhere the
// conversion is done with integer ops: exact for normals, subnormals, zeros, infinities and NaNs.
#if defined(__clang__) && __has_builtin(__builtin_convertvector) && __has_builtin(__builtin_bit_cast) &&          \
    !defined(MM_NO_FP16_STORAGE)
typedef __fp16 mm_half16 __attribute__((ext_vector_type(16)));
inline float16 half16_to_float16(const ushort16 h) {
    return __builtin_convertvector(__builtin_bit_cast(mm_half16, h), float16);
}
#else
inline float16 half16_to_float16(const ushort16 h) {
    const uint16 u = convert_uint16(h);
    const uint16 mag = (u & 0x7fffu) << 13;               // exponent + mantissa in float position
    float16 f = as_float16(mag) * 0x1p112f;               // rebias 15 -> 127; renormalises subnormals
    f = select(f, as_float16(mag | 0x7f800000u), mag >= 0x0f800000u);  // inf / NaN keep exponent 255
    return as_float16(as_uint16(f) | ((u & 0x8000u) << 16));
}
#endif

inline float16 bf16x16_to_float16(const ushort16 h) {
    return as_float16(convert_uint16(h) << 16);
}

inline float half_to_float(const ushort h) {
    const uint mag = ((uint)h & 0x7fffu) << 13;
    float f = as_float(mag) * 0x1p112f;
    if (mag >= 0x0f800000u) {
        f = as_float(mag | 0x7f800000u);
    }
    return as_float(as_uint(f) | (((uint)h & 0x8000u) << 16));
}

// The fifth bits of Q5_0 / Q5_1 for 16 rows: the 4 qh bytes of each row as one little-endian word (ggml's
// uint32 qh), bit c for column c. One word per block, then a shift per column, instead of a byte load and
// a shift per column.
inline uint16 q5_qh(__global const uchar *qh) {
    return convert_uint16(LD_UC16(qh, 0)) | (convert_uint16(LD_UC16(qh, 1)) << 8) |
           (convert_uint16(LD_UC16(qh, 2)) << 16) | (convert_uint16(LD_UC16(qh, 3)) << 24);
}

// bit c of h moved to bit 4 (the fifth bit of a quant)
#define Q5_BIT(h, c) (as_int16(((h) >> (uint)(c)) & 1u) << 4)

// The 16 non-uniform levels of IQ4_NL / IQ4_XS (ggml's kvalues_iq4nl) a 4-bit index selects.
#define IQ4_LEVELS -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113

// IQ4_LEVELS[q & 15] of 16 rows as floats: one table-lookup instruction on x86, AVX-512's vpermps (a table
// of 16 floats) or SSSE3's pshufb (16 bytes), else OpenCL's shuffle(). PoCL's shuffle() is a scalar loop:
// in a lookup-bound loop it ran at 0.8 GB/s against 5.7 (pshufb) and 7.8 (vpermps, as fast as no lookup).
// Each reads only the low 4 bits of an index (pshufb would zero an element whose bit 7 is set, so it is
// masked). MM_IQ4_LOOKUP (2 vpermps, 1 pshufb, 0 shuffle) picks one; the tests build each the CPU has.
#ifndef MM_IQ4_LOOKUP
#if defined(__clang__) && defined(__AVX512F__)
#define MM_IQ4_LOOKUP 2
#elif defined(__clang__) && defined(__SSSE3__)
#define MM_IQ4_LOOKUP 1
#else
#define MM_IQ4_LOOKUP 0
#endif
#endif

static __attribute__((always_inline)) inline float16 iq4_levels(const uchar16 q) {
#if MM_IQ4_LOOKUP == 2
    return __builtin_ia32_permvarsf512((float16)(IQ4_LEVELS), convert_int16(q));
#elif MM_IQ4_LOOKUP == 1
    const char16 lv = __builtin_ia32_pshufb128((char16)(IQ4_LEVELS), as_char16(q & (uchar)15));
    return convert_float16(lv);
#else
    return convert_float16(shuffle((char16)(IQ4_LEVELS), q));
#endif
}

// 6-bit scales and mins of Q4_K / Q5_K (ggml's get_scale_min_k4), for 16 rows at once.
// q: the 12 packed scale bytes as uchar16 row vectors; j: sub-block 0..7 (compile-time after unrolling).
static __attribute__((always_inline)) inline void scale_min_k4(const int j, __global const uchar *q, float16 *sc,
                                                        float16 *m) {
    if (j < 4) {
        *sc = convert_float16(LD_UC16(q, j) & (uchar)63);
        *m = convert_float16(LD_UC16(q, j + 4) & (uchar)63);
    } else {
        const uchar16 a = LD_UC16(q, j + 4);
        *sc = convert_float16((a & (uchar)0xF) | ((LD_UC16(q, j - 4) >> (uchar)6) << (uchar)4));
        *m = convert_float16((a >> (uchar)4) | ((LD_UC16(q, j) >> (uchar)6) << (uchar)4));
    }
}

// Q3_K's signed 6-bit scale of sub-block i (0..15) for 16 rows (ggml's packing: the low nibble in byte i % 8,
// its low half for i < 8; the high 2 bits in byte 8 + i % 4 at bit 2 (i / 4); minus 32).
static __attribute__((always_inline)) inline float16 q3_k_scale(__global const uchar *sc, const int i) {
    const int16 lo = (convert_int16(LD_UC16(sc, i & 7)) >> (4 * (i >> 3))) & 15;
    const int16 hi = (convert_int16(LD_UC16(sc, 8 + (i & 3))) >> (2 * (i >> 2))) & 3;
    return convert_float16((lo | (hi << 4)) - 32);
}

// ---- matmul driver -------------------------------------------------------------------------------------
//
// A tile function `tile_<type>(TT, NA, ...)` computes y[t, r0:r0+16] (+)= W[r0:r0+16, :] . x[t, :] for TT
// consecutive tokens. TT and NA are compile-time constants at each call site (the function is always
// inlined), so the arrays below live in registers.
//
// Per (sub-)block the tile function sums raw quants times x into partial sums s[t][a] (MM_COL), then
// applies the block's scale once (MM_BLOCK_END) and, for types with an offset or a min, subtracts
// min * sum(x over the block) (MM_BLOCK_END_MIN). Scaling per block instead of per column saves one
// multiply per 16 weights, which is what the one-token case is short of. NA > 1 splits each token's
// partial sum into NA independent FMA chains: with one token a single chain would wait on FMA latency.

#define MM_TT_MAX 8

// Loads decoded per loop iteration out of a run of N: the whole run for one token (measured 15-40% faster
// on a mat-vec streaming from memory than 4 at a time), M for several tokens (unrolling further lets the
// compiler decode every column first and spill them when 8 tokens hold 16 registers).
#define MM_UNROLL(N, M) (TT == 1 ? (N) : (M))
#define MM_NA_MAX 4

// Batch invariance (-DMM_BATCH_INVARIANT, engine/ops/matmul.py; on unless --no-batch-invariant): every
// token group size runs the same arithmetic - NA chains of MM_NA_INVARIANT, each column in the same chain
// (every U is a multiple of NA, so the unrolling changes the loop, not the chain of a column), the same
// decode of the weights - so a token's result is bit-identical whether it is alone in its step, batched with
// other requests or among drafts being verified. Without it the one-token tile takes shortcuts that round
// differently: more chains, and scales and offsets applied per block instead of per column.
#ifdef MM_BATCH_INVARIANT
#ifndef MM_NA_INVARIANT
#define MM_NA_INVARIANT 1
#endif
#define MM_ONE_TOKEN(TT) 0
#define MM_NA(NA) MM_NA_INVARIANT
#else
#define MM_ONE_TOKEN(TT) ((TT) == 1)
#define MM_NA(NA) (NA)
#endif

#define MM_ACC_DECL                                                                                         \
    float16 acc[MM_TT_MAX];                                                                                 \
    _Pragma("unroll") for (int t_ = 0; t_ < TT; t_++) {                                                     \
        acc[t_] = (float16)(0.0f);                                                                          \
    }

#define MM_PART_DECL(s)                                                                                     \
    float16 s[MM_TT_MAX][MM_NA_MAX];                                                                        \
    _Pragma("unroll") for (int t_ = 0; t_ < TT; t_++) {                                                     \
        _Pragma("unroll") for (int a_ = 0; a_ < NA; a_++) {                                                 \
            s[t_][a_] = (float16)(0.0f);                                                                    \
        }                                                                                                   \
    }

// 2 x NG sets of partial sums, s[h][g] used as one MM_PART_DECL's: the two 16-column sub-blocks h of NG
// groups decoded together (Q2_K, Q3_K, Q6_K: one load feeds a column of four groups)
#define MM_PARTS_DECL(s, NG)                                                                                \
    float16 s[2][4][MM_TT_MAX][MM_NA_MAX];                                                                  \
    _Pragma("unroll") for (int h_ = 0; h_ < 2; h_++) {                                                      \
        _Pragma("unroll") for (int g_ = 0; g_ < (NG); g_++) {                                               \
            _Pragma("unroll") for (int t_ = 0; t_ < TT; t_++) {                                             \
                _Pragma("unroll") for (int a_ = 0; a_ < NA; a_++) {                                         \
                    s[h_][g_][t_][a_] = (float16)(0.0f);                                                    \
                }                                                                                           \
            }                                                                                               \
        }                                                                                                   \
    }

// s[t][a] += w * x[t, col] for the TT tokens; xp points at x[0, col], rows of x are n_cols apart.
#define MM_COL(s, w, xp, a)                                                                                 \
    _Pragma("unroll") for (int t_ = 0; t_ < TT; t_++) {                                                     \
        s[t_][(a)] = fma((w), (float16)((xp)[t_ * n_cols]), s[t_][(a)]);                                    \
    }

static __attribute__((always_inline)) inline float16 mm_part_sum(float16 *s, const int NA) {
    float16 v = s[0];
    _Pragma("unroll") for (int a_ = 1; a_ < NA; a_++) {
        v += s[a_];
    }
    return v;
}

// acc[t] += scale * sum_a s[t][a]
#define MM_BLOCK_END(s, scale)                                                                              \
    _Pragma("unroll") for (int t_ = 0; t_ < TT; t_++) {                                                     \
        acc[t_] = fma(mm_part_sum(s[t_], NA), (scale), acc[t_]);                                            \
    }

// acc[t] += scale * sum_a s[t][a] + neg_min * sum(x[t, col : col + NCOL]); xp points at x[0, col]
#define MM_BLOCK_END_MIN(s, scale, neg_min, xp, NCOL)                                                       \
    _Pragma("unroll") for (int t_ = 0; t_ < TT; t_++) {                                                     \
        acc[t_] = fma(mm_part_sum(s[t_], NA), (scale),                                                      \
                      fma((neg_min), (float16)(mm_xsum(xsum, x, (xp), t_, n_cols, (NCOL))), acc[t_]));       \
    }

// Types with an offset per block of 32 (Q4_1, Q5_1: w = d q + m). One token: raw q summed, scale and offset
// applied once per block (the offset as m sum(x)). Several tokens: each column decoded to d q + m, one FMA
// shared by the tokens, where a sum of x per token and block cost more (Q4_1 prompt: 40 against 95 GFLOP/s).
#define Q_1_WEIGHT(q, d, m) (MM_ONE_TOKEN(TT) ? convert_float16(q) : fma(convert_float16(q), (d), (m)))
#define Q_1_BLOCK_END(s, d, m, xb)                                                                          \
    if (MM_ONE_TOKEN(TT)) {                                                                                          \
        MM_BLOCK_END_MIN(s, d, m, xb, 32)                                                                   \
    } else {                                                                                                \
        MM_BLOCK_END(s, (float16)(1.0f))                                                                    \
    }

inline float x_sum16(__global const float *p) {
    const float16 v = vload16(0, p);
    const float8 a = v.lo + v.hi;
    const float4 b = a.lo + a.hi;
    const float2 c = b.lo + b.hi;
    return c.x + c.y;
}

inline float x_sum32(__global const float *p) {
    const float16 v = vload16(0, p) + vload16(1, p);
    const float8 a = v.lo + v.hi;
    const float4 b = a.lo + a.hi;
    const float2 c = b.lo + b.hi;
    return c.x + c.y;
}

// sum(p[0 : ncol]) for a block of 32 or 16 columns (ncol is a constant wherever a tile calls it)
inline float x_block_sum(__global const float *p, const int ncol) {
    return ncol == 32 ? x_sum32(p) : x_sum16(p);
}

// The sums of x over a block for MM_BLOCK_END_MIN: sum(x[t, col : col + ncol]), xp pointing at x[0, col] of
// the token group x. Every tile needs them for every token and block; the prompt plans compute them once per
// step instead (kernel_x_block_sums below: the same x_block_sum, so the same bits) and pass xsum, float
// [n_tokens, n_cols / 16] from the group's first token, the sum of the block at column col in element
// col / ncol of a token's row. Without xsum (NULL: decode and verify steps) each tile computes them.
inline float mm_xsum(__global const float *xsum, __global const float *x, __global const float *xp, const int t,
                     const int n_cols, const int ncol) {
    return xsum ? xsum[(size_t)t * (n_cols / 16) + (int)(xp - x) / ncol] : x_block_sum(xp + (size_t)t * n_cols, ncol);
}

// xsum[t, b] = x_block_sum(x[t, b * ncol :], ncol) for b < n_cols / ncol and the rows t < n of x, n = n_rows, or
// bounds[n_expert] with bounds (the rows an expert-indexed product's router gathered); rows of xsum n_cols / 16
// floats apart. NDRange: one work-item per row, any count; work-items past n return.
__kernel void kernel_x_block_sums(__global const float *x, __global float *xsum, const int n_cols, const int ncol,
                                  const int n_rows, __global const int *bounds, const int n_expert) {
    const int t = get_global_id(0);
    if (t >= (bounds ? min(n_rows, bounds[n_expert]) : n_rows)) {
        return;
    }
    for (int b = 0; b < n_cols / ncol; b++) {
        xsum[(size_t)t * (n_cols / 16) + b] = x_block_sum(x + (size_t)t * n_cols + (size_t)b * ncol, ncol);
    }
}

// y[t, :rows] (+)= acc[t]; y points at y[0, r0], rows of y are `n_rows` (the kernel's ldy) apart.
#define MM_STORE(y)                                                                                         \
    _Pragma("unroll") for (int t_ = 0; t_ < TT; t_++) {                                                     \
        store_rows(acc[t_], (y) + (size_t)t_ * n_rows, rows, accumulate);                                   \
    }

inline void store_rows(float16 v, __global float *yr, const int rows, const int accumulate) {
    if (rows == TILE_ROWS) {
        if (accumulate) {
            v += vload16(0, yr);
        }
        vstore16(v, 0, yr);
    } else {
        float tmp[TILE_ROWS];
        vstore16(v, 0, tmp);
        for (int i = 0; i < rows; i++) {
            yr[i] = accumulate ? yr[i] + tmp[i] : tmp[i];
        }
    }
}

// The parameter list every tile function takes (after TT, NA).
#define MM_TILE_PARAMS                                                                                      \
    __global const uchar *wt, const int nb, __global const float *x, const int n_cols, __global float *y,  \
        const int n_rows, const int rows, const int accumulate, __global const float *xsum

// The token loop shared by MM_KERNEL and MM_KERNEL_ID: rows t0 <= t < t1 of x (rows n_cols floats apart) and
// y (rows ldy apart, from y_off + r0), in groups of 8, 4, 2 and 1 tokens.
#define MM_TOKEN_LOOP(TILE_FN)                                                                              \
    while (t0 < t1) {                                                                                       \
        __global const float *xt = x + (size_t)t0 * n_cols;                                                 \
        __global float *yt = y + y_off + (size_t)t0 * ldy + r0;                                             \
        __global const float *xst = xsum ? xsum + (size_t)t0 * (n_cols / 16) : xsum;                        \
        const int rem = t1 - t0;                                                                            \
        if (rem >= 8) {                                                                                     \
            TILE_FN(8, MM_NA(1), wt, nb, xt, n_cols, yt, ldy, rows, accumulate, xst);                      \
            t0 += 8;                                                                                        \
        } else if (rem >= 4) {                                                                              \
            TILE_FN(4, MM_NA(2), wt, nb, xt, n_cols, yt, ldy, rows, accumulate, xst);                      \
            t0 += 4;                                                                                        \
        } else if (rem >= 2) {                                                                              \
            TILE_FN(2, MM_NA(4), wt, nb, xt, n_cols, yt, ldy, rows, accumulate, xst);                      \
            t0 += 2;                                                                                        \
        } else {                                                                                            \
            TILE_FN(1, MM_NA(4), wt, nb, xt, n_cols, yt, ldy, rows, accumulate, xst);                      \
            t0 += 1;                                                                                        \
        }                                                                                                   \
    }

// Kernel entry, the contract of every kernels/matmul_<type>_f32.cl:
//   y[t, y_off + r] (+)= sum_c W[r, c] * x[t, c]: y rows are ldy floats apart (ldy = n_rows unless several
//   weights write side by side into one row, e.g. Q|K|V of different types).
// NDRange: 2-D (tile, token chunk): global = (ceil(n_rows / 16) rounded up to the local size,
//     ceil(max_tokens / tchunk)), local = (WG, 1), any WG. Work-item (i, j) owns rows [16 i, 16 i + 16),
//     lane l of its float16 accumulators being row 16 i + l, and tokens [j tchunk, (j + 1) tchunk) below
//     n_tokens (a step argument; chunks past it return at once). It decodes each column of its tile once
//     per group of up to 8 tokens and does rank-1 updates with x broadcast from memory, scaling once per
//     (sub-)block (see MM_KERNEL in quants.h).
// Variants (chosen on the host, engine/ops/matmul.py, by max_tokens; one kernel, float32 throughout, so
//     results agree to float rounding, only the order of the sums differing): mat-vec (max_tokens 1),
//     few tokens (tchunk = max_tokens <= 16: the weight is streamed from memory once, later token groups
//     of the work-item re-read its tile from cache) and prompt (tchunk 64: a chunk of x stays in a CPU's
//     L2). Inside, a one-token group unrolls whole blocks and CPU builds prefetch the weight stream
//     (MM_UNROLL, MM_PREFETCH in quants.h).
// Work-item (tile, chunk) handles rows [16 tile, 16 tile + 16) for tokens
// [chunk * tchunk, min(n_tokens, (chunk + 1) * tchunk)), in groups of 8, 4, 2 and 1 tokens.
// xsum: NULL, or x's block sums from kernel_x_block_sums for the types whose several-token tiles subtract
//     a min (MM_BLOCK_END_MIN; the prompt variant passes them, engine/ops/matmul.py XSUM_COLS; the same for
//     MM_KERNEL_ID, whose x rows are the gathered (token, expert) pairs).
#define MM_KERNEL(NAME, TILE_FN, BLOCK_COLS, TILE_BLOCK_BYTES)                                              \
    __kernel void NAME(__global const uchar *w, __global const float *x, __global float *y,                 \
                       const int n_rows, const int n_cols, const int n_tokens, const int tchunk,            \
                       const int accumulate, const int ldy, const int y_off, __global const float *xsum) {  \
        const int tile = get_global_id(0);                                                                  \
        const int r0 = tile * TILE_ROWS;                                                                    \
        if (r0 >= n_rows) {                                                                                 \
            return;                                                                                         \
        }                                                                                                   \
        const int rows = min(TILE_ROWS, n_rows - r0);                                                       \
        const int nb = n_cols / (BLOCK_COLS);                                                               \
        __global const uchar *wt = w + (size_t)tile * nb * (TILE_BLOCK_BYTES);                              \
        int t0 = get_global_id(1) * tchunk;                                                                 \
        const int t1 = min(n_tokens, t0 + tchunk);                                                          \
        MM_TOKEN_LOOP(TILE_FN)                                                                              \
    }

// Expert-indexed entry (ggml's mul_mat_id), the contract of every kernel_matmul_id_<type>_f32:
//   w holds n_expert weights of n_rows rows each, each expert padded to whole tiles (expert e's tile i is
//   tile e * ceil(n_rows / 16) + i of the buffer; engine/ops/moe.py::upload_experts). The rows of x and y
//   are grouped by expert: expert e owns rows [bounds[e], bounds[e + 1]) (bounds int32 [n_expert + 1],
//   written on the device by the MoE router, kernels/moe.cl), and
//   y[s, y_off + r] (+)= sum_c W_e[r, c] * x[s, c]  for s in that range.
// NDRange: 2-D (tile, (token chunk, expert)): dim 0 as MM_KERNEL; dim 1 index j is chunk j / n_expert of
//   expert j % n_expert (chunk-major, so a grid of n_expert * ceil(n / tchunk) covers n rows per expert and
//   grows with the batch). Work-item (i, j) handles rows [bounds[e] + chunk * tchunk, ... + tchunk) clipped
//   to the expert's range, with the tile function and token grouping of MM_KERNEL: every row routed to an
//   expert shares one pass over that expert's weights. Empty chunks (most of them in decode: 1 token uses
//   n_used of n_expert experts) return after reading two ints.
#define MM_KERNEL_ID(NAME, TILE_FN, BLOCK_COLS, TILE_BLOCK_BYTES)                                           \
    __kernel void NAME(__global const uchar *w, __global const float *x, __global float *y,                 \
                       const int n_rows, const int n_cols, __global const int *bounds, const int tchunk,    \
                       const int accumulate, const int ldy, const int y_off, const int n_expert,            \
                       __global const float *xsum) {                                                         \
        const int tile = get_global_id(0);                                                                  \
        const int r0 = tile * TILE_ROWS;                                                                    \
        const int e = get_global_id(1) % n_expert;                                                          \
        const int end = bounds[e + 1];                                                                      \
        int t0 = bounds[e] + (int)(get_global_id(1) / n_expert) * tchunk;                                   \
        if (r0 >= n_rows || t0 >= end) {                                                                    \
            return;                                                                                         \
        }                                                                                                   \
        const int t1 = min(end, t0 + tchunk);                                                               \
        const int rows = min(TILE_ROWS, n_rows - r0);                                                       \
        const int nb = n_cols / (BLOCK_COLS);                                                               \
        const int n_tiles = (n_rows + TILE_ROWS - 1) / TILE_ROWS;                                           \
        __global const uchar *wt = w + ((size_t)e * n_tiles + tile) * nb * (TILE_BLOCK_BYTES);              \
        MM_TOKEN_LOOP(TILE_FN)                                                                              \
    }

#endif
