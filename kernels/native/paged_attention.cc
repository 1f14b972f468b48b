// Paged attention for XLA:CPU, as an XLA FFI custom call (moejax.kernels.native builds and
// registers it). Same semantics as paged_attention.py's "rows" method: every row attends causally to
// its own sequence's keys, positions 0 .. its position (within a sliding window if one is given),
// reading them through the sequence's block table. Rows are spread over XLA's intra-op thread pool.
//
// Why native code: XLA:CPU lowers the per-row gather of KV blocks to an element-wise loop (~3 GB/s)
// and the per-row attention to tiny batched dots; at decode batch sizes that made attention most of
// a step. Here each row streams its blocks straight from the cache.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"

namespace {

using namespace moejax;

struct Shape {
  int64_t rows, heads, head_dim, kv_heads, block_size, num_blocks, table_width, num_tables;
  float scale;
  int64_t window;  // 0: none
};

// Head sizes that are a multiple of 8 run on 8-lane vectors, with the common sizes known at compile
// time so their loops unroll; other head sizes run the scalar loops.
template <int64_t HD>
inline int64_t head_size(int64_t runtime) { return HD > 0 ? HD : runtime; }

// q . k on the vector path (a head size that is a multiple of 8), as 8 lane sums
template <int64_t HD, typename T>
inline f8 dot_lanes(const float* __restrict q, const T* __restrict k, int64_t hd) {
  f8 acc = {};
  for (int64_t d = 0; d < head_size<HD>(hd); d += kLanes) acc += load8(q + d) * load8(k + d);
  return acc;
}

template <typename T>
inline float dot(const float* __restrict q, const T* __restrict k, int64_t hd) {
  float sum = 0.f;
  for (int64_t d = 0; d < hd; ++d) sum += q[d] * load(k, d);
  return sum;
}

template <int64_t HD, typename T>
inline void axpy(float a, const T* __restrict x, float* __restrict y, int64_t hd) {
  if (head_size<HD>(hd) % kLanes == 0) {
    for (int64_t d = 0; d < head_size<HD>(hd); d += kLanes) {
      const f8 sum = load8(y + d) + a * load8(x + d);
      std::memcpy(y + d, &sum, sizeof sum);
    }
    return;
  }
  for (int64_t d = 0; d < hd; ++d) y[d] += a * load(x, d);
}

// The KV block read after the current one, requested a few 64-byte lines at a time as the current one's
// keys are computed: spread so, its lines arrive while the core computes; requested all at once at the
// block's start, they stalled it (side by side in the engine at 64 rows: a shorter decode step).
struct BlockAhead {
  LinesAhead lines;

