// What the CPU stand-ins for Metal and CUDA share (tests/kernel_stand_in/): a launch of whole
// threadgroups with one std::thread per kernel thread, a barrier for the threadgroup, 32-lane
// shuffles, 16-bit float types, and the files a kernel's inputs and outputs travel in.
// metal.h and cuda.h add each language's vocabulary on top.
#include <array>
#include <atomic>
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

struct uint3 {
  uint x, y, z;
};

struct uint4 {
  uint x, y, z, w;
  uint4() = default;
  explicit uint4(uint v) : x(v), y(v), z(v), w(v) {}
  uint4(uint a, uint b, uint c, uint d) : x(a), y(b), z(c), w(d) {}
  uint4(const volatile uint4& o) : x(o.x), y(o.y), z(o.z), w(o.w) {}
  uint4(const uint4&) = default;
  uint4& operator=(const uint4&) = default;
};

// bfloat16: float32's top 16 bits, rounded to nearest even (as both GPUs convert).
struct pkv_bfloat16 {
  uint16_t bits;
  pkv_bfloat16() = default;
  pkv_bfloat16(float f) {
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
T pkv_bits_as(S s) {
  static_assert(sizeof(T) == sizeof(S), "a reinterpretation needs equal sizes");
  T t;
  std::memcpy(&t, &s, sizeof t);
  return t;
}

// The running launch: one barrier for the threadgroup, one per simdgroup / warp.
inline std::barrier<>* pkv_threadgroup_sync;
inline std::vector<std::barrier<>*> pkv_simdgroup_sync;
inline std::vector<std::array<unsigned char, 32>> pkv_simd_slots;  // one per thread
inline thread_local uint pkv_tid;             // this thread's index in its threadgroup
inline thread_local uint3 pkv_thread, pkv_group, pkv_groups, pkv_size;

inline void pkv_threadgroup_barrier() { pkv_threadgroup_sync->arrive_and_wait(); }

// Every lane of this thread's 32-lane group publishes `value`; `read(lane_value)` then computes
// this lane's result, `lane_value(l)` being lane l's value. The kernels call this under uniform
// control flow (a warp's or simdgroup's 32 lanes together), as their shuffles and mma require.
template <class T, class Read>
auto pkv_exchange(const T& value, Read read) {
  static_assert(sizeof(T) <= 32, "an exchanged value fits 32 bytes");
  const uint first = pkv_tid - pkv_tid % 32;
  std::barrier<>& lanes = *pkv_simdgroup_sync[pkv_tid / 32];
  std::memcpy(pkv_simd_slots[pkv_tid].data(), &value, sizeof value);
  lanes.arrive_and_wait();  // every lane has written
  auto result = read([&](uint lane) {
    T out;
    std::memcpy(&out, pkv_simd_slots[first + lane].data(), sizeof out);
    return out;
  });
  lanes.arrive_and_wait();  // every lane has read before the next exchange writes
  return result;
}

template <class T>
T pkv_shuffle_xor(T value, uint mask) {
  return pkv_exchange(value, [&](auto lane_value) { return lane_value(pkv_tid % 32 ^ mask); });
}

// One launch: `groups` threadgroups of `size` threads. Every thread runs the threadgroups in the
// same order and waits for the whole threadgroup at the end of each, so shared memory (function
// statics) never belongs to two threadgroups at once.
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
  pkv_simd_slots.assign(threads, {});
  std::vector<std::thread> pool;
  for (uint t = 0; t < threads; t++) {
    pool.emplace_back([&, t] {
      pkv_tid = t;
      pkv_thread = uint3{t % size.x, t / size.x % size.y, t / (size.x * size.y)};
      pkv_groups = groups;
      pkv_size = size;
      for (uint z = 0; z < groups.z; z++)
        for (uint y = 0; y < groups.y; y++)
          for (uint x = 0; x < groups.x; x++) {
            pkv_group = uint3{x, y, z};
            kernel();
            group_done.arrive_and_wait();
          }
    });
  }
  for (auto& th : pool) th.join();
}

template <class T>
std::vector<T> pkv_read(const std::string& path, size_t count) {
  std::vector<T> data(count);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(data.data(), sizeof(T), count, f) != count) {
    std::fprintf(stderr, "stand-in: cannot read %s\n", path.c_str());
    std::exit(2);
  }
  std::fclose(f);
  return data;
}

template <class T>
void pkv_write(const std::string& path, const std::vector<T>& data) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(data.data(), sizeof(T), data.size(), f) != data.size()) {
    std::fprintf(stderr, "stand-in: cannot write %s\n", path.c_str());
    std::exit(2);
  }
  std::fclose(f);
}
