// CUDA's vocabulary as the pagedkv kernels use it, over launch.h, and the two tensor-core
// instructions of paged_decode_mma.cu (mma.sync m16n8k16, movmatrix.trans) computed from their
// PTX fragment layouts. Not modelled: NVRTC, the memory model beyond one threadblock at a time
// (threadblocks run one after another, so a block sees every earlier block's writes), speed.
#include "launch.h"

#define __device__
#define __forceinline__
#define __global__
#define __grid_constant__
#define __shared__ static  // a function-local static: shared by the threadblock's threads

struct __half {
  _Float16 value;
  __half() = default;
  __half(float f) : value(_Float16(f)) {}
  operator float() const { return float(value); }
};
typedef pkv_bfloat16 __nv_bfloat16;
struct __half2 {
  __half x, y;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline thread_local uint3 threadIdx, blockIdx, gridDim, blockDim;

inline float __uint_as_float(unsigned int u) { return pkv_bits_as<float>(u); }
inline float __int_as_float(int i) { return pkv_bits_as<float>(i); }
inline __half __ushort_as_half(unsigned short u) { return pkv_bits_as<__half>(u); }
inline float __half2float(__half h) { return float(h); }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__half(lo), __half(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__nv_bfloat16(lo), __nv_bfloat16(hi)};
}
inline uint4 make_uint4(unsigned int a, unsigned int b, unsigned int c, unsigned int d) {
  return uint4(a, b, c, d);
}
template <class T>
T max(T a, T b) { return a < b ? b : a; }
template <class T>
T min(T a, T b) { return b < a ? b : a; }
template <class T>
T __ldcg(const T* p) { return *p; }

inline void __syncthreads() { pkv_threadgroup_barrier(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
template <class T>
T __shfl_xor_sync(unsigned int, T value, int mask) { return pkv_shuffle_xor(value, mask); }

// Sets the CUDA built-ins for the calling kernel thread (the launch's thread-local state).
inline void pkv_cuda_thread() {
  threadIdx = pkv_thread, blockIdx = pkv_group, gridDim = pkv_groups, blockDim = pkv_size;
}

// --- the tensor-core instructions, from the PTX ISA's fragment layouts (lane l: g = l / 4,
// t = l % 4) --- 16-bit values travel two to a 32-bit register, the lower one first.
template <int KIND>
float pkv_half_of(unsigned int word, int which) {
  const unsigned short bits = which ? word >> 16 : word & 0xffffu;
  if (KIND == 1) return float(pkv_bits_as<__half>(bits));
  return float(pkv_bits_as<__nv_bfloat16>(bits));
}

// c (16x8, float) += A (16x16) B (16x8), mma.sync.aligned.m16n8k16.row.col.f32: A row-major in
// a0..a3 (a_i: row g + 8 (i % 2), columns 2t + 8 (i / 2) and + 1), B column-major in b0, b1
// (b_i: rows 2t + 8i and + 1, column g), C rows g (c0, c1) and g + 8 (c2, c3), columns 2t, 2t + 1.
template <int KIND>
void pkv_mma_emulated(float* c, unsigned int a0, unsigned int a1, unsigned int a2,
                      unsigned int a3, unsigned int b0, unsigned int b1) {
  struct Registers {
    unsigned int a[4], b[2];
  };
  const Registers mine{{a0, a1, a2, a3}, {b0, b1}};
  float product[4];
  pkv_exchange(mine, [&](auto registers_of) {
    float A[16][16], B[16][8];
    for (uint lane = 0; lane < 32; lane++) {
      const Registers r = registers_of(lane);
      const int g = lane / 4, t = lane % 4;
      for (int i = 0; i < 4; i++) {
        for (int h = 0; h < 2; h++) A[g + 8 * (i % 2)][2 * t + 8 * (i / 2) + h] = pkv_half_of<KIND>(r.a[i], h);
      }
      for (int i = 0; i < 2; i++) {
        for (int h = 0; h < 2; h++) B[2 * t + 8 * i + h][g] = pkv_half_of<KIND>(r.b[i], h);
      }
    }
    const int g = pkv_tid % 32 / 4, t = pkv_tid % 4;
    for (int e = 0; e < 4; e++) {
      float sum = 0.f;
      for (int k = 0; k < 16; k++) sum += A[g + 8 * (e / 2)][k] * B[k][2 * t + e % 2];
      product[e] = sum;
    }
    return 0;
  });
  for (int e = 0; e < 4; e++) c[e] += product[e];
}

// movmatrix.sync.aligned.m8n8.trans.b16: lane l holds row l / 4, columns 2 (l % 4) and + 1 of an
// 8x8 matrix of 16-bit values; it gets the same of the transpose.
inline unsigned int pkv_movmatrix_trans(unsigned int word) {
  return pkv_exchange(word, [&](auto word_of) {
    const uint g = pkv_tid % 32 / 4, t = pkv_tid % 4;
    auto at = [&](uint row, uint col) -> unsigned int {  // element (row, col) of the matrix
      const unsigned int w = word_of(row * 4 + col / 2);
      return col % 2 ? w >> 16 : w & 0xffffu;
    };
    return at(2 * t, g) | at(2 * t + 1, g) << 16;
  });
}
