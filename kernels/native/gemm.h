// The GEMM the native kernels share: c = a @ w over register tiles, float32 accumulation, every output
// element the same ascending-k chain of multiply-adds whatever the number of rows and wherever its tile
// starts. So a row's result depends on that row alone: outputs do not depend on the batch.

#pragma once

#include <algorithm>
#include <cstdint>

#include "common.h"

namespace moejax {

// Bytes another GEMM reads next, requested one 64-byte line every `interval` multiply-add steps of this
// one's tiles: they arrive from memory while this one computes. (Requested a burst per column block, they
// stalled the core: side by side in the engine, a longer decode step at 64 rows.)
struct LinePrefetcher {
  LinesAhead lines;
  int64_t interval = 1, countdown = 1;

  // `bytes` from `first`, over a GEMM of `steps` multiply-add steps (column blocks x row tiles x K)
  LinePrefetcher() = default;
  LinePrefetcher(const void* first, int64_t bytes, int64_t steps)
      : lines{static_cast<const char*>(first), static_cast<const char*>(first) + bytes},
        interval(std::max<int64_t>(1, steps / std::max<int64_t>(1, lines.left()))), countdown(interval) {}

  void step() {
    if (--countdown == 0) {
      countdown = interval;
      lines.request(1);
    }
  }
};

// A register tile: 6 rows x 2 vectors, 12 accumulators + 2 weight vectors + a broadcast row value: all in
// AVX2's 16 registers (4 x 4 spilled), 12 multiply-adds per 8 loads.
constexpr int64_t kRows = 6;
constexpr int64_t kColVectors = 2;

// c[r, n:n+W] = a[r, :K] @ w[:K, n:n+W] for R rows, W = 8 * V columns (V vectors) or 1 (scalar); a:
// float32 rows with stride lda, w: [K, N] row-major (float32 or bfloat16), c: float32 rows with stride
// ldc. Every c[r, n] is the same ascending-k chain of multiply-adds whatever R and the column block, so a
// row's result never depends on its neighbours. With Ahead each k step also steps `ahead` (another
// GEMM's operand, a line every few steps).
template <int64_t R, int64_t V, bool Ahead, typename T>
void tile(const float* a, int64_t lda, const T* w, int64_t K, int64_t N, int64_t n, float* c, int64_t ldc,
          LinePrefetcher* ahead) {
  if constexpr (V == 0) {
    float acc[R] = {};
    for (int64_t k = 0; k < K; ++k) {
      if constexpr (Ahead) ahead->step();
      const float wk = load(w, k * N + n);
      for (int64_t r = 0; r < R; ++r) acc[r] += a[r * lda + k] * wk;
    }
    for (int64_t r = 0; r < R; ++r) c[r * ldc + n] = acc[r];
  } else {
    f8 acc[R][V] = {};
    for (int64_t k = 0; k < K; ++k) {
      if constexpr (Ahead) ahead->step();
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

// The column block [n, n + 8V) (V = 0: the single column n) for any number of rows, kRows at a time:
// the block's weights stay in cache across the row groups.
template <int64_t V, bool Ahead, typename T>
void column_block(int64_t rows, const float* a, int64_t lda, const T* w, int64_t K, int64_t N, int64_t n, float* c,
                  int64_t ldc, LinePrefetcher* ahead) {
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) tile<kRows, V, Ahead>(a + r * lda, lda, w, K, N, n, c + r * ldc, ldc, ahead);
  switch (rows - r) {
    case 1: return tile<1, V, Ahead>(a + r * lda, lda, w, K, N, n, c + r * ldc, ldc, ahead);
    case 2: return tile<2, V, Ahead>(a + r * lda, lda, w, K, N, n, c + r * ldc, ldc, ahead);
    case 3: return tile<3, V, Ahead>(a + r * lda, lda, w, K, N, n, c + r * ldc, ldc, ahead);
    case 4: return tile<4, V, Ahead>(a + r * lda, lda, w, K, N, n, c + r * ldc, ldc, ahead);
    case 5: return tile<5, V, Ahead>(a + r * lda, lda, w, K, N, n, c + r * ldc, ldc, ahead);
    default: return;
  }
}

template <bool Ahead, typename T>
void column_blocks(int64_t rows, const float* a, int64_t lda, const T* w, int64_t K, int64_t N, float* c, int64_t ldc,
                   int64_t n_begin, int64_t n_end, LinePrefetcher* ahead) {
  int64_t n = n_begin;
  for (; n + kColVectors * kLanes <= n_end; n += kColVectors * kLanes)
    column_block<kColVectors, Ahead>(rows, a, lda, w, K, N, n, c, ldc, ahead);
  for (; n + kLanes <= n_end; n += kLanes) column_block<1, Ahead>(rows, a, lda, w, K, N, n, c, ldc, ahead);
  for (; n < n_end; ++n) column_block<0, Ahead>(rows, a, lda, w, K, N, n, c, ldc, ahead);
}

// The multiply-add steps of a GEMM over `rows` rows and N columns with K-long chains (what a
// LinePrefetcher spreads its lines over).
inline int64_t gemm_steps(int64_t rows, int64_t K, int64_t N) {
  const int64_t blocks = N / (kColVectors * kLanes) + N % (kColVectors * kLanes) / kLanes + N % kLanes;
  return blocks * ((rows + kRows - 1) / kRows) * K;
}

// c[:rows, n_begin:n_end] = a[:rows, :K] @ w[:K, n_begin:n_end]: whole 2-vector blocks, then an 8-lane one,
// then single columns. With n_begin a multiple of 16 a column runs the same tile width as in the
// whole-width call, so how columns are split between calls never changes a result. ahead: lines of
// another GEMM's operand to request meanwhile.
template <typename T>
void gemm(int64_t rows, const float* a, int64_t lda, const T* w, int64_t K, int64_t N, float* c, int64_t ldc,
          int64_t n_begin, int64_t n_end, LinePrefetcher* ahead = nullptr) {
  if (ahead)
    column_blocks<true>(rows, a, lda, w, K, N, c, ldc, n_begin, n_end, ahead);
  else
    column_blocks<false>(rows, a, lda, w, K, N, c, ldc, n_begin, n_end, ahead);
}

template <typename T>
void gemm(int64_t rows, const float* a, int64_t lda, const T* w, int64_t K, int64_t N, float* c, int64_t ldc,
          LinePrefetcher* ahead = nullptr) {
  gemm(rows, a, lda, w, K, N, c, ldc, 0, N, ahead);
}

}  // namespace moejax
