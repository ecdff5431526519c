// gemm_chain.cu's chain of a step's 72 expert GEMMs (M = 50) in one persistent kernel, the other way to split K:
// inside a thread-block cluster, with no global atomics. Every cluster of C CTAs owns a contiguous run of the
// GEMM's n8 tiles; its C CTAs each take one C-th of K, so each reads only its share of A (bf16, as §63's
// "A / 4 through bulk copies" floor did), and the C partial sums meet in shared memory across the cluster: each
// CTA writes its partials to its own shared memory, arrives on every peer's mbarrier (release at cluster scope),
// waits for its own, then sums a C-th of the outputs from all C CTAs' shared memory (distributed shared memory)
// and stores them once, as bf16. Y is written exactly once, so it needs no zeroing and two buffers suffice.
//
// Layouts: weights K-chunk major, [K/32][N/8][32 lanes][8 bf16] (a chunk's run of n8 tiles is one bulk copy), each
// lane's 8 values the B fragments of two k16 steps; activations [K/32][M][40] bf16 (80-byte rows: the 32-bit
// fragment loads are free of bank conflicts). Per CTA: warp 0 bulk-copies the weights (running ahead across GEMMs),
// warp 1 the A chunks once the grid has finished the GEMM before; eight consumer warps compute 16 rows x half of
// the CTA's tiles each with mma.sync m16n8k16.
//
// Built by tools/gemm_chain_gpu.py with nvcc (-arch=sm_90a) into a shared library it calls through ctypes.

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "hopper_sync.cuh"

namespace {

using namespace hopper;

constexpr int kRows = 64;
constexpr int kStageBytes = 16384;        // a weight stage: as many K chunks of the CTA's tiles as fit
constexpr int kTileBytes = 512;           // one n8 tile x 32 of K, bf16
constexpr int kMaxTiles = 32;             // a CTA's tiles at most: one K chunk of them fills a stage
constexpr int kActSlotBytes = 32768;      // an A stage: the stage's K chunks, M rows of 80 bytes each
constexpr int kHalfStride = 40;           // bf16 a row of an activation chunk takes
constexpr int kPartialBytes = kMaxTiles * kRows * 8 * 4;  // float32 partial sums: [tile][64 rows][8]
constexpr int kConsumerWarps = 8;
constexpr int kProducerWarps = 2;
constexpr int kThreads = 32 * (kConsumerWarps + kProducerWarps);

__host__ __device__ constexpr int ring_offset(int weight_stages, int act_stages) {
  return 128 * (((2 * (weight_stages + act_stages) + 1) * 8 + 127) / 128);
}

__host__ __device__ inline int shared_bytes(int weight_stages, int act_stages) {
  return ring_offset(weight_stages, act_stages) + weight_stages * kStageBytes + act_stages * kActSlotBytes +
         kPartialBytes;
}

// What a CTA does of GEMM g: its cluster's tiles [t0, t1), its K chunks [c0, c1), and how many chunks a stage takes.
struct Share {
  int t0, t1, c0, c1, per_stage;
  __device__ int tiles() const { return t1 - t0; }
};

__device__ __forceinline__ Share share_of(int k, int n, int m, int cluster, int clusters, int rank, int split) {
  const int tiles = n / 8, chunks = k / 32;
  Share s;
  s.t0 = static_cast<int>(static_cast<long long>(tiles) * cluster / clusters);
  s.t1 = static_cast<int>(static_cast<long long>(tiles) * (cluster + 1) / clusters);
  s.c0 = chunks * rank / split;
  s.c1 = chunks * (rank + 1) / split;
  const int by_weights = kStageBytes / (kTileBytes * max(1, s.t1 - s.t0));
  const int by_act = kActSlotBytes / (m * kHalfStride * 2);
  s.per_stage = max(1, min(by_weights, by_act));
  return s;
}

template <int C>
__global__ void __launch_bounds__(kThreads, 1)
    cluster_kernel(const uint8_t* __restrict__ weights, const int* __restrict__ gemm_k, const int* __restrict__ gemm_n,
                   const uint64_t* __restrict__ weight_offset, int gemms, const __nv_bfloat16* __restrict__ x0,
                   __nv_bfloat16* __restrict__ y, uint64_t y_buffer_halves, int m, uint32_t* __restrict__ counters,
                   uint32_t epoch, int weight_stages, int act_stages, int compute) {
  extern __shared__ __align__(128) uint8_t smem[];
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem);  // weights' full, empty; A's full, empty; partials ready
  uint64_t* act_bars = bars + 2 * weight_stages;
  uint64_t* ready = act_bars + 2 * act_stages;
  uint8_t* weight_ring = smem + ring_offset(weight_stages, act_stages);
  uint8_t* act_ring = weight_ring + static_cast<size_t>(weight_stages) * kStageBytes;
  float* partial = reinterpret_cast<float*>(act_ring + static_cast<size_t>(act_stages) * kActSlotBytes);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rank = static_cast<int>(cluster_rank());
  const int cluster = blockIdx.x / C, clusters = gridDim.x / C;
  const uint32_t target = epoch * gridDim.x;
  const int chunk_halves = m * kHalfStride;  // an activation chunk, in bf16

