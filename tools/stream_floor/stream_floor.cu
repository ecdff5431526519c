// How fast one persistent kernel can stream a denoise step's expert weights (72 GEMMs' worth, 0.62 GB in bf16)
// through shared memory on Hopper, and what a grid-wide dependency between consecutive GEMMs costs: with the
// weight copies running ahead across it (they never depend on activations) or held until it passes. No math:
// the floor of the "megakernel" design issue 12 leaves untried (docs/fast_path.md), before anyone builds one.
//
// Per CTA (one per SM): warp 0 is the producer. Its lane 0 issues 1-D bulk copies (cp.async.bulk, TMA without a
// tensor map) of the CTA's slice of each GEMM's weights into a ring of `stages` shared-memory buffers, each
// completed on a "full" mbarrier. The warps after warp 1 consume a buffer (read it, fold it into a checksum) and
// release it on an "empty" mbarrier. With activations, each GEMM first has every CTA read its A operand (64 rows x
// K, or a K split's share) from L2. After a GEMM's slice, with SYNC, the consumers wait until every CTA has
// finished that GEMM (a counter per GEMM, release/acquire). With HOLD the producer waits for that too before
// copying the next GEMM's slice, as a design would whose copies cannot run ahead.
//
// Two ways to read A: the consumer threads load it themselves (16-byte loads, then the weights), or, with
// ACT_ASYNC, warp 1 bulk-copies it into a ring of its own once the grid has finished the GEMM before (A is that
// GEMM's output), and the consumers take A's pieces among the weights' as a GEMM's K loop would. With ACT_ASYNC
// each CTA reads its own K split's share (cta % split), not the first share every CTA reads otherwise.
//
// Built by tools/stream_floor_gpu.py with nvcc (-arch=sm_90a) into a shared library it calls through ctypes.

#include <cstdint>
#include <cuda_runtime.h>

#include "hopper_sync.cuh"

