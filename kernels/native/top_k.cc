// The k largest of each row, as an XLA FFI custom call (moejax.kernels.native builds and registers it):
// the routers' top-k and greedy sampling's argmax on CPU.
//
// Order: that of jax.lax.top_k, the total order XLA's TopK sorts by (+NaN first, then +inf ... +0, -0
// ... -inf, -NaN last), equal values in ascending index order; with `argmax` (k = 1), that of
// jnp.argmax: every NaN above +inf and -0 equal to +0, so the first NaN, else the first of the largest.
//
// Why native code: XLA:CPU runs lax.top_k as a sort library call and jnp.argmax as a two-operand
// reduction loop; at decode sizes both took up to about 3x the time per call of this pass, which skips
// 8 values at a time when none beats the k-th kept (benchmarks/decode_settings.json, `kernels`).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

using namespace moejax;

// The integers whose signed order is the kernel's order of 8 floats.
template <bool Argmax>
inline i8 order_keys(const float* x) {
  i8 bits;
  std::memcpy(&bits, x, sizeof bits);
  if constexpr (Argmax) {
    const f8 v = load8(x);
    bits = v != v ? i8{} + 0x7fc00000 : bits;  // any NaN: the positive quiet NaN
    bits = bits == i8{} + INT32_MIN ? i8{} : bits;  // -0: +0
  }
  return bits < 0 ? bits ^ 0x7fffffff : bits;
}

// One row's k largest, in order, into v / id (keys: scratch of k), 8 values at a time: a block none of
// whose values beats the k-th kept is skipped whole.
template <bool Argmax>
void row_top_k(const float* row, int64_t N, int64_t k, float* v, int32_t* id, int32_t* keys) {
  int64_t held = 0;  // the best `held` so far, in order
  for (int64_t j = 0; j < N; j += kLanes) {
    const int64_t n = std::min(kLanes, N - j);
    float tail[kLanes] = {};
    const float* block = n == kLanes ? row + j : static_cast<const float*>(std::memcpy(tail, row + j, n * sizeof(float)));
    const i8 block_keys = order_keys<Argmax>(block);
    if (held == k && !any_lane(block_keys > keys[k - 1])) continue;
    for (int64_t u = 0; u < n; ++u) {
      const int32_t key = block_keys[u];
      if (held == k && key <= keys[k - 1]) continue;  // not above the k-th (an equal one came first)
      int64_t at = held < k ? held++ : k - 1;
      for (; at > 0 && keys[at - 1] < key; --at) {  // after every held one not below it
        keys[at] = keys[at - 1], v[at] = v[at - 1], id[at] = id[at - 1];
      }
      keys[at] = key, v[at] = block[u], id[at] = static_cast<int32_t>(j + u);
    }
  }
}

// x [M, N] float32 -> values [M, k], indices [M, k] int32; 1 <= k <= N (k = 1 with argmax).
ffi::Error TopKImpl(ffi::Buffer<ffi::F32> x, int64_t k, bool argmax, ffi::Result<ffi::Buffer<ffi::F32>> values,
                    ffi::Result<ffi::Buffer<ffi::S32>> indices) {
  auto dims = x.dimensions();
  if (dims.size() != 2 || k < 1 || k > dims[1] || (argmax && k != 1))
    return ffi::Error::InvalidArgument("top_k: x [M, N] and 1 <= k <= N (k = 1 with argmax)");
  const int64_t M = dims[0], N = dims[1];
  std::vector<int32_t> keys(k);
  for (int64_t r = 0; r < M; ++r) {
    const float* row = x.typed_data() + r * N;
    float* v = values->typed_data() + r * k;
    int32_t* id = indices->typed_data() + r * k;
    argmax ? row_top_k<true>(row, N, k, v, id, keys.data()) : row_top_k<false>(row, N, k, v, id, keys.data());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxTopK, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<bool>("argmax")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
