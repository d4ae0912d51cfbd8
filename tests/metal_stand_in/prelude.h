// A stand-in for the parts of Metal that paged_decode.metal uses, in C++20, so that the kernel's
// text, as MLX's mx.fast.metal_kernel assembles it, can be compiled and run on a CPU
// (tests/metal_stand_in/__init__.py). It models what the kernel's logic depends on: 16-bit float
// types, as_type, exp2/max/min, threadgroup memory shared by a threadgroup's threads,
// threadgroup_barrier, and simd_shuffle_xor across 32-lane simdgroups. It does not model address
// spaces (device/constant/thread are plain pointers here), Metal's compiler or its performance.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

typedef uint32_t uint;
typedef uint16_t ushort;
typedef _Float16 half;
typedef half float16_t;

struct uint3 {
  uint x, y, z;
};

struct uint4 {
  uint x, y, z, w;
  uint4() = default;
  explicit uint4(uint v) : x(v), y(v), z(v), w(v) {}
  uint4(const volatile uint4& o) : x(o.x), y(o.y), z(o.z), w(o.w) {}
  uint4(const uint4&) = default;
  uint4& operator=(const uint4&) = default;
};

// bfloat16 as Metal's bfloat16_t behaves here: float32's top 16 bits, rounded to nearest even.
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    bits = std::isnan(f) ? 0x7fc0 : uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);
  }
  operator float() const volatile {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

template <class T, class S>
T as_type(S s) {
  static_assert(sizeof(T) == sizeof(S), "as_type needs equal sizes");
  T t;
  std::memcpy(&t, &s, sizeof t);
  return t;
}
inline float exp2(float x) { return std::exp2(x); }
template <class T>
T max(T a, T b) { return a < b ? b : a; }
template <class T>
T min(T a, T b) { return b < a ? b : a; }

enum class mem_flags { mem_none, mem_device, mem_threadgroup };

// The running launch's synchronisation: one barrier for the threadgroup, one per simdgroup.
inline std::barrier<>* pkv_threadgroup_sync;
inline std::vector<std::barrier<>*> pkv_simdgroup_sync;
inline std::vector<uint64_t> pkv_simd_slots;  // a shuffle's values, one per thread
inline thread_local uint pkv_tid;             // this thread's index in its threadgroup

inline void threadgroup_barrier(mem_flags) { pkv_threadgroup_sync->arrive_and_wait(); }

template <class T>
T simd_shuffle_xor(T value, ushort mask) {
  static_assert(sizeof(T) <= 8, "a shuffled value fits 8 bytes");
  const uint lane = pkv_tid % 32, first = pkv_tid - lane;
  std::barrier<>& simdgroup = *pkv_simdgroup_sync[pkv_tid / 32];
  uint64_t slot = 0;
  std::memcpy(&slot, &value, sizeof value);
  pkv_simd_slots[pkv_tid] = slot;
  simdgroup.arrive_and_wait();  // every lane has written its value
  slot = pkv_simd_slots[first + (lane ^ mask)];
  simdgroup.arrive_and_wait();  // every lane has read before the next shuffle writes
  T out;
  std::memcpy(&out, &slot, sizeof out);
  return out;
}

// One launch: `groups` threadgroups of `size` threads, as dispatch_threads runs a grid that is a
// whole number of threadgroups. Every thread runs the threadgroups in the same order and waits
// for the whole threadgroup at the end of each, so threadgroup memory is never shared by two.
template <class Kernel>
void pkv_launch(uint3 groups, uint3 size, Kernel kernel) {
  const uint threads = size.x * size.y * size.z;
  if (threads % 32) {
    std::fprintf(stderr, "stand-in: threadgroups must be whole simdgroups\n");
    std::exit(2);
  }
  std::barrier<> group_sync(threads), group_done(threads);
  std::vector<std::unique_ptr<std::barrier<>>> simdgroups;
  pkv_simdgroup_sync.clear();
  for (uint s = 0; s < threads / 32; s++) {
    simdgroups.emplace_back(new std::barrier<>(32));
    pkv_simdgroup_sync.push_back(simdgroups.back().get());
  }
  pkv_threadgroup_sync = &group_sync;
  pkv_simd_slots.assign(threads, 0);
  std::vector<std::thread> pool;
  for (uint t = 0; t < threads; t++) {
    pool.emplace_back([&, t] {
      pkv_tid = t;
      const uint3 in_group{t % size.x, t / size.x % size.y, t / (size.x * size.y)};
      for (uint z = 0; z < groups.z; z++)
        for (uint y = 0; y < groups.y; y++)
          for (uint x = 0; x < groups.x; x++) {
            kernel(in_group, uint3{x, y, z}, groups, size, t);
            group_done.arrive_and_wait();
          }
    });
  }
  for (auto& th : pool) th.join();
}

template <class T>
std::vector<T> pkv_read(const char* path, size_t count) {
  std::vector<T> data(count);
  FILE* f = std::fopen(path, "rb");
  if (!f || std::fread(data.data(), sizeof(T), count, f) != count) {
    std::fprintf(stderr, "stand-in: cannot read %s\n", path);
    std::exit(2);
  }
  std::fclose(f);
  return data;
}

template <class T>
void pkv_write(const char* path, const std::vector<T>& data) {
  FILE* f = std::fopen(path, "wb");
  if (!f || std::fwrite(data.data(), sizeof(T), data.size(), f) != data.size()) {
    std::fprintf(stderr, "stand-in: cannot write %s\n", path);
    std::exit(2);
  }
  std::fclose(f);
}

// Last, so that the stand-in's own code above keeps these words (std::thread).
// Address spaces: plain pointers, except that `constant` is volatile, which only gives the
// kernel's overloads per address space (pkv_load16) two distinct types to choose between.
#define device
#define constant volatile
#define thread
// Threadgroup memory: a function-local static, shared by every thread of the process. The
// threadgroups of a launch run one after another, so at any time it belongs to one threadgroup.
#define threadgroup static
