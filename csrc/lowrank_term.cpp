// lowrank_linear_term: out += ((x V) diag(c)) U^T, the term TeZO's virtual probes add to the
// output of an nn.Linear (zokernels/lowrank_probe.py), out (N x m), x (N x n), U (m x r),
// V (n x r), c (r, float32). The torch reference makes three BLAS calls (x V, the scaling, an
// addmm_ of inner size r, which rereads the output). Here two blocks of 4 rows compute their
// x V together (8 independent chains of multiply-adds: with one block's 4 the adds' latency
// held x V to about one vector multiply-add a cycle; 2026-12-07: a 256 x 1024 -> 256 call
// 114-142 -> 89-93 us in bf16, same bits), then each block adds its whole term to 16 columns
// of out at a time from registers: one read and one write of out, float32 arithmetic, one
// rounding to out's dtype. x's rows are converted to float32 a chunk at a time by vector
// loops. Per call at 256 rows, r = 8, 1 thread, against
// the reference (benchmarks/results/cpu_lowrank_term.json): float32 0.3-1.0x its time, float16
// 0.1-0.2x, bfloat16 0.5-1.6x (torch's bf16 GEMMs use AVX-512 BF16 dot products; summed over
// the probes of `small` the kernel is the faster, docs/tezo.md "Time").
//
// Summation order (fixed, so a result does not depend on the thread count): (x V)[row, k] sums
// over x's columns in order; the term of out[row, col] sums over k in order, from +0.0.
// The AVX2 build fuses each multiply-add (FMA), as does the AVX-512 build (16 lanes, the same
// operations per element: the same bits); the generic build multiplies, then adds. All agree
// with the reference to float32 rounding, not bit for bit.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "common.h"
#include "ops.h"
#include "rounding.h"
#include "work_items.h"

#if ZK_HAVE_AVX2_PATH
#include <immintrin.h>
#endif

namespace zk {
namespace {

enum Isa : int { kIsaGeneric = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };

constexpr int kRows = 4;    // rows per block: U^T's loads are shared by 4 rows
constexpr int kCols = 16;   // output columns per block: 4 x 16 accumulators fit the registers
constexpr int kLanes = 8;   // r is padded to a multiple of 8 with zero factor columns
constexpr int kMaxRank = 32;  // a block's 4 x r left factor stays in registers / L1
constexpr int kChunk = 256;   // x columns converted to float32 at a time (4 KiB per block)

struct TermJob {
    uintptr_t out, x;
    int64_t ldo, ldx;        // row strides, elements (columns are contiguous)
    int64_t rows, n, m;
    int64_t rp;              // r padded to a multiple of kLanes
    const float* vt;         // n x rp: V (zero columns past r)
    const float* ut;         // rp x m: U^T (zero rows past r)
};

// A float32 value rounded to nearest into Format's storage.
template <class Format>
ZK_INLINE typename Format::storage rounded(float value) {
    if constexpr (std::is_same<Format, Float32Format>::value)
        return value;
    else
        return static_cast<uint16_t>(Format::bits_from_float(value));
}

template <bool kFused>
ZK_INLINE float multiply_add(float a, float b, float c) {
    if constexpr (kFused)
        return std::fma(a, b, c);  // one vfmadd under the AVX2 target (-fno-math-errno)
    else
        return a * b + c;
}

#if ZK_HAVE_AVX2_PATH
// The bfloat16 bits of round(value + add) for 8 bfloat16 values widened to 32-bit lanes, in the
// low half of each lane: BFloat16Format::bits_from_float's rounding to nearest even, NaN -> 0x7FC0.
ZK_TARGET_AVX2 inline __m256i bfloat16_added_avx2(__m256i bits, __m256 add) {
    const __m256 value = _mm256_add_ps(_mm256_castsi256_ps(_mm256_slli_epi32(bits, 16)), add);
    const __m256i b = _mm256_castps_si256(value);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    const __m256i biased = _mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), odd);
    const __m256i rounded = _mm256_srli_epi32(biased, 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7FFFFFFF)),
                                           _mm256_set1_epi32(0x7F800000));
    return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
}

