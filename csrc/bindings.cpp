// pybind11 module zokernels._C: thin bindings over ops.h. Every kernel releases the GIL; the
// argument lists are converted to C++ vectors before that, while the GIL is still held.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "ops.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef ZOKERNELS_MACHINE
#define ZOKERNELS_MACHINE "unknown"
#endif

namespace py = pybind11;

namespace {

py::dict build_info() {
    py::dict info;
#if defined(__clang__)
    info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    info["compiler"] = std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
    info["compiler"] = std::string("msvc ") + std::to_string(_MSC_VER);
#else
    info["compiler"] = "unknown";
#endif
#ifdef _OPENMP
    info["openmp"] = true;
    info["openmp_version"] = _OPENMP;
    info["openmp_max_threads"] = omp_get_max_threads();
#else
    info["openmp"] = false;
    info["openmp_version"] = 0;
    info["openmp_max_threads"] = 1;
#endif
    info["simd"] = zk::simd_level_name();  // chosen at runtime
#if ZK_HAVE_AVX2_PATH
    info["simd_compiled"] = py::make_tuple("generic", "avx2", "avx512");  // avx512: the term
#else
    info["simd_compiled"] = py::make_tuple("generic");
#endif
#if defined(__AVX2__)
    info["baseline_isa"] = "avx2";  // e.g. ZOKERNELS_NATIVE=1 (-march=native)
#elif defined(__x86_64__)
    info["baseline_isa"] = "x86-64";
#elif defined(__aarch64__)
    info["baseline_isa"] = "aarch64";
#else
    info["baseline_isa"] = "unknown";
#endif
    info["machine"] = ZOKERNELS_MACHINE;
    return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "zokernels C++ CPU backend (Philox4x32-10 noise kernels; no libtorch)";
    using release_gil = py::call_guard<py::gil_scoped_release>;

    m.def("philox",
          [](uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
              const auto w = zk::philox_words(seed, c0, c1, c2, c3);
              return py::make_tuple(w[0], w[1], w[2], w[3]);
          },
          py::arg("seed"), py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"),
          "Philox4x32-10 words of one counter (known-answer tests).");
    m.def("philox_fill", &zk::philox_fill, release_gil(), py::arg("seed"), py::arg("c_ptr"),
          py::arg("out_ptr"), py::arg("n"), py::arg("num_threads"),
          "out[n, 4] = philox(seed, c[n, 4]); both int64 arrays holding uint32 values.");
    m.def("noise", &zk::noise, release_gil(), py::arg("out_ptr"), py::arg("numel"), py::arg("seed"),
          py::arg("key"), py::arg("offset"), py::arg("dist"), py::arg("num_threads"),
          py::arg("contract") = 2,
          "out[j] = z(seed, key, offset + j), float32; dist 0 gaussian, 1 rademacher, 2 uniform; "
          "contract 1 or 2: the version of the gaussian normals.");
    m.def("normal_pairs_v2", &zk::normal_pairs_v2, release_gil(), py::arg("w_radius_ptr"),
          py::arg("w_angle_ptr"), py::arg("out_ptr"), py::arg("n"),
          "out[n, 2] = contract v2 Box-Muller (n_cos, n_sin) of uint32 words w_radius[n], "
          "w_angle[n] (tests on chosen words).");
    m.def("perturb", &zk::perturb, release_gil(), py::arg("ptrs"), py::arg("numels"),
          py::arg("keys"), py::arg("decays"), py::arg("dtype"), py::arg("seeds"), py::arg("scales"),
          py::arg("applied"), py::arg("dist"), py::arg("rounding"), py::arg("rounding_seed"),
          py::arg("num_threads"),
          py::arg("log_index_ptr") = 0, py::arg("log_values_ptr") = 0, py::arg("log_capacity") = 0,
          py::arg("log_count_ptr") = 0, py::arg("log_mode") = 0,
          py::arg("index_offsets") = std::vector<uint64_t>{},
          py::arg("index_local_spans") = std::vector<uint64_t>{},
          py::arg("index_global_spans") = std::vector<uint64_t>{}, py::arg("contract") = 2,
          py::arg("selector_out") = std::vector<uint64_t>{},
          py::arg("selector_in") = std::vector<uint64_t>{},
          py::arg("source_ptrs") = std::vector<uintptr_t>{},
          "In place: t = round(decay * t + sum_k scale_k * z(seed_k, key, g(i))); applied (empty "
          "or one per seed): the perturbation t holds now, undone first. log_mode 1: append the "
          "elements recovery could not give back to the undo log (index, values, capacity, "
          "count; local indices); 2: only add their number to count, writing nothing else. "
          "index_*: empty, or one per tensor, g(i) = offset + (i // local_span) * global_span + "
          "i % local_span (a shard of a bigger tensor); empty: g(i) = i. selector_out (regions, "
          "words, pool, capacity, count, count_only) / selector_in (regions, words, pool, "
          "capacity): the selector log this pass writes / reads to recover exactly "
          "(docs/undo-log.md). source_ptrs (empty, or one per tensor, without applied or logs): "
          "t = round(decay * s + ...) reads source s instead of t.");
    m.def("scatter_perturb", &zk::scatter_perturb, release_gil(), py::arg("ptrs"), py::arg("numels"),
          py::arg("keys"), py::arg("decays"), py::arg("dtype"), py::arg("index_ptr"),
          py::arg("values_ptr"), py::arg("capacity"), py::arg("count_ptr"), py::arg("seeds"),
          py::arg("scales"), py::arg("dist"), py::arg("rounding"), py::arg("rounding_seed"),
          py::arg("num_threads"), py::arg("index_offsets") = std::vector<uint64_t>{},
          py::arg("index_local_spans") = std::vector<uint64_t>{},
          py::arg("index_global_spans") = std::vector<uint64_t>{}, py::arg("contract") = 2,
          "Undo-log entries e < min(count, capacity): t[index[e]] = values[e] (no seeds), else "
          "round(decay * values[e] + sum_k scale_k * z(seed_k, key, g(i))) as perturb would; "
          "index_*: the index maps of perturb, the log's indices are local.");
    m.def("lowrank_perturb", &zk::lowrank_perturb, release_gil(), py::arg("w_ptrs"), py::arg("ms"),
          py::arg("ns"), py::arg("ranks"), py::arg("u_ptrs"), py::arg("v_ptrs"),
          py::arg("tau_ptrs"), py::arg("decays"), py::arg("scale"), py::arg("keys"),
          py::arg("dtype"), py::arg("rounding"), py::arg("rounding_seed"), py::arg("num_threads"),
          py::arg("applied_tau_ptrs") = std::vector<uintptr_t>{}, py::arg("applied_scale") = 0.0f,
          py::arg("log_index_ptr") = 0, py::arg("log_values_ptr") = 0, py::arg("log_capacity") = 0,
          py::arg("log_count_ptr") = 0, py::arg("log_mode") = 0,
          py::arg("selector_out") = std::vector<uint64_t>{},
          py::arg("selector_in") = std::vector<uint64_t>{},
          py::arg("factor_seed") = 0, py::arg("u_offsets") = std::vector<uint64_t>{},
          py::arg("v_offsets") = std::vector<uint64_t>{}, py::arg("factor_contract") = 0,
          "In place: W = round(decay * theta + scale * U diag(tau) V^T); theta = W, or with "
          "applied_tau_ptrs the weight recovered from round(theta + applied_scale * U diag(applied "
          "tau) V^T). log_mode 1: append the elements recovery could not give back to the undo "
          "log (index, values, capacity, count); 2: only add their number to count. "
          "selector_out / selector_in: the selector logs of perturb, over the weights' flat "
          "indices in list order (docs/undo-log.md). A weight with u_ptr = v_ptr = 0 draws its "
          "factors from noise(factor_seed, key) at u_offsets / v_offsets (normals of "
          "factor_contract).");
    m.def("lowrank_scatter", &zk::lowrank_scatter, release_gil(), py::arg("w_ptrs"), py::arg("ms"),
          py::arg("ns"), py::arg("ranks"), py::arg("u_ptrs"), py::arg("v_ptrs"),
          py::arg("tau_ptrs"), py::arg("decays"), py::arg("scale"), py::arg("keys"),
          py::arg("dtype"), py::arg("index_ptr"), py::arg("values_ptr"), py::arg("capacity"),
          py::arg("count_ptr"), py::arg("rounding"), py::arg("rounding_seed"),
          py::arg("num_threads"),
          "Low-rank undo-log entries e < min(count, capacity): W[index[e]] = values[e] (no taus), "
          "else round(decay * values[e] + scale * (U diag(tau) V^T)[row, col]) as lowrank_perturb "
          "would.");
    m.def("lowrank_linear_term", &zk::lowrank_linear_term, release_gil(), py::arg("out_ptr"),
          py::arg("out_row_stride"), py::arg("x_ptr"), py::arg("x_row_stride"), py::arg("rows"),
          py::arg("n"), py::arg("m"), py::arg("r"), py::arg("u_ptr"), py::arg("v_ptr"),
          py::arg("coef_ptr"), py::arg("dtype"), py::arg("num_threads"),
          "out += ((x V) diag(coef)) U^T in float32, out rounded once: TeZO's virtual-probe term "
          "for an nn.Linear. U (m x r), V (n x r) contiguous of out's dtype, coef float32.");
    m.def("build_info", &build_info, "Compiler, OpenMP, SIMD level chosen at runtime, machine.");
}
