// A denoise step's 72 expert GEMMs at batch 1 (M = 50) in ONE persistent kernel, with the arithmetic: the piece of
// issue 12's "megakernel" that §63's stream floor left out (it streamed the bytes and did no math). Measures what the
// GEMMs of a persistent step cost with real tensor-core math, a K split across CTAs and its reduction, against the
// six-kernel step and cuBLAS's chain of the same GEMMs (tools/gemm_chain_gpu.py).
//
// The chain: GEMM g computes Y_g = A_g W_g^T, W_g [N_g, K_g] bf16, A_g the first K_g columns of Y_{g-1} rounded to
// bf16 (A_0 = X0). Every GEMM waits for the one before it (a grid-wide counter), as a real step's would.
//
// Work: a GEMM is cut into units of 16 KiB of bf16 weights, TN columns x 8192 / TN of K (TN 64, 128 or 256: wider
// units read less A per weight byte, narrower ones flush smaller partial sums). The units, n-tile major, are
// shared out in equal contiguous ranges over the CTAs (stream-K): a CTA accumulates in registers across its range
// and, at the end of an n-tile or of its range, adds its partial sums into Y_g with float2 atomics (Hopper's vector
// atomicAdd). Y_g is float32 in a chunked layout, [N/32][M][40]: a chunk of 32 columns is one contiguous bulk copy
// for the next GEMM, its rows padded to 40 floats so the fragment loads from shared memory are free of bank
// conflicts. Three Y buffers rotate: GEMM g writes Y_g, reads Y_{g-1}, and zeroes the buffer of Y_{g+1} (Y_{g-2},
// which every CTA finished reading before GEMM g could start).
//
// Per CTA (one per SM): warp 0's lane 0 bulk-copies the CTA's weight units into a ring (they never depend on
// activations, so they run ahead across the GEMM boundaries); warp 1's lane 0 copies each unit's A chunk into a
// ring of its own once the grid has finished the GEMM before. Eight consumer warps each compute 16 rows x TN / 2
// columns of a unit with mma.sync m16n8k16 (bf16 in, float32 accumulate): A from the float32 chunks, converted in
// registers (rows past M read as zero); B from the weights, which the host packed in the mma's fragment order (one
// 16-byte load per lane gives two k16 steps of one n8 tile).
//
// Built by tools/gemm_chain_gpu.py with nvcc (-arch=sm_90a) into a shared library it calls through ctypes.

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "hopper_sync.cuh"

namespace {

using namespace hopper;

constexpr int kRows = 64;                           // the mma rows: M <= 64 valid ones, the rest zero
constexpr int kUnitBytes = 16384;                   // a unit's bf16 weights: TN columns x 8192 / TN of K
constexpr int kChunk = 32;                          // columns of an activation chunk (Y's layout)
constexpr int kRowStride = 40;                      // floats a row of an activation chunk takes
constexpr int kConsumerWarps = 8;                   // 4 row blocks of 16 x 2 column halves of 128
constexpr int kProducerWarps = 2;                   // warp 0: the weights; warp 1: A
constexpr int kThreads = 32 * (kConsumerWarps + kProducerWarps);

__host__ __device__ constexpr int ring_offset(int weight_stages, int act_stages) {
  return 128 * ((2 * (weight_stages + act_stages) * 8 + 127) / 128);
}

__device__ __forceinline__ uint32_t pack_bf16(float2 v) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(v.x, v.y);  // .x (the lower column) in the low half
  return *reinterpret_cast<const uint32_t*>(&h);
}

// The CTA's contiguous range of a GEMM's units.
__device__ __forceinline__ void range_of(int units, int cta, int ctas, int* begin, int* end) {
  *begin = static_cast<int>(static_cast<long long>(units) * cta / ctas);
  *end = static_cast<int>(static_cast<long long>(units) * (cta + 1) / ctas);
}

// How many CTAs add into n-tile `tile` of a GEMM of `units` units, `chunks` a tile (each flushes it once): the
// owners of its first and last unit and every CTA between (with units >= ctas, none is without units).
__device__ __forceinline__ uint32_t contributors(int tile, int chunks, int units, int ctas) {
  auto owner = [&](long long u) { return static_cast<int>(((u + 1) * ctas + units - 1) / units - 1); };
  return static_cast<uint32_t>(owner(static_cast<long long>(tile + 1) * chunks - 1) -
                               owner(static_cast<long long>(tile) * chunks) + 1);
}

