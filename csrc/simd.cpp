// Runtime selection between the AVX2 and the generic kernels.
#include <cstdlib>
#include <cstring>

#include "common.h"

namespace zk {

static bool detect_avx2() {
#if ZK_HAVE_AVX2_PATH
    const char* forced = std::getenv("ZOKERNELS_CPU_SIMD");
    if (forced != nullptr && std::strcmp(forced, "generic") == 0) return false;
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
    // ZOKERNELS_CPU_SIMD=avx2 (or generic) keeps the AVX-512 term kernel out; other values, as
    // for detect_avx2, mean the default
    const char* forced = std::getenv("ZOKERNELS_CPU_SIMD");
    if (forced != nullptr &&
        (std::strcmp(forced, "avx2") == 0 || std::strcmp(forced, "generic") == 0))
        return false;
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
