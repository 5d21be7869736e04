/*
 * The portable basis rule randlora-philox4x32-10-v1 (SPEC.md section 4) as one fused CPU loop.
 *
 * fill(out, k0, k1, tag, d1, d2, i0, i1, i2, kind, threshold, scale, threads, simd) fills the
 * writable 4-byte-element buffer `out` with consecutive elements of a row-major tensor of shape
 * (d0, d1, d2), starting at coordinates (i0, i1, i2): the element at (j0, j1, j2) is Philox4x32-10
 * word 0 of the counter (j0, j1, j2, tag) under the key (k0, k1), written as
 *   kind 0: the dense float32 value (SPEC 4.3), `scale` = DENSE_SCALE;
 *   kind 1: the ternary float32 value with the integer threshold T (SPEC 4.4), `scale` = c;
 *   kind 2: the word itself (uint32), for known-answer tests.
 * simd = 0 forces the generic loop. d1, d2 <= 2**32 (a counter word ranges over [0, 2**32)).
 *
 * Every value is a pure function of its coordinates, so the work is cut into fixed blocks that
 * threads claim from a shared counter: whatever the number of threads, and whichever thread computes
 * a block, the bits are the same. A thread the OS runs more often claims more blocks, so a loaded
 * machine slows the fill no more than it slows a single-threaded loop (there is no barrier per step).
 *
 * Exactness: 32/64-bit integer operations, and one binary32 multiply per dense value (x86-64 and
 * AArch64 evaluate float arithmetic in binary32, FLT_EVAL_METHOD == 0, and there is no addition to
 * contract into an FMA); ternary values are selected, not computed. Two loops give the same bits: a
 * generic one (words in 64-bit lanes, so each 32x32 -> 64 bit product is one unsigned multiply) and,
 * on x86-64 CPUs with AVX2, eight counters at a time in 32-bit lanes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if !defined(_WIN32)
#include <pthread.h>
#define RANDLORA_THREADS 1
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define RANDLORA_AVX2 1
#endif

#define M0 0xD2511F53u
#define M1 0xCD9E8D57u
#define W0 0x9E3779B9u
#define W1 0xBB67AE85u
#define BLOCK ((uint64_t)1 << 16) /* elements per claimed block: 256 KiB of output */
#define MAX_THREADS 256

enum { DENSE = 0, TERNARY = 1, WORDS = 2 };

typedef struct {
    uint32_t *out; /* float32 values (bit patterns) or words */
    uint64_t count, d1, d2, i0, i1, i2;
    uint32_t k0, k1, tag, le_neg, le_pos; /* ternary: w <= le_neg -> -c, else w <= le_pos -> +c */
    int kind, simd;
    float scale;
    uint64_t next_block; /* claimed with atomic adds */
} Job;

typedef struct {
    uint64_t i0, i1, i2;
} Coord;

/* The next coordinates in row-major order. */
static inline void step(const Job *job, Coord *at) {
    if (++at->i2 == job->d2) {
        at->i2 = 0;
        if (++at->i1 == job->d1) at->i1 = 0, at->i0++;
    }
}

/* One Philox round (SPEC 4.1) on words kept in 64-bit lanes, with the round's key words. */
#define ROUND(ka, kb)                                                                 \
    do {                                                                              \
        uint64_t p0 = (uint64_t)(uint32_t)c0 * M0, p1 = (uint64_t)(uint32_t)c2 * M1;  \
        c0 = (p1 >> 32) ^ c1 ^ (uint32_t)(ka), c2 = (p0 >> 32) ^ c3 ^ (uint32_t)(kb); \
        c1 = p1 & 0xFFFFFFFFu, c3 = p0 & 0xFFFFFFFFu;                                 \
    } while (0)

/* Word 0 of Philox4x32-10 at the counter (c0, c1, c2, c3), written out round by round (the key is
 * bumped before every round but the first) so that the element loops have no inner loop. */
static inline uint32_t word0(uint64_t c0, uint64_t c1, uint64_t c2, uint64_t c3, uint32_t k0, uint32_t k1) {
    ROUND(k0, k1);
    ROUND(k0 + 1 * W0, k1 + 1 * W1);
    ROUND(k0 + 2 * W0, k1 + 2 * W1);
    ROUND(k0 + 3 * W0, k1 + 3 * W1);
    ROUND(k0 + 4 * W0, k1 + 4 * W1);
    ROUND(k0 + 5 * W0, k1 + 5 * W1);
    ROUND(k0 + 6 * W0, k1 + 6 * W1);
    ROUND(k0 + 7 * W0, k1 + 7 * W1);
    ROUND(k0 + 8 * W0, k1 + 8 * W1);
    ROUND(k0 + 9 * W0, k1 + 9 * W1);
    return (uint32_t)c0;
}