  if (threadIdx.x == 0) {
    for (int s = 0; s < weight_stages; ++s) {
      mbar_init(smem_addr(&bars[s]), 1);
      mbar_init(smem_addr(&bars[weight_stages + s]), kConsumerWarps);
    }
    for (int s = 0; s < act_stages; ++s) {
      mbar_init(smem_addr(&act_bars[s]), 1);
      mbar_init(smem_addr(&act_bars[act_stages + s]), kConsumerWarps);
    }
    mbar_init(smem_addr(ready), C);  // one arrival per CTA of the cluster, each GEMM
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  }
  __syncthreads();
  // every CTA's `ready` initialized before any peer arrives on it
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");

  if (warp == 0) {
    if (lane == 0) {
      uint32_t piece = 0;
      for (int g = 0; g < gemms; ++g) {
        const Share sh = share_of(gemm_k[g], gemm_n[g], m, cluster, clusters, rank, C);
        const int tiles_n = gemm_n[g] / 8;
        for (int c = sh.c0; c < sh.c1; c += sh.per_stage, ++piece) {
          const int s = claim_slot(&bars[weight_stages], weight_stages, piece);
          const int n_chunks = min(sh.per_stage, sh.c1 - c);
          const uint32_t run = static_cast<uint32_t>(sh.tiles()) * kTileBytes;
          const uint32_t full = smem_addr(&bars[s]);
          mbar_expect_bytes(full, run * n_chunks);
          for (int i = 0; i < n_chunks; ++i)
            bulk_copy(smem_addr(weight_ring + static_cast<size_t>(s) * kStageBytes + i * run),
                      weights + weight_offset[g] + (static_cast<uint64_t>(c + i) * tiles_n + sh.t0) * kTileBytes,
                      run, full);
        }
      }
    }
    return;
  }

  if (warp == 1) {
    if (lane == 0) {
      uint32_t piece = 0;
      for (int g = 0; g < gemms; ++g) {
        const __nv_bfloat16* a = x0;
        if (g > 0) {
          wait_for_count(&counters[g - 1], target);
          asm volatile("fence.proxy.async.global;" ::: "memory");
          a = y + static_cast<uint64_t>((g - 1) % 2) * y_buffer_halves;
        }
        const Share sh = share_of(gemm_k[g], gemm_n[g], m, cluster, clusters, rank, C);
        for (int c = sh.c0; c < sh.c1; c += sh.per_stage, ++piece) {
          const int s = claim_slot(&act_bars[act_stages], act_stages, piece);
          const uint32_t bytes = static_cast<uint32_t>(min(sh.per_stage, sh.c1 - c) * chunk_halves * 2);
          const uint32_t full = smem_addr(&act_bars[s]);
          mbar_expect_bytes(full, bytes);
          bulk_copy(smem_addr(act_ring + static_cast<size_t>(s) * kActSlotBytes),
                    a + static_cast<uint64_t>(c) * chunk_halves, bytes, full);
        }
      }
    }
    return;
  }

