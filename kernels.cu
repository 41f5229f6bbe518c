// Fused token log-prob / entropy / sampling kernels, one CUDA block per row of logits.
//
// RL for LLMs needs log p(target) for every generated token. The usual
// log_softmax(logits.float()).gather(...) materialises an (N, V) float32 tensor in the forward
// and another in the backward. Here the forward reads each row once with an online max /
// sum-exp (Milakov & Gimelshein, arXiv 1805.02867) and keeps only the row's logsumexp; the
// backward recomputes softmax from it while writing the gradient (as llm.c's fused classifier
// does). The slow, obvious twin is kernels.py's torch path; tests/test_kernels.py compares them.
//
// Built by setup.py as the extension `kernels_cuda` when nvcc and a CUDA build of torch exist.

#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cmath>

namespace {

constexpr int kThreads = 512;  // per row; V is 32k..256k, so each thread reads 64..512 values

// Running softmax statistics over part of a row of z = x / T:
//   m = max z,  s = sum exp(z - m),  t = sum exp(z - m) * (z - m)
// so lse = m + log s and the entropy H = -sum p log p = log s - t / s. Keeping t relative to m
// avoids the cancellation of lse - E[z] when logits are large (1e4).
struct Stats {
  float m, s, t;
};

__device__ __forceinline__ Stats merge(Stats a, Stats b) {
  if (a.m == -INFINITY) return b;  // an empty part (or all -inf) adds nothing
  if (b.m == -INFINITY) return a;
  float m = fmaxf(a.m, b.m);
  float ca = __expf(a.m - m), cb = __expf(b.m - m);
  // t is relative to its own max: shifting it to m adds s * (m_part - m)
  return {m, a.s * ca + b.s * cb, ca * (a.t + a.s * (a.m - m)) + cb * (b.t + b.s * (b.m - m))};
}

// Add one value: one exp per element (merge would take two).
__device__ __forceinline__ void add_value(Stats& a, float z) {
  if (z == -INFINITY) return;  // a masked token has p = 0 and contributes nothing
  if (a.m == -INFINITY) { a = {z, 1.f, 0.f}; return; }
  if (z <= a.m) {
    float d = z - a.m, e = __expf(d);
    a.s += e;
    a.t += e * d;
  } else {  // a new max: rescale what we have to it
    float d = a.m - z, c = __expf(d);
    a.t = c * (a.t + a.s * d);
    a.s = a.s * c + 1.f;
    a.m = z;
  }
}

// 16 bytes per load or store (8 bf16 / fp16, 4 fp32, 2 fp64 values): one wide memory
// instruction instead of 8 narrow ones is what lets a row stream at close to full bandwidth.
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int n = 16 / sizeof(scalar_t);
  scalar_t v[n];
};

template <typename scalar_t>
bool can_use_packs(const torch::Tensor& t, int64_t V) {
  return V % Pack<scalar_t>::n == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// Reduce one Stats per thread to one per block; every thread gets the result.
__device__ Stats block_reduce(Stats v) {
  __shared__ Stats warp_part[32];
  for (int o = 16; o > 0; o >>= 1) {
    Stats other{__shfl_xor_sync(0xffffffff, v.m, o), __shfl_xor_sync(0xffffffff, v.s, o),
                __shfl_xor_sync(0xffffffff, v.t, o)};
    v = merge(v, other);
  }
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  v = lane < n_warps ? warp_part[lane] : Stats{-INFINITY, 0.f, 0.f};
  for (int o = 16; o > 0; o >>= 1) {
    Stats other{__shfl_xor_sync(0xffffffff, v.m, o), __shfl_xor_sync(0xffffffff, v.s, o),
                __shfl_xor_sync(0xffffffff, v.t, o)};
    v = merge(v, other);
  }
  __syncthreads();  // warp_part may be reused by a following call
  return v;
}

// Forward: logprob = z[target] - lse, entropy = log s - t / s.
template <typename scalar_t>
__global__ void logprob_forward_kernel(const scalar_t* __restrict__ logits,
                                       const int64_t* __restrict__ targets,
                                       float* __restrict__ logprobs, float* __restrict__ entropy,
                                       float* __restrict__ lse_out, int64_t V, float inv_T,
                                       bool packed) {
  int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * V;
  Stats st{-INFINITY, 0.f, 0.f};
  if (packed) {
    using P = Pack<scalar_t>;
    const P* xp = reinterpret_cast<const P*>(x);
    for (int64_t i = threadIdx.x; i < V / P::n; i += blockDim.x) {
      P p = xp[i];
#pragma unroll
      for (int k = 0; k < P::n; ++k) add_value(st, static_cast<float>(p.v[k]) * inv_T);
    }
  } else {
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
      add_value(st, static_cast<float>(x[j]) * inv_T);
    }
  }
  st = block_reduce(st);
  if (threadIdx.x == 0) {
    float lse = st.m + logf(st.s);
    int64_t tgt = targets[row];
    lse_out[row] = lse;
    // negative targets (e.g. -100) mark ignored rows: 0 out, and 0 grad in the backward
    logprobs[row] = tgt < 0 ? 0.f : static_cast<float>(x[tgt]) * inv_T - lse;
    if (entropy != nullptr) entropy[row] = tgt < 0 ? 0.f : logf(st.s) - st.t / st.s;
  }
}

