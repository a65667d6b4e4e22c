// sliding_head(features, weights, biases, relu) runs the converted head of a sliding-window classifier: the
// large-kernel conv (the first Linear, reshaped) and the 1x1 convs (the later Linears) with their bias (+ReLU).
//
//   features (B, C, H, W);  weights[0] (N0, C, kh, kw);  weights[i>0] (Ni, N(i-1), 1, 1);  biases[i] (Ni,)
//   output   (B, N_last, H - kh + 1, W - kw + 1)
//
// Every output position p = (b, y, x) is an independent row, so the work is tiled over positions:
//   cols  (P_t, K = C*kh*kw) = im2col of the tile          (our kernel: the layout change into the first GEMM)
//   act_0 (P_t, N0)          = cols @ W0^T                 (vendor GEMM into a preallocated buffer; W0^T is a view)
//   act_i (P_t, Ni)          = act_(i-1) @ Wi^T            ((positions, channels) rows: no copy between layers)
// and after each GEMM one epilogue pass of ours adds the bias and applies the ReLU in place (vectorized along the
// channels of a row); the last epilogue instead writes straight into the NCHW output (positions of a tile may span
// images). The tile size bounds the workspace. Where the device prefers it (few feature channels on the CPU), layer 0
// is instead the vendor's direct convolution of the whole map, transposed into act_0 for all positions.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace pyops {

struct HeadGeometry {
  int64_t batch, channels, in_h, in_w, kh, kw, out_h, out_w;
  int64_t out_hw() const { return out_h * out_w; }
  int64_t positions() const { return batch * out_hw(); }
  int64_t patch() const { return channels * kh * kw; }  // K of the first GEMM
};

// The device-specific halves of the head: everything else (checks, tiling, GEMMs) is shared.
struct HeadKernels {
  // cols (count, patch) <- the patches of positions [p0, p0 + count) of the contiguous features.
  void (*im2col)(const at::Tensor& features, at::Tensor& cols, const HeadGeometry& g, int64_t p0, int64_t count);
  // act (count, N) <- act(act + bias) in place, act = ReLU or identity: the epilogue of an intermediate layer.
  void (*bias_act)(at::Tensor& act, const at::Tensor& bias, bool relu);
  // out[b, n, yx] = act(acc[j, n] + bias[n]) for p0 + j = b * out_hw + yx: the last layer's epilogue into NCHW.
  void (*bias_act_nchw)(const at::Tensor& acc, const at::Tensor& bias, bool relu, at::Tensor& out, int64_t p0);
  // The im2col tile the device prefers, in bytes (0: as large as workspace_bytes allows). See sliding_head_tile.
  int64_t preferred_cols_bytes;
  // Whether layer 0 should run as the vendor's direct convolution of the whole map instead of im2col + GEMM tiles
  // (nullptr: never). The driver takes it only where that output fits half the workspace.
  bool (*direct_first_layer)(const HeadGeometry& g, const at::Tensor& w0);
};

// Validates the arguments (naming the one at fault) and returns the geometry.
HeadGeometry check_sliding_head_args(const at::Tensor& features, at::TensorList weights, at::TensorList biases,
                                     at::IntArrayRef relu);

// The shared driver: tiles positions so that cols and the activation buffers fit in workspace_bytes.
at::Tensor sliding_head_run(const at::Tensor& features, at::TensorList weights, at::TensorList biases,
                            at::IntArrayRef relu, int64_t workspace_bytes, const HeadKernels& kernels);

// Positions per tile: as many as workspace_bytes holds, fewer where the device prefers smaller im2col tiles
// (preferred_cols_bytes > 0; but never under kMinTilePositions, nor under layer 0's output channels: each tile's
// first GEMM rereads the whole weight, which must not cost more than the tile). preferred_cols_bytes < 0: no im2col
// at all (layer 0 ran as a direct convolution). Tiles are balanced (the same size up to one position). At least 1
// position, at most all.
constexpr int64_t kMinTilePositions = 256;
int64_t sliding_head_tile(const HeadGeometry& g, at::TensorList weights, int64_t element_size,
                          int64_t workspace_bytes, int64_t preferred_cols_bytes);

}  // namespace pyops
