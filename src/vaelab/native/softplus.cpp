// Σⱼ softplus(ℓⱼ) over each row of a (rows, D) float32 array, in one pass (vaelab.objectives.softplus_sum), or with
// the data the Bernoulli negative log-likelihood Σⱼ softplus(ℓⱼ) − xⱼℓⱼ (vaelab.models.base.bernoulli_data_term).
//
// softplus(ℓ) = max(ℓ, 0) + log(1 + u), u = e^{−|ℓ|} ∈ (0, 1]. Both parts are computed for 16 pixels at a time in
// loops the compiler vectorises, and summed into 16 float32 lanes, which are added in double at the end (a row of
// 784 pixels: 49 terms per lane, each positive, so the sum's relative rounding stays below 49 · 2⁻²⁴):
//
//   u = 2^{−|y|} with y = ℓ log₂e: 2^{−|y|} = 2^{−k} e^{r}, k = |y| rounded to an integer, r = (k − |y|) ln 2,
//       |r| ≤ (ln 2)/2, e^{r} by its Taylor series to r⁷ (remainder < 0.35⁸/8! < 6e-9, a tenth of float32's ulp).
//   log(1 + u) = 2 atanh(t), t = u/(2 + u) ∈ (0, 1/3]: 2(t + t³/3 + t⁵/5 + … + t¹⁵/15), remainder below
//       (1/3)¹⁷/17 · 2 < 1e-9; relative precision is kept for the tiny u of confident pixels (t ≈ u/2), which 1 + u
//       in float32 would round away.
//
// A bias (D,) may be given, added to every row as it is read (a product's output before its layer's bias). Below
// 2^{−126} u is float32's subnormal (0 where the caller flushes them); |y| ≥ 150 gives u = 0. NaN stays NaN.
//
// With data x (a row of D values in [0, 1] per digit) the sum is the Bernoulli negative log-likelihood instead,
// Σⱼ softplus(ℓⱼ) − xⱼℓⱼ = −log p(x|ℓ) (from log sigmoid(ℓ) = ℓ − softplus(ℓ)), each pixel's term taken whole,
// (max(ℓ, 0) − xℓ) + log(1 + u): for binary x the first part is max(±ℓ, 0) exactly, every term ≥ 0, and the lanes
// add positive terms as above, where Σ softplus − Σ xℓ in two sums would cancel two sums of hundreds of nats.
// The result is float32. Built by vaelab.native with the machine's C++ compiler; no torch headers.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int kLanes = 16;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;

// 2^{−a} for a ≥ 0, written so that a loop of it vectorises. 2^{−k} is applied as two normal factors 2^{−⌊k/2⌋}
// and 2^{−⌈k/2⌉}, so that below 2^{−126} the result is float32's subnormal (flushed to 0 where the caller set
// FTZ, as vaelab's loops do); a ≥ 150 gives 0.
inline float exp2_negative(float a) {
    a = a < 150.0f ? a : 150.0f;
    const float k = std::nearbyint(a);
    const float r = (k - a) * kLn2;                                        // |r| ≤ (ln 2)/2
    const float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720
                                                                                                   + r * (1.0f / 5040)))))));
    const int32_t half = static_cast<int32_t>(k) >> 1;
    const int32_t low = (127 - half) << 23, high = (127 - (static_cast<int32_t>(k) - half)) << 23;   // k ∈ [0, 150]
    float s1, s2;
    std::memcpy(&s1, &low, sizeof s1);
    std::memcpy(&s2, &high, sizeof s2);
    return a < 150.0f ? p * s1 * s2 : 0.0f;
}

// log(1 + u) for u ∈ [0, 1]
inline float log1p_unit(float u) {
    const float t = u / (2.0f + u);
    const float s = t * t;
    return 2.0f * t * (1.0f + s * (1.0f / 3 + s * (1.0f / 5 + s * (1.0f / 7 + s * (1.0f / 9 + s * (1.0f / 11
                                                                                                + s * (1.0f / 13 + s * (1.0f / 15))))))));
}

// One element's term in nats, from y = ℓ log₂e (base2) or ℓ: softplus(ℓ) = max(y, 0) ln 2 + log(1 + 2^{−|y|}), or with
// the data (kData) the pixel's −log p(x|ℓ) = softplus(ℓ) − xℓ, whose first part is (max(y, 0) − xy) ln 2. NaN stays
// NaN (a diverged decoder must not read as a finite likelihood); softplus(+inf) = +inf, softplus(−inf) = 0.
template <bool kData>
inline float term(float v, float x, float to_base2) {
    const float y = v * to_base2;
    const float positive = y > 0.0f ? y : (y != y ? y : 0.0f);
    const float linear = kData ? positive - x * y : positive;
    return linear * kLn2 + log1p_unit(exp2_negative(std::fabs(y)));
}

// one row's sum: of softplus, or with ``data`` (the row's digit, D values) of softplus(ℓ) − xℓ
template <bool kData>
void row_sum(const float* __restrict__ row, const float* __restrict__ bias, const float* __restrict__ data, int64_t d,
             float to_base2, float* __restrict__ out) {
    float lanes[kLanes] = {0};                        // float32 lanes (one vector): 49 terms each for 784 pixels
    int64_t j = 0;
    for (; j + kLanes <= d; j += kLanes)
        for (int l = 0; l < kLanes; ++l)
            lanes[l] += term<kData>(row[j + l] + bias[j + l], kData ? data[j + l] : 0.0f, to_base2);
    double total = 0.0;
    for (; j < d; ++j) total += term<kData>(row[j] + bias[j], kData ? data[j] : 0.0f, to_base2);
    for (int l = 0; l < kLanes; ++l) total += lanes[l];
    *out = static_cast<float>(total);
}

}  // namespace

extern "C" {

// out[i] = Σⱼ softplus(ℓᵢⱼ) for x (rows, d) contiguous and a bias (d,) added to every row (a product's output
// and its layer's bias, so that the product need not write the bias first): ℓ = (x + bias) / log₂e when base2
// (they hold ℓ log₂e), else ℓ = x + bias; bias null: zeros. With data (data_rows, d) (not null): out[i] =
// Σⱼ softplus(ℓᵢⱼ) − dataₖⱼ ℓᵢⱼ with k = i mod data_rows (rows are draws × digits, the digits innermost).
void softplus_sum_f32(const float* x, const float* bias, const float* data, int64_t data_rows, float* out,
                      int64_t rows, int64_t d, int base2, int threads) {
    const float to_base2 = base2 ? 1.0f : kLog2e;
    std::vector<float> zeros(bias ? 0 : d, 0.0f);
    if (!bias) bias = zeros.data();
#ifdef _OPENMP
    const bool parallel = threads > 1 && rows * d >= 100000;
#pragma omp parallel for num_threads(threads) schedule(static) if (parallel)
#endif
    for (int64_t i = 0; i < rows; ++i) {
        if (data)
            row_sum<true>(x + i * d, bias, data + (i % data_rows) * d, d, to_base2, out + i);
        else
            row_sum<false>(x + i * d, bias, nullptr, d, to_base2, out + i);
    }
}

}  // extern "C"