  void start(const void* block, int64_t bytes) {  // what is left of the last block first: every line asked for
    lines.request(lines.left());
    lines = {static_cast<const char*>(block), static_cast<const char*>(block) + bytes};
  }
  void step(int64_t count) { lines.request(count); }
};

// o += sum_j p[j] v[j] over a block's keys j0 .. j1, in key order, `lines` of the next block asked for per
// key. Head sizes 32 and 64 keep o in registers across the keys (128 would spill AVX2's 16); the rest go
// through memory.
template <int64_t HD, typename T>
inline void add_weighted_values(const float* p, const T* vb, int64_t stride, int64_t j0, int64_t j1, float* o,
                                int64_t hd, BlockAhead& ahead, int64_t lines) {
  if constexpr (HD == 32 || HD == 64) {
    f8 acc[HD / kLanes];
    for (int64_t i = 0; i < HD / kLanes; ++i) acc[i] = load8(o + i * kLanes);
    for (int64_t j = j0; j < j1; ++j) {
      ahead.step(lines);
      for (int64_t i = 0; i < HD / kLanes; ++i) acc[i] += p[j] * load8(vb + j * stride + i * kLanes);
    }
    for (int64_t i = 0; i < HD / kLanes; ++i) store8(o + i * kLanes, acc[i]);
  } else {
    for (int64_t j = j0; j < j1; ++j) {
      ahead.step(lines);
      axpy<HD>(p[j], vb + j * stride, o, hd);
    }
  }
}

inline float max_lanes(f8 v) {
  float m = v[0];
  for (int u = 1; u < kLanes; ++u) m = std::max(m, v[u]);
  return m;
}

inline float sum_lanes(f8 v) {
  float s = 0.f;
  for (int u = 0; u < kLanes; ++u) s += v[u];
  return s;
}

// Keys per chunk (whole blocks): a chunk's scores are computed for every head, softmaxed together 8 at
// a time, then its values are summed; the running max and total are corrected once per chunk (an
// online softmax over chunks, not over keys or blocks).
constexpr int64_t kChunkKeys = 256;

// Rows [begin, end): out[r, h, :] = softmax(q[r, h] . k[keys] * scale) @ v[keys], keys first .. pos.
// Per chunk of a row's blocks, two passes: the scores of every head (a K block read once for all
// heads, each key once for the g query heads sharing its KV head), then the weighted values (each V
// block read once), the next block requested while one is used (BlockAhead): at decode batch sizes the KV
// of all layers outgrows the last-level cache, a KV block is one 4 KiB page at the common sizes, and the
// hardware prefetchers stop at page boundaries (they cannot follow a block table).
template <int64_t HD, typename T>
void attend_rows(const Shape& s, const T* q, const T* k, const T* v, const int32_t* positions,
                 const int32_t* seq_ids, const int32_t* tables, float* out, int64_t begin, int64_t end) {
  const int64_t g = s.heads / s.kv_heads, hd = head_size<HD>(s.head_dim), bs = s.block_size;
  const int64_t block_stride = bs * s.kv_heads * hd, slot_stride = s.kv_heads * hd, block_bytes = block_stride * sizeof(T);
  const int64_t chunk_blocks = std::max<int64_t>(1, kChunkKeys / bs);
  // per head: a chunk's scores, padded to whole vectors plus one (8 scores stored from any key)
  const int64_t score_stride = (chunk_blocks * bs + kLanes - 1) / kLanes * kLanes + kLanes;
  std::vector<float> qf(s.heads * hd), scores(s.heads * score_stride), best(s.heads), total(s.heads);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  auto row_table = [&](int64_t r) { return tables + std::clamp<int64_t>(seq_ids[r], 0, s.num_tables - 1) * s.table_width; };
  auto block_of = [&](const int32_t* table, int64_t b) {  // bad table entries clamped
    return std::clamp<int64_t>(table[std::min(b, s.table_width - 1)], 0, s.num_blocks - 1);
  };
  auto first_key = [&](int64_t pos) { return s.window > 0 ? std::max<int64_t>(0, pos - s.window + 1) : int64_t{0}; };
  // a block's lines spread over one pass's work on a block: every head's keys
  const int64_t block_lines = (block_bytes + 63) / 64, key_steps = s.heads * bs;
  const int64_t lines_per_key = (block_lines + key_steps - 1) / key_steps;
  const int64_t lines_per_8_keys = (block_lines + key_steps / kLanes - 1) / std::max<int64_t>(1, key_steps / kLanes);
  BlockAhead ahead;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t pos = positions[r], first = first_key(pos);
    const int32_t* table = row_table(r);
    for (int64_t i = 0; i < s.heads * hd; ++i) qf[i] = load(q, r * s.heads * hd + i) * s.scale;
    float* o = out + r * s.heads * hd;
    std::fill(o, o + s.heads * hd, 0.f);
    std::fill(best.begin(), best.end(), neg_inf);
    std::fill(total.begin(), total.end(), 0.f);
    const int64_t last_block = pos / bs;
    for (int64_t c = first / bs; c <= last_block; c += chunk_blocks) {
      const int64_t c_end = std::min(c + chunk_blocks, last_block + 1);  // blocks [c, c_end)
      // the chunk's keys as score indices [lo, hi]
      const int64_t lo = std::max<int64_t>(first - c * bs, 0), hi = std::min(pos, c_end * bs - 1) - c * bs;
      auto keys_of = [&](int64_t b, int64_t& j0, int64_t& j1) {
        j0 = std::max<int64_t>(first - b * bs, 0), j1 = std::min<int64_t>(pos - b * bs + 1, bs);
      };
      for (int64_t b = c; b < c_end; ++b) {  // scores
        const int64_t block = block_of(table, b);
        ahead.start(b + 1 < c_end ? k + block_of(table, b + 1) * block_stride : v + block_of(table, c) * block_stride,
                    block_bytes);
        int64_t j0, j1;
        keys_of(b, j0, j1);
        for (int64_t kh = 0; kh < s.kv_heads; ++kh) {
          const T* kb = k + block * block_stride + kh * hd;
          for (int64_t h = 0; h < g; ++h) {
            const float* qh = qf.data() + (kh * g + h) * hd;
            float* sh = scores.data() + (kh * g + h) * score_stride + (b - c) * bs;
            if (hd % kLanes == 0) {
              for (int64_t j = j0; j < j1; j += kLanes) {  // 8 keys at once: one 8 x 8 lane reduction
                ahead.step(lines_per_8_keys);
                f8 partial[kLanes];
                for (int64_t u = 0; u < kLanes; ++u)  // past j1: the last key again (overwritten or masked)
                  partial[u] = dot_lanes<HD>(qh, kb + std::min(j + u, j1 - 1) * slot_stride, hd);
                store8(sh + j, sum8x8(partial));
              }
            } else {
              for (int64_t j = j0; j < j1; ++j) {
                ahead.step(lines_per_key);
                sh[j] = dot(qh, kb + j * slot_stride, hd);
              }
            }
          }
        }
      }
      const int64_t padded = (hi + 1 + kLanes - 1) / kLanes * kLanes;
      for (int64_t head = 0; head < s.heads; ++head) {  // softmax of the chunk, merged into the row's
        float* sh = scores.data() + head * score_stride;
        std::fill(sh, sh + lo, neg_inf);
        std::fill(sh + hi + 1, sh + padded, neg_inf);
        f8 m8 = f8{} + neg_inf;
        for (int64_t j = 0; j < padded; j += kLanes) {
          const f8 x = load8(sh + j);
          m8 = x > m8 ? x : m8;
        }
        const float m = std::max(best[head], max_lanes(m8));
        // 0 on the first chunk (best = -inf)
        const float correction = best[head] == neg_inf ? 0.f : exp_nonpositive(f8{} + (best[head] - m))[0];
        best[head] = m;
        f8 sum8 = {};
        for (int64_t j = 0; j < padded; j += kLanes) {
          f8 e = exp_nonpositive(load8(sh + j) - m);
          const f8 x = load8(sh + j);
          e = x == neg_inf ? f8{} : e;  // outside the keys: exactly 0
          sum8 += e;
          store8(sh + j, e);
        }
        total[head] = total[head] * correction + sum_lanes(sum8);
        float* oh = o + head * hd;
        for (int64_t d = 0; d < hd; ++d) oh[d] *= correction;
      }
      for (int64_t b = c; b < c_end; ++b) {  // weighted values
        const int64_t block = block_of(table, b);
        if (b + 1 < c_end) {
          ahead.start(v + block_of(table, b + 1) * block_stride, block_bytes);
        } else if (c_end <= last_block) {
          ahead.start(k + block_of(table, c_end) * block_stride, block_bytes);
        } else if (r + 1 < end) {  // the next row's first keys
          const int64_t next_pos = positions[r + 1];
          ahead.start(k + block_of(row_table(r + 1), first_key(next_pos) / bs) * block_stride, block_bytes);
        }
        int64_t j0, j1;
        keys_of(b, j0, j1);
        for (int64_t kh = 0; kh < s.kv_heads; ++kh) {
          const T* vb = v + block * block_stride + kh * hd;
          for (int64_t h = 0; h < g; ++h) {
            const int64_t head = kh * g + h;
            add_weighted_values<HD>(scores.data() + head * score_stride + (b - c) * bs, vb, slot_stride, j0, j1,
                                    o + head * hd, hd, ahead, lines_per_key);
          }
        }
      }
    }
    for (int64_t head = 0; head < s.heads; ++head) {
      const float inv = total[head] > 0.f ? 1.f / total[head] : 0.f;
      for (int64_t d = 0; d < hd; ++d) o[head * hd + d] *= inv;
    }
  }
}