static inline uint32_t bits_of(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u;
}

/* out[j] for the counters (i0, i1, i2_0 + j, tag), j < n; one loop per kind so that each stays simple. */
static void run_generic(const Job *job, uint32_t *out, uint64_t n, uint32_t i0, uint32_t i1, uint32_t i2_0) {
    const uint32_t k0 = job->k0, k1 = job->k1, tag = job->tag, le_neg = job->le_neg, le_pos = job->le_pos;
    const float scale = job->scale;
    const uint32_t pos = bits_of(scale), neg = bits_of(-scale);
    if (job->kind == DENSE) {
        for (uint64_t j = 0; j < n; j++) {
            uint32_t w = word0(i0, i1, i2_0 + (uint32_t)j, tag, k0, k1);
            out[j] = bits_of((float)(2 * (int32_t)(w >> 8) + 1 - (1 << 24)) * scale); /* |n| < 2**24: exact */
        }
    } else if (job->kind == TERNARY) {
        for (uint64_t j = 0; j < n; j++) {
            uint32_t w = word0(i0, i1, i2_0 + (uint32_t)j, tag, k0, k1);
            out[j] = w <= le_neg ? neg : (w <= le_pos ? pos : 0u); /* zeros are +0.0 */
        }
    } else {
        for (uint64_t j = 0; j < n; j++) out[j] = word0(i0, i1, i2_0 + (uint32_t)j, tag, k0, k1);
    }
}

#ifdef RANDLORA_AVX2
/* Eight (hi, lo) = x * m products: the even lanes from one vpmuludq, the odd lanes from another. */
__attribute__((target("avx2"))) static inline __m256i mulhilo8(__m256i x, __m256i m, __m256i *lo) {
    __m256i even = _mm256_mul_epu32(x, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
    *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    return _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

/* The eight counters starting at `at`, then `at` moved past them. Within a row of the last axis the
 * lanes differ in c2 only; across rows (a short last axis, e.g. B's rank axis) each lane is stepped. */
__attribute__((target("avx2"))) static void counters8(const Job *job, Coord *at, __m256i *c0, __m256i *c1, __m256i *c2) {
    if (at->i2 + 8 <= job->d2) {
        *c0 = _mm256_set1_epi32((int)at->i0), *c1 = _mm256_set1_epi32((int)at->i1);
        *c2 = _mm256_add_epi32(_mm256_set1_epi32((int)at->i2), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        at->i2 += 7;
        step(job, at);
        return;
    }
    uint32_t w0[8], w1[8], w2[8];
    for (int lane = 0; lane < 8; lane++) w0[lane] = (uint32_t)at->i0, w1[lane] = (uint32_t)at->i1, w2[lane] = (uint32_t)at->i2, step(job, at);
    *c0 = _mm256_loadu_si256((const __m256i *)w0), *c1 = _mm256_loadu_si256((const __m256i *)w1);
    *c2 = _mm256_loadu_si256((const __m256i *)w2);
}

__attribute__((target("avx2"))) static __m256i words8(const Job *job, Coord *at) {
    const __m256i m0 = _mm256_set1_epi32((int)M0), m1 = _mm256_set1_epi32((int)M1);
    __m256i c0, c1, c2, c3 = _mm256_set1_epi32((int)job->tag), lo0, lo1;
    counters8(job, at, &c0, &c1, &c2);
    for (uint32_t round = 0; round < 10; round++) {
        __m256i hi0 = mulhilo8(c0, m0, &lo0), hi1 = mulhilo8(c2, m1, &lo1);
        c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32((int)(job->k0 + round * W0)));
        c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32((int)(job->k1 + round * W1)));
        c1 = lo1, c3 = lo0;
    }
    return c0;
}

/* The first n - n % 8 elements from `at` (moved past them); returns how many it wrote. */
__attribute__((target("avx2"))) static uint64_t run_avx2(const Job *job, uint32_t *out, uint64_t n, Coord *at) {
    const __m256i bias = _mm256_set1_epi32(1 - (1 << 24));
    const __m256i le_neg = _mm256_set1_epi32((int)job->le_neg), le_pos = _mm256_set1_epi32((int)job->le_pos);
    const __m256 scale = _mm256_set1_ps(job->scale), neg = _mm256_set1_ps(-job->scale);
    uint64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256i w = words8(job, at), v = w;
        if (job->kind == DENSE) {
            __m256i odd = _mm256_add_epi32(_mm256_slli_epi32(_mm256_srli_epi32(w, 8), 1), bias);
            v = _mm256_castps_si256(_mm256_mul_ps(_mm256_cvtepi32_ps(odd), scale));
        } else if (job->kind == TERNARY) { /* unsigned w <= t  <=>  min(w, t) == w */
            __m256 is_neg = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_min_epu32(w, le_neg), w));
            __m256 is_pos = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_min_epu32(w, le_pos), w));
            v = _mm256_castps_si256(_mm256_blendv_ps(_mm256_and_ps(is_pos, scale), neg, is_neg));
        }
        _mm256_storeu_si256((__m256i *)(out + j), v);
    }
    return j;
}
#endif

