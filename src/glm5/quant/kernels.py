"""CPU kernels for block-scaled e4m3 weights: a fused dequantize-GEMV for a few tokens, and a block dequantizer.

Why C: PyTorch's own float8 -> float32 cast runs at ~8 ns per element on this CPU (AVX2/AVX-512, no FP8 units),
15-40x slower than an fp32 GEMV over the same matrix, and every pure-PyTorch rewrite we measured (a 256-entry
lookup table, the bf16 bit trick, see bench/fp8.py) still costs several full passes over the matrix. Decoding
is a GEMV: read each weight once, convert it in registers, multiply. That is what the C below does, with AVX2 or
AVX-512 when the compiler targets them (-march=native: built on the machine that runs it).

The library is plain C loaded with ctypes (no Python headers, no ninja): it builds in about a second with any
gcc/clang at first use, cached under ~/.cache/glm5 by a hash of the source, flags and CPU. If no compiler works,
`cpu_lib()` returns None and callers use the pure-PyTorch fallback in this file (correct, slower).

e4m3 -> fp32, exactly: for a byte with magnitude bits v = b & 0x7F (exponent e = v >> 3, mantissa m = v & 7),
placing v at bit 20 and adding 120 to the exponent field gives 2^(e-7) * (1 + m/8), the e4m3 value, whenever
e >= 1. Subnormals (e == 0, value m * 2^-9) come from the same float: (f - 2^-7) * 2. The sign is bit 7 -> bit 31.
Every intermediate is a normal float, so no denormal slow path. (0x7F / 0xFF, e4m3fn's NaN, decode as 480; the
quantizer never writes them.)

Letters: N tokens, O output rows, I input columns, bo x bi the scale block.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("glm5.quant")

MAX_FUSED_TOKENS = 8  # above this many tokens, dequantize row chunks and let the BLAS GEMM do the work
_CHUNK_ELEMS = 1 << 21  # dequantize at most 8 MB of fp32 at a time (a reused, cache-sized piece, not the matrix)

_SRC = r"""
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline float cvt1(uint8_t b) {
    uint32_t v = b & 0x7Fu, u = (v << 20) + (120u << 23);
    float f;
    memcpy(&f, &u, 4);
    if (v < 8) f = (f - 0.0078125f) * 2.0f;
    return (b & 0x80u) ? -f : f;
}

#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
static inline vf cvtv(const uint8_t* p) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
    __m512i mag = _mm512_and_si512(b, _mm512_set1_epi32(0x7F));
    __m512 f = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(mag, 20), _mm512_set1_epi32(120 << 23)));
    __m512 fs = _mm512_mul_ps(_mm512_sub_ps(f, _mm512_set1_ps(0.0078125f)), _mm512_set1_ps(2.0f));
    f = _mm512_mask_blend_ps(_mm512_cmpgt_epi32_mask(mag, _mm512_set1_epi32(7)), fs, f);
    __m512i sign = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(f), sign));
}
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vmuls(vf a, float s) { return _mm512_mul_ps(a, _mm512_set1_ps(s)); }
static inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__)
#define VW 8
typedef __m256 vf;
static inline vf cvtv(const uint8_t* p) {
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
    __m256i mag = _mm256_and_si256(b, _mm256_set1_epi32(0x7F));
    __m256 f = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(mag, 20), _mm256_set1_epi32(120 << 23)));
    __m256 fs = _mm256_mul_ps(_mm256_sub_ps(f, _mm256_set1_ps(0.0078125f)), _mm256_set1_ps(2.0f));
    f = _mm256_blendv_ps(fs, f, _mm256_castsi256_ps(_mm256_cmpgt_epi32(mag, _mm256_set1_epi32(7))));
    __m256i sign = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24);
    return _mm256_or_ps(f, _mm256_castsi256_ps(sign));
}
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vmuls(vf a, float s) { return _mm256_mul_ps(a, _mm256_set1_ps(s)); }
static inline float vsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#else
#define VW 1
typedef float vf;
static inline vf cvtv(const uint8_t* p) { return cvt1(*p); }
static inline vf vzero(void) { return 0.f; }
static inline vf vload(const float* p) { return *p; }
static inline void vstore(float* p, vf v) { *p = v; }
static inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
static inline vf vmuls(vf a, float s) { return a * s; }
static inline float vsum(vf v) { return v; }
#endif