  const int w = warp - kProducerWarps;
  const int row0 = (w & 3) * 16, half = w >> 2;  // 16 rows; the first or second half of the CTA's tiles
  const int group = lane >> 2, quad = lane & 3;
  const int t = threadIdx.x - 32 * kProducerWarps;
  const int consumer_threads = 32 * kConsumerWarps;
  const bool rows_lo = row0 + group < m, rows_hi = row0 + group + 8 < m;
  uint32_t piece = 0;
  for (int g = 0; g < gemms; ++g) {
    const Share sh = share_of(gemm_k[g], gemm_n[g], m, cluster, clusters, rank, C);
    const int tiles = sh.tiles();
    const int first = half * ((tiles + 1) / 2);                // this warp's tiles: [first, first + mine)
    const int mine = min((tiles + 1) / 2, tiles - first);
    float acc[kMaxTiles / 2][4];
#pragma unroll
    for (int j = 0; j < kMaxTiles / 2; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    for (int c = sh.c0; c < sh.c1; c += sh.per_stage, ++piece) {
      const int ws = wait_slot(bars, weight_stages, piece), as = wait_slot(act_bars, act_stages, piece);
      if (compute) {
        const int n_chunks = min(sh.per_stage, sh.c1 - c);
        const uint32_t* a_slot = reinterpret_cast<const uint32_t*>(act_ring + static_cast<size_t>(as) * kActSlotBytes);
        const uint4* b_slot = reinterpret_cast<const uint4*>(weight_ring + static_cast<size_t>(ws) * kStageBytes);
        for (int i = 0; i < n_chunks; ++i) {
          // a bf16 pair is one 32-bit word: row r, columns 2q, 2q + 1 of a k16 step at word r * 20 + 8 ks + q
          const uint32_t* lo = a_slot + (i * chunk_halves + (row0 + group) * kHalfStride) / 2 + quad;
          const uint32_t* hi = lo + 8 * kHalfStride / 2;
          uint32_t frag[2][4];
#pragma unroll
          for (int ks = 0; ks < 2; ++ks) {
            frag[ks][0] = rows_lo ? lo[8 * ks] : 0u;
            frag[ks][1] = rows_hi ? hi[8 * ks] : 0u;
            frag[ks][2] = rows_lo ? lo[8 * ks + 4] : 0u;
            frag[ks][3] = rows_hi ? hi[8 * ks + 4] : 0u;
          }
          const uint4* b = b_slot + (i * tiles + first) * 32 + lane;
#pragma unroll
          for (int j = 0; j < kMaxTiles / 2; ++j) {
            if (j < mine) {
              const uint4 v = b[j * 32];
              mma_bf16(acc[j], frag[0], v.x, v.y);
              mma_bf16(acc[j], frag[1], v.z, v.w);
            }
          }
        }
      }
      __syncwarp();
      if (lane == 0) {
        mbar_arrive(smem_addr(&bars[weight_stages + ws]));
        mbar_arrive(smem_addr(&act_bars[act_stages + as]));
      }
    }
    if (compute) {
      // this CTA's partial sums, [tile][64 rows][8 columns]: rows past M are never read
#pragma unroll
      for (int j = 0; j < kMaxTiles / 2; ++j) {
        if (j < mine) {
          float* at = partial + ((first + j) * kRows + row0 + group) * 8 + 2 * quad;
          *reinterpret_cast<float2*>(at) = make_float2(acc[j][0], acc[j][1]);
          *reinterpret_cast<float2*>(at + 64) = make_float2(acc[j][2], acc[j][3]);
        }
      }
    }
    consumers_sync(consumer_threads);
    if (t == 0) {
      for (int r = 0; r < C; ++r) mbar_arrive_remote(map_to_rank(smem_addr(ready), static_cast<uint32_t>(r)));
    }
    mbar_wait_cluster(smem_addr(ready), static_cast<uint32_t>(g) & 1);  // every peer's partials are written
    if (compute) {
      // this CTA's C-th of the outputs: tiles rank, rank + C, ...; a thread sums one column pair of one row
      __nv_bfloat16* out = y + static_cast<uint64_t>(g % 2) * y_buffer_halves;
      const int mine_tiles = (tiles - rank + C - 1) / C;
      const int pairs = mine_tiles * m * 4;
      for (int i = t; i < pairs; i += consumer_threads) {
        const int tile = rank + C * (i / (m * 4)), row = (i / 4) % m, pair = i % 4;
        const uint32_t local = smem_addr(partial + (tile * kRows + row) * 8 + 2 * pair);
        float2 sum = make_float2(0.f, 0.f);
#pragma unroll
        for (int r = 0; r < C; ++r) {
          const float2 v = load_remote_float2(map_to_rank(local, static_cast<uint32_t>(r)));
          sum.x += v.x;
          sum.y += v.y;
        }
        const int col = (sh.t0 + tile) * 8 + 2 * pair;
        *reinterpret_cast<__nv_bfloat162*>(out + static_cast<uint64_t>(col / 32) * chunk_halves + row * kHalfStride +
                                           col % 32) = __floats2bfloat162_rn(sum.x, sum.y);
      }
    }
    consumers_sync(consumer_threads);  // this CTA's outputs of GEMM g are stored, its peers' partials read
    if (t == 0) {
      __threadfence();
      atomicAdd(&counters[g], 1u);
    }
  }
  // no CTA leaves while a peer may still read its partials: every CTA has finished the last GEMM
  if (t == 0) wait_for_count(&counters[gemms - 1], target);
  consumers_sync(consumer_threads);
}

template <int C>
int launch(const void* weights, const void* gemm_k, const void* gemm_n, const void* weight_offset, int gemms,
           const void* x0, void* y, unsigned long long y_buffer_halves, int m, void* counters, unsigned epoch,
           int ctas, int weight_stages, int act_stages, int compute, cudaStream_t stream) {
  const int shared = shared_bytes(weight_stages, act_stages);
  cudaError_t err = cudaFuncSetAttribute(cluster_kernel<C>, cudaFuncAttributeMaxDynamicSharedMemorySize, shared);
  if (err != cudaSuccess) return static_cast<int>(err);
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(ctas);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = C;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  if (ctas < 0) {  // a query: how many CTAs can be resident at once (all must be, for the grid-wide waits)
    config.gridDim = dim3(C);
    int clusters = 0;
    err = cudaOccupancyMaxActiveClusters(&clusters, cluster_kernel<C>, &config);
    return err == cudaSuccess ? clusters * C : -static_cast<int>(err);
  }
  err = cudaLaunchKernelEx(&config, cluster_kernel<C>, static_cast<const uint8_t*>(weights),
                           static_cast<const int*>(gemm_k), static_cast<const int*>(gemm_n),
                           static_cast<const uint64_t*>(weight_offset), gemms,
                           static_cast<const __nv_bfloat16*>(x0), static_cast<__nv_bfloat16*>(y),
                           static_cast<uint64_t>(y_buffer_halves), m, static_cast<uint32_t*>(counters),
                           static_cast<uint32_t>(epoch), weight_stages, act_stages, compute);
  if (err != cudaSuccess) return static_cast<int>(err);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

// Returns a cudaError_t (0: launched). split: the cluster size, K's split (2 or 4); ctas a multiple of it, all
// resident at once (gemm_chain_cluster_ctas says how many can be). The weights packed K-chunk major (the
// gemm_chain_gpu.py packing), at most 32 n8 tiles a cluster; x0 and y in the bf16 chunk layout, y two buffers, the
// last GEMM's output in buffer (gemms - 1) % 2. counters as gemm_chain_launch's.
extern "C" int gemm_chain_cluster_launch(const void* weights, const void* gemm_k, const void* gemm_n,
                                         const void* weight_offset, int gemms, const void* x0, void* y,
                                         unsigned long long y_buffer_halves, int m, void* counters, unsigned epoch,
                                         int ctas, int split, int weight_stages, int act_stages, int compute,
                                         void* stream) {
  if (m < 1 || m > kRows || weight_stages < 1 || act_stages < 1 || ctas < split || ctas % split != 0 ||
      m * kHalfStride * 2 > kActSlotBytes)
    return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (split == 2)
    return launch<2>(weights, gemm_k, gemm_n, weight_offset, gemms, x0, y, y_buffer_halves, m, counters, epoch, ctas,
                     weight_stages, act_stages, compute, s);
  if (split == 4)
    return launch<4>(weights, gemm_k, gemm_n, weight_offset, gemms, x0, y, y_buffer_halves, m, counters, epoch, ctas,
                     weight_stages, act_stages, compute, s);
  return static_cast<int>(cudaErrorInvalidValue);
}

// How many CTAs of the kernel with this cluster size and ring can be resident at once (negative: a cudaError_t).
extern "C" int gemm_chain_cluster_ctas(int split, int weight_stages, int act_stages) {
  if (split == 2) return launch<2>(nullptr, nullptr, nullptr, nullptr, 0, nullptr, nullptr, 0, 1, nullptr, 0, -1,
                                   weight_stages, act_stages, 0, nullptr);
  if (split == 4) return launch<4>(nullptr, nullptr, nullptr, nullptr, 0, nullptr, nullptr, 0, 1, nullptr, 0, -1,
                                   weight_stages, act_stages, 0, nullptr);
  return -static_cast<int>(cudaErrorInvalidValue);
}
