// Paged attention for XLA:CPU, as an XLA FFI custom call (moejax.kernels.native_attention builds and
// registers it). Same semantics as paged_attention.py's "rows" method: every row attends causally to
// its own sequence's keys, positions 0 .. its position (within a sliding window if one is given),
// reading them through the sequence's block table. Rows are spread over XLA's intra-op thread pool.
//
// Why native code: XLA:CPU lowers the per-row gather of KV blocks to an element-wise loop (~3 GB/s)
// and the per-row attention to tiny batched dots; at decode batch sizes that made attention most of
// a step. Here each row streams its blocks straight from the cache.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <condition_variable>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {  // bfloat16: the high half of a float32
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

struct Shape {
  int64_t rows, heads, head_dim, kv_heads, block_size, num_blocks, table_width, num_tables;
  float scale;
  int64_t window;  // 0: none
};

constexpr int64_t kLanes = 8;  // one AVX2 register of float32: partial sums kept per lane vectorise

template <typename T>
inline float dot(const float* __restrict q, const T* __restrict k, int64_t n) {
  float lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes)
    for (int64_t u = 0; u < kLanes; ++u) lanes[u] += q[d + u] * load(k, d + u);
  float sum = 0.f;
  for (; d < n; ++d) sum += q[d] * load(k, d);
  for (int64_t u = 0; u < kLanes; ++u) sum += lanes[u];
  return sum;
}

template <typename T>
inline void axpy(float a, const T* __restrict x, float* __restrict y, int64_t n) {
  for (int64_t d = 0; d < n; ++d) y[d] += a * load(x, d);
}

// Rows [begin, end): out[r, h, :] = softmax(q[r, h] . k[keys] * scale) @ v[keys]. Two passes over a
// row's keys (scores, then the weighted values), block by block.
template <typename T>
void attend_rows(const Shape& s, const T* q, const T* k, const T* v, const int32_t* positions,
                 const int32_t* seq_ids, const int32_t* tables, float* out, int64_t begin, int64_t end) {
  const int64_t g = s.heads / s.kv_heads, hd = s.head_dim;
  const int64_t block_stride = s.block_size * s.kv_heads * hd, slot_stride = s.kv_heads * hd;
  std::vector<float> qf(g * hd), scores, best(g), total(g);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t pos = positions[r];
    const int64_t seq = std::clamp<int64_t>(seq_ids[r], 0, s.num_tables - 1);
    const int64_t first = s.window > 0 ? std::max<int64_t>(0, pos - s.window + 1) : 0;
    const int64_t n = std::max<int64_t>(pos - first + 1, 0);
    scores.resize(n * g);
    const int32_t* table = tables + seq * s.table_width;
    auto slot = [&](int64_t key) {  // offset of `key`'s slot in the caches (bad table entries clamped)
      const int64_t block = std::clamp<int64_t>(table[std::min(key / s.block_size, s.table_width - 1)], 0,
                                                s.num_blocks - 1);
      return block * block_stride + (key % s.block_size) * slot_stride;
    };
    for (int64_t kh = 0; kh < s.kv_heads; ++kh) {
      for (int64_t i = 0; i < g * hd; ++i) qf[i] = load(q, (r * s.heads + kh * g) * hd + i) * s.scale;
      std::fill(best.begin(), best.end(), -std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < n; ++j) {  // the g query heads sharing this KV head, against each key
        const T* kr = k + slot(first + j) + kh * hd;
        for (int64_t h = 0; h < g; ++h) {
          const float x = dot(qf.data() + h * hd, kr, hd);
          scores[j * g + h] = x;
          best[h] = std::max(best[h], x);
        }
      }
      float* o = out + (r * s.heads + kh * g) * hd;
      std::fill(o, o + g * hd, 0.f);
      std::fill(total.begin(), total.end(), 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const T* vr = v + slot(first + j) + kh * hd;
        for (int64_t h = 0; h < g; ++h) {
          const float p = std::exp(scores[j * g + h] - best[h]);
          total[h] += p;
          axpy(p, vr, o + h * hd, hd);
        }
      }
      for (int64_t h = 0; h < g; ++h) {
        const float inv = total[h] > 0.f ? 1.f / total[h] : 0.f;
        for (int64_t d = 0; d < hd; ++d) o[h * hd + d] *= inv;
      }
    }
  }
}

