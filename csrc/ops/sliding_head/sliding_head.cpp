// Schema and the device-independent half of sliding_head: argument checks, the position tiling, and the GEMM
// chain through the vendor library (at::mm_out into preallocated buffers). The device files supply im2col and the
// fused bias+ReLU epilogue (see sliding_head.h).
#include "ops/sliding_head/sliding_head.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "common/autocast.h"
#include "common/checks.h"

namespace pyops {

HeadGeometry check_sliding_head_args(const at::Tensor& features, at::TensorList weights, at::TensorList biases,
                                     at::IntArrayRef relu) {
  check_floating(features, "features");
  check_dim(features, 4, "features");
  const int64_t layers = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(layers > 0, "pyops.sliding_head: argument 'weights' must hold at least one layer");
  TORCH_CHECK_VALUE(static_cast<int64_t>(biases.size()) == layers, "pyops.sliding_head: argument 'biases' has ",
                    biases.size(), " entries but 'weights' has ", layers);
  TORCH_CHECK_VALUE(static_cast<int64_t>(relu.size()) == layers, "pyops.sliding_head: argument 'relu' has ",
                    relu.size(), " entries but 'weights' has ", layers);
  int64_t in_channels = features.size(1);
  for (int64_t i = 0; i < layers; ++i) {
    const at::Tensor& w = weights[i];
    const at::Tensor& b = biases[i];
    const std::string w_name = "weights[" + std::to_string(i) + "]", b_name = "biases[" + std::to_string(i) + "]";
    TORCH_CHECK_VALUE(w.dim() == 4, "pyops.sliding_head: argument '", w_name,
                      "' must be a 4-d conv weight (out, in, kh, kw), got shape ", w.sizes());
    // (a zero-size layer has nothing to compute, and its sizes would divide the tile planning by zero)
    TORCH_CHECK_VALUE(w.numel() > 0, "pyops.sliding_head: argument '", w_name, "' has no elements (shape ",
                      w.sizes(), "): every layer needs input and output channels and a non-empty kernel");
    check_same_dtype(w, features, w_name.c_str(), "features");
    check_same_device(w, features, w_name.c_str(), "features");
    TORCH_CHECK_VALUE(w.size(1) == in_channels, "pyops.sliding_head: argument 'weights[", i, "]' expects ", w.size(1),
                      " input channels but ", i == 0 ? "'features' has " : "the previous layer gives ", in_channels);
    TORCH_CHECK_VALUE(i == 0 || (w.size(2) == 1 && w.size(3) == 1), "pyops.sliding_head: argument 'weights[", i,
                      "]' must be a 1x1 kernel (only the first layer has a spatial kernel), got shape ", w.sizes());
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == w.size(0), "pyops.sliding_head: argument 'biases[", i,
                      "]' must have shape (", w.size(0), ",), got ", b.sizes());
    check_same_dtype(b, features, b_name.c_str(), "features");
    check_same_device(b, features, b_name.c_str(), "features");
    TORCH_CHECK_VALUE(relu[i] == 0 || relu[i] == 1, "pyops.sliding_head: argument 'relu[", i,
                      "]' must be 0 or 1, got ", relu[i]);
    in_channels = w.size(0);
  }
  const at::Tensor& w0 = weights[0];
  HeadGeometry g{features.size(0), features.size(1), features.size(2), features.size(3), w0.size(2), w0.size(3), 0, 0};
  TORCH_CHECK_VALUE(g.kh <= g.in_h && g.kw <= g.in_w, "pyops.sliding_head: argument 'features' has a ", g.in_h, "x",
                    g.in_w, " map, smaller than the ", g.kh, "x", g.kw, " kernel of 'weights[0]'");
  g.out_h = g.in_h - g.kh + 1;
  g.out_w = g.in_w - g.kw + 1;
  return g;
}

int64_t sliding_head_tile(const HeadGeometry& g, at::TensorList weights, int64_t element_size,
                          int64_t workspace_bytes, int64_t preferred_cols_bytes) {
  int64_t widest = 0;
  for (const at::Tensor& w : weights) widest = std::max(widest, w.size(0));
  const int64_t positions = std::max<int64_t>(g.positions(), 1);
  // Per position: one row of cols (none when layer 0 is a direct convolution: preferred_cols_bytes < 0) and one of
  // each of the two ping-pong activation buffers.
  const int64_t cols = preferred_cols_bytes < 0 ? 0 : g.patch();
  const int64_t per_position = (cols + 2 * widest) * element_size;
  int64_t tile = std::clamp<int64_t>(workspace_bytes / per_position, 1, positions);
  if (preferred_cols_bytes > 0) {
    // Every tile's GEMM reads (and the BLAS packs) all of W0, (N0, patch): tiles of at least N0 positions keep that
    // traffic below the im2col tile's own (Net1's 1.36 GB W0 on its 289 positions: 2.55 s in one tile, 2.82 s in
    // two, 3.48 s in three; bench/NOTES-sliding.md, stop 14).
    const int64_t preferred = std::max({preferred_cols_bytes / (g.patch() * element_size), kMinTilePositions,
                                        weights[0].size(0)});
    tile = std::min(tile, preferred);
  }
  const int64_t tiles = (positions + tile - 1) / tile;
  return (positions + tiles - 1) / tiles;
}

