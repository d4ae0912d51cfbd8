// Metal's vocabulary as paged_decode.metal uses it, over launch.h. Not modelled: address spaces
// (device/constant/thread are plain pointers; `constant` is volatile only so that overloads per
// address space, pkv_load16, have two types to choose between), Metal's compiler, speed.
#include "launch.h"

typedef _Float16 half;
typedef half float16_t;
typedef pkv_bfloat16 bfloat16_t;

template <class T, class S>
T as_type(S s) { return pkv_bits_as<T>(s); }
inline float exp2(float x) { return std::exp2(x); }
template <class T>
T max(T a, T b) { return a < b ? b : a; }
template <class T>
T min(T a, T b) { return b < a ? b : a; }

enum class mem_flags { mem_none, mem_device, mem_threadgroup };
inline void threadgroup_barrier(mem_flags) { pkv_threadgroup_barrier(); }
template <class T>
T simd_shuffle_xor(T value, ushort mask) { return pkv_shuffle_xor(value, mask); }

// Last, so that the code above keeps these words.
#define device
#define constant volatile
#define thread
#define threadgroup static  // a function-local static: shared by the threadgroup's threads
