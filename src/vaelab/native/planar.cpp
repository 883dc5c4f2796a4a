// The planar flow's two sequential recursions (vaelab.models.flows.PlanarSteps) and its log-determinant, as native
// loops.
//
// For every draw, with M[t][r] = ûₜᵀwᵣ and cₜ = wₜᵀûₜ of its digit's flow (N digits, R draws each, T steps):
//
//   forward   aₜ = tanh(sₜ),  then  sᵣ += M[t][r] aₜ  for r > t        (s in: wₜᵀz₀ + bₜ; a out)
//             Σₜ log(1 + (1 − aₜ²) cₜ)                                  (the log-determinant, out)
//   backward  pₜ = (Dₜ + Σ_{r>t} M[t][r] pᵣ)(1 − aₜ²)  from t = T − 1 down    (D in; p = ∂L/∂s out)
//
// The tensors are (N, T, R) contiguous, each digit's (T, R) block what the batched products around the recursion
// read and write without a copy; M is (N, T, T), c (N, T), the log-determinant (N, R). A tile of J ≤ 64 draws of one
// digit is copied into a (T, J) buffer that stays in L1 (80 × 64 floats = 20 KB), the T steps run over it, and the
// result is written back: the loops over the tile's draws are what the compiler vectorises. The forward takes the
// steps in blocks of 8: within a block one after another, then the block's 8 values of aₜ go into every later
// step's pre-activation at once, held in registers, 8 multiply-adds per load and store of sᵣ instead of one, added
// in the order of t as step by step. With one draw per digit (training) the loops over the steps r are vectorised,
// for 8 digits at a time. Built by vaelab.native with the machine's C++ compiler; no torch headers.

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

// The log-determinant Σₜ log(1 + xₜ), xₜ = (1 − aₜ²)cₜ, one running value per draw, added to step by step
// (``add``) and read at the end (``value``). In float32 as log Πₜ(1 + xₜ): each factor 1 + xₜ one fused multiply-add,
// the product kept as m · 2^E with m ∈ [1, 2) (E an integer; renormalised after every factor, by its bits, so that
// no product of 80 factors over- or underflows), and one log per draw at the end, in double: a vectorised
// multiply and a few integer operations per step instead of a log. Each factor and each product is rounded once,
// |log(1 ± 2⁻²⁴)| < 6e-8 each: at most 2T · 6e-8 from the exact value (1e-5 for 80 steps; over 800 draws of 80
// random steps, |Σ| up to 22, at most 4.2e-6, where float32's own Σ log1p was off by up to 2.9e-6). A factor 0
// (c = −1, a = 0) gives −inf, an infinite one +inf, NaN stays NaN. In float64 (gradients checked in tests) the
// sum of log1p.
template <typename F> struct LogDet;

template <> struct LogDet<float> {
    static constexpr float kStart = 1.0f;
    static void add(float& product, int32_t& exponent, float one_minus, float c) {
        const float q = product * std::fma(one_minus, c, 1.0f);
        int32_t bits;
        std::memcpy(&bits, &q, sizeof bits);
        const int32_t mantissa = (bits & 0x007fffff) | 0x3f800000;        // q / 2^⌊log₂ q⌋ ∈ [1, 2), for q normal
        float reduced;
        std::memcpy(&reduced, &mantissa, sizeof reduced);
        const bool finite = q > 0.0f && q < INFINITY;                      // 0, inf and NaN stay as they are
        product = finite ? reduced : q;
        exponent += finite ? (bits >> 23) - 127 : 0;
    }
    static float value(float product, int32_t exponent) {
        return static_cast<float>(exponent * 0.69314718055994530942 + std::log(static_cast<double>(product)));
    }
};

template <> struct LogDet<double> {
    static constexpr double kStart = 0.0;
    static void add(double& total, int32_t&, double one_minus, double c) { total += std::log1p(one_minus * c); }
    static double value(double total, int32_t) { return total; }
};

constexpr int64_t kLanes = 16;   // a tile's width in the buffer is a multiple of this: whole vectors, no remainder
constexpr int64_t kTile = 64;    // draws per tile (a multiple of kLanes)
constexpr int64_t kBlock = 8;    // the forward's steps per block

// A vector the block update holds in registers: AVX-512's width, else AVX's (8 of them and an accumulator fit in
// the 16 registers AVX2 has)
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#else
constexpr int kVectorBytes = 32;
#endif
typedef float FloatVector __attribute__((vector_size(kVectorBytes)));
typedef double DoubleVector __attribute__((vector_size(kVectorBytes)));
template <typename F> struct VectorOf;
template <> struct VectorOf<float> { using type = FloatVector; };
template <> struct VectorOf<double> { using type = DoubleVector; };