/* Elements [first, first + n) of the job. */
static void fill_range(const Job *job, uint64_t first, uint64_t n) {
    Coord at = {0, job->i1, job->i2 + first};
    uint64_t done = 0;
    at.i1 += at.i2 / job->d2, at.i2 %= job->d2;
    at.i0 = job->i0 + at.i1 / job->d1, at.i1 %= job->d1;
#ifdef RANDLORA_AVX2
    if (job->simd) done = run_avx2(job, job->out + first, n, &at);
#endif
    while (done < n) { /* one run of the last axis at a time */
        uint64_t run = job->d2 - at.i2 < n - done ? job->d2 - at.i2 : n - done;
        run_generic(job, job->out + first + done, run, (uint32_t)at.i0, (uint32_t)at.i1, (uint32_t)at.i2);
        done += run;
        at.i2 += run - 1;
        step(job, &at);
    }
}

static void *worker(void *arg) {
    Job *job = (Job *)arg;
    for (;;) {
#ifdef RANDLORA_THREADS
        uint64_t first = __atomic_fetch_add(&job->next_block, 1, __ATOMIC_RELAXED) * BLOCK;
#else
        uint64_t first = job->next_block++ * BLOCK;
#endif
        if (first >= job->count) return NULL;
        fill_range(job, first, job->count - first < BLOCK ? job->count - first : BLOCK);
    }
}

/* The job on `threads` threads, this one included; fewer start if the OS refuses (same bits). */
static void run_job(Job *job, int threads) {
#ifdef RANDLORA_THREADS
    pthread_t ids[MAX_THREADS];
    int started = 0;
    while (started + 1 < threads && pthread_create(&ids[started], NULL, worker, job) == 0) started++;
    worker(job);
    for (int t = 0; t < started; t++) pthread_join(ids[t], NULL);
#else
    (void)threads;
    worker(job);
#endif
}

static int has_avx2(void) {
#ifdef RANDLORA_AVX2
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
#else
    return 0;
#endif
}

static const char *check(const Py_buffer *view, const unsigned long long *dims, int kind, unsigned long threshold) {
    const unsigned long long limit = 1ULL << 32;
    if (view->len % 4 != 0) return "the buffer's length is not a multiple of 4 bytes";
    if (dims[0] < 1 || dims[1] < 1 || dims[0] > limit || dims[1] > limit) return "d1 and d2 must be in [1, 2**32]";
    if (dims[2] >= limit || dims[3] >= dims[0] || dims[4] >= dims[1]) return "the start coordinates are out of range";
    if (kind < DENSE || kind > WORDS) return "kind must be 0 (dense), 1 (ternary) or 2 (words)";
    if (kind == TERNARY && (threshold < 1 || threshold > 0x80000000UL)) return "the threshold must be in [1, 2**31]";
    return NULL;
}

static PyObject *fill(PyObject *self, PyObject *args) {
    Py_buffer view;
    unsigned long k0, k1, tag, threshold;
    unsigned long long dims[5]; /* d1, d2, i0, i1, i2 */
    int kind, threads, simd;
    float scale;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*kkkKKKKKikfip", &view, &k0, &k1, &tag, &dims[0], &dims[1], &dims[2], &dims[3],
                          &dims[4], &kind, &threshold, &scale, &threads, &simd))
        return NULL;
    const char *problem = check(&view, dims, kind, threshold);
    if (problem != NULL) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, problem);
        return NULL;
    }
    Job job = {(uint32_t *)view.buf, (uint64_t)view.len / 4, dims[0], dims[1], dims[2], dims[3], dims[4],
               (uint32_t)k0, (uint32_t)k1, (uint32_t)tag, 0, 0, kind, simd && has_avx2(), scale, 0};
    if (kind == TERNARY) job.le_neg = (uint32_t)(threshold - 1), job.le_pos = (uint32_t)(2 * (uint64_t)threshold - 1);
    uint64_t blocks = (job.count + BLOCK - 1) / BLOCK;
    threads = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
    if ((uint64_t)threads > blocks) threads = blocks > 1 ? (int)blocks : 1;
    Py_BEGIN_ALLOW_THREADS
    run_job(&job, threads);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"fill", fill, METH_VARARGS,
     "fill(out, k0, k1, tag, d1, d2, i0, i1, i2, kind, threshold, scale, threads, simd): see randlora_core/_philox.c"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_philox", "The fused Philox4x32-10 basis fill.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__philox(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "AVX2", has_avx2()) != 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
