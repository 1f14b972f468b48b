// The routed experts of an MoE layer for XLA:CPU, as one XLA FFI custom call (moejax.kernels.native
// builds and registers it). Same semantics as moejax.kernels.moe_ffn on a buffer of S expert slots:
//
//   out[t] = sum_k w[t, k] * down[s](glu(x[t] @ gate_up[s] + b[s]))   with s = slot[t, k], s < S
//
// the hidden activation rounded to x's dtype before the down GEMM, as the jnp backends cast it.
//
// Why native code: at decode sizes XLA:CPU runs the grouped GEMM as a loop over tiles in which each
// tile's expert weights are copied by a dynamic slice before a tiny dot, and sorts, gathers and pads
// rows around it. Here a counting sort groups the (token, k) pairs by slot, and each work item runs a
// few rows of one expert through both GEMMs straight from the weight buffer, over XLA's thread pool.
//
// A row's result depends on nothing but that row: every row runs the same sequence of multiply-adds
// whichever rows share its work item, so outputs do not depend on the batch.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "gemm.h"

namespace {

using namespace moejax;

enum Activation : int64_t { kSilu = 0, kGelu = 1, kClampedSwiGLU = 2 };

struct Glu {
  Activation kind;
  float alpha, limit;  // kClampedSwiGLU's

  // act(gate) * up, or GPT-OSS's clamped form; 8 lanes at a time.
  f8 operator()(f8 gate, f8 up) const {
    switch (kind) {
      case kSilu:
        return gate * sigmoid(gate) * up;
      case kGelu: {  // tanh form (jax.nn.gelu's default): x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))
        const f8 inner = 1.5957691216057308f * (gate + 0.044715f * gate * gate * gate);
        return gate * sigmoid(inner) * up;
      }
      default: {
        gate = gate > limit ? f8{} + limit : gate;
        up = up > limit ? f8{} + limit : up;
        up = up < -limit ? f8{} - limit : up;
        return (up + 1.0f) * (gate * sigmoid(alpha * gate));
      }
    }
  }
};

struct Problem {
  int64_t T, K, D, F, S;
  Glu glu;
};

constexpr int64_t kItemRows = 8 * kRows;  // rows of one slot per work item: its weights stream once per item

// One work item: up to kItemRows (token, k) pairs routed to one slot.
struct Item {
  int32_t slot, first, count;  // pairs sorted[first .. first + count)
};

// The weights of one slot, to be requested over a GEMM of `steps` multiply-add steps of another slot
// (gemm.h's LinePrefetcher).
template <typename T>
LinePrefetcher weights_ahead(const T* weights, int64_t per_slot, int64_t slot, int64_t steps) {
  return {weights + slot * per_slot, per_slot * static_cast<int64_t>(sizeof(T)), steps};
}

template <typename T>
void run_items(const Problem& p, const T* x, const T* w_gate_up, const T* w_down, const T* b_gate_up,
               const int32_t* sorted, const Item* items, int64_t begin, int64_t end, float* y,
               int64_t num_items, int64_t ahead) {
  const int64_t D = p.D, F = p.F, Fp = (F + kLanes - 1) / kLanes * kLanes;
  // xs: the rows' inputs; gu: gate | up, padded so 8-lane reads past 2F stay inside; h: the
  // activation; ys: the rows' outputs. One set per thread, kept between calls.
  thread_local std::vector<float> xs, gu, h, ys;
  xs.resize(kItemRows * D), gu.resize(kItemRows * 2 * F + kLanes), h.resize(kItemRows * Fp), ys.resize(kItemRows * D);
  for (int64_t i = begin; i < end; ++i) {
    const Item item = items[i];
    const int32_t* pairs = sorted + item.first;
    for (int64_t r = 0; r < item.count; ++r)
      for (int64_t d = 0; d < D; ++d) xs[r * D + d] = load(x, (pairs[r] / p.K) * D + d);
    // While this item computes, the weights of the one `ahead` places on (the next this thread is likely
    // to take: the threads take items in turn) are requested: at decode sizes the KV streamed by the
    // attention before has pushed the experts out of cache, and they then arrive during the GEMMs
    // instead of stalling them (side by side on 2 cores: a shorter decode step at 16 and 64 rows, the
    // same at 256).
    const int64_t next = i + ahead < num_items && items[i + ahead].slot != item.slot ? items[i + ahead].slot : -1;
    LinePrefetcher next_gate_up, next_down;
    if (next >= 0) {
      next_gate_up = weights_ahead(w_gate_up, D * 2 * F, next, gemm_steps(item.count, D, 2 * F));
      next_down = weights_ahead(w_down, F * D, next, gemm_steps(item.count, F, D));
    }
    gemm(item.count, xs.data(), D, w_gate_up + item.slot * D * 2 * F, D, 2 * F, gu.data(), 2 * F,
         next >= 0 ? &next_gate_up : nullptr);
    for (int64_t r = 0; r < item.count; ++r) {
      float* g = gu.data() + r * 2 * F;
      if (b_gate_up != nullptr)
        for (int64_t j = 0; j < 2 * F; ++j) g[j] += load(b_gate_up, item.slot * 2 * F + j);
      for (int64_t f = 0; f < Fp; f += kLanes) {  // lanes past F hold garbage that the down GEMM never reads
        f8 act = p.glu(load8(g + f), load8(g + F + f));
        if constexpr (sizeof(T) == 2) act = round_to_bf16(act);
        store8(h.data() + r * Fp + f, act);
      }
    }
    gemm(item.count, h.data(), Fp, w_down + item.slot * F * D, F, D, ys.data(), D, next >= 0 ? &next_down : nullptr);
    for (int64_t r = 0; r < item.count; ++r)  // each row's output to its own (token, k) row of y
      std::memcpy(y + static_cast<int64_t>(pairs[r]) * D, ys.data() + r * D, D * sizeof(float));
  }
}

template <typename T>
void moe_ffn(ffi::ThreadPool& pool, const Problem& p, const T* x, const int32_t* slots, const float* weights,
             const T* w_gate_up, const T* w_down, const T* b_gate_up, float* out, int32_t* sizes) {
  const int64_t pairs = p.T * p.K, D = p.D;
  // counting sort of the (token, k) pairs by slot; pairs reaching no slot (slot >= S or < 0) are dropped
  std::fill(sizes, sizes + p.S, 0);
  for (int64_t i = 0; i < pairs; ++i)
    if (slots[i] >= 0 && slots[i] < p.S) ++sizes[slots[i]];
  std::vector<int32_t> start(p.S + 1, 0), sorted(pairs);
  for (int64_t s = 0; s < p.S; ++s) start[s + 1] = start[s] + sizes[s];
  std::vector<int32_t> fill(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < pairs; ++i)
    if (slots[i] >= 0 && slots[i] < p.S) sorted[fill[slots[i]]++] = static_cast<int32_t>(i);
  std::vector<Item> items;
  for (int64_t s = 0; s < p.S; ++s)
    for (int32_t first = start[s]; first < start[s + 1]; first += kItemRows)
      items.push_back({static_cast<int32_t>(s), first, std::min<int32_t>(kItemRows, start[s + 1] - first)});

  std::unique_ptr<float[]> y(new float[pairs * D]);  // expert output per (token, k) pair
  // at the sizes where the threshold matters an item has few rows: its expert's weights stream from memory
  const int64_t flops = static_cast<int64_t>(start[p.S]) * 3 * D * p.F * kStreamingWeight;
  parallel_chunks(pool, static_cast<int64_t>(items.size()), 1, flops, [&](int64_t b, int64_t e) {
    run_items(p, x, w_gate_up, w_down, b_gate_up, sorted.data(), items.data(), b, e, y.get(),
              static_cast<int64_t>(items.size()), parallel_workers(pool, static_cast<int64_t>(items.size()), flops));
  });
  const int64_t grain = std::max<int64_t>(1, p.T / (4 * std::max<int64_t>(pool.num_threads(), 1)));
  parallel_chunks(pool, p.T, grain, pairs * D, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      float* o = out + t * D;
      std::fill(o, o + D, 0.f);
      for (int64_t k = 0; k < p.K; ++k) {
        const int64_t i = t * p.K + k;
        if (slots[i] < 0 || slots[i] >= p.S) continue;
        const float w = weights[i];
        const float* yi = y.get() + i * D;
        for (int64_t d = 0; d < D; ++d) o[d] += w * yi[d];
      }
    }
  });
}

