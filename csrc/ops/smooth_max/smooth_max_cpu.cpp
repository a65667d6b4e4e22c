// CPU kernels of smooth_max: one pass over x in the forward (online max/sum, in chunks that stay in L1), one
// elementwise pass in the backward. Parallel over independent outputs; vectorized with at::vec.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "common/cpu_isa.h"
#include "common/cpu_vec.h"
#include "ops/smooth_max/smooth_max.h"

namespace pyops {
namespace PYOPS_CPU_ISA {  // (common/cpu_isa.h: built once per instruction set)
namespace {

// Rows of the reduction handled per online step: a chunk is loaded (converted to the accumulation type and
// multiplied by sign), its maximum found, the running sum rescaled at most once, then its exponentials summed.
constexpr int64_t kChunk = 512;

// m: the running maximum; s: the running sum of exp(b·(x − m)), with c its Kahan compensation (the sum takes one
// addend per chunk or block of rows; plain fp32 addition lost ~2e-3 of a 16M-row sum, as s grew past the addends).
template <typename acc>
struct OnlineState {
  acc m = -std::numeric_limits<acc>::infinity();
  acc s = 0;
  acc c = 0;
};

// s += y with Kahan compensation c (elementwise for vectors). Compiled without fast-math, so kept as written.
template <typename T>
inline void kahan_add(T& s, T& c, const T& y) {
  const T yc = y - c;
  const T t = s + yc;
  c = (t - s) - yc;
  s = t;
}

// Loads `count` elements of x (stride 1) into buf as sign * acc(x).
template <typename scalar_t, typename acc>
inline void load_signed(const scalar_t* x, int64_t count, acc sign, acc* buf) {
  for (int64_t i = 0; i < count; ++i) buf[i] = sign * static_cast<acc>(x[i]);
}

// Folds buf[0:count) into the state of one output.
template <typename acc>
inline void fold_chunk(const acc* buf, int64_t count, acc b, OnlineState<acc>& st) {
  using Vec = Vectorized<acc>;
  constexpr int64_t V = Vec::size();
  Vec vmax(-std::numeric_limits<acc>::infinity());
  int64_t i = 0;
  for (; i + V <= count; i += V) vmax = at::vec::maximum(vmax, Vec::loadu(buf + i));
  acc cm = hmax(vmax);
  bool nan = std::isnan(cm);
  for (; i < count; ++i) {
    nan |= std::isnan(buf[i]);
    cm = std::max(cm, buf[i]);
  }
  if (nan) {  // NaN propagates, as in torch.logsumexp
    st.s = std::numeric_limits<acc>::quiet_NaN();
    return;
  }
  if (cm > st.m) {
    const acc f = std::exp(b * (st.m - cm));
    st.s *= f, st.c *= f;
    st.m = cm;
  }
  const Vec vm(st.m), vb(b), one(acc(1));
  Vec vs(acc(0));
  i = 0;
  for (; i + V <= count; i += V) {
    const Vec v = Vec::loadu(buf + i);
    vs += Vec::blendv((vb * (v - vm)).exp(), one, v == vm);
  }
  acc s = hsum(vs);
  for (; i < count; ++i) s += buf[i] == st.m ? acc(1) : std::exp(b * (buf[i] - st.m));
  kahan_add(st.s, st.c, s);
}

// A row of -inf alone (in sign·x) is -inf: log(n)/β would add +inf where it overflows (tiny β), giving NaN.
template <typename acc>
inline acc finish(const OnlineState<acc>& st, acc sign, acc b) {
  const bool all_minus_inf = st.m == -std::numeric_limits<acc>::infinity() && !std::isnan(st.s);  // (NaN stays)
  return sign * (all_minus_inf ? st.m : st.m + std::log(st.s) / b);
}

// Reduction over a contiguous row (inner == 1): the dim=-1 case.
template <typename scalar_t>
void forward_rows(const scalar_t* x, scalar_t* out, const ReductionView& v, double beta) {
  using acc = acc_t<scalar_t>;
  const acc sign = beta > 0 ? acc(1) : acc(-1), b = static_cast<acc>(std::abs(beta));
  const int64_t grain = std::max<int64_t>(1, 32768 / v.n);
  at::parallel_for(0, v.outer, grain, [&](int64_t begin, int64_t end) {
    acc buf[kChunk];
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* xr = x + row * v.n;
      OnlineState<acc> st;
      for (int64_t c = 0; c < v.n; c += kChunk) {
        const int64_t count = std::min(kChunk, v.n - c);
        load_signed(xr + c, count, sign, buf);
        fold_chunk(buf, count, b, st);
      }
      out[row] = static_cast<scalar_t>(finish(st, sign, b));
    }
  });
}

// Loads `count` (<= Vec::size()) elements at p as a vector of the accumulation type (lanes past count are 0).
template <typename scalar_t>
inline Vectorized<acc_t<scalar_t>> load_acc(const scalar_t* p, int64_t count) {
  using Vec = Vectorized<acc_t<scalar_t>>;
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    return count == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, count);
  } else {
    acc_t<scalar_t> buf[Vec::size()] = {};
    for (int64_t k = 0; k < count; ++k) buf[k] = static_cast<acc_t<scalar_t>>(p[k]);
    return Vec::loadu(buf);
  }
}