template <int TN>
__global__ void __launch_bounds__(kThreads, 1)
    chain_kernel(const uint8_t* __restrict__ weights, const int* __restrict__ gemm_k, const int* __restrict__ gemm_n,
                 const uint64_t* __restrict__ weight_offset, int gemms, const float* __restrict__ x0,
                 float* __restrict__ y, uint64_t y_buffer_floats, int m, uint32_t* __restrict__ counters,
                 uint32_t epoch, int weight_stages, int act_stages, int compute,
                 uint32_t* __restrict__ tile_counters, const int* __restrict__ tile_base) {
  constexpr int kChunkK = kUnitBytes / 2 / TN;       // a unit's K
  constexpr int kChunksPerUnit = kChunkK / kChunk;   // activation chunks a unit takes (adjacent: one copy)
  constexpr int kTiles = TN / 16;                    // n8 tiles per consumer warp
  auto units_of = [](int k, int n) { return (n / TN) * (k / kChunkK); };
  extern __shared__ __align__(128) uint8_t smem[];
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem);  // weights' full, empty; A's full, empty
  uint64_t* act_bars = bars + 2 * weight_stages;
  uint8_t* weight_ring = smem + ring_offset(weight_stages, act_stages);
  uint8_t* act_ring = weight_ring + static_cast<size_t>(weight_stages) * kUnitBytes;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int cta = blockIdx.x, ctas = gridDim.x;
  const uint32_t target = epoch * static_cast<uint32_t>(ctas);  // counters only grow: no reset between launches
  const uint32_t chunk_floats = static_cast<uint32_t>(m) * kRowStride;

  if (threadIdx.x == 0) {
    for (int s = 0; s < weight_stages; ++s) {
      mbar_init(smem_addr(&bars[s]), 1);                                 // full: the producer's expect_tx
      mbar_init(smem_addr(&bars[weight_stages + s]), kConsumerWarps);   // empty: one arrival per consumer warp
    }
    for (int s = 0; s < act_stages; ++s) {
      mbar_init(smem_addr(&act_bars[s]), 1);
      mbar_init(smem_addr(&act_bars[act_stages + s]), kConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  }
  const uint32_t slot_bytes = kChunksPerUnit * chunk_floats * 4;
  __syncthreads();

  if (warp == 0) {
    if (lane == 0) {
      uint32_t piece = 0;
      for (int g = 0; g < gemms; ++g) {
        int u0, u1;
        range_of(units_of(gemm_k[g], gemm_n[g]), cta, ctas, &u0, &u1);
        for (int u = u0; u < u1; ++u, ++piece) {
          const int s = claim_slot(&bars[weight_stages], weight_stages, piece);
          const uint32_t full = smem_addr(&bars[s]);
          mbar_expect_bytes(full, kUnitBytes);
          bulk_copy(smem_addr(weight_ring + static_cast<size_t>(s) * kUnitBytes),
                    weights + weight_offset[g] + static_cast<uint64_t>(u) * kUnitBytes, kUnitBytes, full);
        }
      }
    }
    return;
  }

  if (warp == 1) {
    if (lane == 0) {
      uint32_t piece = 0;
      for (int g = 0; g < gemms; ++g) {
        const float* a = x0;
        if (g > 0) {  // A is GEMM g - 1's output: copied once every CTA has added its part and arrived
          if (!tile_counters) {
            wait_for_count(&counters[g - 1], target);
            // the other SMs wrote Y with generic atomics; these copies read it through the async proxy
            asm volatile("fence.proxy.async.global;" ::: "memory");
          }
          a = y + static_cast<uint64_t>((g - 1) % 3) * y_buffer_floats;
        }
        const int chunks = gemm_k[g] / kChunkK;
        int u0, u1;
        range_of(units_of(gemm_k[g], gemm_n[g]), cta, ctas, &u0, &u1);
        for (int u = u0; u < u1; ++u, ++piece) {
          const int s = claim_slot(&act_bars[act_stages], act_stages, piece);
          if (tile_counters && g > 0) {
            // fine-grained: only the n-tiles of GEMM g - 1 that hold this unit's K columns, each complete once
            // every CTA adding into it has flushed
            const int prev_chunks = gemm_k[g - 1] / kChunkK, prev_units = units_of(gemm_k[g - 1], gemm_n[g - 1]);
            const int col = (u % chunks) * kChunkK;
            for (int tile = col / TN; tile <= (col + kChunkK - 1) / TN; ++tile)
              wait_for_count(&tile_counters[tile_base[g - 1] + tile],
                             epoch * contributors(tile, prev_chunks, prev_units, ctas));
            asm volatile("fence.proxy.async.global;" ::: "memory");
          }
          const uint32_t full = smem_addr(&act_bars[s]);
          mbar_expect_bytes(full, slot_bytes);
          bulk_copy(smem_addr(act_ring + static_cast<size_t>(s) * slot_bytes),
                    a + static_cast<uint64_t>(u % chunks) * kChunksPerUnit * chunk_floats, slot_bytes, full);
        }
      }
    }
    return;
  }

  // consumers: warp w computes rows (w % 4) * 16 .. + 16, columns (w / 4) * TN / 2 .. + TN / 2 of each unit
  const int w = warp - kProducerWarps;
  const int row0 = (w & 3) * 16, col0 = (w >> 2) * (TN / 2);
  const int group = lane >> 2, quad = lane & 3;  // the mma fragments' row within 8, column pair within 4
  const int t = threadIdx.x - 32 * kProducerWarps;
  const int consumer_threads = 32 * kConsumerWarps;
  const bool rows_lo = row0 + group < m, rows_hi = row0 + group + 8 < m;
  uint32_t piece = 0;
  for (int g = 0; g < gemms; ++g) {
    const int chunks = gemm_k[g] / kChunkK;
    int u0, u1;
    range_of(units_of(gemm_k[g], gemm_n[g]), cta, ctas, &u0, &u1);
    float* out = y + static_cast<uint64_t>(g % 3) * y_buffer_floats;
    bool flushed = false;
    float acc[kTiles][4];
#pragma unroll
    for (int j = 0; j < kTiles; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    for (int u = u0; u < u1; ++u, ++piece) {
      const int ws = wait_slot(bars, weight_stages, piece), as = wait_slot(act_bars, act_stages, piece);
      if (compute) {
        const float* slot = reinterpret_cast<const float*>(act_ring + static_cast<size_t>(as) * slot_bytes);
        const uint4* b = reinterpret_cast<const uint4*>(weight_ring + static_cast<size_t>(ws) * kUnitBytes) +
                         (col0 / 8) * kChunksPerUnit * 32 + lane;
#pragma unroll
        for (int c = 0; c < kChunksPerUnit; ++c) {  // 32 of K: two k16 steps
          const float* a = slot + c * chunk_floats;
          uint32_t frag[2][4];
#pragma unroll
          for (int ks = 0; ks < 2; ++ks) {
            const int col = ks * 16 + 2 * quad;
            const float* lo = a + (row0 + group) * kRowStride + col;
            const float* hi = lo + 8 * kRowStride;
            const float2 zero = make_float2(0.f, 0.f);
            frag[ks][0] = pack_bf16(rows_lo ? *reinterpret_cast<const float2*>(lo) : zero);
            frag[ks][1] = pack_bf16(rows_hi ? *reinterpret_cast<const float2*>(hi) : zero);
            frag[ks][2] = pack_bf16(rows_lo ? *reinterpret_cast<const float2*>(lo + 8) : zero);
            frag[ks][3] = pack_bf16(rows_hi ? *reinterpret_cast<const float2*>(hi + 8) : zero);
          }
#pragma unroll
          for (int j = 0; j < kTiles; ++j) {
            const uint4 v = b[(j * kChunksPerUnit + c) * 32];
            mma_bf16(acc[j], frag[0], v.x, v.y);
            mma_bf16(acc[j], frag[1], v.z, v.w);
          }
        }
      }
      __syncwarp();
      if (lane == 0) {
        mbar_arrive(smem_addr(&bars[weight_stages + ws]));
        mbar_arrive(smem_addr(&act_bars[act_stages + as]));
      }
      const bool tile_ends = u % chunks == chunks - 1 || u + 1 == u1;
      if (tile_counters && tile_ends && g > 0 && !flushed) {
        // fine-grained: Y_g's buffer was zeroed by every CTA during GEMM g - 1 (and Y_{g-2}, which this CTA zeroes
        // after its flushes, read by all): wait for all of GEMM g - 1 before the first atomics of GEMM g
        if (t == 0) wait_for_count(&counters[g - 1], target);
        consumers_sync(consumer_threads);
      }
      if (compute == 1 && tile_ends) {  // this CTA's part of the n-tile: added into Y_g
        const int tile_col = (u / chunks) * TN + col0;
#pragma unroll
        for (int j = 0; j < kTiles; ++j) {
          const int col = tile_col + j * 8 + 2 * quad;
          float* at = out + static_cast<uint64_t>(col / kChunk) * chunk_floats + (row0 + group) * kRowStride +
                      col % kChunk;
          if (rows_lo) atomicAdd(reinterpret_cast<float2*>(at), make_float2(acc[j][0], acc[j][1]));
          if (rows_hi) atomicAdd(reinterpret_cast<float2*>(at + 8 * kRowStride), make_float2(acc[j][2], acc[j][3]));
          acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
        }
      }
      if (tile_counters && tile_ends) {  // the n-tile's part from this CTA is in: its counter says so
        consumers_sync(consumer_threads);
        if (t == 0) {
          __threadfence();
          atomicAdd(&tile_counters[tile_base[g] + u / chunks], 1u);
        }
        flushed = true;
      }
    }
    if (g + 1 < gemms) {
      // Y_{g+1}'s buffer held Y_{g-2}, which GEMM g - 1 read: every CTA is past it once this one has its first A
      // of GEMM g; a CTA without units waits for the count itself
      if (u0 == u1 && g > 0) {
        if (t == 0) wait_for_count(&counters[g - 1], target);
        consumers_sync(consumer_threads);
      }
      float4* next = reinterpret_cast<float4*>(y + static_cast<uint64_t>((g + 1) % 3) * y_buffer_floats);
      const uint32_t n4 = static_cast<uint32_t>(gemm_n[g + 1] / kChunk) * chunk_floats / 4;
      const uint32_t per = (n4 + ctas - 1) / ctas;
      const uint32_t end = min(n4, per * (cta + 1));
      for (uint32_t i = per * cta + t; i < end; i += consumer_threads) next[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    consumers_sync(consumer_threads);  // this CTA's atomics and zeroes of GEMM g are issued
    if (t == 0) {
      __threadfence();
      atomicAdd(&counters[g], 1u);
    }
  }
}

}  // namespace

// Returns a cudaError_t (0: launched). tile_n: 64, 128 or 256 (the weights packed for it). y: three buffers of
// y_buffer_floats each, the first zeroed here (GEMM 0's output); the last GEMM's output is in buffer
// (gemms - 1) % 3. counters: `gemms` uint32, zero before the first epoch (1, 2, ...). tile_counters (or null: a
// grid-wide wait per GEMM): one uint32 per n-tile of every GEMM, GEMM g's from tile_base[g], zero before the first
// epoch; with them a CTA copies each A chunk as soon as the n-tiles of the GEMM before that hold it are complete
// (every GEMM needs at least as many units as there are CTAs), and waits for the whole GEMM before only at its
// first flush. compute 0 streams the same bytes with no mma and no atomics; 2 does the mma but not the atomics (Y
// stays zero: a timing of the reduction's share, not a result).
extern "C" int gemm_chain_launch(const void* weights, const void* gemm_k, const void* gemm_n, const void* weight_offset,
                                 int gemms, const void* x0, void* y, unsigned long long y_buffer_floats, int m,
                                 void* counters, unsigned epoch, int ctas, int tile_n, int weight_stages,
                                 int act_stages, int compute, void* tile_counters, const void* tile_base,
                                 void* stream) {
  if (m < 1 || m > kRows || weight_stages < 1 || act_stages < 1) return static_cast<int>(cudaErrorInvalidValue);
  void (*kernel)(const uint8_t*, const int*, const int*, const uint64_t*, int, const float*, float*, uint64_t, int,
                 uint32_t*, uint32_t, int, int, int, uint32_t*, const int*) = nullptr;
  if (tile_n == 64) kernel = chain_kernel<64>;
  if (tile_n == 128) kernel = chain_kernel<128>;
  if (tile_n == 256) kernel = chain_kernel<256>;
  if (kernel == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t err = cudaMemsetAsync(y, 0, y_buffer_floats * sizeof(float), s);
  if (err != cudaSuccess) return static_cast<int>(err);
  const int slot_bytes = (kUnitBytes / 2 / tile_n) / kChunk * m * kRowStride * 4;
  const int shared = ring_offset(weight_stages, act_stages) + weight_stages * kUnitBytes + act_stages * slot_bytes;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared);
  if (err != cudaSuccess) return static_cast<int>(err);
  kernel<<<ctas, kThreads, shared, s>>>(
      static_cast<const uint8_t*>(weights), static_cast<const int*>(gemm_k), static_cast<const int*>(gemm_n),
      static_cast<const uint64_t*>(weight_offset), gemms, static_cast<const float*>(x0), static_cast<float*>(y),
      y_buffer_floats, m, static_cast<uint32_t*>(counters), epoch, weight_stages, act_stages, compute,
      static_cast<uint32_t*>(tile_counters), static_cast<const int*>(tile_base));
  return static_cast<int>(cudaGetLastError());
}