ffi::Error MoeFfnImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> slots,
                      ffi::Buffer<ffi::F32> weights, ffi::AnyBuffer w_gate_up, ffi::AnyBuffer w_down,
                      ffi::AnyBuffer b_gate_up, int64_t activation, float alpha, float limit,
                      ffi::Result<ffi::Buffer<ffi::F32>> out, ffi::Result<ffi::Buffer<ffi::S32>> sizes) {
  auto xd = x.dimensions(), sd = slots.dimensions(), gd = w_gate_up.dimensions(), dd = w_down.dimensions();
  if (xd.size() != 2 || sd.size() != 2 || gd.size() != 3 || dd.size() != 3)
    return ffi::Error::InvalidArgument("moe_ffn: x [T, D], slots [T, K], w_gate_up [S, D, 2F], w_down [S, F, D]");
  Problem p{xd[0], sd[1], xd[1], dd[1], dd[0], Glu{static_cast<Activation>(activation), alpha, limit}};
  if (sd[0] != p.T || weights.element_count() != p.T * p.K || gd[0] != p.S || gd[1] != p.D ||
      gd[2] != 2 * p.F || dd[2] != p.D)
    return ffi::Error::InvalidArgument("moe_ffn: inconsistent shapes");
  const bool biased = b_gate_up.element_count() != 0;
  if (biased && b_gate_up.element_count() != p.S * 2 * p.F)
    return ffi::Error::InvalidArgument("moe_ffn: b_gate_up must be [S, 2F] (or empty: no bias)");
  if (activation < kSilu || activation > kClampedSwiGLU)
    return ffi::Error::InvalidArgument("moe_ffn: activation 0 (silu), 1 (gelu) or 2 (clamped SwiGLU)");
  const auto dtype = x.element_type();
  if (w_gate_up.element_type() != dtype || w_down.element_type() != dtype ||
      (biased && b_gate_up.element_type() != dtype))
    return ffi::Error::InvalidArgument("moe_ffn: x and the expert weights must share one dtype");
  float* o = out->typed_data();
  int32_t* n = sizes->typed_data();
  const int32_t* s = slots.typed_data();
  const float* w = weights.typed_data();
  return by_element_type(dtype, "moe_ffn", [&](auto element) {
    using T = decltype(element);
    moe_ffn(pool, p, static_cast<const T*>(x.untyped_data()), s, w, static_cast<const T*>(w_gate_up.untyped_data()),
            static_cast<const T*>(w_down.untyped_data()),
            biased ? static_cast<const T*>(b_gate_up.untyped_data()) : nullptr, o, n);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxMoeFfn, MoeFfnImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<int64_t>("activation")
                                  .Attr<float>("alpha")
                                  .Attr<float>("limit")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