// Reduction over a strided dim (inner > 1), e.g. dim=0 of a matrix. A task owns a segment of kWidth outputs side
// by side and walks the reduced dim in blocks of kRows rows: each row of a block is one contiguous, prefetchable
// read of the segment (kWidth * 4 bytes), the block stays in L1 for the second (exp) sweep, and the running
// (m, S) of the segment live in two small arrays. Reading whole row segments rather than one cache line per row
// is what keeps this near the dim=-1 speed: a narrow tile would touch a new page on every row.
template <typename scalar_t>
void forward_strided(const scalar_t* x, scalar_t* out, const ReductionView& v, double beta) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t kWidth = 256, kRows = 8;
  const acc sign = beta > 0 ? acc(1) : acc(-1), b = static_cast<acc>(std::abs(beta));
  const acc inf = std::numeric_limits<acc>::infinity();
  const int64_t segments = (v.inner + kWidth - 1) / kWidth;
  const int64_t grain = std::max<int64_t>(1, 32768 / (v.n * kWidth));
  at::parallel_for(0, v.outer * segments, grain, [&](int64_t begin, int64_t end) {
    acc ms[kWidth], ss[kWidth], cs[kWidth];  // per output: max, sum, the sum's Kahan compensation
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t / segments, j0 = (t % segments) * kWidth;
      const int64_t width = std::min(kWidth, v.inner - j0);
      const scalar_t* xs = x + o * v.n * v.inner + j0;
      std::fill(ms, ms + width, -inf);
      std::fill(ss, ss + width, acc(0));
      std::fill(cs, cs + width, acc(0));
      const Vec vb(b), vsign(sign), one(acc(1));
      for (int64_t r0 = 0; r0 < v.n; r0 += kRows) {
        const int64_t rows = std::min(kRows, v.n - r0);
        for (int64_t j = 0; j < width; j += V) {
          const int64_t w = std::min(V, width - j);
          const scalar_t* xj = xs + r0 * v.inner + j;
          Vec cm(-inf);
          for (int64_t r = 0; r < rows; ++r) cm = at::vec::maximum(cm, vsign * load_acc(xj + r * v.inner, w));
          const Vec m = Vec::loadu(ms + j);
          const Vec nm = at::vec::maximum(m, cm);  // NaN in the block makes nm NaN, hence the result NaN
          const Vec f = Vec::blendv((vb * (m - nm)).exp(), one, m == nm);
          Vec ns = Vec::loadu(ss + j) * f, nc = Vec::loadu(cs + j) * f;
          Vec block(acc(0));  // the block's rows summed apart, then added to the running sum compensated
          for (int64_t r = 0; r < rows; ++r) {
            const Vec xv = vsign * load_acc(xj + r * v.inner, w);
            block += Vec::blendv((vb * (xv - nm)).exp(), one, xv == nm);
          }
          kahan_add(ns, nc, block);
          nm.store(ms + j), ns.store(ss + j), nc.store(cs + j);  // full-vector stores: the arrays have kWidth lanes
        }
      }
      scalar_t* os = out + o * v.inner + j0;
      for (int64_t j = 0; j < width; ++j) os[j] = static_cast<scalar_t>(finish(OnlineState<acc>{ms[j], ss[j]}, sign, b));
    }
  });
}