// sᵣ += Σ_{t0 ≤ t < t0 + 8} M[t][r] aₜ for every later step r ≥ t0 + 8, over the buffer's (T, W) rows: each vector of
// sᵣ loaded once, the 8 terms added in the order of t (one multiply-add each, as step by step), stored once
template <typename F>
void block_update(F* __restrict__ buf, const F* __restrict__ m, int64_t T, int64_t W, int64_t t0) {
    using V = typename VectorOf<F>::type;
    constexpr int64_t L = kVectorBytes / sizeof(F);
    for (int64_t b = 0; b < W; b += L) {
        V a[kBlock];
        for (int64_t k = 0; k < kBlock; ++k) std::memcpy(&a[k], buf + (t0 + k) * W + b, sizeof(V));
        for (int64_t r = t0 + kBlock; r < T; ++r) {
            const F* __restrict__ column = m + t0 * T + r;                             // M[t0 + k][r] at k · T
            V s;
            std::memcpy(&s, buf + r * W + b, sizeof(V));
            for (int64_t k = 0; k < kBlock; ++k) s += column[k * T] * a[k];
            std::memcpy(buf + r * W + b, &s, sizeof(V));
        }
    }
}

// J draws of one digit: s, a with `stride` between steps (R), M (T, T) and c (T,) of the digit, log_det (J,)
template <typename F>
void forward_tile(const F* __restrict__ m, const F* __restrict__ c, const F* __restrict__ s, F* __restrict__ a,
                  F* __restrict__ log_det, int64_t T, int64_t stride, int64_t J, F* __restrict__ buf) {
    const int64_t W = (J + kLanes - 1) / kLanes * kLanes;                 // the lanes past J hold zeros
    for (int64_t t = 0; t < T; ++t) {
        std::memcpy(buf + t * W, s + t * stride, J * sizeof(F));
        std::fill(buf + t * W + J, buf + (t + 1) * W, F(0));
    }
    F running[kTile];                                                     // the log-determinants (LogDet)
    int32_t exponent[kTile];
    std::fill(running, running + W, LogDet<F>::kStart);
    std::fill(exponent, exponent + W, 0);
    for (int64_t t0 = 0; t0 < T; t0 += kBlock) {
        const int64_t t1 = std::min(t0 + kBlock, T);
        for (int64_t t = t0; t < t1; ++t) {
            F* __restrict__ at = buf + t * W;
            const F ct = c[t];
            for (int64_t j = 0; j < W; ++j) {
                const F value = at[j] = tanh_of(at[j]);
                LogDet<F>::add(running[j], exponent[j], F(1) - value * value, ct);
            }
            const F* __restrict__ mt = m + t * T;
            for (int64_t r = t + 1; r < t1; ++r) {                       // the later steps of this block
                const F coefficient = mt[r];
                F* __restrict__ sr = buf + r * W;
                for (int64_t b = 0; b < W; b += kLanes)
                    for (int64_t l = 0; l < kLanes; ++l) sr[b + l] += coefficient * at[b + l];
            }
        }
        if (t1 - t0 == kBlock) block_update(buf, m, T, W, t0);          // a shorter block is the last: no steps after
    }
    for (int64_t t = 0; t < T; ++t) std::memcpy(a + t * stride, buf + t * W, J * sizeof(F));
    for (int64_t j = 0; j < J; ++j) log_det[j] = LogDet<F>::value(running[j], exponent[j]);
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
            const F coefficient = mt[r];
            const F* __restrict__ pr = buf + r * W;
            for (int64_t b = 0; b < W; b += kLanes)
                for (int64_t l = 0; l < kLanes; ++l) pt[b + l] += coefficient * pr[b + l];
        }
        for (int64_t j = 0; j < W; ++j) pt[j] *= one_minus[t * W + j];
    }
    for (int64_t t = 0; t < T; ++t) std::memcpy(p + t * stride, buf + t * W, J * sizeof(F));
}

// One draw per digit (training): G digits at a time, each digit's T values contiguous (in the tensors and in buf
// (G, T)). A step's tanh of one digit waits for that digit's previous update; the G digits' updates are independent
// of each other, so the core overlaps them instead of waiting on one digit's chain after another's.
constexpr int64_t kGroup = 8;

