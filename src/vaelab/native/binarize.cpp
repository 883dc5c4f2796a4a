// Dynamic binarisation's draws (vaelab.data.binarize): out[i] = (r_i < grey[i]) with r_i = y_i mod 255, y_i the next
// 32-bit output of the generator's MT19937 (Matsumoto & Nishimura 1998) — what torch.randint(0, 255, …, uint8)
// draws from a CPU torch.Generator, bit for bit, and the generator's state left where torch's would be. P(r < k) =
// k/255 for a grey level k (vaelab.data's docstring).
//
// torch (ATen/core/MT19937RNGEngine.h) draws one word at a time: `if (--left == 0) twist; y = state[next++]`, a
// serial loop of about 3.3 ns a number on the Intel Xeon of benchmarks/README.md. Here the words a state holds
// before its next twist are tempered, reduced and compared as one vectorised loop, and the twist (the state's
// recurrence, over 624 words at once) too; with a row index, the grey levels are read through it.
//
// Reduction mod 255 without a division: 256 ≡ 1 (mod 255), so y ≡ the sum of its four bytes (≤ 1020), ≡ that sum's
// two bytes added (≤ 258), less 255 once where it reaches 255: a number in [0, 254], equal to y % 255.
//
// Built by vaelab.native with the machine's C++ compiler; no torch headers (the state's layout is read in
// vaelab.native, from torch.Generator.get_state).

#include <cstdint>

namespace {

constexpr int kN = 624;              // words of state
constexpr int kM = 397;              // the recurrence's middle term
constexpr uint32_t kMatrixA = 0x9908b0dfu;
constexpr uint32_t kUpper = 0x80000000u;
constexpr uint32_t kLower = 0x7fffffffu;

inline uint32_t twist(uint32_t u, uint32_t v) {
    return (((u & kUpper) | (v & kLower)) >> 1) ^ ((v & 1u) ? kMatrixA : 0u);
}

// The state's next 624 words, in place: s[i] ← s[i + M] ^ twist(s[i], s[i + 1]), the indices mod N, in torch's order
// (each loop reads words that are either not yet rewritten, or rewritten at least 227 places before).
void next_state(uint32_t* s) {
    for (int i = 0; i < kN - kM; ++i) s[i] = s[i + kM] ^ twist(s[i], s[i + 1]);
    for (int i = kN - kM; i < kN - 1; ++i) s[i] = s[i + kM - kN] ^ twist(s[i], s[i + 1]);
    s[kN - 1] = s[kM - 1] ^ twist(s[kN - 1], s[0]);
}

inline uint32_t mod255(uint32_t y) {
    uint32_t s = (y & 0xffu) + ((y >> 8) & 0xffu) + ((y >> 16) & 0xffu) + (y >> 24);
    s = (s & 0xffu) + (s >> 8);
    return s >= 255u ? s - 255u : s;
}

// out[i] = (temper(words[i]) mod 255) < grey[i], i < count
void emit(const uint32_t* __restrict__ words, const uint8_t* __restrict__ grey, uint8_t* __restrict__ out,
          int64_t count) {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) {
        uint32_t y = words[i];
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c5680u;
        y ^= (y << 15) & 0xefc60000u;
        y ^= y >> 18;
        out[i] = static_cast<uint8_t>(mod255(y) < grey[i]);
    }
}

}  // namespace

extern "C" {

// state: the 624 words as torch's get_state keeps them (uint64 each); position: {left, next} (torch's int32 ``left``
// widened, its ``next``), both read and written back; the caller checks 1 ≤ left ≤ 624 and next + left − 1 ≤ 624.
// Without rows, grey holds the n grey levels in out's order; with rows, out's row r (of ``width`` pixels) is drawn
// for grey's row rows[r], so that an epoch's permuted digits are binarised without gathering them first.
void binarize_mt19937(uint64_t* state, int64_t* position, const uint8_t* grey, const int64_t* rows, int64_t width,
                      uint8_t* out, int64_t n) {
    alignas(64) uint32_t s[kN];
    for (int i = 0; i < kN; ++i) s[i] = static_cast<uint32_t>(state[i]);
    int64_t left = position[0], next = position[1];
    for (int64_t i = 0, take; i < n; i += take) {
        if (left == 1) {               // the draw that decrements left to 0 twists, then reads word 0
            next_state(s);
            left = kN + 1;             // (torch sets N, and that draw does not decrement it)
            next = 0;
        }
        take = left - 1 < n - i ? left - 1 : n - i;                       // the words this state still holds
        const uint8_t* source = grey + i;
        if (rows != nullptr) {
            const int64_t column = i % width;
            source = grey + rows[i / width] * width + column;
            take = take < width - column ? take : width - column;
        }
        emit(s + next, source, out + i, take);
        left -= take;
        next += take;
    }
    for (int i = 0; i < kN; ++i) state[i] = s[i];
    position[0] = left;
    position[1] = next;
}

}  // extern "C"