// grad_x = grad * exp(beta * (x - result)) = grad * softmax(beta * x) along the reduced dim.
template <typename scalar_t>
void backward_finite(const scalar_t* g, const scalar_t* x, const scalar_t* r, scalar_t* gx, const ReductionView& v,
                     double beta) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  constexpr int64_t V = Vec::size();
  const acc bt = static_cast<acc>(beta);
  const int64_t rows = v.outer * v.n;
  const int64_t grain = std::max<int64_t>(1, 32768 / v.inner);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    acc xb[V], gb[V], rb[V];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t o = row / v.n;
      const scalar_t* xr = x + row * v.inner;
      const scalar_t* gr = g + o * v.inner;  // grad and result are broadcast along the reduced dim
      const scalar_t* rr = r + o * v.inner;
      scalar_t* out = gx + row * v.inner;
      for (int64_t j = 0; j < v.inner; j += V) {
        const int64_t w = std::min(V, v.inner - j);
        for (int64_t k = 0; k < w; ++k) {
          xb[k] = static_cast<acc>(xr[j + k]);
          gb[k] = static_cast<acc>(gr[j + k]);
          rb[k] = static_cast<acc>(rr[j + k]);
        }
        const Vec e = Vec::loadu(gb, w) * (Vec(bt) * (Vec::loadu(xb, w) - Vec::loadu(rb, w))).exp();
        e.store(xb, w);
        for (int64_t k = 0; k < w; ++k) out[j + k] = static_cast<scalar_t>(xb[k]);
      }
    }
  });
}

// The dim=-1 layout (inner == 1) of the same formula: vectorized along the row with grad and result scalars.
template <typename scalar_t>
void backward_finite_rows(const scalar_t* g, const scalar_t* x, const scalar_t* r, scalar_t* gx,
                          const ReductionView& v, double beta) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  constexpr int64_t V = Vec::size();
  const acc bt = static_cast<acc>(beta);
  const int64_t grain = std::max<int64_t>(1, 32768 / v.n);
  at::parallel_for(0, v.outer, grain, [&](int64_t begin, int64_t end) {
    acc buf[kChunk];
    for (int64_t row = begin; row < end; ++row) {
      const Vec gv(static_cast<acc>(g[row])), rv(static_cast<acc>(r[row])), bv(bt);
      const scalar_t* xr = x + row * v.n;
      scalar_t* out = gx + row * v.n;
      for (int64_t c = 0; c < v.n; c += kChunk) {
        const int64_t count = std::min(kChunk, v.n - c);
        load_signed(xr + c, count, acc(1), buf);
        int64_t i = 0;
        for (; i + V <= count; i += V) (gv * (bv * (Vec::loadu(buf + i) - rv)).exp()).store(buf + i);
        if (i < count) (gv * (bv * (Vec::loadu(buf + i, count - i) - rv)).exp()).store(buf + i, count - i);
        for (i = 0; i < count; ++i) out[c + i] = static_cast<scalar_t>(buf[i]);
      }
    }
  });
}

// beta = +-inf: the gradient is one-hot at the arg-extreme, shared equally between ties. Rare, so scalar code:
// one pass counts the ties of each output, a second writes grad / count where x equals the result.
template <typename scalar_t>
void backward_infinite(const scalar_t* g, const scalar_t* x, const scalar_t* r, scalar_t* gx, const ReductionView& v) {
  using acc = acc_t<scalar_t>;
  at::parallel_for(0, v.outer * v.inner, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t o = k / v.inner, j = k % v.inner;
      const scalar_t* xk = x + o * v.n * v.inner + j;
      scalar_t* gk = gx + o * v.n * v.inner + j;
      const scalar_t res = r[k];
      if (res != res) {  // a NaN result (x held a NaN): its gradient is NaN, as torch.amax's is
        for (int64_t i = 0; i < v.n; ++i) gk[i * v.inner] = std::numeric_limits<scalar_t>::quiet_NaN();
        continue;
      }
      int64_t ties = 0;
      for (int64_t i = 0; i < v.n; ++i) ties += xk[i * v.inner] == res;
      const acc share = ties > 0 ? static_cast<acc>(g[k]) / static_cast<acc>(ties) : acc(0);
      for (int64_t i = 0; i < v.n; ++i) gk[i * v.inner] = static_cast<scalar_t>(xk[i * v.inner] == res ? share : acc(0));
    }
  });
}

}  // namespace

void smooth_max_forward_cpu_impl(const at::Tensor& x, at::Tensor& out, const ReductionView& v, double beta) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "smooth_max_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    if (v.inner == 1) {
      forward_rows(xp, op, v, beta);
    } else {
      forward_strided(xp, op, v, beta);
    }
  });
}

void smooth_max_backward_cpu_impl(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& result,
                                  at::Tensor& grad_x, const ReductionView& v, double beta) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "smooth_max_backward_cpu", [&] {
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = result.const_data_ptr<scalar_t>();
    scalar_t* op = grad_x.mutable_data_ptr<scalar_t>();
    if (std::isinf(beta)) {
      backward_infinite(gp, xp, rp, op, v);
    } else if (v.inner == 1) {
      backward_finite_rows(gp, xp, rp, op, v, beta);
    } else {
      backward_finite(gp, xp, rp, op, v, beta);
    }
  });
}

}  // namespace PYOPS_CPU_ISA
}  // namespace pyops
