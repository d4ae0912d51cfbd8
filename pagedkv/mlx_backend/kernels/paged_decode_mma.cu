// Paged decode attention on tensor cores, for mx.fast.cuda_kernel on sm_80 and later GPUs with
// float16 or bfloat16 pools (queries of the pool's dtype, head_dim a multiple of 32 up to 128).
// The same split-K algorithm as paged_decode.cu (pagedkv/spec/split_k.py) and the same launch,
// in-block merge, epilogues (`final`, `split`) and merge kernel (`reduce`), which it takes from
// that file; only the rest of pass 1's body differs. ADR 0002 says why: on the H200 at batch 1 the one-lane-per-chunk kernel
// issues 2.3x the instructions of cuDNN's tensor-core kernel and waits on them.
//
// One threadblock (4 warps) per (split, kv head x query tile, sequence), as in paged_decode.cu.
// Each warp takes 16 keys at a time, every 4th group of 16 of the split's keys, and computes
// with m16n8k16 mma instructions (16-bit inputs, float32 accumulators):
//   scores   S^T (16 keys x 8 queries) = K (16 keys x head_dim) Q^T: A is the two K rows a lane
//            loads itself (rows r and r + 8), B the tile's queries (up to 8, zero-padded);
//   softmax  the warp's running max per query (shuffles over the 8 key rows), p = exp2(s - max),
//            rounded to the pool's 16-bit type for the next product (as flash attention does);
//   output   O^T (head_dim x 8 queries) += V^T P^T: movmatrix transposes 8x8 blocks of the V
//            rows and of P^T into A and B fragments, so K/V go from memory to registers with
//            16-byte loads and never through shared memory;
//   pipeline a warp's next 16 keys load while it computes the current ones (2x the K/V registers,
//            198 per thread at d128: 2 threadblocks per SM, hence TARGET_BLOCKS_MMA).
// The dot products' order over head_dim is free (the same permutation on both operands), so a
// lane loads the 16 bytes at elements [32j + 8t, 32j + 8t + 8) of a row and its 32-bit words
// are the fragments' element pairs as they come. Lane l: r = l / 4 (fragment row), t = l % 4.
//
// Sections: header, partial (pass 1 up to the warps' merge, whose `merge` section and
// epilogues come from paged_decode.cu: the same sm_acc / sm_m / sm_l layout, NSG = 4 warps).
// Template constants: D, BS, KVH, G, QT (query heads per threadblock, <= 8), KIND (1 float16,
// 2 bfloat16), HAS_SINKS; type TQ (the queries' and pool's type).

//// header
#define PKV_LOG2E 1.4426950408889634f
#define PKV_NEG_BIG -1e30f  // "no key yet": finite, so exp2(PKV_NEG_BIG - max) == 0 without NaN
#define PKV_NEG_INF __int_as_float(0xff800000)  // a masked key's score
#define PKV_PARTIAL(x) (x)  // a split's partial (the single launch reads it through L2)

// Two floats as one 32-bit pair of the pool's 16-bit type (KIND 1 float16, 2 bfloat16), lo first.
template <int KIND>
__device__ __forceinline__ unsigned int pkv_pack(float lo, float hi) {
  if (KIND == 1) {
    __half2 pair = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned int*>(&pair);
  } else {
    __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned int*>(&pair);
  }
}