// Runs `rows` rows in chunks taken from a shared counter by the calling thread and by tasks on the
// pool: the caller never waits for a chunk nobody has started, so a busy (or one-thread) pool cannot
// deadlock it. Tasks may start after the call returned; they then find no chunk left.
template <typename Work>
void parallel_rows(ffi::ThreadPool& pool, int64_t rows, int64_t grain, Work work) {
  struct State {
    std::atomic<int64_t> next{0};
    int64_t chunks, done = 0;
    std::mutex mutex;
    std::condition_variable finished;
  };
  auto state = std::make_shared<State>();
  state->chunks = (rows + grain - 1) / grain;
  auto run = [state, rows, grain, work]() {
    for (int64_t c; (c = state->next.fetch_add(1)) < state->chunks;) {
      work(c * grain, std::min(rows, (c + 1) * grain));
      std::lock_guard<std::mutex> lock(state->mutex);
      if (++state->done == state->chunks) state->finished.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), state->chunks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(run)(run));  // a copy per task
  run();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->finished.wait(lock, [&] { return state->done == state->chunks; });
}

ffi::Error PagedAttentionImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                              ffi::AnyBuffer v_cache, ffi::Buffer<ffi::S32> positions,
                              ffi::Buffer<ffi::S32> seq_ids, ffi::Buffer<ffi::S32> block_tables, float scale,
                              int64_t window, ffi::Result<ffi::Buffer<ffi::F32>> out) {
  auto qd = q.dimensions(), kd = k_cache.dimensions(), td = block_tables.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || td.size() != 2)
    return ffi::Error::InvalidArgument("paged attention: q [T, H, hd], caches [N, bs, KV, hd], tables [S, B]");
  if (q.element_type() != k_cache.element_type() || k_cache.element_type() != v_cache.element_type())
    return ffi::Error::InvalidArgument("paged attention: q and the caches must share one dtype");
  Shape s{qd[0], qd[1], qd[2], kd[2], kd[1], kd[0], td[1], td[0], scale, window};
  if (s.heads % s.kv_heads || kd[3] != s.head_dim || s.num_tables == 0 || s.table_width == 0)
    return ffi::Error::InvalidArgument("paged attention: inconsistent shapes");
  const int32_t *pos = positions.typed_data(), *seq = seq_ids.typed_data(), *tab = block_tables.typed_data();
  float* o = out->typed_data();
  const int64_t grain = std::max<int64_t>(1, s.rows / (4 * std::max<int64_t>(pool.num_threads(), 1)));
  switch (q.element_type()) {
    case ffi::DataType::F32: {
      auto *qp = static_cast<const float*>(q.untyped_data()), *kp = static_cast<const float*>(k_cache.untyped_data()),
           *vp = static_cast<const float*>(v_cache.untyped_data());
      parallel_rows(pool, s.rows, grain, [=](int64_t b, int64_t e) { attend_rows(s, qp, kp, vp, pos, seq, tab, o, b, e); });
      return ffi::Error::Success();
    }
    case ffi::DataType::BF16: {
      auto *qp = static_cast<const uint16_t*>(q.untyped_data()),
           *kp = static_cast<const uint16_t*>(k_cache.untyped_data()),
           *vp = static_cast<const uint16_t*>(v_cache.untyped_data());
      parallel_rows(pool, s.rows, grain, [=](int64_t b, int64_t e) { attend_rows(s, qp, kp, vp, pos, seq, tab, o, b, e); });
      return ffi::Error::Success();
    }
    default:
      return ffi::Error::InvalidArgument("paged attention: float32 or bfloat16 only");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxPagedAttention, PagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>());
