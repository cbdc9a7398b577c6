// Paged optimizer states: CUDA managed (unified) memory that the page manager (nf4q/optim/paging.py)
// moves between host and device with explicit prefetches.
//
// managed_zeros allocates with cudaMallocManaged, refuses to take more than cudaMemGetInfo reports free
// (oversubscribing a shared GPU with managed memory can hang it), and returns a tensor whose deleter
// cudaFrees the memory when its last view goes away. prefetch issues cudaMemPrefetchAsync on the
// current stream, so the caller orders it against compute with events; nothing here synchronizes.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>

namespace nf4q::cuda {
namespace {

std::atomic<int64_t> g_live_bytes{0};
std::atomic<int64_t> g_live_allocs{0};

bool concurrent_managed_access(int dev) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrConcurrentManagedAccess, dev));
  return value != 0;
}

cudaMemLocation location_of(int dev) {
  cudaMemLocation loc{};
  if (dev < 0) {
    loc.type = cudaMemLocationTypeHost;
    loc.id = 0;
  } else {
    loc.type = cudaMemLocationTypeDevice;
    loc.id = dev;
  }
  return loc;
}

// Hints only: a failure (e.g. on a system without concurrent managed access) is cleared and ignored.
void advise(void* ptr, size_t bytes, cudaMemoryAdvise advice, int dev) {
#if CUDART_VERSION >= 13000
  const cudaError_t err = cudaMemAdvise(ptr, bytes, advice, location_of(dev));
#else
  const cudaError_t err = cudaMemAdvise(ptr, bytes, advice, dev < 0 ? cudaCpuDeviceId : dev);
#endif
  if (err != cudaSuccess) (void)cudaGetLastError();
}

void prefetch_range(const void* ptr, size_t bytes, int dev, cudaStream_t stream) {
#if CUDART_VERSION >= 13000
  C10_CUDA_CHECK(cudaMemPrefetchAsync(ptr, bytes, location_of(dev), 0, stream));
#else
  C10_CUDA_CHECK(cudaMemPrefetchAsync(ptr, bytes, dev < 0 ? cudaCpuDeviceId : dev, stream));
#endif
}

at::Tensor managed_zeros(int64_t nbytes, at::Device device, bool host_home) {
  TORCH_CHECK_VALUE(device.is_cuda(), "nf4q: managed_zeros needs a CUDA device, got ", device);
  TORCH_CHECK_VALUE(nbytes >= 0, "nf4q: managed_zeros: nbytes must be >= 0, got ", nbytes);
  const int dev = device.has_index() ? device.index() : c10::cuda::current_device();
  c10::cuda::CUDAGuard guard(dev);
  const auto options = at::TensorOptions().dtype(at::kByte).device(at::kCUDA, dev);
  if (nbytes == 0) return at::empty({0}, options);
  size_t free_bytes = 0, total_bytes = 0;
  C10_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  TORCH_CHECK(static_cast<size_t>(nbytes) <= free_bytes, "nf4q: paged optimizer state of ", nbytes,
              " bytes is more than the ", free_bytes, " bytes free on cuda:", dev,
              "; nf4q never allocates more managed memory than the GPU has free (gpu_budget_bytes only limits "
              "how much of it stays resident). Free GPU memory, use bits=8, or paged=False.");
  void* ptr = nullptr;
  C10_CUDA_CHECK(cudaMallocManaged(&ptr, static_cast<size_t>(nbytes), cudaMemAttachGlobal));
  g_live_bytes += nbytes;
  g_live_allocs += 1;
  const bool host_ok = host_home && concurrent_managed_access(dev);
  if (host_ok) {
    // Home on the host, mapped in the GPU's page tables: the page manager prefetches what it needs and a
    // stray GPU access reads over the bus instead of faulting pages in behind the budget's back.
    advise(ptr, nbytes, cudaMemAdviseSetPreferredLocation, -1);
    advise(ptr, nbytes, cudaMemAdviseSetAccessedBy, dev);
    std::memset(ptr, 0, static_cast<size_t>(nbytes));  // first touch on the host: pages start there
  } else {
    // Home on the device: zeroing there populates the pages on the GPU; the driver may still evict them
    // under memory pressure and fault them back in on use.
    advise(ptr, nbytes, cudaMemAdviseSetPreferredLocation, dev);
    C10_CUDA_CHECK(cudaMemsetAsync(ptr, 0, static_cast<size_t>(nbytes), c10::cuda::getCurrentCUDAStream(dev)));
  }
  auto deleter = [nbytes](void* p) {
    // cudaFree waits for the device; an error at interpreter exit (driver unloaded) is ignored.
    if (cudaFree(p) != cudaSuccess) (void)cudaGetLastError();
    g_live_bytes -= nbytes;
    g_live_allocs -= 1;
  };
  return at::from_blob(ptr, {nbytes}, deleter, options, at::Device(at::kCUDA, dev));
}

void prefetch(at::TensorList tensors, int64_t device) {
  if (tensors.empty()) return;
  const int dev = tensors[0].device().index();
  c10::cuda::CUDAGuard guard(dev);
  TORCH_CHECK_VALUE(device == -1 || device == dev, "nf4q: prefetch: device must be -1 (host) or ", dev, ", got ",
                    device);
  if (!concurrent_managed_access(dev)) return;  // prefetching is unsupported there: leave it to the driver
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev);
  for (const auto& t : tensors) {
    TORCH_CHECK_VALUE(t.is_cuda() && t.device().index() == dev, "nf4q: prefetch: tensors must be on cuda:", dev);
    const size_t bytes = t.numel() * t.element_size();
    if (bytes == 0) continue;
    TORCH_CHECK_VALUE(t.is_contiguous(), "nf4q: prefetch: tensors must be contiguous");
    cudaPointerAttributes attr{};
    C10_CUDA_CHECK(cudaPointerGetAttributes(&attr, t.data_ptr()));
    if (attr.type != cudaMemoryTypeManaged) continue;  // ordinary device memory has nowhere to go
    prefetch_range(t.data_ptr(), bytes, static_cast<int>(device), stream);
  }
}

std::vector<int64_t> managed_stats() { return {g_live_bytes.load(), g_live_allocs.load()}; }

}  // namespace

// No tensor arguments to dispatch on: CompositeExplicitAutograd serves every backend key.
TORCH_LIBRARY_IMPL(nf4q, CompositeExplicitAutograd, m) {
  m.impl("managed_zeros", &managed_zeros);
  m.impl("managed_stats", &managed_stats);
}

TORCH_LIBRARY_IMPL(nf4q, CUDA, m) { m.impl("prefetch", &prefetch); }

}  // namespace nf4q::cuda
