/* Inner products of fp16 rows with fp32 queries on x86-64 with AVX2, FMA and F16C.
 *
 * Built and loaded by score_kernels.py, which falls back to torch where this cannot run. Rows are
 * widened to fp32 as they are read (F16C) and every product is summed in fp32, so scores are those
 * of the fp32 product up to summation order.
 *
 * One query: the scan is a read of the whole matrix, so it is written to stream at memory speed:
 * one row after the other (a single sequential stream per thread; four rows interleaved read at
 * two thirds of the speed on an EPYC), four accumulators, and a software prefetch 1 KB ahead.
 *
 * Several queries: a matrix product, compute-bound. A 6-row x 16-query register tile (12 fp32
 * accumulators) as in BLIS's Haswell kernel: per element of the 6 rows, two loads of packed
 * queries, six broadcasts and twelve FMAs; the packed queries (dim x 16 floats a block) stay in
 * L2. Rows are widened six at a time into a panel, reused for every block of 16 queries.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The kernels alone use AVX2, FMA and F16C: the file is compiled for plain x86-64, so that
 * clipsearch_cpu_supported can run, and answer, on any x86-64 CPU. */
#define KERNEL __attribute__((target("avx2,fma,f16c")))

#define PREFETCH_BYTES 1024
#define TILE_ROWS 6
#define TILE_QUERIES 16

int clipsearch_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

KERNEL static inline __m256 load_half(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

KERNEL static inline float horizontal_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* out[r] = rows[r] . query for r < count; rows fp16 [count, dim], dim a multiple of 8. */
KERNEL void clipsearch_score_one_f16(const uint16_t *rows, int64_t count, int64_t dim, const float *query, float *out) {
    int64_t wide = dim - dim % 32;
    for (int64_t r = 0; r < count; r++) {
        const uint16_t *row = rows + r * dim;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t k = 0;
        for (; k < wide; k += 32) {
            _mm_prefetch((const char *)(row + k) + PREFETCH_BYTES, _MM_HINT_T0);
            a0 = _mm256_fmadd_ps(load_half(row + k), _mm256_loadu_ps(query + k), a0);
            a1 = _mm256_fmadd_ps(load_half(row + k + 8), _mm256_loadu_ps(query + k + 8), a1);
            a2 = _mm256_fmadd_ps(load_half(row + k + 16), _mm256_loadu_ps(query + k + 16), a2);
            a3 = _mm256_fmadd_ps(load_half(row + k + 24), _mm256_loadu_ps(query + k + 24), a3);
        }
        for (; k < dim; k += 8) a0 = _mm256_fmadd_ps(load_half(row + k), _mm256_loadu_ps(query + k), a0);
        out[r] = horizontal_sum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    }
}

/* packed [ceil(query_count / 16)][dim][16]: each block of 16 queries by element, zero-padded. */
void clipsearch_pack_queries(const float *queries, int64_t query_count, int64_t dim, float *packed) {
    int64_t blocks = (query_count + TILE_QUERIES - 1) / TILE_QUERIES;
    memset(packed, 0, sizeof(float) * blocks * dim * TILE_QUERIES);
    for (int64_t j = 0; j < query_count; j++)
        for (int64_t k = 0; k < dim; k++)
            packed[(j / TILE_QUERIES) * dim * TILE_QUERIES + k * TILE_QUERIES + j % TILE_QUERIES] = queries[j * dim + k];
}

/* tile [6][16] = a panel of six fp32 rows ([6][dim]) x one block of packed queries. */
KERNEL static void score_tile(const float *panel, const float *packed, int64_t dim, float *tile) {
    const float *r0 = panel, *r1 = r0 + dim, *r2 = r1 + dim, *r3 = r2 + dim, *r4 = r3 + dim, *r5 = r4 + dim;
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int64_t k = 0; k < dim; k++) {
        __m256 b0 = _mm256_loadu_ps(packed + k * TILE_QUERIES), b1 = _mm256_loadu_ps(packed + k * TILE_QUERIES + 8);
        __m256 a = _mm256_broadcast_ss(r0 + k);
        c00 = _mm256_fmadd_ps(a, b0, c00); c01 = _mm256_fmadd_ps(a, b1, c01);
        a = _mm256_broadcast_ss(r1 + k);
        c10 = _mm256_fmadd_ps(a, b0, c10); c11 = _mm256_fmadd_ps(a, b1, c11);
        a = _mm256_broadcast_ss(r2 + k);
        c20 = _mm256_fmadd_ps(a, b0, c20); c21 = _mm256_fmadd_ps(a, b1, c21);
        a = _mm256_broadcast_ss(r3 + k);
        c30 = _mm256_fmadd_ps(a, b0, c30); c31 = _mm256_fmadd_ps(a, b1, c31);
        a = _mm256_broadcast_ss(r4 + k);
        c40 = _mm256_fmadd_ps(a, b0, c40); c41 = _mm256_fmadd_ps(a, b1, c41);
        a = _mm256_broadcast_ss(r5 + k);
        c50 = _mm256_fmadd_ps(a, b0, c50); c51 = _mm256_fmadd_ps(a, b1, c51);
    }
    _mm256_storeu_ps(tile, c00); _mm256_storeu_ps(tile + 8, c01);
    _mm256_storeu_ps(tile + 16, c10); _mm256_storeu_ps(tile + 24, c11);
    _mm256_storeu_ps(tile + 32, c20); _mm256_storeu_ps(tile + 40, c21);
    _mm256_storeu_ps(tile + 48, c30); _mm256_storeu_ps(tile + 56, c31);
    _mm256_storeu_ps(tile + 64, c40); _mm256_storeu_ps(tile + 72, c41);
    _mm256_storeu_ps(tile + 80, c50); _mm256_storeu_ps(tile + 88, c51);
}