// out[q, j] = round(out[q, j] + sum[q][j]) for 16 columns from two float32 vectors: bfloat16
// rounds to nearest even as BFloat16Format (NaN -> 0x7FC0), float16 through Format's scalar
// rounding (F16C's keeps other NaN payloads).
template <class Format>
ZK_TARGET_AVX2 inline void add_rounded_avx2(typename Format::storage* o, __m256 lo, __m256 hi) {
    if constexpr (std::is_same<Format, Float32Format>::value) {
        _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), lo));
        _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_loadu_ps(o + 8), hi));
    } else if constexpr (std::is_same<Format, BFloat16Format>::value) {
        const __m256i both = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(o));
        const __m256i low = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(both));
        const __m256i high = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(both, 1));
        const __m256i first = bfloat16_added_avx2(low, lo);
        const __m256i second = bfloat16_added_avx2(high, hi);
        // packus interleaves 128-bit lanes: the permute puts the 16 results back in order
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o),
                            _mm256_permute4x64_epi64(_mm256_packus_epi32(first, second), 0xD8));
    } else {
        alignas(32) float sum[16];
        _mm256_store_ps(sum, lo);
        _mm256_store_ps(sum + 8, hi);
        for (int j = 0; j < 16; ++j) o[j] = rounded<Format>(Format::to_float(o[j]) + sum[j]);
    }
}

// The 4 x 16 block of term_block below at columns j0 (ut, out advanced to them), its sums held
// in registers with explicit intrinsics (the plain loop kept some on the stack): the same fused
// multiply-adds in the same order, so the same bits.
template <class Format, int R>
ZK_TARGET_AVX2 inline void add_columns_avx2(const float (&left)[kRows][R], const float* ut,
                                            int64_t m, typename Format::storage* out, int64_t ldo) {
    __m256 sum[kRows][2];
    for (int q = 0; q < kRows; ++q) sum[q][0] = sum[q][1] = _mm256_setzero_ps();
    for (int p = 0; p < R; ++p) {
        const __m256 u0 = _mm256_loadu_ps(ut + p * m), u1 = _mm256_loadu_ps(ut + p * m + 8);
#pragma GCC unroll 4
        for (int q = 0; q < kRows; ++q) {
            const __m256 l = _mm256_set1_ps(left[q][p]);
            sum[q][0] = _mm256_fmadd_ps(l, u0, sum[q][0]);
            sum[q][1] = _mm256_fmadd_ps(l, u1, sum[q][1]);
        }
    }
#pragma GCC unroll 4
    for (int q = 0; q < kRows; ++q) add_rounded_avx2<Format>(out + q * ldo, sum[q][0], sum[q][1]);
}
#endif

// (x V)[row, :] for kN rows from `first` (R = r padded): x's rows in float32 times V, summed
// over x's columns in order. Each row's sums are one chain of dependent multiply-adds: 8 rows
// (two blocks) at a time keep twice as many chains in flight as one block's 4 (the adds'
// latency bound the product to about one vector multiply-add per cycle), the same operations
// per row, so the same bits. Rows past the last read the last row again (never stored).
template <class Format, int kIsa, int R, int kN>
inline void left_factors(const TermJob& job, int64_t first, float (&left)[kN][R]) {
    constexpr bool kFused = kIsa != kIsaGeneric;
    using Storage = typename Format::storage;
    const auto* x = reinterpret_cast<const Storage*>(job.x);
    const int rows = static_cast<int>(min_of<int64_t>(kN, job.rows - first));
    const Storage* row[kN];
    for (int q = 0; q < kN; ++q) row[q] = x + (first + min_of(q, rows - 1)) * job.ldx;
    for (int q = 0; q < kN; ++q)
        for (int p = 0; p < R; ++p) left[q][p] = 0.0f;
    // x's rows in float32, kChunk columns at a time: converted by vector loops rather than one
    // element per multiply-add (float32 rows are read in place)
    alignas(64) float converted[std::is_same<Format, Float32Format>::value ? 1 : kN][kChunk];
    for (int64_t k0 = 0; k0 < job.n; k0 += kChunk) {
        const int width = static_cast<int>(min_of<int64_t>(kChunk, job.n - k0));
        const float* xs[kN];
        for (int q = 0; q < kN; ++q) {
            if constexpr (std::is_same<Format, Float32Format>::value) {
                xs[q] = row[q] + k0;
            } else {
                const Storage* source = row[q] + k0;
#pragma omp simd
                for (int k = 0; k < width; ++k) converted[q][k] = Format::to_float(source[k]);
                xs[q] = converted[q];
            }
        }
        for (int k = 0; k < width; ++k) {
            const float* v = job.vt + (k0 + k) * R;
            for (int q = 0; q < kN; ++q) {
                const float xq = xs[q][k];
#pragma omp simd
                for (int p = 0; p < R; ++p) left[q][p] = multiply_add<kFused>(xq, v[p], left[q][p]);
            }
        }
    }
}