/* sum_i w[i] * x[i] over one row segment of length len, w as e4m3 bytes */
static inline float dot1(const uint8_t* w, const float* x, int64_t len) {
    vf a0 = vzero(), a1 = vzero();
    int64_t i = 0;
    for (; i + 2 * VW <= len; i += 2 * VW) {
        a0 = vfma(cvtv(w + i), vload(x + i), a0);
        a1 = vfma(cvtv(w + i + VW), vload(x + i + VW), a1);
    }
    float acc = vsum(a0) + vsum(a1);
    for (; i < len; i++) acc += cvt1(w[i]) * x[i];
    return acc;
}

#define MAXN 16
#define SEG 256

/* y[N, O] = x[N, I] @ (w[O, I] * s[O/bo, I/bi])^T, N <= MAXN. Each weight is read and converted once. */
int fp8_linear_small(const float* x, const uint8_t* w, const float* s, float* y,
                     int64_t N, int64_t O, int64_t I, int64_t bo, int64_t bi, int nthreads) {
    if (N < 1 || N > MAXN) return -1;
    const int64_t KI = (I + bi - 1) / bi;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int64_t o = 0; o < O; o++) {
        const uint8_t* wr = w + o * I;
        const float* sr = s + (o / bo) * KI;
        float tot[MAXN];
        float buf[SEG];
        for (int64_t n = 0; n < N; n++) tot[n] = 0.f;
        for (int64_t kb = 0; kb < KI; kb++) {
            const int64_t i0 = kb * bi, i1 = i0 + bi < I ? i0 + bi : I;
            const float sc = sr[kb];
            if (N == 1) {
                tot[0] += dot1(wr + i0, x + i0, i1 - i0) * sc;
                continue;
            }
            for (int64_t j0 = i0; j0 < i1; j0 += SEG) {  /* convert a segment once, use it for every token */
                const int64_t len = j0 + SEG < i1 ? SEG : i1 - j0;
                int64_t i = 0;
                for (; i + VW <= len; i += VW) vstore(buf + i, cvtv(wr + j0 + i));
                for (; i < len; i++) buf[i] = cvt1(wr[j0 + i]);
                for (int64_t n = 0; n < N; n++) {
                    const float* xr = x + n * I + j0;
                    vf a0 = vzero();
                    i = 0;
                    for (; i + VW <= len; i += VW) a0 = vfma(vload(buf + i), vload(xr + i), a0);
                    float acc = vsum(a0);
                    for (; i < len; i++) acc += buf[i] * xr[i];
                    tot[n] += acc * sc;
                }
            }
        }
        for (int64_t n = 0; n < N; n++) y[n * O + o] = tot[n];
    }
    return 0;
}

/* out[r, :] = w[row0 + r, :] * s[(row0 + r) / bo, :/bi] for r < R: fp32 rows of the dequantized matrix. */
void fp8_dequant_rows(const uint8_t* w, const float* s, float* out, int64_t row0, int64_t R, int64_t I,
                      int64_t bo, int64_t bi, int nthreads) {
    const int64_t KI = (I + bi - 1) / bi;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int64_t r = 0; r < R; r++) {
        const uint8_t* wr = w + (row0 + r) * I;
        const float* sr = s + ((row0 + r) / bo) * KI;
        float* orow = out + r * I;
        for (int64_t kb = 0; kb < KI; kb++) {
            const int64_t i0 = kb * bi, i1 = i0 + bi < I ? i0 + bi : I;
            const float sc = sr[kb];
            int64_t i = i0;
            for (; i + VW <= i1; i += VW) vstore(orow + i, vmuls(cvtv(wr + i), sc));
            for (; i < i1; i++) orow[i] = cvt1(wr[i]) * sc;
        }
    }
}