// The row loop for the head size: compile-time for the common ones.
template <typename T>
void attend_rows_any(const Shape& s, const T* q, const T* k, const T* v, const int32_t* positions,
                     const int32_t* seq_ids, const int32_t* tables, float* out, int64_t begin, int64_t end) {
  switch (s.head_dim) {
    case 32: return attend_rows<32>(s, q, k, v, positions, seq_ids, tables, out, begin, end);
    case 64: return attend_rows<64>(s, q, k, v, positions, seq_ids, tables, out, begin, end);
    case 128: return attend_rows<128>(s, q, k, v, positions, seq_ids, tables, out, begin, end);
    default: return attend_rows<0>(s, q, k, v, positions, seq_ids, tables, out, begin, end);
  }
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
  int64_t keys = 0;  // the work: keys read per row (queries x keys x head size x 2 multiply-adds)
  for (int64_t r = 0; r < s.rows; ++r) keys += std::min<int64_t>(pos[r] + 1, s.window > 0 ? s.window : pos[r] + 1);
  const int64_t flops = keys * s.heads * s.head_dim * 2 * kStreamingWeight;  // KV streams from memory
  return by_element_type(q.element_type(), "paged attention", [&](auto element) {
    using T = decltype(element);
    auto *qp = static_cast<const T*>(q.untyped_data()), *kp = static_cast<const T*>(k_cache.untyped_data()),
         *vp = static_cast<const T*>(v_cache.untyped_data());
    parallel_chunks(pool, s.rows, grain, flops, [=](int64_t b, int64_t e) { attend_rows_any(s, qp, kp, vp, pos, seq, tab, o, b, e); });
  });
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
