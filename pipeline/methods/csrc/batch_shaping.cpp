// Fused CPU kernel of the batch-shaping loss (batch_shaping.py, `_BatchShaping`): from each gate's
// batch of probabilities, sorted and packed by NumPy, the Cramér–von Mises sum and the
// clipped-density weights of its gradient, written straight into the (N, G) layout of p — the
// torch path needs a dozen full-size temporaries and a scatter for the same.
//
// Built with -ffast-math so that GCC calls glibc's vector logf/expf (libmvec) in
// `squared_errors`; every value stays finite there (logarithms of max(·, FLT_MIN), exponents
// capped), as fast-math requires.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

struct Prior {
  float a, b, log_norm, pdf_min, pdf_max;
};

// The transcendental part for one gate, vectorised by GCC with glibc's vector logf/expf
// (libmvec): Σ_i error_i², and w_i = clip(pdf(x_i)) · error_i, error_i = ecdf_i − F(x_i), given
// the interpolated table value smooth_i = A or B at the nearer end. A plain function of
// pointers and values: inside the parallel lambda GCC vectorised the loop with scalar calls.
float squared_errors(const float* x, const float* smooth, const float* ecdf, float* w, int64_t n,
                     const Prior prior) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i], rest = 1.0f - xi;
    const float log_x = std::log(std::max(xi, FLT_MIN));
    const float log_rest = std::log(std::max(rest, FLT_MIN));
    const bool upper = xi > 0.5f;
    const float mass = std::exp(upper ? prior.b * log_rest : prior.a * log_x) * smooth[i];
    const float cdf = upper ? 1.0f - mass : mass;
    const float pdf = std::exp(std::min((prior.a - 1.0f) * log_x + (prior.b - 1.0f) * log_rest -
                                        prior.log_norm, 80.0f));  // e^80 < FLT_MAX
    const float error = ecdf[i] - cdf;
    sum += error * error;
    w[i] = std::clamp(pdf, prior.pdf_min, prior.pdf_max) * error;
  }
  return sum;
}

// keys: (G, N) int64, each row sorted ascending, key = (float32 bits of p) << 32 | image index;
// table: (2, 2·size) float64, the values and slopes of A on [0, 1/2] then of B (see BetaCDF):
//
//   F(x) = x^a A(x) for x ≤ 1/2, 1 − (1 − x)^b B(1 − x) above;  pdf(x) = x^(a−1) (1 − x)^(b−1) / B(a, b)
//
// Returns the sum over gates and ranks i of (i/(N+1) − F(p_(i)))² and, in p's (N, G) layout,
// weighted[n, g] = clip(pdf(p[n, g]), pdf_min, pdf_max) · (i/(N+1) − F(p[n, g])), i its rank.
std::vector<at::Tensor> forward(const at::Tensor& keys_in, const at::Tensor& table_in, double a,
                                double b, double log_norm, double pdf_min, double pdf_max) {
  TORCH_CHECK(keys_in.dim() == 2 && keys_in.scalar_type() == at::kLong,
              "batch_shaping: keys must be a 2-D int64 tensor");
  auto keys = keys_in.contiguous();
  auto table = table_in.to(at::kDouble).contiguous();
  const int64_t G = keys.size(0), N = keys.size(1), size = table.size(1) / 2;
  const double* values = table.data_ptr<double>();
  const double* slopes = values + table.size(1);
  const Prior prior{static_cast<float>(a), static_cast<float>(b), static_cast<float>(log_norm),
                    static_cast<float>(pdf_min), static_cast<float>(pdf_max)};
  const float ecdf_step = 1.0f / static_cast<float>(N + 1);
  const float table_step = static_cast<float>(2 * (size - 1));
  auto weighted = at::empty({N, G}, at::kFloat);
  auto row_sums = at::empty({G}, at::kDouble);
  const int64_t* kp = keys.data_ptr<int64_t>();
  float* wp = weighted.data_ptr<float>();
  double* sp = row_sums.data_ptr<double>();
  at::parallel_for(0, G, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> x(N), smooth(N), w(N), ecdf(N);
    for (int64_t i = 0; i < N; ++i) ecdf[i] = static_cast<float>(i + 1) * ecdf_step;
    for (int64_t g = begin; g < end; ++g) {
      const int64_t* row = kp + g * N;
      // Unpack, and interpolate the table (a gather: scalar).
      for (int64_t i = 0; i < N; ++i) {
        const uint32_t bits = static_cast<uint32_t>(static_cast<uint64_t>(row[i]) >> 32);
        std::memcpy(&x[i], &bits, sizeof(float));
        const bool upper = x[i] > 0.5f;
        const float pos = (upper ? 1.0f - x[i] : x[i]) * table_step;
        const int64_t step = static_cast<int64_t>(pos);           // pos ≥ 0: truncation = floor
        const int64_t index = step + (upper ? size : 0);
        smooth[i] = static_cast<float>(values[index] + slopes[index] * (pos - step));
      }
      sp[g] = squared_errors(x.data(), smooth.data(), ecdf.data(), w.data(), N, prior);
      // Back to each value's image (a scatter: scalar).
      for (int64_t i = 0; i < N; ++i) wp[(row[i] & 0xFFFFFFFF) * G + g] = w[i];
    }
  });
  return {row_sums.sum(), weighted};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "batch-shaping loss sum and gradient weights from sorted keys");
}
