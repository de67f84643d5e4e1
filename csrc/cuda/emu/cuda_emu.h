// Host emulation of the small part of the CUDA execution model that csrc/cuda's
// kernels use, so that the very same kernel sources compile with g++ and run on
// the CPU.  A verification tool, not a fast path.
//
// What is emulated, and how:
//  * a grid of blocks: blocks run one after another (or in parallel on several OS
//    threads, each OS thread running one block at a time);
//  * the threads of a block: one fiber (own stack, cooperative switching) per CUDA
//    thread, all alive at once; a fiber only gives up the CPU at a barrier or a
//    warp-collective instruction, so every interleaving the kernels rely on is
//    produced by the synchronisation they contain, not by luck;
//  * blockIdx/threadIdx/blockDim/gridDim: per fiber / per block;
//  * __syncthreads(): all threads of the block meet (a barrier with a deadlock check:
//    a divergent barrier that can never complete aborts the launch with a message);
//  * shared memory: dynamic shared memory is one buffer per block (dynamic_smem()),
//    prefilled with a NaN pattern so that reading unwritten shared memory shows; a
//    static `__shared__` variable becomes `static thread_local`, one per OS thread,
//    i.e. per running block;
//  * warp collectives (__shfl*_sync, __syncwarp, ldmatrix, mma.sync): every lane
//    deposits its operands; the last lane to arrive executes the instruction for the
//    whole warp at that one moment, exactly as the PTX ISA defines the distribution
//    of elements over lanes; then each lane takes its own result.  Lanes that call
//    different collectives at the same time are reported as divergence;
//  * cp.async: the copy is recorded at issue time and performed only when a
//    cp.async.wait_group that covers it executes (the latest moment the hardware may
//    complete it), so a kernel that reads its shared memory before waiting sees the
//    stale contents, as it could on a GPU.
//
// Instruction layouts (register fragments) follow the PTX ISA, "Matrix Fragments for
// mma.m16n8k16 with floating point type" (section 9.7.14.5.8 in PTX ISA 8.x) and
// "Warp-level matrix load instruction: ldmatrix" (section 9.7.14.5.15):
//   https://docs.nvidia.com/cuda/parallel-thread-execution/index.html
// The emulator's layouts are checked on their own by tests/test_cuda_emulator_unit.py
// against formulas written out independently there.

#pragma once

#define CUDA_EMU 1

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <unordered_map>
#include <stdexcept>
#include <string>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __align__(n) alignas(n)

// ---------------------------------------------------------------- CUDA host API subset
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 { unsigned x, y, z; };
typedef void* cudaStream_t;
typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

// ---------------------------------------------------------------- fp16 / bf16 storage types
struct __half { uint16_t x; };
struct __nv_bfloat16 { uint16_t x; };

