// The planar flow's two sequential recursions (vaelab.models.flows.PlanarSteps) and its log-determinant, as native
// loops.
//
// For every draw, with M[t][r] = ûₜᵀwᵣ and cₜ = wₜᵀûₜ of its digit's flow (N digits, R draws each, T steps):
//
//   forward   aₜ = tanh(sₜ),  then  sᵣ += M[t][r] aₜ  for r > t        (s in: wₜᵀz₀ + bₜ; a out)
//             Σₜ log(1 + (1 − aₜ²) cₜ)                                  (the log-determinant, out)
//   backward  Dₜ = ûₜᵀg − 2ℓaₜcₜ/(1 + (1 − aₜ²)cₜ)  and  ∂L/∂cₜ = Σ_draws ℓ(1 − aₜ²)/(1 + (1 − aₜ²)cₜ)
//             (ûₜᵀg in, ℓ = ∂L/∂log-det per draw in, where there is one), then
//             pₜ = (Dₜ + Σ_{r>t} M[t][r] pᵣ)(1 − aₜ²)  from t = T − 1 down    (p = ∂L/∂s out)
//
// and, per step of every digit (no recursion, one pass each over the steps' parameters [u, w, b]): û, c and κ
// from them (``quantities``), and the chain rule from ∂L/∂û, ∂L/∂w (direct), ∂L/∂c and p back to ∂L/∂[u, w, b]
// (``parameter_gradient``): what PyTorch ran as about thirty small passes over (N, T, d).
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

// e^y = 2ᵏ(1 + p) for float32 y ∈ [−87, 18], written so that a loop of it vectorises: y = k ln 2 + r, |r| ≤ ln 2 / 2
// (ln 2 split in two so that k ln2_hi is exact), p = expm1(r) by its Taylor series to r⁷ (remainder r⁸/8! < 6e-9 ·
// |r|/0.35, under half an ulp); 2ᵏ (a normal number for these y) into two_k, p returned.
inline float exp_parts(float y, float& two_k) {
    const float k = std::floor(y * 1.44269504088896341f + 0.5f);
    const float r = (y - k * 0.693359375f) - k * -2.12194440e-4f;
    const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
    std::memcpy(&two_k, &bits, sizeof two_k);
    return r + r * r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720 + r * (1.0f / 5040))))));
}

