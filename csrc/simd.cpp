// Runtime selection between the AVX2 and the generic kernels.
#include <cstdlib>
#include <cstring>

#include "common.h"

namespace zk {

// The highest level ZOKERNELS_CPU_SIMD allows: "generic" keeps every SIMD kernel out, "avx2"
// the AVX-512 ones; unset or any other value leaves the choice to the CPU check.
enum SimdCap { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

static SimdCap simd_cap_from_env() {
    const char* forced = std::getenv("ZOKERNELS_CPU_SIMD");
    if (forced == nullptr) return kAvx512;
    if (std::strcmp(forced, "generic") == 0) return kGeneric;
    if (std::strcmp(forced, "avx2") == 0) return kAvx2;
    return kAvx512;
}

static bool detect_avx2() {
#if ZK_HAVE_AVX2_PATH
    if (simd_cap_from_env() < kAvx2) return false;
    // libgcc's check also verifies that the OS saves the YMM state (XGETBV).
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
#else
    return false;
#endif
}

static bool detect_avx512() {
#if ZK_HAVE_AVX2_PATH
    if (simd_cap_from_env() < kAvx512) return false;
    __builtin_cpu_init();  // as above, with the OS saving the ZMM state
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
    return false;
#endif
}

bool use_avx512() {
    static const bool avx512 = use_avx2() && detect_avx512();
    return avx512;
}

bool use_avx2() {
    static const bool avx2 = detect_avx2();  // thread-safe one-time init (C++11 statics)
    return avx2;
}

const char* simd_level_name() {
    return use_avx512() ? "avx512" : use_avx2() ? "avx2" : "generic";
}

}  // namespace zk
