// Raw Philox words, for known-answer tests and cross-backend checks of the counter layout.
#include "ops.h"
#include "philox.h"
#include "work_items.h"

namespace zk {

std::array<uint32_t, 4> philox_words(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2,
                                     uint32_t c3) {
    const uint32_t counter[4] = {c0, c1, c2, c3};
    std::array<uint32_t, 4> words{};
    philox4x32_10(seed, counter, words.data());
    return words;
}

void philox_fill(uint64_t seed, uintptr_t counters_ptr, uintptr_t out_ptr, uint64_t n,
                 int num_threads) {
    const auto* counters = reinterpret_cast<const int64_t*>(counters_ptr);
    auto* out = reinterpret_cast<int64_t*>(out_ptr);
    const PhiloxKeys keys(seed);
    // Arbitrary counters (not consecutive), so the scalar form; this op only serves tests.
    constexpr uint64_t kRowsPerItem = 16 * 1024;
    const uint64_t n_items = (n + kRowsPerItem - 1) / kRowsPerItem;
    parallel_for_items(n_items, n * 8, num_threads, [&](size_t item) {
        const uint64_t end = min_of<uint64_t>(n, (item + 1) * kRowsPerItem);
        for (uint64_t row = item * kRowsPerItem; row < end; ++row) {
            const int64_t* c = counters + 4 * row;
            uint32_t x0 = static_cast<uint32_t>(c[0]), x1 = static_cast<uint32_t>(c[1]);
            uint32_t x2 = static_cast<uint32_t>(c[2]), x3 = static_cast<uint32_t>(c[3]);
            philox_rounds(keys, x0, x1, x2, x3);
            int64_t* w = out + 4 * row;
            w[0] = x0;
            w[1] = x1;
            w[2] = x2;
            w[3] = x3;
        }
    });
}

}  // namespace zk