int fp8_vector_width(void) { return VW; }
"""

_FLAGS = ["-O3", "-shared", "-fPIC", "-std=c11"]


def _cpu_id() -> str:
    """What the -march=native code depends on: a cached build is never reused on a CPU with other features."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compile(cc: str, src: Path, out: Path, arch: str, openmp: bool) -> bool:
    cmd = [cc, *_FLAGS, f"-march={arch}", *(["-fopenmp"] if openmp else []), str(src), "-o", str(out)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("FP8 CPU kernel: %s failed to run (%s)", cc, e)
        return False
    if r.returncode != 0:
        log.info("FP8 CPU kernel: %s exited %d: %s", " ".join(cmd), r.returncode, r.stderr.strip()[-500:])
    return r.returncode == 0


def build(cache_dir: str | Path | None = None, arch: str = "native") -> ctypes.CDLL | None:
    """Compile (once per source, flags, target and CPU) and load the kernels; None if no C compiler manages it.
    arch: gcc's -march (tests build "haswell", AVX2 without AVX-512, and "x86-64", plain C, to check every path)."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        log.warning("FP8 CPU kernel: no C compiler found; using the slower pure-PyTorch FP8 path")
        return None
    cache = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "glm5"
    key = hashlib.sha256("\0".join([_SRC, " ".join(_FLAGS), arch, cc, _cpu_id()]).encode()).hexdigest()[:16]
    so = cache / f"fp8_cpu_{key}.so"
    if not so.exists():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                src, out = Path(tmp) / "fp8_cpu.c", Path(tmp) / "fp8_cpu.so"
                src.write_text(_SRC)
                # OpenMP: libgomp.so.1 resolves to the copy torch already loaded, so both share one thread pool.
                if not (_compile(cc, src, out, arch, True) or _compile(cc, src, out, arch, False)):
                    log.warning("FP8 CPU kernel: compiling with %s failed; using the slower pure-PyTorch FP8 path", cc)
                    return None
                os.replace(out, so)  # atomic: a concurrent build or a crash never leaves half a library under the name
        except OSError as e:
            log.warning("FP8 CPU kernel: cannot build in %s (%s); using the slower pure-PyTorch FP8 path", cache, e)
            return None
    try:
        lib = ctypes.CDLL(str(so))
    except OSError as e:
        log.warning("FP8 CPU kernel: cannot load %s (%s); using the slower pure-PyTorch FP8 path", so, e)
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.fp8_linear_small.argtypes = [p, p, p, p, i64, i64, i64, i64, i64, i32]
    lib.fp8_linear_small.restype = ctypes.c_int
    lib.fp8_dequant_rows.argtypes = [p, p, p, i64, i64, i64, i64, i64, i32]
    lib.fp8_dequant_rows.restype = None
    lib.fp8_vector_width.restype = ctypes.c_int
    log.debug("FP8 CPU kernel: %s (vector width %d)", so, lib.fp8_vector_width())
    return lib


@functools.lru_cache(maxsize=1)
def cpu_lib() -> ctypes.CDLL | None:
    """The process-wide kernel library, built on first use."""
    return build()


# -- entry points ------------------------------------------------------------------------------------------------
def _threads(work: int) -> int:
    # Forking the pool costs a few microseconds: small matrices run on one thread.
    return torch.get_num_threads() if work >= (1 << 16) else 1


def dequant_rows_into(out_RI: torch.Tensor, q_OI: torch.Tensor, s: torch.Tensor, row0: int, block, lib="auto") -> None:
    """out_RI (fp32, contiguous) <- rows row0 .. row0 + R of the dequantized q_OI. lib=None: pure PyTorch."""
    lib = cpu_lib() if lib == "auto" else lib
    R, I = out_RI.shape
    if lib is not None:
        lib.fp8_dequant_rows(q_OI.data_ptr(), s.data_ptr(), out_RI.data_ptr(), row0, R, I, block[0], block[1],
                             _threads(R * I))
        return
    out_RI.copy_(dequant_torch(q_OI[row0: row0 + R], s, block, row0))


def linear_cpu(x_NI: torch.Tensor, q_OI: torch.Tensor, s: torch.Tensor, block, lib="auto",
               chunk_elems: int = _CHUNK_ELEMS) -> torch.Tensor:
    """x_NI [N, I] fp32 contiguous -> [N, O] fp32: the fused GEMV for up to MAX_FUSED_TOKENS tokens, else
    dequantize chunks of rows into one reused fp32 scratch and GEMM. lib=None: the pure-PyTorch fallback."""
    lib = cpu_lib() if lib == "auto" else lib
    N, I = x_NI.shape
    O = q_OI.shape[0]
    if not (q_OI.is_contiguous() and s.is_contiguous() and s.dtype == torch.float32 and x_NI.is_contiguous()
            and x_NI.dtype == torch.float32):
        raise ValueError("FP8 CPU linear needs contiguous fp32 activations, contiguous weights and fp32 scales")
    if lib is not None and N <= MAX_FUSED_TOKENS:
        y_NO = torch.empty(N, O, dtype=torch.float32)
        rc = lib.fp8_linear_small(x_NI.data_ptr(), q_OI.data_ptr(), s.data_ptr(), y_NO.data_ptr(), N, O, I, block[0],
                                  block[1], _threads(O * I))
        if rc != 0:
            raise RuntimeError(f"fp8_linear_small refused N={N}")
        return y_NO
    rows = max(1, min(O, chunk_elems // max(1, I)))
    if rows >= O:
        w_OI = torch.empty(O, I, dtype=torch.float32)
        dequant_rows_into(w_OI, q_OI, s, 0, block, lib)
        return F.linear(x_NI, w_OI)
    y_NO = torch.empty(N, O, dtype=torch.float32)
    scratch = torch.empty(rows, I, dtype=torch.float32)
    for r0 in range(0, O, rows):
        r1 = min(O, r0 + rows)
        w = scratch[: r1 - r0]
        dequant_rows_into(w, q_OI, s, r0, block, lib)
        y_NO[:, r0:r1] = F.linear(x_NI, w)
    return y_NO


# -- pure-PyTorch fallback ---------------------------------------------------------------------------------------
_TWO_POW_120 = 2.0**120


def dequant_torch(q_RI: torch.Tensor, s: torch.Tensor, block, row0: int = 0) -> torch.Tensor:
    """fp32 rows of a block-scaled e4m3 matrix without a compiler: the bf16 bit trick.

    e4m3 bits (s eeee mmm) shifted left by 4 into a bfloat16 (s 0000eeee mmm0000) are the same number times
    2^-120, subnormals included (they become bf16 subnormals, exact). Folding 2^120 into the block scale costs
    nothing; scales of 2^8 or more would overflow, so those take torch's exact (slow) cast. The fastest
    pure-PyTorch option we measured (bench/fp8.py), still several times slower than an fp32 GEMV."""
    R, I = q_RI.shape
    bo, bi = block
    s_rows = s[torch.arange(row0, row0 + R, device=s.device) // bo]  # [R, KI]
    s_RI = s_rows.repeat_interleave(bi, dim=1)[:, :I]
    if float(s.abs().max()) >= 2.0**8:
        return q_RI.float() * s_RI
    u = q_RI.view(torch.uint8).to(torch.int16)
    bits = ((u & 0x80) << 8) | ((u & 0x7F) << 4)
    return bits.view(torch.bfloat16).float() * (s_RI * _TWO_POW_120)