// c += A B for one m16n8k16 tile: A 16x16 (a0..a3), B 16x8 (b0, b1), float32 accumulators c[4].
template <int KIND>
__device__ __forceinline__ void pkv_mma(float* c, unsigned int a0, unsigned int a1,
                                        unsigned int a2, unsigned int a3, unsigned int b0,
                                        unsigned int b1) {
  if (KIND == 1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// The transpose of an 8x8 matrix of 16-bit values spread over a warp (lane l holds row l / 4,
// columns 2 (l % 4) and 2 (l % 4) + 1 as one 32-bit word), in the same spread.
__device__ __forceinline__ unsigned int pkv_transpose(unsigned int x) {
  unsigned int y;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}

// A lane's share of one group of 16 keys: the 16-byte pieces j of its rows a and b (pool
// offsets of the pieces j = 0), from both pools.
template <int NJ, typename T>
__device__ __forceinline__ void pkv_load_group(const T* k_pool, const T* v_pool, size_t row_a,
                                               size_t row_b, uint4* k_a, uint4* k_b, uint4* v_a,
                                               uint4* v_b) {
#pragma unroll
  for (int j = 0; j < NJ; j++) {
    k_a[j] = *reinterpret_cast<const uint4*>(k_pool + row_a + 32 * j);
    k_b[j] = *reinterpret_cast<const uint4*>(k_pool + row_b + 32 * j);
    v_a[j] = *reinterpret_cast<const uint4*>(v_pool + row_a + 32 * j);
    v_b[j] = *reinterpret_cast<const uint4*>(v_pool + row_b + 32 * j);
  }
}

//// partial
  constexpr int NJ = D / 32;  // 16-byte pieces of a row per lane: elements [32j + 8t, +8)
  constexpr int NSG = 4;      // warps, each its own key stream until the merge
  constexpr int QTILES = G / QT;
  constexpr int HQ = KVH * G;

  const int split = blockIdx.x, num_splits = gridDim.x;
  const int kvh = blockIdx.y / QTILES, head0 = kvh * G + (blockIdx.y % QTILES) * QT;
  const int b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = lane / 4, t = lane % 4;  // fragment row; column pair (queries 2t, 2t + 1)

  // This split's keys: whole blocks of the visible range [first, length).
  const int first = bounds[2 * b], length = bounds[2 * b + 1];
  const int first_block = first / BS;
  const int blocks = (length + BS - 1) / BS - first_block;
  const int per_split = (blocks + num_splits - 1) / num_splits;
  const int t_begin = max(first, (first_block + split * per_split) * BS);
  const int t_end = min(length, (first_block + (split + 1) * per_split) * BS);
  const int* table = tables + (size_t)b * tables_shape[1];

  // queries: B of the scores, query r of the tile (zero past QT), its pieces in the K pieces'
  // order. Read 2 bytes at a time (once per threadblock): a query row need not start 16-byte
  // aligned. (tools/paged_decode_queue.cu reuses the lines down to `end queries`.)
  const unsigned short* query = reinterpret_cast<const unsigned short*>(queries) +
                                ((size_t)b * HQ + head0 + r) * D + 8 * t;
  uint4 qf[NJ];
#pragma unroll
  for (int j = 0; j < NJ; j++) {
    unsigned int pair[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int e = 0; e < 4 && r < QT; e++) {
      pair[e] = query[32 * j + 2 * e] | (unsigned int)query[32 * j + 2 * e + 1] << 16;
    }
    qf[j] = make_uint4(pair[0], pair[1], pair[2], pair[3]);
  }
  // end queries
  const float qscale = scale[0] * PKV_LOG2E;

  // Online softmax for queries 2t and 2t + 1: running max m, this lane's part of the sum l, and
  // acc: O^T in D / 16 tiles of 16 head_dim rows x 8 queries (c0, c1 row r; c2, c3 row r + 8).
  float m[2] = {PKV_NEG_BIG, PKV_NEG_BIG}, l[2] = {0.f, 0.f};
  float acc[D / 16][4];
#pragma unroll
  for (int i = 0; i < D / 16; i++) {
#pragma unroll
    for (int e = 0; e < 4; e++) acc[i][e] = 0.f;
  }

  // The pool offset of key `key`'s piece 0 for this lane (clamped to a real row: masked below).
  auto row_of = [&](int key) {
    key = min(key, t_end - 1);
    return (((size_t)table[key / BS] * BS + key % BS) * KVH + kvh) * D + 8 * t;
  };
  // This lane's keys of a group starting at `base`: rows base + r and base + 8 + r. The next
  // group's rows load while this one computes (one group ahead: the loop waits on memory
  // once, not once per group; 2x the registers for K/V, ADR 0002).
  uint4 k_a[NJ], k_b[NJ], v_a[NJ], v_b[NJ];
  uint4 next_k_a[NJ], next_k_b[NJ], next_v_a[NJ], next_v_b[NJ];
  if (t_begin + 16 * warp < t_end) {
    const int base = t_begin + 16 * warp;
    pkv_load_group<NJ>(k_pool, v_pool, row_of(base + r), row_of(base + 8 + r), k_a, k_b, v_a, v_b);
  }
  for (int base = t_begin + 16 * warp; base < t_end; base += 16 * NSG) {
    const int next = base + 16 * NSG;
    if (next < t_end) {
      pkv_load_group<NJ>(k_pool, v_pool, row_of(next + r), row_of(next + 8 + r), next_k_a,
                         next_k_b, next_v_a, next_v_b);
    }

    // group: one group of 16 keys computed (tools/paged_decode_queue.cu reuses these lines)
    // Scores S^T: two k-steps per piece (its words 0-1, then 2-3).
    float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int j = 0; j < NJ; j++) {
      pkv_mma<KIND>(s, k_a[j].x, k_b[j].x, k_a[j].y, k_b[j].y, qf[j].x, qf[j].y);
      pkv_mma<KIND>(s, k_a[j].z, k_b[j].z, k_a[j].w, k_b[j].w, qf[j].z, qf[j].w);
    }

    // Log2 units, masked keys at -inf, the warp's new max per query, p = exp2(s - max).
    const bool valid_a = base + r < t_end, valid_b = base + 8 + r < t_end;
    float correction[2];
#pragma unroll
    for (int q = 0; q < 2; q++) {
      s[q] = valid_a ? s[q] * qscale : PKV_NEG_INF;
      s[q + 2] = valid_b ? s[q + 2] * qscale : PKV_NEG_INF;
      float top = fmaxf(s[q], s[q + 2]);
#pragma unroll
      for (int o = 4; o < 32; o <<= 1) top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, o));
      top = fmaxf(m[q], top);
      correction[q] = exp2f(m[q] - top);
      m[q] = top;
      s[q] = exp2f(s[q] - top);
      s[q + 2] = exp2f(s[q + 2] - top);
      l[q] = l[q] * correction[q] + s[q] + s[q + 2];
    }

    // B of the output, P^T (16 keys x 8 queries): the transposes of this lane's score pairs.
    const unsigned int p_a = pkv_transpose(pkv_pack<KIND>(s[0], s[1]));  // keys 0-7
    const unsigned int p_b = pkv_transpose(pkv_pack<KIND>(s[2], s[3]));  // keys 8-15
    // O^T += V^T P^T. Tile 2j + h: head_dim rows 32j + 8(r / 2) + 4h + r % 2 (c0, c1) and
    // that + 2 (c2, c3); A is the transposes of words 2h, 2h + 1 of the V pieces j.