// tanh for float32, vectorisable: tanh|x| = e/(e + 2) with e = expm1(2|x|) = 2ᵏ p + (2ᵏ − 1) (exp_parts), which keeps
// full relative precision near 0 (1 − 2/(e^{2|x|} + 1) would cancel). |x| ≥ 9 gives 1 (tanh 9 = 1 − 3e-8 rounds to 1);
// NaN stays NaN (it passes the clamp and every operation after it).
inline float tanh_of(float x) {
    float ax = std::fabs(x);
    ax = ax > 9.0f ? 9.0f : ax;
    float two_k;
    const float p = exp_parts(2.0f * ax, two_k);                      // 2ᵏ, k ∈ [0, 26]
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

// The direct part Dₜ from ûₜᵀg (in buf) and the log-determinant's gradient ℓ of each draw (ell, or none), and
// ∂L/∂cₜ's terms: Dₜ −= 2ℓaₜcₜ/(1 + (1 − aₜ²)cₜ), and ℓ(1 − aₜ²)/(1 + (1 − aₜ²)cₜ) returned for the caller to sum
template <typename F>
inline F log_det_head(F& direct, F a, F c, F ell) {
    const F one_minus = F(1) - a * a;
    const F denominator = one_minus * c + F(1);
    direct -= F(2) * ell * (a * c / denominator);
    return ell * one_minus / denominator;
}

// J draws of one digit: a, d (ûᵀg), p with `stride` between steps (R); M (T, T) and c (T,) of the digit; ell (J,)
// the draws' ∂L/∂log-det or null; grad_c (T,): their Σ over the tile's draws, written where ell is given
template <typename F>
void backward_tile(const F* __restrict__ m, const F* __restrict__ a, const F* __restrict__ d, const F* __restrict__ c,
                   const F* __restrict__ ell, F* __restrict__ p, F* __restrict__ grad_c, int64_t T, int64_t stride,
                   int64_t J, F* __restrict__ buf) {
    const int64_t W = (J + kLanes - 1) / kLanes * kLanes;
    F* __restrict__ one_minus = buf + T * W;                               // 1 − aₜ², the second half of buf
    for (int64_t t = 0; t < T; ++t) {
        std::memcpy(buf + t * W, d + t * stride, J * sizeof(F));
        std::fill(buf + t * W + J, buf + (t + 1) * W, F(0));
        if (ell) {
            F sum = 0;
            for (int64_t j = 0; j < J; ++j) sum += log_det_head(buf[t * W + j], a[t * stride + j], c[t], ell[j]);
            grad_c[t] = sum;
        }
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
void backward_digits(const F* __restrict__ m, const F* __restrict__ a, const F* __restrict__ d,
                     const F* __restrict__ c, const F* __restrict__ ell, F* __restrict__ p, F* __restrict__ grad_c,
                     int64_t T, int64_t n0, int64_t G, F* __restrict__ buf) {
    std::memcpy(buf, d + n0 * T, G * T * sizeof(F));
    if (ell)
        for (int64_t g = 0; g < G; ++g) {
            const int64_t n = n0 + g;
            const F ell_n = ell[n];
            for (int64_t t = 0; t < T; ++t)
                grad_c[n * T + t] = log_det_head(buf[g * T + t], a[n * T + t], c[n * T + t], ell_n);
        }
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

// ell (N, R) or null; grad_c (N, T) out where ell is given (summed over a digit's tiles in a fixed order: the same
// bits on any number of threads)
template <typename F>
void backward(const F* m, const F* a, const F* d, const F* c, const F* ell, F* p, F* grad_c, int64_t T, int64_t N,
              int64_t R, int threads) {
    if (R == 1) {
        over_items<F>((N + kGroup - 1) / kGroup, N * T * T, kGroup * T, threads, [&](int64_t i, F* buf) {
            backward_digits(m, a, d, c, ell, p, grad_c, T, i * kGroup, std::min(kGroup, N - i * kGroup), buf);
        });
        return;
    }
    const int64_t per_digit = (R + kTile - 1) / kTile, width = (std::min(R, kTile) + kLanes - 1) / kLanes * kLanes;
    std::vector<F> partial(ell && per_digit > 1 ? N * per_digit * T : 0);     // (N, tiles, T) ∂L/∂c per tile
    over_items<F>(N * per_digit, N * R * T * T, 2 * T * width, threads, [&](int64_t i, F* buf) {
        const int64_t n = i / per_digit, r0 = (i % per_digit) * kTile, offset = n * T * R + r0;
        F* tile_grad_c = !ell ? nullptr : per_digit > 1 ? partial.data() + i * T : grad_c + n * T;
        backward_tile(m + n * T * T, a + offset, d + offset, c + n * T, ell ? ell + n * R + r0 : nullptr, p + offset,
                      tile_grad_c, T, R, std::min(kTile, R - r0), buf);
    });
    if (ell && per_digit > 1)
        for (int64_t n = 0; n < N; ++n)
            for (int64_t t = 0; t < T; ++t) {
                F sum = 0;
                for (int64_t k = 0; k < per_digit; ++k) sum += partial[(n * per_digit + k) * T + t];
                grad_c[n * T + t] = sum;
            }
}

// Ranges of kRows rows of the steps' parameters [u, w, b] (2d + 1 numbers each, N · T rows) over the threads:
// body(begin, end)
constexpr int64_t kRows = 64;

template <typename F, typename Body>
void over_rows(int64_t rows, int64_t d, int threads, Body body) {
    over_items<F>((rows + kRows - 1) / kRows, 8 * rows * d, 0, threads, [&](int64_t i, F*) {
        body(i * kRows, std::min(rows, (i + 1) * kRows));
    });
}

// e^x for float32 x ≤ 0, vectorisable (exp_parts); below −87 it gives 0 (e^{−87} = 1.6e-38: 2ᵏ stays a normal number
// above, and float32 holds nothing but denormals below, which the training loop flushes to zero anyway).
inline float exp_nonpositive(float x) {
    float two_k;
    const float p = exp_parts(x > -87.0f ? x : -87.0f, two_k);       // 2ᵏ, k ∈ [−126, 0]
    return x > -87.0f ? two_k + two_k * p : 0.0f;
}

// log(1 + y) for float32 0 ≤ y ≤ 1, vectorisable: log x = 2 atanh((x − 1)/(x + 1)) with x = 1 + y when y ≤ √2 − 1,
// else x = (1 + y)/2 and ln 2 added, so |t| = |x − 1|/(x + 1) ≤ 0.1716 and 2 atanh t = 2t(1 + t²/3 + … + t⁸/9) leaves
// under 1e-9 of it; t is formed from y itself (y/(2 + y), (y − 1)/(y + 3)), never from a rounded 1 + y.
inline float log1p_unit(float y) {
    const bool high = y > 0.41421356f;
    const float t = high ? (y - 1.0f) / (y + 3.0f) : y / (y + 2.0f);
    const float t2 = t * t;
    const float series = 2.0f * t * (1.0f + t2 * (1.0f / 3 + t2 * (1.0f / 5 + t2 * (1.0f / 7 + t2 * (1.0f / 9)))));
    return (high ? 0.693147181f : 0.0f) + series;
}

// m(s) = softplus(s) − 1 − s = log(1 + e^{−|s|}) + max(−s, 0) − 1: softplus(s) = max(s, 0) + log(1 + e^{−|s|}) and
// max(s, 0) − s = max(−s, 0), so the terms in s cancel exactly instead of in rounding (softplus(s) − s for s ≫ 0)
inline float m_of(float s) { return log1p_unit(exp_nonpositive(-std::fabs(s))) + std::max(-s, 0.0f) - 1.0f; }
inline double m_of(double s) { return std::log1p(std::exp(-std::fabs(s))) + std::max(-s, 0.0) - 1.0; }

// For each row [u, w, b]: wᵀu, ‖w‖², κ = m(wᵀu)/max(‖w‖², ε), û = u + κw (out, (rows, d)) and c = wᵀu + κ‖w‖² (the
// clamp ε makes a zero w harmless: κ finite, û = u); scalars (4, rows) out: κ, c, wᵀu, ‖w‖². A range of rows at a
// time: the dot products, then κ for the range (a loop over rows, vectorised), then û and c.
template <typename F>
void quantities(const F* params, F* u_hat, F* scalars, int64_t rows, int64_t d, F min_ww, int threads) {
    F* kappa = scalars;
    F* c = scalars + rows;
    F* wu = scalars + 2 * rows;
    F* ww = scalars + 3 * rows;
    over_rows<F>(rows, d, threads, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
            const F* __restrict__ u = params + row * (2 * d + 1);
            const F* __restrict__ w = u + d;
            F dot = 0, norm = 0;
#pragma omp simd reduction(+ : dot, norm)
            for (int64_t i = 0; i < d; ++i) {
                dot += w[i] * u[i];
                norm += w[i] * w[i];
            }
            wu[row] = dot;
            ww[row] = norm;
        }
        for (int64_t row = begin; row < end; ++row) kappa[row] = m_of(wu[row]) / std::max(ww[row], min_ww);
        for (int64_t row = begin; row < end; ++row) {
            const F* __restrict__ u = params + row * (2 * d + 1);
            const F* __restrict__ w = u + d;
            F* __restrict__ out = u_hat + row * d;
            const F k = kappa[row];
            for (int64_t i = 0; i < d; ++i) out[i] = u[i] + k * w[i];
            c[row] = wu[row] + k * ww[row];
        }
    });
}

// m'(s) = σ(s) − 1 = −1/(1 + eˢ), as −1/(1 + e^{−|s|}) for s ≤ 0 and −e^{−|s|}/(1 + e^{−|s|}) above (no overflow)
inline float m_derivative(float s) {
    const float e = exp_nonpositive(-std::fabs(s));
    return (s > 0.0f ? -e : -1.0f) / (1.0f + e);
}
inline double m_derivative(double s) { return -1.0 / (1.0 + std::exp(s)); }

// The chain rule from ∂L/∂û (grad_u_hat), ∂L/∂w through the steps (grad_w), ∂L/∂c (grad_c, (rows,)) and p (rows, R)
// back to each row's [∂u, ∂w, ∂b] (out, (rows, 2d + 1)), through û = u + κw, c = wᵀu + κ‖w‖², κ = m(wᵀu)/‖w‖²:
//   ∂κ = ∂ûᵀw + ∂c‖w‖²,  ∂(wᵀu) = ∂c + ∂κ m'(wᵀu)/‖w‖²,  ∂‖w‖² = ∂c κ − ∂κ κ/‖w‖² (no term where ‖w‖² ≤ ε: clamped),
//   ∂u = ∂û + ∂(wᵀu) w,  ∂w = ∂w + κ∂û + ∂(wᵀu) u + 2∂‖w‖² w,  ∂b = Σ_draws p
// A range of rows at a time: ∂κ (dot products), then ∂(wᵀu) and ∂‖w‖² for the range (vectorised), then the rows.
template <typename F>
void parameter_gradient(const F* params, const F* scalars, const F* grad_u_hat, const F* grad_w, const F* grad_c,
                        const F* p, F* out, int64_t rows, int64_t d, int64_t R, F min_ww, int threads) {
    const F* kappa = scalars;
    const F* wu = scalars + 2 * rows;
    const F* ww_raw = scalars + 3 * rows;
    over_rows<F>(rows, d, threads, [&](int64_t begin, int64_t end) {
        F g_kappa[kRows], g_wu[kRows], g_ww[kRows];
        for (int64_t row = begin; row < end; ++row) {
            const F* __restrict__ w = params + row * (2 * d + 1) + d;
            const F* __restrict__ gu_hat = grad_u_hat + row * d;
            F dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < d; ++i) dot += gu_hat[i] * w[i];
            g_kappa[row - begin] = dot + grad_c[row] * ww_raw[row];
        }
        for (int64_t row = begin; row < end; ++row) {
            const F ww = std::max(ww_raw[row], min_ww), gk = g_kappa[row - begin], gc = grad_c[row];
            g_wu[row - begin] = gc + gk * m_derivative(wu[row]) / ww;
            g_ww[row - begin] = gc * kappa[row] - (ww_raw[row] > min_ww ? gk * kappa[row] / ww : F(0));
        }
        for (int64_t row = begin; row < end; ++row) {
            const F* __restrict__ u = params + row * (2 * d + 1);
            const F* __restrict__ w = u + d;
            const F* __restrict__ gu_hat = grad_u_hat + row * d;
            const F* __restrict__ gw = grad_w + row * d;
            const F k = kappa[row], a = g_wu[row - begin], twice = F(2) * g_ww[row - begin];
            F* __restrict__ o = out + row * (2 * d + 1);
            for (int64_t i = 0; i < d; ++i) {
                o[i] = gu_hat[i] + a * w[i];
                o[d + i] = gw[i] + k * gu_hat[i] + a * u[i] + twice * w[i];
            }
            F b = 0;
            for (int64_t r = 0; r < R; ++r) b += p[row * R + r];
            o[2 * d] = b;
        }
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
// a, d, p (N, T, R); m (N, T, T); c, grad_c (N, T); ell (N, R) or null (then grad_c is not written)
void planar_backward_f32(const float* m, const float* a, const float* d, const float* c, const float* ell, float* p,
                         float* grad_c, int64_t T, int64_t N, int64_t R, int threads) {
    backward(m, a, d, c, ell, p, grad_c, T, N, R, threads);
}
void planar_backward_f64(const double* m, const double* a, const double* d, const double* c, const double* ell,
                         double* p, double* grad_c, int64_t T, int64_t N, int64_t R, int threads) {
    backward(m, a, d, c, ell, p, grad_c, T, N, R, threads);
}
// params (rows, 2d + 1); u_hat (rows, d); scalars (4, rows)
void planar_quantities_f32(const float* params, float* u_hat, float* scalars, int64_t rows, int64_t d, double min_ww,
                           int threads) {
    quantities(params, u_hat, scalars, rows, d, static_cast<float>(min_ww), threads);
}
void planar_quantities_f64(const double* params, double* u_hat, double* scalars, int64_t rows, int64_t d,
                           double min_ww, int threads) {
    quantities(params, u_hat, scalars, rows, d, min_ww, threads);
}
// params, out (rows, 2d + 1); scalars (4, rows); grad_u_hat, grad_w (rows, d); grad_c (rows,); p (rows, R)
void planar_parameter_gradient_f32(const float* params, const float* scalars, const float* grad_u_hat,
                                   const float* grad_w, const float* grad_c, const float* p, float* out, int64_t rows,
                                   int64_t d, int64_t R, double min_ww, int threads) {
    parameter_gradient(params, scalars, grad_u_hat, grad_w, grad_c, p, out, rows, d, R, static_cast<float>(min_ww),
                       threads);
}
void planar_parameter_gradient_f64(const double* params, const double* scalars, const double* grad_u_hat,
                                   const double* grad_w, const double* grad_c, const double* p, double* out,
                                   int64_t rows, int64_t d, int64_t R, double min_ww, int threads) {
    parameter_gradient(params, scalars, grad_u_hat, grad_w, grad_c, p, out, rows, d, R, min_ww, threads);
}
// x ← tanh(x) elementwise, n floats (the flow's tanh_of, for a tanh network's hidden layers outside autograd: the
// IWAE's decoder; torch's float32 tanh took 3.6 ns an element on one thread of the Zen 4 of benchmarks/README.md)
void tanh_inplace_f32(float* x, int64_t n, int threads) {
    constexpr int64_t kChunk = 1 << 14;                                // 64 KB a task
    const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && chunks > 1)
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        float* __restrict__ part = x + chunk * kChunk;
        const int64_t size = std::min(kChunk, n - chunk * kChunk);
#pragma omp simd
        for (int64_t i = 0; i < size; ++i) part[i] = tanh_of(part[i]);
    }
}
}
