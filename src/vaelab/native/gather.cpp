// A step's gradient written into the flat buffer and its squared Euclidean norm, in one pass
// (vaelab.engines.write_gradient; training.clip_norm_ takes the norm from here instead of a second pass over the
// buffer).
//
// The parameters' gradients (k float32 arrays, as autograd hands them back) lie one after the other in the buffer
// (training.FlatParameters). The buffer is cut into blocks of kBlock numbers; each block copies the parts of the
// gradients that fall into it and sums their squares, ‖g‖² = Σᵢ gᵢ², in kLanes double lanes (a square of a float32
// is exact in double; each lane adds kBlock / kLanes of them), and the blocks' sums are added in block order after
// the parallel loop: the same bits for any number of threads. Built by vaelab.native with the machine's C++
// compiler; no torch headers.

#include <cstdint>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int64_t kBlock = 1 << 14;          // numbers per block: 64 KiB of float32, within the core's L2
constexpr int kLanes = 8;                    // one AVX-512 vector of doubles

// out[0, n) = in[0, n), returning Σ in² (double lanes, added in a fixed order)
inline double copy_squares(const float* __restrict__ in, float* __restrict__ out, int64_t n) {
    double lanes[kLanes] = {0};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
        for (int l = 0; l < kLanes; ++l) {
            const float v = in[i + l];
            out[i + l] = v;
            lanes[l] += static_cast<double>(v) * v;
        }
    double total = 0.0;
    for (; i < n; ++i) {
        out[i] = in[i];
        total += static_cast<double>(in[i]) * in[i];
    }
    for (int l = 0; l < kLanes; ++l) total += lanes[l];
    return total;
}

}  // namespace

extern "C" {

// out[offsetⱼ, offsetⱼ + sizesⱼ) = partsⱼ for j < k, offsets the running sums of sizes (out holds Σ sizes numbers);
// returns Σ out². threads: at most this many OpenMP threads.
double gather_squares_f32(const float* const* parts, const int64_t* sizes, int64_t k, float* out, int threads) {
    std::vector<int64_t> offsets(k + 1, 0);
    for (int64_t j = 0; j < k; ++j) offsets[j + 1] = offsets[j] + sizes[j];
    const int64_t n = offsets[k];
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    std::vector<double> partial(blocks, 0.0);
#ifdef _OPENMP
    const bool parallel = threads > 1 && n >= 4 * kBlock;
#pragma omp parallel for num_threads(threads) schedule(static) if (parallel)
#endif
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t start = b * kBlock, end = start + kBlock < n ? start + kBlock : n;
        // the first part reaching into the block: offsets[j] ≤ start < offsets[j + 1]
        int64_t lo = 0, hi = k;
        while (hi - lo > 1) {
            const int64_t mid = (lo + hi) / 2;
            (offsets[mid] <= start ? lo : hi) = mid;
        }
        double total = 0.0;
        for (int64_t j = lo, at = start; at < end; ++j) {
            const int64_t stop = offsets[j + 1] < end ? offsets[j + 1] : end;
            if (stop > at) total += copy_squares(parts[j] + (at - offsets[j]), out + at, stop - at);
            at = stop > at ? stop : at;
        }
        partial[b] = total;
    }
    double total = 0.0;
    for (int64_t b = 0; b < blocks; ++b) total += partial[b];
    return total;
}

}  // extern "C"
