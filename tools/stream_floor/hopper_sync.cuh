// Hopper shared-memory rings for the persistent-kernel tools (stream_floor.cu, gemm_chain.cu, gemm_chain_cluster.cu):
// mbarriers, 1-D bulk copies (cp.async.bulk, TMA without a tensor map) completing on them, a ring's slot claimed by
// its producer and awaited by its consumers, acquire loads of the grid's counters, a spin limit that traps instead
// of hanging a device call, thread-block cluster helpers, and the bf16 mma the GEMM tools compute with.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace hopper {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

// A wait that has not ended after ~2 s (clock64 cycles at the H100's ~1.7 GHz) traps instead of hanging the
// device call: a bug shows as a launch error.
constexpr long long kSpinLimit = 4000000000LL;

__device__ __forceinline__ void give_up_after(long long since) {
  if (clock64() - since > kSpinLimit) __trap();
}

__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}

__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  const long long since = clock64();
  while (!mbar_try_wait(bar, parity)) give_up_after(since);
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void mbar_expect_bytes(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

// A ring of `stages` slots with a "full" and an "empty" mbarrier each, pieces numbered from 0 in issue order.
// The producer's slot for `piece`: once the consumers gave back what it held `stages` pieces before.
__device__ __forceinline__ int claim_slot(const uint64_t* empty, int stages, uint64_t piece) {
  const int s = static_cast<int>(piece % stages);
  const uint64_t round = piece / stages;
  if (round > 0) mbar_wait(smem_addr(&empty[s]), static_cast<uint32_t>((round - 1) & 1));
  return s;
}

// The consumers' slot for `piece`: once its bytes have arrived.
__device__ __forceinline__ int wait_slot(const uint64_t* full, int stages, uint64_t piece) {
  const int s = static_cast<int>(piece % stages);
  mbar_wait(smem_addr(&full[s]), static_cast<uint32_t>((piece / stages) & 1));
  return s;
}

__device__ __forceinline__ uint32_t load_acquire(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Spins until the counter reaches `target` (every CTA has arrived), with the spin limit.
__device__ __forceinline__ void wait_for_count(const uint32_t* counter, uint32_t target) {
  const long long since = clock64();
  while (load_acquire(counter) < target) give_up_after(since);
}

// A named barrier over the consumer warps only (the producers are busy in their own loops).
__device__ __forceinline__ void consumers_sync(int consumer_threads) {
  asm volatile("bar.sync 1, %0;" ::"r"(consumer_threads) : "memory");
}

// Thread-block clusters: a shared-memory address in another CTA of the cluster, an arrival on an mbarrier there
// (release at cluster scope: this CTA's shared-memory writes before it are visible to whoever waits), a wait that
// acquires at cluster scope, and a load from another CTA's shared memory.
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}

__device__ __forceinline__ uint32_t map_to_rank(uint32_t addr, uint32_t rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(addr), "r"(rank));
  return r;
}

__device__ __forceinline__ void mbar_arrive_remote(uint32_t cluster_addr) {
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(cluster_addr) : "memory");
}

__device__ __forceinline__ void mbar_wait_cluster(uint32_t bar, uint32_t parity) {
  const long long since = clock64();
  while (true) {
    uint32_t done;
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
    if (done) return;
    give_up_after(since);
  }
}

__device__ __forceinline__ float2 load_remote_float2(uint32_t cluster_addr) {
  float2 v;
  asm volatile("ld.shared::cluster.v2.f32 {%0, %1}, [%2];" : "=f"(v.x), "=f"(v.y) : "r"(cluster_addr) : "memory");
  return v;
}

// D += A B on the tensor cores, m16n8k16, bf16 in, float32 accumulate: a[4] and b0, b1 the lanes' fragments as the
// PTX ISA lays them out (the host tools pack the weights in that order).
__device__ __forceinline__ void mma_bf16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace hopper