// out[row, :] += (left[row] diag(c)) U^T for the rows of block `block` (left: their x V),
// R = r padded: the block's left factor stays in registers.
template <class Format, int kIsa, int R>
inline void add_block(const TermJob& job, const float* coef, int64_t block,
                      const float (*x_v)[R]) {
    constexpr bool kFused = kIsa != kIsaGeneric;
    using Storage = typename Format::storage;
    auto* out = reinterpret_cast<Storage*>(job.out);
    const int64_t first = block * kRows;
    const int rows = static_cast<int>(min_of<int64_t>(kRows, job.rows - first));
    float left[kRows][R];
    for (int q = 0; q < kRows; ++q)
        for (int p = 0; p < R; ++p) left[q][p] = x_v[q][p] * coef[p];
    int64_t j0 = 0;
    // Whole blocks of 4 rows x 16 columns (kept apart from the rest: with a row count known
    // only at run time GCC kept the accumulators in memory, 2x slower).
#if ZK_HAVE_AVX2_PATH
    if constexpr (kIsa == kIsaAvx2) {
        for (; rows == kRows && j0 + kCols <= job.m; j0 += kCols)
            add_columns_avx2<Format, R>(left, job.ut + j0, job.m, out + first * job.ldo + j0,
                                        job.ldo);
    }
#endif
    for (; rows == kRows && j0 + kCols <= job.m; j0 += kCols) {
        float acc[kRows][kCols] = {};
        for (int p = 0; p < R; ++p) {
            const float* u = job.ut + p * job.m + j0;
            for (int q = 0; q < kRows; ++q) {
                const float l = left[q][p];
#pragma omp simd
                for (int j = 0; j < kCols; ++j) acc[q][j] = multiply_add<kFused>(l, u[j], acc[q][j]);
            }
        }
        for (int q = 0; q < kRows; ++q) {
            Storage* o = out + (first + q) * job.ldo + j0;
#pragma omp simd
            for (int j = 0; j < kCols; ++j) o[j] = rounded<Format>(Format::to_float(o[j]) + acc[q][j]);
        }
    }
    for (int q = 0; q < rows; ++q) {  // the last columns, in the same order
        Storage* o = out + (first + q) * job.ldo;
        for (int64_t j = j0; j < job.m; ++j) {
            float acc = 0.0f;
            for (int p = 0; p < R; ++p) acc = multiply_add<kFused>(left[q][p], job.ut[p * job.m + j], acc);
            o[j] = rounded<Format>(Format::to_float(o[j]) + acc);
        }
    }
}

// Blocks [begin, end): two at a time (their x V together, left_factors), the last alone.
template <class Format, int kIsa, int R>
inline void term_blocks_rank(const TermJob& job, const float* coef, int64_t begin, int64_t end) {
    int64_t b = begin;
    for (; b + 1 < end; b += 2) {
        float x_v[2 * kRows][R];
        left_factors<Format, kIsa, R, 2 * kRows>(job, b * kRows, x_v);
        add_block<Format, kIsa, R>(job, coef, b, x_v);
        add_block<Format, kIsa, R>(job, coef, b + 1, x_v + kRows);
    }
    if (b < end) {
        float x_v[kRows][R];
        left_factors<Format, kIsa, R, kRows>(job, b * kRows, x_v);
        add_block<Format, kIsa, R>(job, coef, b, x_v);
    }
}

template <class Format, int kIsa>
inline void term_blocks(const TermJob& job, const float* coef, int64_t begin, int64_t end) {
    switch (job.rp) {
        case 8: term_blocks_rank<Format, kIsa, 8>(job, coef, begin, end); break;
        case 16: term_blocks_rank<Format, kIsa, 16>(job, coef, begin, end); break;
        case 24: term_blocks_rank<Format, kIsa, 24>(job, coef, begin, end); break;
        default: term_blocks_rank<Format, kIsa, 32>(job, coef, begin, end); break;
    }
}

template <int kIsa>
inline void term_range(const TermJob& job, const float* coef, int dtype, int64_t begin,
                       int64_t end) {
    switch (dtype) {
        case kFloat32: term_blocks<Float32Format, kIsa>(job, coef, begin, end); break;
        case kBFloat16: term_blocks<BFloat16Format, kIsa>(job, coef, begin, end); break;
        default: term_blocks<Float16Format, kIsa>(job, coef, begin, end); break;
    }
}

