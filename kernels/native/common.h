// What the native XLA:CPU kernels share: 8-lane float vectors (GCC/Clang vector extensions: one AVX2
// register, two NEON ones), bfloat16 loads and rounding, a vectorised exp and sigmoid, and work spread
// over XLA's intra-op thread pool.

#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace moejax {

namespace ffi = xla::ffi;

constexpr int64_t kLanes = 8;
typedef float f8 __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t i8 __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint16_t h8 __attribute__((vector_size(kLanes * sizeof(uint16_t))));

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {  // bfloat16: the high half of a float32
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline f8 load8(const uint16_t* p) {  // 8 bfloat16 -> float32
  h8 h;
  std::memcpy(&h, p, sizeof h);
  const i8 bits = __builtin_convertvector(h, i8) << 16;
  f8 v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
inline void store8(float* p, f8 v) { std::memcpy(p, &v, sizeof v); }

// Memory to be read soon, requested (prefetched) a few 64-byte lines at a time from `next` to `end`.
struct LinesAhead {
  const char* next = nullptr;
  const char* end = nullptr;

  void request(int64_t lines) {
    for (int64_t i = 0; i < lines && next < end; ++i, next += 64) __builtin_prefetch(next);
  }
  int64_t left() const { return (end - next + 63) / 64; }
};

// Whether any lane of a comparison's result (-1 or 0 per lane) is set.
inline bool any_lane(i8 mask) {
#ifdef __AVX__
  return __builtin_ia32_movmskps256(reinterpret_cast<f8>(mask)) != 0;
#else
  uint64_t words[sizeof mask / sizeof(uint64_t)], any = 0;
  std::memcpy(words, &mask, sizeof mask);
  for (uint64_t w : words) any |= w;
  return any != 0;
#endif
}

// Lane u of the result = the sum of a[u]'s lanes: eight horizontal sums in 14 shuffles and 7 adds (a
// pairwise tree: neighbours, then pairs, then halves) instead of 56 scalar adds.
inline f8 sum8x8(const f8 (&a)[8]) {
  f8 pairs[4], quads[2];
  for (int u = 0; u < 4; ++u)
    pairs[u] = __builtin_shufflevector(a[2 * u], a[2 * u + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
               __builtin_shufflevector(a[2 * u], a[2 * u + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  for (int u = 0; u < 2; ++u)
    quads[u] = __builtin_shufflevector(pairs[2 * u], pairs[2 * u + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
               __builtin_shufflevector(pairs[2 * u], pairs[2 * u + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(quads[0], quads[1], 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(quads[0], quads[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

// float32 -> the nearest bfloat16 (ties to even) -> float32: what XLA's convert does, so a kernel that
// rounds an intermediate to the input's dtype matches the jnp code that casts it.
inline f8 round_to_bf16(f8 v) {
  i8 bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & ~0xFFFF;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// exp(x) for x <= 0, on 8 lanes (std::exp is a scalar libm call). Cephes' expf: x = n ln2 + r,
// |r| <= ln2 / 2, exp(r) by a degree-6 polynomial, 2^n from the exponent bits; ~1 ulp.
inline f8 exp_nonpositive(f8 x) {
  const f8 lowest = f8{} - 87.0f;  // exp(-87) ~ 1.6e-38: below it, 0 for a softmax or a sigmoid
  x = x < lowest ? lowest : x;
  const i8 n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, i8);  // round to nearest (x <= 0)
  const f8 nf = __builtin_convertvector(n, f8);
  const f8 r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;
  f8 p = f8{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const i8 bits = (n + 127) << 23;
  f8 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// 1 / (1 + exp(-x)) without overflow: e = exp(-|x|) <= 1, then 1 / (1 + e) or e / (1 + e).
inline f8 sigmoid(f8 x) {
  const f8 e = exp_nonpositive(x < 0 ? x : -x);
  return (x < 0 ? e : f8{} + 1.0f) / (1.0f + e);
}

// Below this many multiply-adds a kernel runs on the calling thread alone: a pool thread joins only after
// it is woken, and below this the caller has done the work by then (benchmarks/decode_settings.py
// compares thresholds in the engine). MOEJAX_NATIVE_PARALLEL_MIN overrides it (read at every call).
constexpr int64_t kParallelMinFlops = 1 << 19;

inline int64_t parallel_min_flops() {
  const char* value = std::getenv("MOEJAX_NATIVE_PARALLEL_MIN");
  return value && *value ? std::strtoll(value, nullptr, 10) : kParallelMinFlops;
}

// Work that streams its operands from memory at decode sizes (KV blocks; an expert's weights for a few
// rows) counts each multiply-add this many times against the threshold: a second thread pays off at
// a quarter of a GEMM's work there (measured side by side on 2 cores, the KV and weights of 4 layers
// read in turn: paged attention at 64 rows, 48 keys 0.32-0.46 -> 0.24-0.36 ms a layer; routed experts
// at 16 rows 0.48-0.62 -> 0.25-0.36 ms; on operands already in cache no different).
constexpr int64_t kStreamingWeight = 4;

// The threads parallel_chunks runs `chunks` chunks of `flops` multiply-adds on: the caller, plus pool
// threads only when the work is worth waking them.
inline int64_t parallel_workers(ffi::ThreadPool& pool, int64_t chunks, int64_t flops) {
  return flops < parallel_min_flops() ? 1 : std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), chunks));
}

// Runs work(begin, end) over [0, n) in chunks of `grain`, taken from a shared counter by the calling
// thread and by tasks on the pool: the caller never waits for a chunk nobody has started, so a busy (or
// one-thread) pool cannot deadlock it. Tasks may start after the call returned; they then find no chunk
// left. Which thread runs a chunk never changes what it computes. `flops`: the whole work's
// multiply-adds; with no pool thread worth waking (parallel_workers) the caller runs it all.
template <typename Work>
void parallel_chunks(ffi::ThreadPool& pool, int64_t n, int64_t grain, int64_t flops, Work work) {
  if (n <= 0) return;
  const int64_t chunks = (n + grain - 1) / grain;
  // The caller is a worker too: pool.num_threads() helpers besides it would put one more thread than
  // the pool was sized for on the cores, and a helper descheduled mid-chunk holds up the whole call
  // (measured on 2 cores, routed experts at 64 rows: 2 helpers 178-201 us a call, 1 helper 123-158).
  const int64_t helpers = parallel_workers(pool, chunks, flops) - 1;
  if (helpers == 0) return work(0, n);
  struct State {
    std::atomic<int64_t> next{0};
    int64_t chunks, done = 0;
    std::mutex mutex;
    std::condition_variable finished;
  };
  auto state = std::make_shared<State>();
  state->chunks = chunks;
  auto run = [state, n, grain, work]() {
    for (int64_t c; (c = state->next.fetch_add(1)) < state->chunks;) {
      work(c * grain, std::min(n, (c + 1) * grain));
      std::lock_guard<std::mutex> lock(state->mutex);
      if (++state->done == state->chunks) state->finished.notify_all();
    }
  };
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(run)(run));  // a copy per task
  run();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->finished.wait(lock, [&] { return state->done == state->chunks; });
}

// The kernels' one dtype dispatch: run(T()) with T float (float32) or uint16_t (bfloat16's bits);
// any other element type is an error naming the kernel.
template <typename Run>
ffi::Error by_element_type(ffi::DataType dtype, const char* kernel, Run run) {
  switch (dtype) {
    case ffi::DataType::F32:
      run(float());
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      run(uint16_t());
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument(std::string(kernel) + ": float32 or bfloat16 only");
  }
}

}  // namespace moejax