template <typename F>
void forward_digits(const F* __restrict__ m, const F* __restrict__ c, const F* __restrict__ s, F* __restrict__ a,
                    F* __restrict__ log_det, int64_t T, int64_t n0, int64_t G, F* __restrict__ buf) {
    std::memcpy(buf, s + n0 * T, G * T * sizeof(F));
    F values[kGroup], running[kGroup];
    int32_t exponent[kGroup] = {};
    std::fill(running, running + kGroup, LogDet<F>::kStart);
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t g = 0; g < G; ++g) {
            const F value = values[g] = tanh_of(buf[g * T + t]);
            LogDet<F>::add(running[g], exponent[g], F(1) - value * value, c[(n0 + g) * T + t]);
        }
        for (int64_t g = 0; g < G; ++g) {
            F* __restrict__ bg = buf + g * T;
            const F* __restrict__ mt = m + (n0 + g) * T * T + t * T;
            const F value = bg[t] = values[g];
            for (int64_t r = t + 1; r < T; ++r) bg[r] += mt[r] * value;
        }
    }
    std::memcpy(a + n0 * T, buf, G * T * sizeof(F));
    for (int64_t g = 0; g < G; ++g) log_det[n0 + g] = LogDet<F>::value(running[g], exponent[g]);
}

template <typename F>
void backward_digits(const F* __restrict__ m, const F* __restrict__ a, const F* __restrict__ d, F* __restrict__ p,
                     int64_t T, int64_t n0, int64_t G, F* __restrict__ buf) {
    std::memcpy(buf, d + n0 * T, G * T * sizeof(F));
    for (int64_t t = T - 1; t >= 0; --t) {
        for (int64_t g = 0; g < G; ++g) {
            F* __restrict__ bg = buf + g * T;
            const F* __restrict__ mt = m + (n0 + g) * T * T + t * T;
            F sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int64_t r = t + 1; r < T; ++r) sum += mt[r] * bg[r];
            const F at = a[(n0 + g) * T + t];
            bg[t] = (bg[t] + sum) * (F(1) - at * at);
        }
    }
    std::memcpy(p + n0 * T, buf, G * T * sizeof(F));
}

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
void forward(const F* m, const F* c, const F* s, F* a, F* log_det, int64_t T, int64_t N, int64_t R, int threads) {
    if (R == 1) {
        over_items<F>((N + kGroup - 1) / kGroup, N * T * T, kGroup * T, threads, [&](int64_t i, F* buf) {
            forward_digits(m, c, s, a, log_det, T, i * kGroup, std::min(kGroup, N - i * kGroup), buf);
        });
        return;
    }
    const int64_t per_digit = (R + kTile - 1) / kTile, width = (std::min(R, kTile) + kLanes - 1) / kLanes * kLanes;
    over_items<F>(N * per_digit, N * R * T * T, T * width, threads, [&](int64_t i, F* buf) {
        const int64_t n = i / per_digit, r0 = (i % per_digit) * kTile, offset = n * T * R + r0;
        forward_tile(m + n * T * T, c + n * T, s + offset, a + offset, log_det + n * R + r0, T, R,
                     std::min(kTile, R - r0), buf);
    });
}

template <typename F>
void backward(const F* m, const F* a, const F* d, F* p, int64_t T, int64_t N, int64_t R, int threads) {
    if (R == 1) {
        over_items<F>((N + kGroup - 1) / kGroup, N * T * T, kGroup * T, threads, [&](int64_t i, F* buf) {
            backward_digits(m, a, d, p, T, i * kGroup, std::min(kGroup, N - i * kGroup), buf);
        });
        return;
    }
    const int64_t per_digit = (R + kTile - 1) / kTile, width = (std::min(R, kTile) + kLanes - 1) / kLanes * kLanes;
    over_items<F>(N * per_digit, N * R * T * T, 2 * T * width, threads, [&](int64_t i, F* buf) {
        const int64_t n = i / per_digit, r0 = (i % per_digit) * kTile, offset = n * T * R + r0;
        backward_tile(m + n * T * T, a + offset, d + offset, p + offset, T, R, std::min(kTile, R - r0), buf);
    });
}

}  // namespace

extern "C" {
// s, a (N, T, R); m (N, T, T); c (N, T); log_det (N, R)
void planar_forward_f32(const float* m, const float* c, const float* s, float* a, float* log_det, int64_t T, int64_t N,
                        int64_t R, int threads) {
    forward(m, c, s, a, log_det, T, N, R, threads);
}
void planar_forward_f64(const double* m, const double* c, const double* s, double* a, double* log_det, int64_t T,
                        int64_t N, int64_t R, int threads) {
    forward(m, c, s, a, log_det, T, N, R, threads);
}
// a, d, p (N, T, R); m (N, T, T)
void planar_backward_f32(const float* m, const float* a, const float* d, float* p, int64_t T, int64_t N, int64_t R,
                         int threads) {
    backward(m, a, d, p, T, N, R, threads);
}
void planar_backward_f64(const double* m, const double* a, const double* d, double* p, int64_t T, int64_t N,
                         int64_t R, int threads) {
    backward(m, a, d, p, T, N, R, threads);
}
}
