// x @ w for XLA:CPU, for one or several weights at once, as an XLA FFI custom call (moejax.kernels.native
// builds and registers it): the models' projections, router and LM head on CPU. Several weights of one
// input (q, k and v) share one pass over the thread pool: at decode sizes waking the pool costs about as
// much as a small projection.
//
// Why native code: XLA:CPU computes a row of a dot with a different sequence of operations depending
// on how many rows the dot has (one row, a few, many), so the same request's logits could differ in the
// last bit between a batch of 1 and one of 20, and a greedy token at a near-tie with them: outputs would
// depend on the schedule. Here every output element is the same ascending-k chain of multiply-adds
// whatever the rows (gemm.h), so a row's result depends on that row alone.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "gemm.h"

namespace {

using namespace moejax;

// A work item: kGroupRows rows (fewer at the end) x kChunkColumns columns of one weight: the rows' inputs
// stay in cache across the chunk's column blocks; several items per thread even at decode sizes.
constexpr int64_t kGroupRows = 8 * kRows;
constexpr int64_t kChunkColumns = 4 * kColVectors * kLanes;

struct Product {  // out[M, N] = x @ w[K, N]
  const void* w;
  int64_t N;
  float* out;
};

// Every product of x[M, K] with one of the weights, float32 accumulation, in one pass over the pool.
template <typename T>
void matmuls(ffi::ThreadPool& pool, const T* x, int64_t M, int64_t K, const std::vector<Product>& products) {
  const int64_t groups = (M + kGroupRows - 1) / kGroupRows;
  std::vector<int64_t> first_item{0};  // items of product p: [first_item[p], first_item[p + 1])
  int64_t flops = 0;
  for (const Product& p : products) {
    first_item.push_back(first_item.back() + groups * ((p.N + kChunkColumns - 1) / kChunkColumns));
    flops += M * K * p.N;
  }
  parallel_chunks(pool, first_item.back(), 1, flops, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> rows;  // bfloat16 inputs as float32
    for (int64_t i = begin; i < end; ++i) {
      const int64_t p = std::upper_bound(first_item.begin(), first_item.end(), i) - first_item.begin() - 1;
      const Product& product = products[p];
      const int64_t item = i - first_item[p], chunks = (product.N + kChunkColumns - 1) / kChunkColumns;
      const int64_t r0 = item / chunks * kGroupRows, n0 = item % chunks * kChunkColumns;
      const int64_t count = std::min(kGroupRows, M - r0);
      const float* a;
      if constexpr (sizeof(T) == sizeof(float)) {
        a = x + r0 * K;
      } else {
        rows.resize(count * K);
        for (int64_t e = 0; e < count * K; ++e) rows[e] = load(x, r0 * K + e);
        a = rows.data();
      }
      gemm(count, a, K, static_cast<const T*>(product.w), K, product.N, product.out + r0 * product.N, product.N, n0,
           std::min(product.N, n0 + kChunkColumns));
    }
  });
}

// x [M, K] and weights w_i [K, N_i] -> out_i = x @ w_i [M, N_i] float32.
ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::RemainingArgs weights, ffi::RemainingRets outs) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || weights.size() != outs.size())
    return ffi::Error::InvalidArgument("matmul: x [M, K], weights [K, N_i], one float32 output per weight");
  const int64_t M = xd[0], K = xd[1];
  std::vector<Product> products;
  for (size_t i = 0; i < weights.size(); ++i) {
    auto w = weights.get<ffi::AnyBuffer>(i);
    auto out = outs.get<ffi::Buffer<ffi::F32>>(i);
    if (!w.has_value() || !out.has_value()) return ffi::Error::InvalidArgument("matmul: a weight or output is not a buffer");
    auto wd = w->dimensions();
    if (wd.size() != 2 || wd[0] != K || w->element_type() != x.element_type())
      return ffi::Error::InvalidArgument("matmul: every weight must be [K, N] of x's dtype");
    products.push_back({w->untyped_data(), wd[1], (*out)->typed_data()});
  }
  return by_element_type(x.element_type(), "matmul", [&](auto element) {
    matmuls(pool, static_cast<const decltype(element)*>(x.untyped_data()), M, K, products);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .RemainingRets());
