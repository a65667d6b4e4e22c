// A strided layer's rows split into their phases and merged back (conv1d.h, PhaseSlabs): one pass over all phases.
// Each phase copied on its own (a strided slice made contiguous, or written back into every stride-th position)
// read or wrote the whole row once per phase: at stride 2 those copies were 42 % of a depthwise layer's backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "ops/conv1d/conv1d.h"
#include "ops/conv1d/conv1d_cpu_phase_rows.h"

namespace pyops {
namespace {

template <bool Split>
void move_phases(const PhaseSlabs& ph, const at::Tensor& rows, const at::Tensor& slabs) {
  const int64_t count = ph.batch * ph.channels, L = ph.length, phases = ph.phases();
  std::vector<int64_t> offset(phases), length(phases);
  for (int64_t p = 0; p < phases; ++p) offset[p] = ph.slab_offset(p), length[p] = ph.phase_length(p);
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "pyops_conv1d_phases", [&] {
    scalar_t* r = static_cast<scalar_t*>(rows.data_ptr());
    scalar_t* s = static_cast<scalar_t*>(slabs.data_ptr());
    at::parallel_for(0, count, std::max<int64_t>(1, 32768 / std::max<int64_t>(L, 1)), [&](int64_t a, int64_t b) {
      std::vector<scalar_t*> dst(phases);
      for (int64_t row = a; row < b; ++row) {
        for (int64_t p = 0; p < phases; ++p) dst[p] = s + offset[p] + row * length[p];
        move_phase_row<scalar_t, Split>(r + row * L, dst.data(), L, ph.stride);
      }
    });
  });
}

}  // namespace

at::Tensor PhaseSlabs::slab(const at::Tensor& slabs, int64_t p) const {
  return slabs.narrow(0, slab_offset(p), batch * channels * phase_length(p)).view({batch, channels, phase_length(p)});
}

at::Tensor split_phases(const at::Tensor& x, int64_t stride) {
  const PhaseSlabs ph{x.size(0), x.size(1), x.size(2), stride};
  at::Tensor slabs = at::empty({x.numel()}, x.options());
  move_phases<true>(ph, x.contiguous(), slabs);
  return slabs;
}

void merge_phases(const at::Tensor& slabs, int64_t stride, at::Tensor& out) {
  move_phases<false>(PhaseSlabs{out.size(0), out.size(1), out.size(2), stride}, out, slabs);
}

}  // namespace pyops