ZK_FLATTEN void term_range_generic(const TermJob& job, const float* coef, int dtype, int64_t begin,
                                   int64_t end) {
    term_range<kIsaGeneric>(job, coef, dtype, begin, end);
}

#if ZK_HAVE_AVX2_PATH
ZK_TARGET_AVX2 ZK_FLATTEN void term_range_avx2(const TermJob& job, const float* coef, int dtype,
                                               int64_t begin, int64_t end) {
    term_range<kIsaAvx2>(job, coef, dtype, begin, end);
}

ZK_TARGET_AVX512 ZK_FLATTEN void term_range_avx512(const TermJob& job, const float* coef,
                                                   int dtype, int64_t begin, int64_t end) {
    term_range<kIsaAvx512>(job, coef, dtype, begin, end);
}
#endif

// V (n x r) and U^T (r x m) in float32, r padded to rp with zeros, from factors of `dtype`.
template <class Format>
void make_factors(uintptr_t u_ptr, uintptr_t v_ptr, int64_t n, int64_t m, int64_t r, int64_t rp,
                  std::vector<float>& vt, std::vector<float>& ut) {
    using Storage = typename Format::storage;
    const auto* u = reinterpret_cast<const Storage*>(u_ptr);
    const auto* v = reinterpret_cast<const Storage*>(v_ptr);
    vt.assign(static_cast<size_t>(n * rp), 0.0f);
    ut.assign(static_cast<size_t>(rp * m), 0.0f);
    for (int64_t k = 0; k < n; ++k)
        for (int64_t p = 0; p < r; ++p) vt[k * rp + p] = Format::to_float(v[k * r + p]);
    for (int64_t j = 0; j < m; ++j)
        for (int64_t p = 0; p < r; ++p) ut[p * m + j] = Format::to_float(u[j * r + p]);
}

}  // namespace

void lowrank_linear_term(uintptr_t out_ptr, int64_t out_row_stride, uintptr_t x_ptr,
                         int64_t x_row_stride, int64_t rows, int64_t n, int64_t m, int64_t r,
                         uintptr_t u_ptr, uintptr_t v_ptr, uintptr_t coef_ptr, int dtype,
                         int num_threads) {
    if (dtype != kFloat32 && dtype != kBFloat16 && dtype != kFloat16)
        throw std::invalid_argument("lowrank_linear_term: bad dtype code");
    if (rows < 0 || n < 1 || m < 1 || r < 1 || r > kMaxRank || out_row_stride < m ||
        x_row_stride < n)
        throw std::invalid_argument("lowrank_linear_term: bad sizes or strides (r <= 32)");
    if (rows == 0) return;
    const int64_t rp = (r + kLanes - 1) / kLanes * kLanes;
    std::vector<float> vt, ut, coef(static_cast<size_t>(rp), 0.0f);
    const auto* c = reinterpret_cast<const float*>(coef_ptr);
    std::copy(c, c + r, coef.begin());
    switch (dtype) {
        case kFloat32: make_factors<Float32Format>(u_ptr, v_ptr, n, m, r, rp, vt, ut); break;
        case kBFloat16: make_factors<BFloat16Format>(u_ptr, v_ptr, n, m, r, rp, vt, ut); break;
        default: make_factors<Float16Format>(u_ptr, v_ptr, n, m, r, rp, vt, ut); break;
    }
    const TermJob job{out_ptr, x_ptr, out_row_stride, x_row_stride, rows, n, m, rp,
                      vt.data(), ut.data()};
    auto* run = &term_range_generic;
#if ZK_HAVE_AVX2_PATH
    if (use_avx2()) run = use_avx512() ? &term_range_avx512 : &term_range_avx2;
#endif
    // Threads take whole runs of row blocks; each block's rows are independent of the others.
    const int64_t blocks = (rows + kRows - 1) / kRows;
    const int64_t per_item = std::max<int64_t>(1, (16 * 1024) / std::max<int64_t>(1, m) / kRows);
    const int64_t items = (blocks + per_item - 1) / per_item;
    parallel_for_items(static_cast<size_t>(items), static_cast<uint64_t>(rows * (n + m)),
                       num_threads, [&](size_t i) {
                           const int64_t begin = static_cast<int64_t>(i) * per_item;
                           run(job, coef.data(), dtype, begin, std::min(blocks, begin + per_item));
                       });
}

}  // namespace zk