inline float emu_bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t emu_float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float __half2float(__half h) {
  const uint32_t s = (h.x & 0x8000u) << 16, e = (h.x >> 10) & 0x1f, m = h.x & 0x3ff;
  if (e == 0) {  // zero or subnormal: m * 2^-24
    float f = std::ldexp(static_cast<float>(m), -24);
    return s ? -f : f;
  }
  if (e == 31) return emu_bits_to_float(s | 0x7f800000u | (m << 13));
  return emu_bits_to_float(s | ((e + 112) << 23) | (m << 13));
}
inline __half __float2half_rn(float f) {  // round to nearest even, with subnormals and overflow to inf
  const uint32_t u = emu_float_to_bits(f), s = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  __half h;
  if (a >= 0x7f800000u) { h.x = static_cast<uint16_t>(s | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0)); return h; }
  if (a >= 0x477ff000u) { h.x = static_cast<uint16_t>(s | 0x7c00u); return h; }  // >= 65520 rounds to inf
  if (a < 0x38800000u) {  // below 2^-14: subnormal half, quantum 2^-24
    const float q = std::nearbyint(emu_bits_to_float(a) * 16777216.0f);  // ties to even (default mode)
    h.x = static_cast<uint16_t>(s | static_cast<uint32_t>(q));
    return h;
  }
  const uint32_t mant = a & 0x7fffffu, exp = (a >> 23) - 112;
  uint32_t r = (exp << 10) | (mant >> 13);
  const uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (r & 1u))) ++r;
  h.x = static_cast<uint16_t>(s | r);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) { return emu_bits_to_float(static_cast<uint32_t>(b.x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u = emu_float_to_bits(f);
  __nv_bfloat16 b;
  if ((u & 0x7fffffffu) > 0x7f800000u) { b.x = static_cast<uint16_t>((u >> 16) | 0x40u); return b; }  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  b.x = static_cast<uint16_t>(u >> 16);
  return b;
}
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }

namespace cuda_emu {

[[noreturn]] void fail(const std::string& msg);

// ---------------------------------------------------------------- fibers
#if defined(__x86_64__)
// Cooperative switch: save the callee-saved registers on the current stack, store the
// stack pointer in *save, load `next` and pop its registers.  (System V x86-64 ABI:
// rbx, rbp, r12-r15 are callee saved; the caller saves everything else.)
extern "C" void cuda_emu_switch_stack(void** save, void* next);
asm(R"(
  .text
  .weak cuda_emu_switch_stack
  .hidden cuda_emu_switch_stack
  .type cuda_emu_switch_stack,@function
cuda_emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch_stack, .-cuda_emu_switch_stack
)");
#endif

struct Block;

struct Copy {  // one pending cp.async
  void* dst;
  const void* src;
  int bytes, src_bytes;
};

struct Thread {
  uint3 idx;
  int linear, lane, warp;
  unsigned collectives = 0;  // collective instructions executed, picks the slot set
  bool done = false;
  const uint64_t* wait_gen = nullptr;  // parked until *wait_gen != wait_val
  uint64_t wait_val = 0;
  void* sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t ctx;
#endif
  std::vector<Copy> uncommitted;
  std::vector<std::vector<Copy>> groups;  // committed, oldest first
};

// One lane's operands and results of a warp collective.
struct Slot {
  int kind;
  uint64_t in[10];
  uint64_t out[4];
};

struct Warp {
  int arrived = 0;
  uint64_t generation = 0;
  Slot slots[2][32];
};

struct Block {
  dim3 grid, dim, idx;
  int nthreads = 0;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  char* smem = nullptr;
  size_t smem_bytes = 0;
  int bar_arrived = 0;
  uint64_t bar_generation = 0;
  uint64_t progress = 0;  // bumped whenever a barrier completes or a thread finishes
  const std::function<void()>* body = nullptr;
  std::string error;
  std::unordered_map<uintptr_t, int> in_flight;  // 16-byte shared chunks a pending cp.async writes
};

struct Worker {  // per OS thread: the block it runs, the fiber stacks, the scheduler context
  Block* block = nullptr;
  Thread* current = nullptr;
  void* sched_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t sched_ctx;
#endif
  std::vector<char*> stacks;
  std::vector<char> smem;
};

inline thread_local Worker tl_worker;

constexpr size_t kStack = 128 * 1024;
constexpr size_t kGuard = 4096;

inline Thread& cur() { return *tl_worker.current; }
inline Block& cur_block() { return *tl_worker.block; }

inline void yield() {
  Worker& w = tl_worker;
#if defined(__x86_64__)
  cuda_emu_switch_stack(&w.current->sp, w.sched_sp);
#else
  swapcontext(&w.current->ctx, &w.sched_ctx);
#endif
}

[[noreturn]] inline void fail(const std::string& msg) {
  Block& b = cur_block();
  if (b.error.empty()) b.error = msg;
  for (;;) yield();  // never resumed: the scheduler stops at the first error
}

inline void perform(const Copy& c);

inline void fiber_main() {
  Worker& w = tl_worker;
  (*w.block->body)();
  Thread& t = *w.current;
  if (!t.uncommitted.empty() || !t.groups.empty()) {  // outstanding copies land eventually
    for (auto& g : t.groups)
      for (auto& c : g) perform(c);
    for (auto& c : t.uncommitted) perform(c);
    t.groups.clear();
    t.uncommitted.clear();
  }
  t.done = true;
  w.block->progress++;
  for (;;) yield();
}

#if defined(__x86_64__)
extern "C" inline void cuda_emu_fiber_entry() { fiber_main(); }
#else
inline void cuda_emu_fiber_entry_uc() { fiber_main(); }
#endif

inline char* stack_at(Worker& w, int i) {
  while (static_cast<int>(w.stacks.size()) <= i) {
    void* p = mmap(nullptr, kStack + kGuard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot allocate a fiber stack");
    mprotect(p, kGuard, PROT_NONE);  // overflow faults instead of corrupting a neighbour
    w.stacks.push_back(static_cast<char*>(p));
  }
  return w.stacks[i];
}

// Runs one block to completion on the calling OS thread; throws on emulator errors.
inline void run_block(dim3 grid, dim3 dim, dim3 idx, size_t smem_bytes, const std::function<void()>& body) {
  Worker& w = tl_worker;
  Block b;
  b.grid = grid;
  b.dim = dim;
  b.idx = idx;
  b.nthreads = static_cast<int>(dim.x * dim.y * dim.z);
  if (b.nthreads % 32) throw std::runtime_error("cuda_emu: the block size must be a multiple of 32");
  b.threads.resize(b.nthreads);
  b.warps.resize(b.nthreads / 32);
  if (w.smem.size() < smem_bytes + 16) w.smem.resize(smem_bytes + 16);
  b.smem = w.smem.data() + ((16 - reinterpret_cast<uintptr_t>(w.smem.data()) % 16) % 16);
  b.smem_bytes = smem_bytes;
  std::memset(b.smem, 0xff, smem_bytes);  // NaN as fp16, bf16 and fp32: unwritten data shows
  b.body = &body;
  w.block = &b;
  for (int i = 0; i < b.nthreads; ++i) {
    Thread& t = b.threads[i];
    t.linear = i;
    t.idx = {static_cast<unsigned>(i % dim.x), static_cast<unsigned>((i / dim.x) % dim.y),
             static_cast<unsigned>(i / (dim.x * dim.y))};
    t.lane = i % 32;
    t.warp = i / 32;
    char* base = stack_at(w, i) + kGuard;
#if defined(__x86_64__)
    uintptr_t top = (reinterpret_cast<uintptr_t>(base) + kStack) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                                                  // fake return address of the entry
    *--sp = reinterpret_cast<void*>(&cuda_emu_fiber_entry);            // `ret` of the first switch lands here
    for (int r = 0; r < 6; ++r) *--sp = nullptr;                        // rbp rbx r12-r15
    t.sp = sp;
#else
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = base;
    t.ctx.uc_stack.ss_size = kStack;
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, cuda_emu_fiber_entry_uc, 0);
#endif
  }
  // Scheduling is deliberately skewed: always resume the lowest-numbered thread that can
  // run, and start over from thread 0 whenever a barrier or collective completes.  So
  // warp 0 runs as far ahead as the synchronisation allows (to the next __syncthreads)
  // before warp 1 moves: a read of shared memory that another warp has not written yet
  // (missing barrier after a load) and an overwrite of data another warp still has to
  // read (missing barrier before reuse) both show.  Threads parked at a barrier whose
  // generation has not moved are skipped without a switch.  A pass in which no thread
  // can run while some are not done is a deadlock.
  for (;;) {
    bool live = false, resumed = false;
    for (int i = 0; i < b.nthreads && b.error.empty(); ++i) {
      Thread& t = b.threads[i];
      if (t.done) continue;
      live = true;
      if (t.wait_gen != nullptr && *t.wait_gen == t.wait_val) continue;
      resumed = true;
      const uint64_t before = b.progress;
      w.current = &t;
#if defined(__x86_64__)
      cuda_emu_switch_stack(&w.sched_sp, t.sp);
#else
      swapcontext(&w.sched_ctx, &t.ctx);
#endif
      if (b.progress != before) break;  // start over from thread 0
    }
    w.current = nullptr;
    if (!b.error.empty() || !live) break;
    if (!resumed) {
      b.error = "deadlock: threads wait at a barrier or warp collective that the others never reach";
      break;
    }
  }
  w.block = nullptr;
  if (!b.error.empty()) {
    char where[96];
    std::snprintf(where, sizeof where, " (block %u,%u,%u)", idx.x, idx.y, idx.z);
    throw std::runtime_error("cuda_emu: " + b.error + where);
  }
}

// ---------------------------------------------------------------- barriers and collectives
inline void wait_for(const uint64_t* generation, uint64_t value) {
  Thread& t = cur();
  t.wait_gen = generation;
  t.wait_val = value;
  while (*generation == value) yield();
  t.wait_gen = nullptr;
}

inline void syncthreads() {
  Block& b = cur_block();
  const uint64_t gen = b.bar_generation;
  if (++b.bar_arrived == b.nthreads) {
    b.bar_arrived = 0;
    b.bar_generation++;
    b.progress++;
    return;
  }
  wait_for(&b.bar_generation, gen);
}

enum Kind { kSyncwarp = 1, kShfl, kLdmatrix, kMma };

// Deposit `in`, wait for the whole warp; the last lane runs exec(slots) for all 32.
template <class Exec>
inline Slot& collective(int kind, Exec&& exec) {
  Thread& t = cur();
  Block& b = cur_block();
  Warp& w = b.warps[t.warp];
  Slot* set = w.slots[t.collectives++ & 1];
  Slot& mine = set[t.lane];
  mine.kind = kind;
  const uint64_t gen = w.generation;
  if (++w.arrived == 32) {
    for (int l = 0; l < 32; ++l)
      if (set[l].kind != kind) fail("warp divergence: lanes of one warp execute different collective instructions");
    exec(set);
    w.arrived = 0;
    w.generation++;
    b.progress++;
  } else {
    wait_for(&w.generation, gen);
  }
  return mine;
}

inline void check_full_mask(unsigned mask) {
  if (mask != 0xffffffffu) fail("only full-warp masks (0xffffffff) are emulated");
}

template <class T>
inline T shfl_generic(unsigned mask, T v, int src_or_mask, int mode) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  check_full_mask(mask);
  Thread& t = cur();
  Slot* peek = &cur_block().warps[t.warp].slots[t.collectives & 1][t.lane];
  peek->in[0] = 0;
  std::memcpy(&peek->in[0], &v, sizeof(T));
  peek->in[1] = static_cast<uint64_t>(static_cast<int64_t>(src_or_mask));
  Slot& mine = collective(kShfl | (mode << 8), [mode](Slot* s) {
    for (int l = 0; l < 32; ++l) {
      const int arg = static_cast<int>(static_cast<int64_t>(s[l].in[1]));
      int src = l;
      if (mode == 0) src = arg & 31;                         // __shfl_sync: absolute lane
      else if (mode == 1) src = l ^ arg;                      // __shfl_xor_sync
      else if (mode == 2) src = (l - arg >= 0) ? l - arg : l;  // __shfl_up_sync
      else src = (l + arg < 32) ? l + arg : l;               // __shfl_down_sync
      s[l].out[0] = s[src & 31].in[0];
    }
  });
  T r;
  std::memcpy(&r, &mine.out[0], sizeof(T));
  return r;
}

inline void check_smem(const void* p, size_t bytes, const char* what) {
  Block& b = cur_block();
  const char* c = static_cast<const char*>(p);
  if (c < b.smem || c + bytes > b.smem + b.smem_bytes)
    fail(std::string(what) + ": address outside the block's dynamic shared memory");
  if (reinterpret_cast<uintptr_t>(p) % 16) fail(std::string(what) + ": address not 16-byte aligned");
}

// ldmatrix.sync.aligned.m8n8{.x1,.x2,.x4}{.trans}.shared.b16: lanes 8i..8i+7 give the
// addresses of rows 0..7 of matrix i (16 bytes each).  Without .trans, lane l receives
// row l/4, elements 2(l%4) and 2(l%4)+1 of each matrix; with .trans, elements
// (row 2(l%4), col l/4) and (row 2(l%4)+1, col l/4).  Lower-indexed element in the low half.
inline void ldmatrix(uint32_t* r, int nmat, bool trans, const void* row_addr) {
  Thread& t = cur();
  Slot* peek = &cur_block().warps[t.warp].slots[t.collectives & 1][t.lane];
  peek->in[0] = reinterpret_cast<uint64_t>(row_addr);
  peek->in[1] = static_cast<uint64_t>(nmat * 2 + (trans ? 1 : 0));
  if (t.lane < 8 * nmat) check_smem(row_addr, 16, "ldmatrix");
  Slot& mine = collective(kLdmatrix, [](Slot* s) {
    const uint64_t shape = s[0].in[1];
    for (int l = 0; l < 32; ++l)
      if (s[l].in[1] != shape) fail("ldmatrix: lanes disagree on the shape");
    const int n = static_cast<int>(shape / 2);
    const bool tr = shape & 1;
    // A cp.async that is issued but not yet waited for may land at any moment: reading
    // its destination is a race (a missing wait, or a buffer refilled while still read).
    const auto& f = cur_block().in_flight;
    if (!f.empty())
      for (int r = 0; r < 8 * n; ++r)
        if (f.count(static_cast<uintptr_t>(s[r].in[0]))) fail("ldmatrix reads shared memory that a pending cp.async writes (missing cp.async.wait_group or __syncthreads)");
    for (int l = 0; l < 32; ++l) {
      for (int i = 0; i < n; ++i) {
        uint16_t e[2];
        for (int j = 0; j < 2; ++j) {
          const int row = tr ? 2 * (l % 4) + j : l / 4;
          const int col = tr ? l / 4 : 2 * (l % 4) + j;
          const uint16_t* base = reinterpret_cast<const uint16_t*>(s[8 * i + row].in[0]);
          e[j] = base[col];
        }
        s[l].out[i] = static_cast<uint64_t>(e[0]) | (static_cast<uint64_t>(e[1]) << 16);
      }
    }
  });
  for (int i = 0; i < nmat; ++i) r[i] = static_cast<uint32_t>(mine.out[i]);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, per the PTX ISA:
//   groupID = lane >> 2, threadID_in_group = lane % 4
//   A (16x16), a0..a7 in 4 registers, two elements each (lower index in the low half):
//     row = groupID            for a0,a1,a4,a5;  groupID + 8 for a2,a3,a6,a7
//     col = 2*threadID_in_group + (i & 1)   for a0..a3;  + 8 for a4..a7
//   B (16x8), b0..b3 in 2 registers:
//     row = 2*threadID_in_group + (i & 1)   for b0,b1;  + 8 for b2,b3;   col = groupID
//   C, D (16x8 f32), c0..c3:
//     row = groupID for c0,c1;  groupID + 8 for c2,c3;  col = 2*threadID_in_group + (i & 1)
template <bool BF16>
inline void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  Thread& t = cur();
  Slot* peek = &cur_block().warps[t.warp].slots[t.collectives & 1][t.lane];
  for (int i = 0; i < 4; ++i) peek->in[i] = a[i];
  for (int i = 0; i < 2; ++i) peek->in[4 + i] = b[i];
  for (int i = 0; i < 4; ++i) peek->in[6 + i] = emu_float_to_bits(c[i]);
  Slot& mine = collective(kMma, [](Slot* s) {
    auto half = [](uint64_t reg, int hi) -> float {
      const uint16_t bits = static_cast<uint16_t>(reg >> (16 * hi));
      if (BF16) return __bfloat162float(__nv_bfloat16{bits});
      return __half2float(__half{bits});
    };
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, tig = l & 3;
      for (int i = 0; i < 8; ++i) {
        const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
        const int col = 2 * tig + (i & 1) + (i >= 4 ? 8 : 0);
        A[row][col] = half(s[l].in[i / 2], i & 1);
      }
      for (int i = 0; i < 4; ++i) {
        const int row = 2 * tig + (i & 1) + (i >= 2 ? 8 : 0);
        B[row][g] = half(s[l].in[4 + i / 2], i & 1);
      }
      for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? g : g + 8;
        C[row][2 * tig + (i & 1)] = emu_bits_to_float(static_cast<uint32_t>(s[l].in[6 + i]));
      }
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, tig = l & 3;
      for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? g : g + 8, col = 2 * tig + (i & 1);
        // products of 16-bit values are exact in fp32; accumulate in fp32, k ascending
        float acc = C[row][col];
        for (int k = 0; k < 16; ++k) acc = std::fma(A[row][k], B[k][col], acc);
        s[l].out[i] = emu_float_to_bits(acc);
      }
    }
  });
  for (int i = 0; i < 4; ++i) d[i] = emu_bits_to_float(static_cast<uint32_t>(mine.out[i]));
}