// Backward, from the saved lse (and entropy H), with p = exp(z - lse), log p = z - lse:
//   d logprob / d x_j = (onehot_j - p_j) / T
//   d H / d x_j       = -p_j (log p_j + H) / T
// grad may alias logits (in-place): each element is read, then written, by one thread.
__device__ __forceinline__ float grad_value(float z, bool is_target, float glp, float gh, float L,
                                            float H, float inv_T) {
  float p = __expf(z - L);
  float d = glp * ((is_target ? 1.f : 0.f) - p);
  if (gh != 0.f && p > 0.f) d -= gh * p * (z - L + H);
  return d * inv_T;
}

template <typename scalar_t>
__global__ void logprob_backward_kernel(const float* __restrict__ g_lp, const float* __restrict__ g_ent,
                                        const scalar_t* logits, const int64_t* __restrict__ targets,
                                        const float* __restrict__ lse, const float* __restrict__ ent,
                                        scalar_t* grad, int64_t V, float inv_T, bool packed) {
  int64_t row = blockIdx.x;
  int64_t tgt = targets[row];
  const scalar_t* x = logits + row * V;
  scalar_t* g = grad + row * V;
  float glp = tgt < 0 ? 0.f : g_lp[row];
  float gh = (g_ent == nullptr || tgt < 0) ? 0.f : g_ent[row];
  float L = lse[row], H = ent == nullptr ? 0.f : ent[row];
  if (packed) {  // a whole pack is read before it is written, so in place is still safe
    using P = Pack<scalar_t>;
    const P* xp = reinterpret_cast<const P*>(x);
    P* gp = reinterpret_cast<P*>(g);
    for (int64_t i = threadIdx.x; i < V / P::n; i += blockDim.x) {
      P p = xp[i], out;
#pragma unroll
      for (int k = 0; k < P::n; ++k) {
        float z = static_cast<float>(p.v[k]) * inv_T;
        out.v[k] = static_cast<scalar_t>(grad_value(z, i * P::n + k == tgt, glp, gh, L, H, inv_T));
      }
      gp[i] = out;
    }
  } else {
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
      float z = static_cast<float>(x[j]) * inv_T;
      g[j] = static_cast<scalar_t>(grad_value(z, j == tgt, glp, gh, L, H, inv_T));
    }
  }
}

// A counter-based random number: every (seed, element) pair hashes to its own 64 bits
// (splitmix64, Steele et al. 2014), so no RNG state is kept and any thread can draw any element.
__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Sampling by Gumbel-max: argmax_j (z_j + G_j), G_j = -log(-log U_j), draws j with probability
// softmax(z)_j. The same pass accumulates the row's lse, so the token's log-prob comes free.
template <typename scalar_t>
__global__ void sample_kernel(const scalar_t* __restrict__ logits, int64_t* __restrict__ tokens,
                              float* __restrict__ logprobs, int64_t V, float inv_T,
                              uint64_t seed, uint64_t offset) {
  int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * V;
  uint64_t key_seed = splitmix64(seed);
  Stats st{-INFINITY, 0.f, 0.f};
  float best = -INFINITY;
  int64_t best_j = 0;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    float z = static_cast<float>(x[j]) * inv_T;
    add_value(st, z);
    // u strictly inside (0, 1) (24 random bits, centred), so the Gumbel noise is always finite
    uint64_t bits = splitmix64(key_seed ^ (offset + static_cast<uint64_t>(row * V + j)));
    float u = (static_cast<float>(bits >> 40) + 0.5f) * (1.f / 16777216.f);
    float key = z - logf(-logf(u));
    if (key > best) { best = key; best_j = j; }
  }
  st = block_reduce(st);
  // argmax over the block: warp shuffles, then one value per warp in shared memory
  __shared__ float best_val[32];
  __shared__ int64_t best_idx[32];
  for (int o = 16; o > 0; o >>= 1) {
    float ov = __shfl_xor_sync(0xffffffff, best, o);
    int64_t oj = __shfl_xor_sync(0xffffffff, best_j, o);
    if (ov > best || (ov == best && oj < best_j)) { best = ov; best_j = oj; }
  }
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  if (lane == 0) { best_val[warp] = best; best_idx[warp] = best_j; }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < n_warps; ++w) {
      if (best_val[w] > best || (best_val[w] == best && best_idx[w] < best_j)) {
        best = best_val[w]; best_j = best_idx[w];
      }
    }
    tokens[row] = best_j;
    logprobs[row] = static_cast<float>(x[best_j]) * inv_T - (st.m + logf(st.s));
  }
}

