// Fused CPU kernels of selective convolution's copy: channels `dst` of x replaced by channels
// `src` translated by per-channel offsets, and its backward. They compute exactly what
// `CopySlots` (channel_copy.py) computes with grid_sample (bilinear, border padding,
// align_corners=True), in one pass over memory: a translation by a constant offset is
// separable, so each plane is interpolated between two rows and then along the row, through
// per-channel coordinate tables instead of grid_sample's per-pixel grid.
#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/GridSampler.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace {

// Sampling an axis of length L at grid values g_k (k = 0..L-1; −1…1 spans the axis) exactly as
// grid_sample does with align_corners=True and border padding: torch's own
// grid_sampler_compute_source_index_set_grad, in the grid's dtype, gives the coordinate
// c = clip(((g + 1) / 2)·(L − 1), 0, L − 1) and dc/dg = (L − 1)/2 strictly inside (0, L − 1), 0
// where clipped. c interpolates entries lo = ⌊c⌋ and hi = min(lo + 1, L − 1) with weight
// w = c − lo on hi. Computing c any other way (say in double from the offset) lands exactly on a
// whole pixel where float32 lands just below it, and the shift gradient there takes the other
// one-sided difference.
template <typename scalar_t, typename T>
struct Axis {
  std::vector<int64_t> lo, hi;
  std::vector<T> w, slope;

  Axis(const scalar_t* grid, int64_t length) : lo(length), hi(length), w(length), slope(length) {
    for (int64_t k = 0; k < length; ++k) {
      scalar_t dc;
      const T c = static_cast<T>(at::native::grid_sampler_compute_source_index_set_grad(
          grid[k], length, at::native::GridSamplerPadding::Border, /*align_corners=*/true, &dc));
      lo[k] = static_cast<int64_t>(std::floor(c));
      hi[k] = std::min(lo[k] + 1, length - 1);
      w[k] = c - static_cast<T>(lo[k]);
      slope[k] = static_cast<T>(dc);
    }
  }
};

template <typename scalar_t, typename T>
struct Shift {
  Axis<scalar_t, T> x, y;  // columns (offset[:, 0]) and rows (offset[:, 1])
};

// The grid values of every copy along one axis as channel_copy.shift_grid builds them:
// linspace(−1, 1, L) + offset[:, axis] in the offset's dtype, then rounded to x's.
at::Tensor axis_grid(const at::Tensor& offset, int64_t axis, int64_t length,
                     at::ScalarType dtype) {
  return (at::linspace(-1, 1, length, offset.options()).unsqueeze(0) +
          offset.select(1, axis).unsqueeze(1)).to(dtype).contiguous();
}

template <typename scalar_t, typename T>
std::vector<Shift<scalar_t, T>> shift_tables(const at::Tensor& offset, int64_t H, int64_t W) {
  const auto dtype = c10::CppTypeToScalarType<scalar_t>::value;
  const at::Tensor gx = axis_grid(offset, 0, W, dtype);
  const at::Tensor gy = axis_grid(offset, 1, H, dtype);
  const scalar_t* px = gx.const_data_ptr<scalar_t>();
  const scalar_t* py = gy.const_data_ptr<scalar_t>();
  std::vector<Shift<scalar_t, T>> tables;
  tables.reserve(offset.size(0));
  for (int64_t j = 0; j < offset.size(0); ++j) {
    tables.push_back({Axis<scalar_t, T>(px + j * W, W), Axis<scalar_t, T>(py + j * H, H)});
  }
  return tables;
}

// row = r0 + wy (r1 − r0): the two source rows of an output row, blended along y.
template <typename scalar_t, typename T>
void blend_rows(const scalar_t* r0, const scalar_t* r1, T wy, int64_t W, T* row) {
  for (int64_t k = 0; k < W; ++k) {
    const T a = static_cast<T>(r0[k]);
    row[k] = a + wy * (static_cast<T>(r1[k]) - a);
  }
}

// out[i, k] = row_i(lo[k]) + wx[k] (row_i(hi[k]) − row_i(lo[k])), row_i = rows y.lo[i], y.hi[i]
// blended by y.w[i]; `row` is a scratch buffer of W entries.
template <typename scalar_t, typename T>
void translate_plane(const scalar_t* in, scalar_t* out, const Shift<scalar_t, T>& s, int64_t H,
                     int64_t W, T* row) {
  for (int64_t i = 0; i < H; ++i) {
    blend_rows(in + s.y.lo[i] * W, in + s.y.hi[i] * W, s.y.w[i], W, row);
    scalar_t* o = out + i * W;
    for (int64_t k = 0; k < W; ++k) {
      const T a = row[s.x.lo[k]];
      o[k] = static_cast<scalar_t>(a + s.x.w[k] * (row[s.x.hi[k]] - a));
    }
  }
}

at::Tensor forward(const at::Tensor& x_in, const at::Tensor& offset, const at::Tensor& dst,
                   const at::Tensor& src) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.device().is_cpu(), "copy_slots: x must be a CPU [N, C, H, W] tensor");
  auto x = x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), P = H * W;
  auto out = at::empty_like(x);
  auto d = dst.to(at::kLong).contiguous();
  auto s = src.to(at::kLong).contiguous();
  std::vector<int64_t> slot(C, -1);
  for (int64_t j = 0; j < d.numel(); ++j) slot[d.data_ptr<int64_t>()[j]] = j;
  const int64_t* sp = s.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "copy_slots_forward", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto tables = shift_tables<scalar_t, T>(offset, H, W);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * C, 16, [&](int64_t begin, int64_t end) {
      std::vector<T> row(W);
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / C, c = plane % C, j = slot[c];
        if (j < 0) {
          std::memcpy(op + plane * P, xp + plane * P, P * sizeof(scalar_t));
        } else {
          translate_plane(xp + (n * C + sp[j]) * P, op + plane * P, tables[j], H, W, row.data());
        }
      }
    });
  });
  return out;
}

