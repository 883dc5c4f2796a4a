// The planar flow's two sequential recursions (vaelab.models.flows.PlanarSteps), as native loops.
//
// For every draw, with M[t][r] = ûₜᵀwᵣ of its digit's flow (N digits, R draws each, T steps):
//
//   forward   aₜ = tanh(sₜ),  then  sᵣ += M[t][r] aₜ  for r > t        (s in: wₜᵀz₀ + bₜ; a out)
//   backward  pₜ = (Dₜ + Σ_{r>t} M[t][r] pᵣ)(1 − aₜ²)  from t = T − 1 down    (D in; p = ∂L/∂s out)
//
// The tensors are step-major, (T, N, R) contiguous; M is (N, T, T) contiguous. A tile of J ≤ 64 draws of one
// digit is copied into a (T, J) buffer that stays in L1 (80 × 64 floats = 20 KB), the T steps run over it, and the
// result is written back: the loops over the tile's draws are what the compiler vectorises. With one draw per
// digit (training) the loops over the steps r are, for 8 digits at a time. Built by vaelab.native with the
// machine's C++ compiler; no torch headers.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// tanh for float32, written so that a loop of it vectorises: tanh|x| = e/(e + 2) with e = expm1(2|x|), which keeps
// full relative precision near 0 (1 − 2/(e^{2|x|} + 1) would cancel). expm1(y) = 2ᵏ(1 + p(r)) − 1 with y = k ln 2 + r,
// |r| ≤ ln 2 / 2 (ln 2 split in two so that k ln2_hi is exact), p(r) = expm1(r) by its Taylor series to r⁷
// (remainder r⁸/8! < 6e-9 · |r|/0.35, under half an ulp). |x| ≥ 9 gives 1 (tanh 9 = 1 − 3e-8 rounds to 1).
inline float tanh_of(float x) {
    float ax = std::fabs(x);
    ax = ax < 9.0f ? ax : 9.0f;
    const float y = 2.0f * ax;
    const float k = std::floor(y * 1.44269504088896341f + 0.5f);
    const float r = (y - k * 0.693359375f) - k * -2.12194440e-4f;
    const float p = r + r * r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720
                                                                                                + r * (1.0f / 5040))))));
    const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
    float two_k;
    std::memcpy(&two_k, &bits, sizeof two_k);                          // 2ᵏ, k ∈ [0, 26]
    const float e = two_k * p + (two_k - 1.0f);
    return std::copysign(e / (e + 2.0f), x);
}

inline double tanh_of(double x) { return std::tanh(x); }

constexpr int64_t kLanes = 16;   // a tile's width in the buffer is a multiple of this: whole vectors, no remainder

template <typename F>
void forward_tile(const F* __restrict__ m, const F* __restrict__ s, F* __restrict__ a, int64_t T, int64_t stride,
                  int64_t J, F* __restrict__ buf) {
    const int64_t W = (J + kLanes - 1) / kLanes * kLanes;                 // the lanes past J hold zeros
    for (int64_t t = 0; t < T; ++t) {
        std::memcpy(buf + t * W, s + t * stride, J * sizeof(F));
        std::fill(buf + t * W + J, buf + (t + 1) * W, F(0));
    }
    for (int64_t t = 0; t < T; ++t) {
        F* __restrict__ at = buf + t * W;
        for (int64_t j = 0; j < W; ++j) at[j] = tanh_of(at[j]);
        const F* __restrict__ mt = m + t * T;
        for (int64_t r = t + 1; r < T; ++r) {
            const F c = mt[r];
            F* __restrict__ sr = buf + r * W;
            for (int64_t b = 0; b < W; b += kLanes)
                for (int64_t l = 0; l < kLanes; ++l) sr[b + l] += c * at[b + l];
        }
    }
    for (int64_t t = 0; t < T; ++t) std::memcpy(a + t * stride, buf + t * W, J * sizeof(F));
}