// cp.async.cg.shared.global [dst], [src], 16, src_bytes: src_bytes < 16 fills the rest with zeros.
inline void cp_async(void* dst, const void* src, int src_bytes) {
  check_smem(dst, 16, "cp.async destination");
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16) fail("cp.async: global address not 16-byte aligned");
  cur().uncommitted.push_back(Copy{dst, src, 16, src_bytes});
  cur_block().in_flight[reinterpret_cast<uintptr_t>(dst)]++;
}
inline void perform(const Copy& c) {
  auto& f = cur_block().in_flight;
  auto it = f.find(reinterpret_cast<uintptr_t>(c.dst));
  if (it != f.end() && --it->second == 0) f.erase(it);
  if (c.src_bytes > 0) std::memcpy(c.dst, c.src, c.src_bytes);
  if (c.src_bytes < c.bytes) std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
}
inline void cp_async_commit() {
  Thread& t = cur();
  t.groups.push_back(std::move(t.uncommitted));
  t.uncommitted.clear();
}
inline void cp_async_wait(int n) {  // all but the newest n committed groups are complete
  Thread& t = cur();
  while (static_cast<int>(t.groups.size()) > n) {
    for (auto& c : t.groups.front()) perform(c);
    t.groups.erase(t.groups.begin());
  }
}