// For one image: grad_x[src[j]] += Tᵀ grad[dst[j]] (the adjoint of translate_plane), and the
// derivatives of Σ grad[dst[j]] · T x[src[j]] with respect to the offsets (grid values) of copy j.
template <typename scalar_t, typename T>
void adjoint_plane(const scalar_t* g, const scalar_t* in, scalar_t* gin,
                   const Shift<scalar_t, T>& s, int64_t H, int64_t W, bool need_x, bool need_offset,
                   T* row, T* d_offset) {
  T dx = 0, dy = 0;
  for (int64_t i = 0; i < H; ++i) {
    const scalar_t* gi = g + i * W;
    const int64_t y0 = s.y.lo[i], y1 = s.y.hi[i];
    const T wy = s.y.w[i];
    if (need_offset) {
      const scalar_t* r0 = in + y0 * W;
      const scalar_t* r1 = in + y1 * W;
      T along_y = 0;
      blend_rows(r0, r1, wy, W, row);
      for (int64_t k = 0; k < W; ++k) {
        const int64_t x0 = s.x.lo[k], x1 = s.x.hi[k];
        const T wx = s.x.w[k], gk = static_cast<T>(gi[k]);
        dx += gk * s.x.slope[k] * (row[x1] - row[x0]);
        const T top = static_cast<T>(r0[x0]) + wx * (static_cast<T>(r0[x1]) - static_cast<T>(r0[x0]));
        const T bottom = static_cast<T>(r1[x0]) + wx * (static_cast<T>(r1[x1]) - static_cast<T>(r1[x0]));
        along_y += gk * (bottom - top);
      }
      dy += s.y.slope[i] * along_y;
    }
    if (need_x) {
      std::fill(row, row + W, T(0));
      for (int64_t k = 0; k < W; ++k) {
        const T gk = static_cast<T>(gi[k]);
        row[s.x.lo[k]] += gk - s.x.w[k] * gk;
        row[s.x.hi[k]] += s.x.w[k] * gk;
      }
      scalar_t* o0 = gin + y0 * W;
      scalar_t* o1 = gin + y1 * W;
      for (int64_t k = 0; k < W; ++k) {
        o0[k] = static_cast<scalar_t>(static_cast<T>(o0[k]) + (1 - wy) * row[k]);
      }
      for (int64_t k = 0; k < W; ++k) {
        o1[k] = static_cast<scalar_t>(static_cast<T>(o1[k]) + wy * row[k]);
      }
    }
  }
  d_offset[0] += dx;
  d_offset[1] += dy;
}

std::vector<at::Tensor> backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                 const at::Tensor& offset, const at::Tensor& dst,
                                 const at::Tensor& src, bool need_x, bool need_offset) {
  auto grad = grad_in.contiguous();
  auto x = x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), P = H * W;
  auto d = dst.to(at::kLong).contiguous();
  auto s = src.to(at::kLong).contiguous();
  const int64_t n_copies = d.numel();
  std::vector<char> is_dst(C, 0);
  const int64_t* dp = d.data_ptr<int64_t>();
  const int64_t* sp = s.data_ptr<int64_t>();
  for (int64_t j = 0; j < n_copies; ++j) is_dst[dp[j]] = 1;
  at::Tensor grad_x = need_x ? at::empty_like(x) : at::Tensor();
  // per-image partial sums, added up after the parallel loop (no shared accumulator)
  auto partial = at::zeros({N, n_copies, 2}, at::kDouble);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "copy_slots_backward", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto tables = shift_tables<scalar_t, T>(offset, H, W);
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* gxp = need_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    double* pp = partial.data_ptr<double>();
    // One image per task: the copies of an image may share a source plane, whose gradient
    // sums them, so an image's planes are written by one thread only.
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> row(W);
      for (int64_t n = begin; n < end; ++n) {
        if (need_x) {
          for (int64_t c = 0; c < C; ++c) {
            scalar_t* target = gxp + (n * C + c) * P;
            if (is_dst[c]) std::fill(target, target + P, scalar_t(0));
            else std::memcpy(target, gp + (n * C + c) * P, P * sizeof(scalar_t));
          }
        }
        for (int64_t j = 0; j < n_copies; ++j) {
          T d_offset[2] = {0, 0};
          adjoint_plane(gp + (n * C + dp[j]) * P, xp + (n * C + sp[j]) * P,
                        need_x ? gxp + (n * C + sp[j]) * P : nullptr, tables[j], H, W, need_x,
                        need_offset, row.data(), d_offset);
          pp[(n * n_copies + j) * 2] = d_offset[0];
          pp[(n * n_copies + j) * 2 + 1] = d_offset[1];
        }
      }
    });
  });
  at::Tensor grad_offset = need_offset ? partial.sum(0).to(offset.scalar_type()) : at::Tensor();
  return {grad_x, grad_offset};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "x with channels dst replaced by channels src translated by offset");
  m.def("backward", &backward, "gradients of forward with respect to x and offset");
}
