/* Inner products of a collection's rows with fp32 queries on x86-64 with AVX2, FMA and F16C: fp16
 * rows, and fp32 rows stored in panels (below the fp16 kernels).
 *
 * Built and loaded by score_kernels.py, which falls back to torch where this cannot run. fp16 rows
 * are widened to fp32 as they are read (F16C) and every product is summed in fp32, so scores are
 * those of the fp32 product up to summation order.
 *
 * fp16, one query: the scan is a read of the whole matrix, so it is written to stream at memory speed:
 * one row after the other (a single sequential stream per thread; four rows interleaved read at
 * two thirds of the speed on an EPYC), four accumulators, and a software prefetch 1 KB ahead.
 *
 * fp16, several queries: a matrix product, compute-bound. A 6-row x 16-query register tile (12 fp32
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
#define TILE_ROWS 6      /* fp16 rows: rows broadcast, queries in the lanes */
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

/* packed [ceil(query_count / width)][dim][width]: each block of `width` queries by element, zero-padded. */
void clipsearch_pack_queries_by(const float *queries, int64_t query_count, int64_t dim, int64_t width, float *packed) {
    int64_t blocks = (query_count + width - 1) / width;
    memset(packed, 0, sizeof(float) * blocks * dim * width);
    for (int64_t j = 0; j < query_count; j++)
        for (int64_t k = 0; k < dim; k++)
            packed[(j / width) * dim * width + k * width + j % width] = queries[j * dim + k];
}

/* The register tile both products share, BLIS's Haswell kernel: tile [6][16] = six broadcast
 * operands x sixteen lanes, summed over dim elements. Per element, two vector loads of `lanes`
 * ([dim][16]), six broadcasts from `broadcast` (operand i's element k at i * operand_stride + k *
 * element_stride) and twelve multiply-adds into twelve accumulators. The loops over the tile have
 * constant bounds: the compiler unrolls them, keeps `c` in registers and, the function being
 * inlined, folds in the strides. */
#define TILE_BROADCASTS 6
#define TILE_LANES 16
KERNEL static inline void register_tile(const float *broadcast, int64_t operand_stride, int64_t element_stride,
                                        const float *lanes, int64_t dim, float *tile) {
    __m256 c[2 * TILE_BROADCASTS];
    for (int i = 0; i < 2 * TILE_BROADCASTS; i++) c[i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < dim; k++) {
        __m256 b0 = _mm256_loadu_ps(lanes + k * TILE_LANES), b1 = _mm256_loadu_ps(lanes + k * TILE_LANES + 8);
        for (int i = 0; i < TILE_BROADCASTS; i++) {
            __m256 a = _mm256_broadcast_ss(broadcast + i * operand_stride + k * element_stride);
            c[2 * i] = _mm256_fmadd_ps(a, b0, c[2 * i]);
            c[2 * i + 1] = _mm256_fmadd_ps(a, b1, c[2 * i + 1]);
        }
    }
    for (int i = 0; i < 2 * TILE_BROADCASTS; i++) _mm256_storeu_ps(tile + 8 * i, c[i]);
}

/* tile [6][16] = a panel of six fp32 rows ([6][dim], broadcast) x one block of packed queries (lanes). */
KERNEL static void score_tile(const float *panel, const float *packed, int64_t dim, float *tile) {
    register_tile(panel, dim, 1, packed, dim, tile);
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
 * clipsearch_pack_queries_by (16 to a block); dim a multiple of 8. When `maxima` is given it receives each query's
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
        /* The next six rows into L2 while this panel's tiles run: 339 against 358 ms for 1M x 512 x 64
         * queries (into L1 instead: 360; the fp32 panels gained nothing from the same). */
        if (r + 2 * TILE_ROWS <= count) {
            const char *next = (const char *)(rows + (r + TILE_ROWS) * dim);
            for (int64_t line = 0; line < TILE_ROWS * dim * 2 / 64; line++) _mm_prefetch(next + 64 * line, _MM_HINT_T1);
        }
        score_panel(panel, r, live, dim, packed, query_count, out, maxima, group_rows);
    }
    free(panel);
    return 0;
}

/* fp32 collections are stored in panels: rows 16p..16p+15 of the collection as panel p, [dim][16]
 * (element k of its 16 rows side by side), the last panel padded with zero rows. Both kernels read
 * a panel front to back, one sequential stream per thread, and neither packs nor transposes: the
 * 16 rows of an element are two vectors, each multiplied by a broadcast query element. */
#define PANEL_ROWS 16    /* fp32 panels: queries broadcast, rows in the lanes */
#define PANEL_QUERIES 6

/* The scores of panel `panel`'s 16 rows with one query: eight accumulators, the elements taken
 * four at a time, so the multiply-adds never wait on each other. */