// ---------------------------------------------------------------- launches
struct FuncAttr { size_t max_dynamic_smem = 48 * 1024; };
// Per-kernel attributes (cudaFuncSetAttribute), keyed by the kernel's address.
inline FuncAttr& attr_of(const void* f) {
  static std::map<const void*, FuncAttr> attrs;  // node based: references stay valid
  static std::mutex lock;
  std::lock_guard<std::mutex> guard(lock);
  return attrs[f];
}

// How blocks of a grid are spread over OS threads; set by the torch binding.
using ParallelFor = std::function<void(int64_t n, const std::function<void(int64_t, int64_t)>&)>;
inline ParallelFor& parallel_for() {
  static ParallelFor pf = [](int64_t n, const std::function<void(int64_t, int64_t)>& f) { f(0, n); };
  return pf;
}

constexpr size_t kMaxDynamicSmem = 227 * 1024;  // sm_90; the compile test checks sm_80's 163 KiB

template <class... P, class... A>
inline void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) throw std::runtime_error("cuda_emu: empty grid");
  if (grid.y > 65535 || grid.z > 65535) throw std::runtime_error("cuda_emu: grid.y/z above 65535");
  if (block.x * block.y * block.z > 1024) throw std::runtime_error("cuda_emu: more than 1024 threads");
  const size_t limit = attr_of(reinterpret_cast<const void*>(kernel)).max_dynamic_smem;
  if (smem > limit)
    throw std::runtime_error("cuda_emu: dynamic shared memory " + std::to_string(smem) +
                             " B above the kernel's limit " + std::to_string(limit) +
                             " B (cudaFuncSetAttribute missing?)");
  std::function<void()> body = [&]() { kernel(args...); };
  const int64_t n = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  std::string error;
  std::atomic_flag err_lock = ATOMIC_FLAG_INIT;
  parallel_for()(n, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const dim3 idx(static_cast<unsigned>(i % grid.x), static_cast<unsigned>((i / grid.x) % grid.y),
                     static_cast<unsigned>(i / (static_cast<int64_t>(grid.x) * grid.y)));
      try {
        run_block(grid, block, idx, smem, body);
      } catch (const std::exception& e) {
        while (err_lock.test_and_set()) {}
        if (error.empty()) error = e.what();
        err_lock.clear();
        return;
      }
    }
  });
  if (!error.empty()) throw std::runtime_error(error);
}

}  // namespace cuda_emu