namespace {

using namespace hopper;

// A's ring (ACT_ASYNC): stages x bytes; beside a weight ring of at most 128 KiB it fits the H100's 227 KiB.
constexpr int kActStages = 4;
constexpr int kActStageBytes = 16384;
constexpr int kProducerWarps = 2;  // warp 0: the weights; warp 1: A's copies (idle without ACT_ASYNC)

// Dynamic shared memory: the mbarriers (full[stages], empty[stages], A's full[kActStages], A's empty[kActStages])
// on 128-byte lines, then the weights' ring, then A's.
__host__ __device__ constexpr int ring_offset(int stages) {
  return 128 * ((2 * (stages + kActStages) * 8 + 127) / 128);
}

// The CTA's byte range of a segment: equal 16-byte-aligned slices, the last CTAs' possibly shorter or empty.
__device__ __forceinline__ void slice_of(uint64_t size, int cta, int ctas, uint64_t* begin, uint64_t* end) {
  uint64_t per = ((size + ctas - 1) / ctas + 15) / 16 * 16;
  uint64_t b = per * cta;
  *begin = b < size ? b : size;
  uint64_t e = b + per;
  *end = e < size ? e : size;
}

__global__ void stream_kernel(const uint8_t* __restrict__ weights, const uint64_t* __restrict__ seg_offset,
                              const uint64_t* __restrict__ seg_size, int segments, uint32_t* __restrict__ counters,
                              uint32_t epoch, int stages, int stage_bytes, int sync, int hold,
                              uint32_t* __restrict__ checksum, const uint8_t* __restrict__ act,
                              const uint64_t* __restrict__ act_bytes, uint32_t* __restrict__ sink, int act_async,
                              int act_split) {
  extern __shared__ __align__(128) uint8_t smem[];
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem);  // full[stages], empty[stages], then A's
  uint64_t* act_bars = bars + 2 * stages;              // A's full[kActStages], then A's empty[kActStages]
  uint8_t* ring = smem + ring_offset(stages);
  uint8_t* act_ring = ring + static_cast<size_t>(stages) * stage_bytes;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int consumer_warps = blockDim.x / 32 - kProducerWarps;
  const int consumer_threads = consumer_warps * 32;
  const int cta = blockIdx.x, ctas = gridDim.x;
  const uint32_t target = epoch * static_cast<uint32_t>(ctas);  // counters only grow: no reset between launches

  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      mbar_init(smem_addr(&bars[s]), 1);                         // full: the producer's expect_tx arrival
      mbar_init(smem_addr(&bars[stages + s]), consumer_warps);  // empty: one arrival per consumer warp
    }
    for (int s = 0; s < kActStages; ++s) {
      mbar_init(smem_addr(&act_bars[s]), 1);
      mbar_init(smem_addr(&act_bars[kActStages + s]), consumer_warps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the inits, visible to the bulk copies
  }
  __syncthreads();

  if (warp == 0) {
    if (lane == 0) {
      uint64_t piece = 0;  // pieces issued so far: its stage and round
      for (int g = 0; g < segments; ++g) {
        if (hold && g > 0) {
          const long long since = clock64();
          while (load_acquire(&counters[g - 1]) < target) give_up_after(since);
        }
        uint64_t begin, end;
        slice_of(seg_size[g], cta, ctas, &begin, &end);
        for (uint64_t at = begin; at < end; at += stage_bytes, ++piece) {
          const int s = claim_slot(&bars[stages], stages, piece);
          const uint32_t bytes = static_cast<uint32_t>(end - at < static_cast<uint64_t>(stage_bytes) ? end - at
                                                                                                     : stage_bytes);
          const uint32_t full = smem_addr(&bars[s]);
          mbar_expect_bytes(full, bytes);
          bulk_copy(smem_addr(ring + static_cast<size_t>(s) * stage_bytes), weights + seg_offset[g] + at, bytes,
                    full);
        }
      }
    }
    return;
  }

  if (warp == 1) {
    if (act_async && lane == 0) {
      uint64_t piece = 0;
      for (int g = 0; g < segments; ++g) {
        if (g > 0) {  // A of GEMM g is GEMM g - 1's output: copied once every CTA has finished that GEMM
          const long long since = clock64();
          while (load_acquire(&counters[g - 1]) < target) give_up_after(since);
          // A real step would write A with ordinary stores and read it here through the async proxy: it needs a
          // fence.proxy.async between this acquire and the copy. Here A is never written, so none is issued.
        }
        const uint8_t* src = act + static_cast<uint64_t>(cta % act_split) * act_bytes[g];
        for (uint64_t at = 0; at < act_bytes[g]; at += kActStageBytes, ++piece) {
          const int s = claim_slot(&act_bars[kActStages], kActStages, piece);
          const uint32_t bytes = static_cast<uint32_t>(
              act_bytes[g] - at < static_cast<uint64_t>(kActStageBytes) ? act_bytes[g] - at : kActStageBytes);
          const uint32_t full = smem_addr(&act_bars[s]);
          mbar_expect_bytes(full, bytes);
          bulk_copy(smem_addr(act_ring + static_cast<size_t>(s) * kActStageBytes), src + at, bytes, full);
        }
      }
    }
    return;
  }

  // consumers
  const int t = threadIdx.x - 32 * kProducerWarps;
  uint32_t sum = 0, other = 0;
  uint64_t piece = 0, act_piece = 0;
  // one piece of A from its ring, folded into `other`, its stage given back
  auto take_act_piece = [&](uint64_t bytes_left) {
    const int s = wait_slot(act_bars, kActStages, act_piece);
    const int bytes = static_cast<int>(bytes_left < static_cast<uint64_t>(kActStageBytes) ? bytes_left
                                                                                          : kActStageBytes);
    const uint4* words = reinterpret_cast<const uint4*>(act_ring + static_cast<size_t>(s) * kActStageBytes);
    for (int i = t; i < bytes / 16; i += consumer_threads) {
      const uint4 v = words[i];
      other ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(smem_addr(&act_bars[kActStages + s]));
    ++act_piece;
  };
  for (int g = 0; g < segments; ++g) {
    if (act_bytes != nullptr && !act_async) {
      // GEMM g's activations, made by GEMM g - 1: every CTA reads them from L2 (.cg: not from its L1), as a real
      // step would before its first multiply
      const uint4* a = reinterpret_cast<const uint4*>(act);
      for (uint64_t i = t; i < act_bytes[g] / 16; i += consumer_threads) {
        const uint4 v = __ldcg(a + i);
        other ^= v.x ^ v.y ^ v.z ^ v.w;
      }
    }
    uint64_t begin, end;
    slice_of(seg_size[g], cta, ctas, &begin, &end);
    // with ACT_ASYNC: A's pieces of this GEMM, taken in step with the weights' (the j-th of n weight pieces
    // needs A's first ceil((j + 1) * n_act / n) pieces), as a K loop takes A's and B's tiles together
    const uint64_t n_act = act_async ? (act_bytes[g] + kActStageBytes - 1) / kActStageBytes : 0;
    const uint64_t n_weights = (end - begin + stage_bytes - 1) / stage_bytes;
    uint64_t act_taken = 0;
    for (uint64_t at = begin, j = 0; at < end; at += stage_bytes, ++piece, ++j) {
      for (; act_taken < n_act && act_taken * n_weights < (j + 1) * n_act; ++act_taken)
        take_act_piece(act_bytes[g] - act_taken * kActStageBytes);
      const int s = wait_slot(bars, stages, piece);
      const int bytes = static_cast<int>(end - at < static_cast<uint64_t>(stage_bytes) ? end - at : stage_bytes);
      const uint4* words = reinterpret_cast<const uint4*>(ring + static_cast<size_t>(s) * stage_bytes);
      for (int i = t; i < bytes / 16; i += consumer_threads) {
        const uint4 v = words[i];
        sum ^= v.x ^ v.y ^ v.z ^ v.w;
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(smem_addr(&bars[stages + s]));
    }
    for (; act_taken < n_act; ++act_taken) take_act_piece(act_bytes[g] - act_taken * kActStageBytes);
    if (sync) {
      consumers_sync(consumer_threads);  // this CTA's slice of GEMM g is consumed
      if (t == 0) {
        __threadfence();
        atomicAdd(&counters[g], 1u);
        const long long since = clock64();
        while (load_acquire(&counters[g]) < target) give_up_after(since);
      }
      consumers_sync(consumer_threads);
    }
  }
  atomicXor(&checksum[cta], sum);
  if (act_bytes != nullptr) atomicXor(&sink[cta], other);
}

}  // namespace

// Returns a cudaError_t (0: launched). counters: `segments` uint32, zero before the first epoch (1, 2, ...).
// act_bytes (per GEMM, or null): the activation bytes each CTA reads from `act` before its GEMM's weights, or
// with act_async, through bulk copies from `act` + (cta % act_split) * act_bytes[g] among them.
extern "C" int stream_floor_launch(const void* weights, const void* seg_offset, const void* seg_size, int segments,
                                   void* counters, unsigned epoch, int ctas, int consumer_warps, int stages,
                                   int stage_bytes, int sync, int hold, void* checksum, const void* act,
                                   const void* act_bytes, void* sink, int act_async, int act_split, void* stream) {
  if (hold && !sync) return static_cast<int>(cudaErrorInvalidValue);  // held copies wait on the grid's counters
  // A's copies wait on the grid's counters; their pieces are whole 16-byte words
  if (act_async && (!sync || act_bytes == nullptr || act_split < 1)) return static_cast<int>(cudaErrorInvalidValue);
  const int shared = ring_offset(stages) + stages * stage_bytes + (act_async ? kActStages * kActStageBytes : 0);
  cudaError_t err = cudaFuncSetAttribute(stream_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared);
  if (err != cudaSuccess) return static_cast<int>(err);
  stream_kernel<<<ctas, 32 * (consumer_warps + kProducerWarps), shared, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const uint8_t*>(weights), static_cast<const uint64_t*>(seg_offset),
      static_cast<const uint64_t*>(seg_size), segments, static_cast<uint32_t*>(counters), epoch, stages,
      stage_bytes, sync, hold, static_cast<uint32_t*>(checksum), static_cast<const uint8_t*>(act),
      static_cast<const uint64_t*>(act_bytes), static_cast<uint32_t*>(sink), act_async, act_split);
  return static_cast<int>(cudaGetLastError());
}