/* Row `row`'s scores of one block of queries (`width` of them) into its group's maxima: the first
 * row of a group sets them. */
KERNEL static inline void update_maxima(float *maxima, const float *scores, int64_t row, int64_t group_rows, int64_t width) {
    if (row % group_rows == 0) {
        memcpy(maxima, scores, sizeof(float) * width);
    } else if (width == TILE_QUERIES) {
        _mm256_storeu_ps(maxima, _mm256_max_ps(_mm256_loadu_ps(maxima), _mm256_loadu_ps(scores)));
        _mm256_storeu_ps(maxima + 8, _mm256_max_ps(_mm256_loadu_ps(maxima + 8), _mm256_loadu_ps(scores + 8)));
    } else {
        for (int64_t j = 0; j < width; j++) maxima[j] = scores[j] > maxima[j] ? scores[j] : maxima[j];
    }
}

/* Scores of rows first..first+live (live <= 6, widened into `panel`) against every block of packed
 * queries, into out [.., query_count] and the maxima. */
KERNEL static void score_panel(const float *panel, int64_t first, int64_t live, int64_t dim, const float *packed,
                        int64_t query_count, float *out, float *maxima, int64_t group_rows) {
    float tile[TILE_ROWS * TILE_QUERIES];
    for (int64_t block = 0; block < query_count; block += TILE_QUERIES) {
        score_tile(panel, packed + block * dim, dim, tile);
        int64_t width = query_count - block < TILE_QUERIES ? query_count - block : TILE_QUERIES;
        for (int64_t i = 0; i < live; i++) {
            memcpy(out + (first + i) * query_count + block, tile + i * TILE_QUERIES, sizeof(float) * width);
            if (maxima != NULL)
                update_maxima(maxima + ((first + i) / group_rows) * query_count + block, tile + i * TILE_QUERIES,
                              first + i, group_rows, width);
        }
    }
}

/* out [count, query_count] = rows (fp16 [count, dim]) x queries^T, the queries packed by
 * clipsearch_pack_queries; dim a multiple of 8. When `maxima` is given it receives each query's
 * largest score over every `group_rows` consecutive rows ([ceil(count / group_rows), query_count]),
 * taken from the registers' tiles, so a top-k need not read the scores again to find them.
 * Returns 0, or -1 when out of memory. */
KERNEL int clipsearch_score_many_f16(const uint16_t *rows, int64_t count, int64_t dim, const float *packed,
                              int64_t query_count, float *out, float *maxima, int64_t group_rows) {
    float *panel = malloc(sizeof(float) * TILE_ROWS * dim);
    if (panel == NULL) return -1;
    for (int64_t r = 0; r < count; r += TILE_ROWS) {
        int64_t live = count - r < TILE_ROWS ? count - r : TILE_ROWS;
        for (int64_t i = 0; i < TILE_ROWS; i++) {
            if (i >= live) {
                memset(panel + i * dim, 0, sizeof(float) * dim);
                continue;
            }
            const uint16_t *row = rows + (r + i) * dim;
            for (int64_t k = 0; k < dim; k += 8) _mm256_storeu_ps(panel + i * dim + k, load_half(row + k));
        }
        score_panel(panel, r, live, dim, packed, query_count, out, maxima, group_rows);
    }
    free(panel);
    return 0;
}