at::Tensor sliding_head_run(const at::Tensor& features, at::TensorList weights, at::TensorList biases,
                            at::IntArrayRef relu, int64_t workspace_bytes, const HeadKernels& kernels) {
  TORCH_CHECK_VALUE(workspace_bytes > 0, "pyops.sliding_head: argument 'workspace_bytes' must be positive, got ",
                    workspace_bytes);
  const HeadGeometry g = check_sliding_head_args(features, weights, biases, relu);
  const int64_t layers = static_cast<int64_t>(weights.size());
  at::Tensor out = at::empty({g.batch, weights[layers - 1].size(0), g.out_h, g.out_w}, features.options());
  if (out.numel() == 0) return out;

  std::vector<at::Tensor> w2d, bias;
  int64_t widest = 0;
  for (int64_t i = 0; i < layers; ++i) {
    w2d.push_back(weights[i].contiguous().view({weights[i].size(0), -1}));  // a view: no copy of the weights
    bias.push_back(biases[i].contiguous());
    widest = std::max(widest, weights[i].size(0));
  }
  // Layer 0 as the vendor's direct convolution of the whole map (no im2col) where the device prefers it for this
  // shape and its output takes at most half the workspace: the convolution's NCHW output and its transposed copy,
  // the (positions, N0) rows the next GEMM reads, exist together for a moment; then the tiles of the later layers
  // get the other half. (NCHW in and a copy out beat channels_last in and out, which converts input and weight.)
  at::Tensor first;
  const int64_t first_bytes = g.positions() * weights[0].size(0) * features.element_size();
  if (kernels.direct_first_layer != nullptr && kernels.direct_first_layer(g, weights[0]) &&
      first_bytes <= workspace_bytes / 2) {
    first = at::convolution(features.contiguous(), weights[0], std::nullopt, {1, 1}, {0, 0}, {1, 1},
                            /*transposed=*/false, {0, 0}, /*groups=*/1)
                .permute({0, 2, 3, 1})
                .contiguous()  // (reshape alone would return a transposed view for one image)
                .view({g.positions(), weights[0].size(0)});
    workspace_bytes -= first_bytes;
  }
  const at::Tensor f = first.defined() ? at::Tensor() : features.contiguous();
  const int64_t tile = sliding_head_tile(g, weights, features.element_size(), workspace_bytes,
                                         first.defined() ? -1 : kernels.preferred_cols_bytes);
  // Flat buffers, allocated once and viewed as contiguous (count, columns) matrices for each tile (the last one
  // may be shorter), so every GEMM writes into memory it already owns.
  at::Tensor cols_buf = first.defined() ? at::Tensor() : at::empty({g.patch() * tile}, features.options());
  at::Tensor ping = at::empty({widest * tile}, features.options());
  at::Tensor pong = at::empty({widest * tile}, features.options());
  auto as_matrix = [](at::Tensor& buf, int64_t count, int64_t columns) {
    return buf.narrow(0, 0, count * columns).view({count, columns});
  };

  for (int64_t p0 = 0; p0 < g.positions(); p0 += tile) {
    const int64_t count = std::min(tile, g.positions() - p0);
    at::Tensor src;
    if (!first.defined()) {
      src = as_matrix(cols_buf, count, g.patch());
      kernels.im2col(f, src, g, p0, count);
    }
    for (int64_t i = 0; i < layers; ++i) {
      at::Tensor act;
      if (i == 0 && first.defined()) {
        act = first.narrow(0, p0, count);  // rows of a contiguous matrix: the epilogue works on them in place
      } else {
        act = as_matrix((i % 2 == 0) ? ping : pong, count, w2d[i].size(0));
        at::mm_out(act, src, w2d[i].t());  // the transposed view: BLAS reads W row-major as W^T, no copy
      }
      if (i + 1 < layers) {
        kernels.bias_act(act, bias[i], relu[i] != 0);
      } else {
        kernels.bias_act_nchw(act, bias[i], relu[i] != 0, out, p0);
      }
      src = act;
    }
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  // relu: one 0/1 flag per layer. allow_tf32: fp32 GEMMs may use TF32 (CUDA only; off means exact fp32 whatever
  // the global flags say). workspace_bytes: bound on the im2col and activation buffers (tiles positions).
  m.def("sliding_head(Tensor features, Tensor[] weights, Tensor[] biases, int[] relu, bool allow_tf32=False, "
        "int workspace_bytes=268435456) -> Tensor");
}

// In autocast regions: one dtype for the features and every layer's weight and bias (csrc/common/autocast.h).
TORCH_LIBRARY_IMPL(pyops, AutocastCPU, m) { m.impl("sliding_head", autocast_kernel<c10::DeviceType::CPU>()); }
TORCH_LIBRARY_IMPL(pyops, AutocastCUDA, m) { m.impl("sliding_head", autocast_kernel<c10::DeviceType::CUDA>()); }

}  // namespace pyops