void check_logits(const torch::Tensor& logits) {
  TORCH_CHECK(logits.is_cuda(), "kernels_cuda: logits must be a CUDA tensor");
  TORCH_CHECK(logits.dim() == 2, "kernels_cuda: logits must be (N, V), got ", logits.dim(), " dims");
  TORCH_CHECK(logits.is_contiguous(), "kernels_cuda: logits must be contiguous");
}

void check_targets(const torch::Tensor& targets, const torch::Tensor& logits) {
  TORCH_CHECK(targets.is_cuda() && targets.scalar_type() == torch::kInt64 && targets.dim() == 1 &&
                  targets.size(0) == logits.size(0) && targets.is_contiguous(),
              "kernels_cuda: targets must be a contiguous int64 CUDA tensor of shape (N,)");
}

}  // namespace

std::vector<torch::Tensor> logprob_forward(torch::Tensor logits, torch::Tensor targets,
                                           double temperature, bool with_entropy) {
  check_logits(logits);
  check_targets(targets, logits);
  TORCH_CHECK(temperature > 0, "kernels_cuda: temperature must be > 0");
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  int64_t N = logits.size(0), V = logits.size(1);
  auto opts = logits.options().dtype(torch::kFloat32);
  auto logprobs = torch::empty({N}, opts), lse = torch::empty({N}, opts);
  auto entropy = with_entropy ? torch::empty({N}, opts) : torch::empty({0}, opts);
  if (N == 0) return {logprobs, entropy, lse};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprob_forward", [&] {
    logprob_forward_kernel<scalar_t><<<N, kThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(), logprobs.data_ptr<float>(),
        with_entropy ? entropy.data_ptr<float>() : nullptr, lse.data_ptr<float>(), V,
        static_cast<float>(1.0 / temperature), can_use_packs<scalar_t>(logits, V));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {logprobs, entropy, lse};
}

torch::Tensor logprob_backward(torch::Tensor grad_logprobs, torch::Tensor grad_entropy,
                               torch::Tensor logits, torch::Tensor targets, torch::Tensor lse,
                               torch::Tensor entropy, double temperature, bool inplace) {
  check_logits(logits);
  check_targets(targets, logits);
  int64_t N = logits.size(0), V = logits.size(1);
  bool with_entropy = grad_entropy.numel() > 0;
  TORCH_CHECK(!with_entropy || entropy.numel() == N, "kernels_cuda: entropy grad needs the saved entropy");
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  auto g_lp = grad_logprobs.to(torch::kFloat32).contiguous();
  auto g_ent = with_entropy ? grad_entropy.to(torch::kFloat32).contiguous() : grad_entropy;
  auto grad = inplace ? logits : torch::empty_like(logits);
  if (N == 0) return grad;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprob_backward", [&] {
    logprob_backward_kernel<scalar_t><<<N, kThreads, 0, stream>>>(
        g_lp.data_ptr<float>(), with_entropy ? g_ent.data_ptr<float>() : nullptr,
        logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(), lse.data_ptr<float>(),
        with_entropy ? entropy.data_ptr<float>() : nullptr, grad.data_ptr<scalar_t>(), V,
        static_cast<float>(1.0 / temperature),
        can_use_packs<scalar_t>(logits, V) && can_use_packs<scalar_t>(grad, V));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

std::vector<torch::Tensor> sample(torch::Tensor logits, double temperature, int64_t seed, int64_t offset) {
  check_logits(logits);
  TORCH_CHECK(temperature > 0, "kernels_cuda: sample needs temperature > 0 (use argmax for 0)");
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  int64_t B = logits.size(0), V = logits.size(1);
  auto tokens = torch::empty({B}, logits.options().dtype(torch::kInt64));
  auto logprobs = torch::empty({B}, logits.options().dtype(torch::kFloat32));
  if (B == 0) return {tokens, logprobs};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sample", [&] {
    sample_kernel<scalar_t><<<B, kThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>(), V,
        static_cast<float>(1.0 / temperature), static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {tokens, logprobs};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("logprob_forward", &logprob_forward, "token log-prob (+ entropy) and row logsumexp, one pass per row");
  m.def("logprob_backward", &logprob_backward, "gradient of log-prob (+ entropy) w.r.t. logits, from the saved lse");
  m.def("sample", &sample, "Gumbel-max sample and its log-prob, one pass per row");
}
