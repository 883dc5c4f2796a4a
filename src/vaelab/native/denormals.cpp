// Flush-to-zero and denormals-are-zero on every thread of the process's OpenMP team (vaelab.evaluation's
// hot_loop_settings).
//
// torch.set_flush_denormal sets the two bits of the x86 MXCSR register (FTZ, bit 15: a denormal result is written as
// zero; DAZ, bit 6: a denormal operand is read as zero) on the calling thread only. The register is per thread, and
// the products (MKL, oneDNN), torch's parallel elementwise kernels and TorchInductor's kernels run their other shares
// on the OpenMP team's workers, which keep the register they were started with. A 512 × 512 product with denormal
// operands took 0.15 s on 2 threads with the calling thread flushing, against 0.8 ms with normal operands
// (benchmarks/README.md, thirty-first session). One parallel region on the process's runtime (torch's libgomp, as
// for the other kernels here) sets or clears the bits on each of its threads, the calling thread included. Built by
// vaelab.native with the machine's C++ compiler; no torch headers. x86 only: elsewhere the library does not build
// and only the calling thread flushes.

#if !defined(__x86_64__) && !defined(__i386__)
#error "MXCSR is x86's"
#endif

#include <xmmintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {
constexpr unsigned kFlushBits = 0x8040u;     // FTZ (bit 15) | DAZ (bit 6)
}

// Sets (on != 0) or clears the bits on each thread of a team of ``threads``; returns how many threads did it.
extern "C" int flush_denormal_all_threads(int on, int threads) {
    int done = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(+ : done)
#endif
    {
        const unsigned csr = _mm_getcsr();
        _mm_setcsr(on ? (csr | kFlushBits) : (csr & ~kFlushBits));
        done += 1;
    }
    return done;
}