#pragma unroll
    for (int j = 0; j < NJ; j++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        acc[2 * j][e] *= correction[e % 2];
        acc[2 * j + 1][e] *= correction[e % 2];
      }
      pkv_mma<KIND>(acc[2 * j], pkv_transpose(v_a[j].x), pkv_transpose(v_a[j].y),
                    pkv_transpose(v_b[j].x), pkv_transpose(v_b[j].y), p_a, p_b);
      pkv_mma<KIND>(acc[2 * j + 1], pkv_transpose(v_a[j].z), pkv_transpose(v_a[j].w),
                    pkv_transpose(v_b[j].z), pkv_transpose(v_b[j].w), p_a, p_b);
    }
#pragma unroll
    for (int j = 0; j < NJ; j++) {  // the next group becomes this one (unread past the last)
      k_a[j] = next_k_a[j], k_b[j] = next_k_b[j], v_a[j] = next_v_a[j], v_b[j] = next_v_b[j];
    }
    // end group
  }

  // The warp's sums over its key rows, then the NSG warps merge through shared memory.
  // sums: (tools/paged_decode_queue.cu reuses the lines down to `end sums`, and those of `stores`)
#pragma unroll
  for (int q = 0; q < 2; q++) {
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) l[q] += __shfl_xor_sync(0xffffffffu, l[q], o);
  }
  // end sums
  __shared__ float sm_acc[NSG][QT][D];
  __shared__ float sm_m[NSG][QT];
  __shared__ float sm_l[NSG][QT];
  // stores: each warp's state into shared memory
#pragma unroll
  for (int i = 0; i < D / 16; i++) {
    const int d0 = 32 * (i / 2) + 8 * (r / 2) + 4 * (i % 2) + r % 2;
#pragma unroll
    for (int q = 0; q < 2; q++) {
      if (2 * t + q < QT) {
        sm_acc[warp][2 * t + q][d0] = acc[i][q];
        sm_acc[warp][2 * t + q][d0 + 2] = acc[i][q + 2];
      }
    }
  }
#pragma unroll
  for (int q = 0; q < 2; q++) {
    if (r == 0 && 2 * t + q < QT) {
      sm_m[warp][2 * t + q] = m[q];
      sm_l[warp][2 * t + q] = l[q];
    }
  }
  // end stores
  __syncthreads();