KERNEL static inline void panel_scores_one(const float *panel, int64_t dim, const float *query, float *scores) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t k = 0; k < dim; k += 4) {
        const float *p = panel + k * PANEL_ROWS;
        _mm_prefetch((const char *)p + PREFETCH_BYTES, _MM_HINT_T0);
        _mm_prefetch((const char *)p + PREFETCH_BYTES + 64, _MM_HINT_T0);
        _mm_prefetch((const char *)p + PREFETCH_BYTES + 128, _MM_HINT_T0);
        _mm_prefetch((const char *)p + PREFETCH_BYTES + 192, _MM_HINT_T0);
        __m256 q = _mm256_broadcast_ss(query + k);
        a0 = _mm256_fmadd_ps(q, _mm256_loadu_ps(p), a0);
        a1 = _mm256_fmadd_ps(q, _mm256_loadu_ps(p + 8), a1);
        q = _mm256_broadcast_ss(query + k + 1);
        a2 = _mm256_fmadd_ps(q, _mm256_loadu_ps(p + 16), a2);
        a3 = _mm256_fmadd_ps(q, _mm256_loadu_ps(p + 24), a3);
        q = _mm256_broadcast_ss(query + k + 2);
        a4 = _mm256_fmadd_ps(q, _mm256_loadu_ps(p + 32), a4);
        a5 = _mm256_fmadd_ps(q, _mm256_loadu_ps(p + 40), a5);
        q = _mm256_broadcast_ss(query + k + 3);
        a6 = _mm256_fmadd_ps(q, _mm256_loadu_ps(p + 48), a6);
        a7 = _mm256_fmadd_ps(q, _mm256_loadu_ps(p + 56), a7);
    }
    _mm256_storeu_ps(scores, _mm256_add_ps(_mm256_add_ps(a0, a2), _mm256_add_ps(a4, a6)));
    _mm256_storeu_ps(scores + 8, _mm256_add_ps(_mm256_add_ps(a1, a3), _mm256_add_ps(a5, a7)));
}

/* out[r - first] = row r . query for rows first..first+count of a panelled fp32 collection; dim a
 * multiple of 8. */
KERNEL void clipsearch_score_one_f32(const float *panels, int64_t first, int64_t count, int64_t dim,
                                     const float *query, float *out) {
    int64_t end = first + count;
    for (int64_t p = first / PANEL_ROWS; p * PANEL_ROWS < end; p++) {
        int64_t row = p * PANEL_ROWS;
        if (row >= first && row + PANEL_ROWS <= end) {
            panel_scores_one(panels + p * dim * PANEL_ROWS, dim, query, out + (row - first));
            continue;
        }
        float scores[PANEL_ROWS];
        panel_scores_one(panels + p * dim * PANEL_ROWS, dim, query, scores);
        for (int64_t i = 0; i < PANEL_ROWS; i++)
            if (row + i >= first && row + i < end) out[row + i - first] = scores[i];
    }
}

/* tile [6][16] = six packed queries (broadcast) x one panel's 16 rows (lanes): the register tile
 * turned so that the rows, not the queries, fill the vectors. */
KERNEL static void panel_tile(const float *panel, const float *packed, int64_t dim, float *tile) {
    register_tile(packed, 1, PANEL_QUERIES, panel, dim, tile);
}

KERNEL static inline float largest_of_16(const float *scores) {
    __m256 m = _mm256_max_ps(_mm256_loadu_ps(scores), _mm256_loadu_ps(scores + 8));
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* out [query_count][out_stride], query-major: out[j * out_stride + r - first] = row r . query j
 * for rows first..first+count of a panelled fp32 collection, the queries packed six to a block by
 * clipsearch_pack_queries_by. When `maxima` is given it receives each query's largest score over
 * every `group_rows` consecutive rows from `first` ([ceil(count / group_rows)][query_count]). */
KERNEL void clipsearch_score_many_f32(const float *panels, int64_t first, int64_t count, int64_t dim,
                                      const float *packed, int64_t query_count, float *out, int64_t out_stride,
                                      float *maxima, int64_t group_rows) {
    int64_t end = first + count;
    float tile[PANEL_QUERIES * PANEL_ROWS];
    for (int64_t p = first / PANEL_ROWS; p * PANEL_ROWS < end; p++) {
        int64_t row = p * PANEL_ROWS, offset = row - first;
        /* A whole panel inside the range and inside one group is written a vector at a time. */
        int whole = row >= first && row + PANEL_ROWS <= end && offset / group_rows == (offset + PANEL_ROWS - 1) / group_rows;
        const float *panel = panels + p * dim * PANEL_ROWS;
        for (int64_t block = 0; block < query_count; block += PANEL_QUERIES) {
            panel_tile(panel, packed + block * dim, dim, tile);
            int64_t width = query_count - block < PANEL_QUERIES ? query_count - block : PANEL_QUERIES;
            for (int64_t j = 0; j < width; j++) {
                const float *scores = tile + j * PANEL_ROWS;
                float *into = out + (block + j) * out_stride;
                if (whole) {
                    memcpy(into + offset, scores, sizeof(float) * PANEL_ROWS);
                    if (maxima != NULL) {
                        float *best = maxima + (offset / group_rows) * query_count + block + j;
                        float largest = largest_of_16(scores);
                        *best = offset % group_rows == 0 || largest > *best ? largest : *best;
                    }
                    continue;
                }
                for (int64_t i = 0; i < PANEL_ROWS; i++) {
                    int64_t r = row + i;
                    if (r < first || r >= end) continue;
                    into[r - first] = scores[i];
                    if (maxima != NULL) {
                        float *best = maxima + ((r - first) / group_rows) * query_count + block + j;
                        *best = (r - first) % group_rows == 0 || scores[i] > *best ? scores[i] : *best;
                    }
                }
            }
        }
    }
}