template <typename F>
void backward_tile(const F* __restrict__ m, const F* __restrict__ a, const F* __restrict__ d, F* __restrict__ p,
                   int64_t T, int64_t stride, int64_t J, F* __restrict__ buf) {
    const int64_t W = (J + kLanes - 1) / kLanes * kLanes;
    F* __restrict__ one_minus = buf + T * W;                               // 1 − aₜ², the second half of buf
    for (int64_t t = 0; t < T; ++t) {
        std::memcpy(buf + t * W, d + t * stride, J * sizeof(F));
        std::fill(buf + t * W + J, buf + (t + 1) * W, F(0));
        for (int64_t j = 0; j < J; ++j) one_minus[t * W + j] = F(1) - a[t * stride + j] * a[t * stride + j];
        std::fill(one_minus + t * W + J, one_minus + (t + 1) * W, F(0));
    }
    for (int64_t t = T - 1; t >= 0; --t) {
        F* __restrict__ pt = buf + t * W;
        const F* __restrict__ mt = m + t * T;
        for (int64_t r = t + 1; r < T; ++r) {
            const F c = mt[r];
            const F* __restrict__ pr = buf + r * W;
            for (int64_t b = 0; b < W; b += kLanes)
                for (int64_t l = 0; l < kLanes; ++l) pt[b + l] += c * pr[b + l];
        }
        for (int64_t j = 0; j < W; ++j) pt[j] *= one_minus[t * W + j];
    }
    for (int64_t t = 0; t < T; ++t) std::memcpy(p + t * stride, buf + t * W, J * sizeof(F));
}

// One draw per digit (training): G digits at a time, each digit's T values contiguous in buf (G, T). A step's
// tanh of one digit waits for that digit's previous update; the G digits' updates are independent of each other,
// so the core overlaps them instead of waiting on one digit's chain after another's.
constexpr int64_t kGroup = 8;

template <typename F>
void forward_digits(const F* __restrict__ m, const F* __restrict__ s, F* __restrict__ a, int64_t T, int64_t N,
                    int64_t n0, int64_t G, F* __restrict__ buf) {
    for (int64_t g = 0; g < G; ++g)
        for (int64_t t = 0; t < T; ++t) buf[g * T + t] = s[t * N + n0 + g];
    F values[kGroup];
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t g = 0; g < G; ++g) values[g] = tanh_of(buf[g * T + t]);
        for (int64_t g = 0; g < G; ++g) {
            F* __restrict__ bg = buf + g * T;
            const F* __restrict__ mt = m + (n0 + g) * T * T + t * T;
            const F value = bg[t] = values[g];
            for (int64_t r = t + 1; r < T; ++r) bg[r] += mt[r] * value;
        }
    }
    for (int64_t g = 0; g < G; ++g)
        for (int64_t t = 0; t < T; ++t) a[t * N + n0 + g] = buf[g * T + t];
}

template <typename F>
void backward_digits(const F* __restrict__ m, const F* __restrict__ a, const F* __restrict__ d, F* __restrict__ p,
                     int64_t T, int64_t N, int64_t n0, int64_t G, F* __restrict__ buf) {
    for (int64_t g = 0; g < G; ++g)
        for (int64_t t = 0; t < T; ++t) buf[g * T + t] = d[t * N + n0 + g];
    for (int64_t t = T - 1; t >= 0; --t) {
        for (int64_t g = 0; g < G; ++g) {
            F* __restrict__ bg = buf + g * T;
            const F* __restrict__ mt = m + (n0 + g) * T * T + t * T;
            F sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int64_t r = t + 1; r < T; ++r) sum += mt[r] * bg[r];
            const F at = a[t * N + n0 + g];
            bg[t] = (bg[t] + sum) * (F(1) - at * at);
        }
    }
    for (int64_t g = 0; g < G; ++g)
        for (int64_t t = 0; t < T; ++t) p[t * N + n0 + g] = buf[g * T + t];
}

constexpr int64_t kTile = 64;

