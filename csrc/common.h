// Shared macros and tiny helpers for the CPU kernels (plain C++17, no libtorch).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(_MSC_VER) && !defined(__clang__)
#define ZK_INLINE __forceinline
#define ZK_FLATTEN
#define ZK_RESTRICT __restrict
#else
// Scalar helpers are written so that, once inlined into a loop, the compiler vectorizes the loop.
#define ZK_INLINE inline __attribute__((always_inline))
// A kernel entry point marked flatten gets every helper inlined into it, so all of its loops are
// compiled (and vectorized) with the entry point's target ISA: this is how one template body
// yields both the AVX2 and the generic version.
#define ZK_FLATTEN __attribute__((flatten))
#define ZK_RESTRICT __restrict__
#endif

// The AVX2 path exists on x86-64 with GCC/clang; elsewhere (aarch64, MSVC) only the generic path
// is built, which the compiler still vectorizes for its baseline ISA (SSE2, NEON).
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define ZK_HAVE_AVX2_PATH 1
#define ZK_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define ZK_TARGET_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))
#else
#define ZK_HAVE_AVX2_PATH 0
#endif

namespace zk {

// Type punning through memcpy: well defined, and vectorizable inside loops.
template <class To, class From>
ZK_INLINE To bits_as(From value) {
    static_assert(sizeof(To) == sizeof(From), "bits_as needs equal sizes");
    To out;
    std::memcpy(&out, &value, sizeof(To));
    return out;
}

template <class T>
ZK_INLINE T min_of(T a, T b) { return b < a ? b : a; }

// Runtime SIMD choice (simd.cpp): AVX2 when the CPU and OS support it, unless the environment
// variable ZOKERNELS_CPU_SIMD=generic forces the portable path (used by tests to compare both);
// the Linear term (lowrank_term.cpp) also has an AVX-512 build, used where the CPU has it unless
// ZOKERNELS_CPU_SIMD is avx2 or generic.
bool use_avx2();
bool use_avx512();
const char* simd_level_name();

}  // namespace zk