template <class F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || static_cast<size_t>(value) > cuda_emu::kMaxDynamicSmem) return cudaErrorInvalidValue;
  cuda_emu::attr_of(reinterpret_cast<const void*>(kernel)).max_dynamic_smem = static_cast<size_t>(value);
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated CUDA error"; }

// ---------------------------------------------------------------- device-side names
#define threadIdx (::cuda_emu::cur().idx)
#define blockIdx (::cuda_emu::cur_block().idx)
#define blockDim (::cuda_emu::cur_block().dim)
#define gridDim (::cuda_emu::cur_block().grid)

inline void __syncthreads() { cuda_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  cuda_emu::check_full_mask(mask);
  cuda_emu::collective(cuda_emu::kSyncwarp, [](cuda_emu::Slot*) {});
}
template <class T> inline T __shfl_sync(unsigned m, T v, int src, int = 32) { return cuda_emu::shfl_generic(m, v, src, 0); }
template <class T> inline T __shfl_xor_sync(unsigned m, T v, int x, int = 32) { return cuda_emu::shfl_generic(m, v, x, 1); }
template <class T> inline T __shfl_up_sync(unsigned m, T v, unsigned d, int = 32) {
  return cuda_emu::shfl_generic(m, v, static_cast<int>(d), 2);
}
template <class T> inline T __shfl_down_sync(unsigned m, T v, unsigned d, int = 32) {
  return cuda_emu::shfl_generic(m, v, static_cast<int>(d), 3);
}

inline char* emu_dynamic_smem() { return cuda_emu::cur_block().smem; }
