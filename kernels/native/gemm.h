// The GEMM the native kernels share: c = a @ w over register tiles, float32 accumulation, every output
// element the same ascending-k chain of multiply-adds whatever the number of rows and wherever its tile
// starts. So a row's result depends on that row alone: outputs do not depend on the batch.

#pragma once

#include <cstdint>

#include "common.h"

namespace moejax {

// A register tile: 6 rows x 2 vectors, 12 accumulators + 2 weight vectors + a broadcast row value: all in
// AVX2's 16 registers (4 x 4 spilled), 12 multiply-adds per 8 loads.
constexpr int64_t kRows = 6;
constexpr int64_t kColVectors = 2;

// c[r, n:n+W] = a[r, :K] @ w[:K, n:n+W] for R rows, W = 8 * V columns (V vectors) or 1 (scalar); a:
// float32 rows with stride lda, w: [K, N] row-major (float32 or bfloat16), c: float32 rows with stride
// ldc. Every c[r, n] is the same ascending-k chain of multiply-adds whatever R and the column block, so a
// row's result never depends on its neighbours.
template <int64_t R, int64_t V, typename T>
void tile(const float* a, int64_t lda, const T* w, int64_t K, int64_t N, int64_t n, float* c, int64_t ldc) {
  if constexpr (V == 0) {
    float acc[R] = {};
    for (int64_t k = 0; k < K; ++k) {
      const float wk = load(w, k * N + n);
      for (int64_t r = 0; r < R; ++r) acc[r] += a[r * lda + k] * wk;
    }
    for (int64_t r = 0; r < R; ++r) c[r * ldc + n] = acc[r];
  } else {
    f8 acc[R][V] = {};
    for (int64_t k = 0; k < K; ++k) {
      f8 wk[V];
      for (int64_t v = 0; v < V; ++v) wk[v] = load8(w + k * N + n + v * kLanes);
      for (int64_t r = 0; r < R; ++r) {
        const float ar = a[r * lda + k];
        for (int64_t v = 0; v < V; ++v) acc[r][v] += ar * wk[v];
      }
    }
    for (int64_t r = 0; r < R; ++r)
      for (int64_t v = 0; v < V; ++v) store8(c + r * ldc + n + v * kLanes, acc[r][v]);
  }
}

// Bytes another GEMM reads next, requested a few lines per column block of this one: they arrive from
// memory while this one computes (all at once, the requests would stall the core instead).
struct LinePrefetcher {
  const char* next = nullptr;
  const char* end = nullptr;
  int64_t lines_per_block = 0;

  void operator()() {
    for (int64_t i = 0; i < lines_per_block && next < end; ++i, next += 64) __builtin_prefetch(next);
  }
};

// The column block [n, n + 8V) (V = 0: the single column n) for any number of rows, kRows at a time:
// the block's weights stay in cache across the row groups.
template <int64_t V, typename T>
void column_block(int64_t rows, const float* a, int64_t lda, const T* w, int64_t K, int64_t N, int64_t n, float* c,
                  int64_t ldc, LinePrefetcher* prefetch) {
  int64_t r = 0;
  if (prefetch) (*prefetch)();
  for (; r + kRows <= rows; r += kRows) tile<kRows, V>(a + r * lda, lda, w, K, N, n, c + r * ldc, ldc);
  switch (rows - r) {
    case 1: return tile<1, V>(a + r * lda, lda, w, K, N, n, c + r * ldc, ldc);
    case 2: return tile<2, V>(a + r * lda, lda, w, K, N, n, c + r * ldc, ldc);
    case 3: return tile<3, V>(a + r * lda, lda, w, K, N, n, c + r * ldc, ldc);
    case 4: return tile<4, V>(a + r * lda, lda, w, K, N, n, c + r * ldc, ldc);
    case 5: return tile<5, V>(a + r * lda, lda, w, K, N, n, c + r * ldc, ldc);
    default: return;
  }
}

// c[:rows, n_begin:n_end] = a[:rows, :K] @ w[:K, n_begin:n_end]: whole 2-vector blocks, then an 8-lane one,
// then single columns. With n_begin a multiple of 16 a column runs the same tile width as in the
// whole-width call, so how columns are split between calls never changes a result.
template <typename T>
void gemm(int64_t rows, const float* a, int64_t lda, const T* w, int64_t K, int64_t N, float* c, int64_t ldc,
          int64_t n_begin, int64_t n_end, LinePrefetcher* prefetch = nullptr) {
  int64_t n = n_begin;
  for (; n + kColVectors * kLanes <= n_end; n += kColVectors * kLanes)
    column_block<kColVectors>(rows, a, lda, w, K, N, n, c, ldc, prefetch);
  for (; n + kLanes <= n_end; n += kLanes) column_block<1>(rows, a, lda, w, K, N, n, c, ldc, prefetch);
  for (; n < n_end; ++n) column_block<0>(rows, a, lda, w, K, N, n, c, ldc, prefetch);
}

template <typename T>
void gemm(int64_t rows, const float* a, int64_t lda, const T* w, int64_t K, int64_t N, float* c, int64_t ldc,
          LinePrefetcher* prefetch = nullptr) {
  gemm(rows, a, lda, w, K, N, c, ldc, 0, N, prefetch);
}

}  // namespace moejax
