// Short rows laid end to end (conv1d.h): the layout conversions, as plain loops (TensorIterator copies with an
// inner dimension of 4 ran at a few percent of the memory's speed).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "ops/conv1d/conv1d.h"

namespace pyops {

int64_t end_to_end_blocks(int64_t batch) { return std::clamp<int64_t>(batch / 16, 1, 8); }

at::Tensor lay_end_to_end(const at::Tensor& t, int64_t lead, int64_t length, int64_t blocks) {
  const int64_t n = t.size(0), channels = t.size(1), l = t.size(2), per_block = (n + blocks - 1) / blocks;
  at::Tensor rows = at::empty({blocks, channels, per_block * length}, t.options());
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "pyops_conv1d_lay_end_to_end", [&] {
    const scalar_t* src = t.const_data_ptr<scalar_t>();
    scalar_t* dst = rows.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, blocks * channels, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / channels, c = row % channels;
        scalar_t* out = dst + row * per_block * length;
        std::fill(out, out + per_block * length, scalar_t(0));
        // (plain loops: a library copy call per sample of a few values cost more than the copy)
        for (int64_t m = 0; m < per_block && b * per_block + m < n; ++m) {
          const scalar_t* in = src + ((b * per_block + m) * channels + c) * l;
          scalar_t* at = out + m * length + lead;
          for (int64_t i = 0; i < l; ++i) at[i] = in[i];
        }
      }
    });
  });
  return rows;
}

void take_end_to_end(const at::Tensor& rows, int64_t length, at::Tensor& out) {
  const int64_t blocks = rows.size(0), channels = rows.size(1), per_block = rows.size(2) / length;
  const int64_t n = out.size(0), count = out.size(2);
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "pyops_conv1d_take_end_to_end", [&] {
    const scalar_t* src = rows.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, blocks * channels, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / channels, c = row % channels;
        const scalar_t* in = src + row * per_block * length;
        for (int64_t m = 0; m < per_block && b * per_block + m < n; ++m, in += length) {
          scalar_t* at = dst + ((b * per_block + m) * channels + c) * count;
          for (int64_t i = 0; i < count; ++i) at[i] = in[i];
        }
      }
    });
  });
}

bool all_finite(const at::Tensor& t) {
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "pyops_conv1d_all_finite", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    finite = std::all_of(p, p + t.numel(), [](scalar_t v) { return std::isfinite(v); });
  });
  return finite;
}

}  // namespace pyops