// Runs body(i, buf) for the work items i < items, in contiguous ranges over up to `threads` threads. Built with
// -fopenmp the library uses the process's OpenMP runtime, torch's own (the same soname, loaded by torch first):
// its threads, still spinning after torch's last parallel region, take the ranges at once, where threads started
// here would compete with them for the cores. Work below ~100 000 multiply-adds stays on the calling thread.
template <typename F, typename Body>
void over_items(int64_t items, int64_t work, int64_t buffer, int threads, Body body) {
    const int64_t count = std::max<int64_t>(1, std::min<int64_t>({threads, items, work / 100000}));
#ifdef _OPENMP
#pragma omp parallel num_threads(static_cast<int>(count)) if (count > 1)
#endif
    {
#ifdef _OPENMP
        const int64_t k = omp_get_thread_num(), used = omp_get_num_threads();
#else
        const int64_t k = 0, used = 1;
#endif
        std::vector<F> buf(buffer);
        for (int64_t i = items * k / used; i < items * (k + 1) / used; ++i) body(i, buf.data());
    }
}

// The work items: groups of kGroup digits where each digit has one draw, else tiles of up to kTile draws of one
// digit (N × ⌈R/kTile⌉ of them).
template <typename F>
void forward(const F* m, const F* s, F* a, int64_t T, int64_t N, int64_t R, int threads) {
    if (R == 1) {
        over_items<F>((N + kGroup - 1) / kGroup, N * T * T, kGroup * T, threads, [&](int64_t i, F* buf) {
            forward_digits(m, s, a, T, N, i * kGroup, std::min(kGroup, N - i * kGroup), buf);
        });
        return;
    }
    const int64_t per_digit = (R + kTile - 1) / kTile, width = (std::min(R, kTile) + kLanes - 1) / kLanes * kLanes;
    over_items<F>(N * per_digit, N * R * T * T, 2 * T * width, threads, [&](int64_t i, F* buf) {
        const int64_t n = i / per_digit, r0 = (i % per_digit) * kTile, offset = n * R + r0;
        forward_tile(m + n * T * T, s + offset, a + offset, T, N * R, std::min(kTile, R - r0), buf);
    });
}

template <typename F>
void backward(const F* m, const F* a, const F* d, F* p, int64_t T, int64_t N, int64_t R, int threads) {
    if (R == 1) {
        over_items<F>((N + kGroup - 1) / kGroup, N * T * T, kGroup * T, threads, [&](int64_t i, F* buf) {
            backward_digits(m, a, d, p, T, N, i * kGroup, std::min(kGroup, N - i * kGroup), buf);
        });
        return;
    }
    const int64_t per_digit = (R + kTile - 1) / kTile, width = (std::min(R, kTile) + kLanes - 1) / kLanes * kLanes;
    over_items<F>(N * per_digit, N * R * T * T, 2 * T * width, threads, [&](int64_t i, F* buf) {
        const int64_t n = i / per_digit, r0 = (i % per_digit) * kTile, offset = n * R + r0;
        backward_tile(m + n * T * T, a + offset, d + offset, p + offset, T, N * R, std::min(kTile, R - r0), buf);
    });
}

}  // namespace

extern "C" {
void planar_forward_f32(const float* m, const float* s, float* a, int64_t T, int64_t N, int64_t R, int threads) {
    forward(m, s, a, T, N, R, threads);
}
void planar_forward_f64(const double* m, const double* s, double* a, int64_t T, int64_t N, int64_t R, int threads) {
    forward(m, s, a, T, N, R, threads);
}
void planar_backward_f32(const float* m, const float* a, const float* d, float* p, int64_t T, int64_t N, int64_t R,
                         int threads) {
    backward(m, a, d, p, T, N, R, threads);
}
void planar_backward_f64(const double* m, const double* a, const double* d, double* p, int64_t T, int64_t N,
                         int64_t R, int threads) {
    backward(m, a, d, p, T, N, R, threads);
}
}
