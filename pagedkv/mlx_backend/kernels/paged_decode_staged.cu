// Paged decode attention on tensor cores with K/V staged in shared memory, for mx.fast.cuda_kernel
// on sm_80 and later GPUs: the cases of paged_decode_mma.cu (16-bit pools, queries of the pool's
// dtype, head_dim a multiple of 32 up to 128), the same split-K algorithm (pagedkv/spec/split_k.py),
// launch, in-block merge, epilogues and merge kernel. Only how K/V reach the mma units differs.
//
// Why (ADR 0002, sixteenth session): paged_decode_mma.cu holds the next group of keys in registers
// (198 per thread at d128), so a warp has one group of 16 keys in flight and an SM holds 2
// threadblocks; at batch 1 each threadblock's keys are a chain of memory latencies. Here each warp
// copies its groups into a ring of STAGES slots in shared memory with cp.async (no registers held
// while in flight), STAGES - 1 groups ahead, and reads them with ldmatrix: K as the scores' A
// operand, V transposed (ldmatrix .trans) as the output's A operand, so V needs no movmatrix.
//
// One threadblock (4 warps) per (split, kv head x query tile, sequence). Warp w takes the groups of
// 16 keys w, w + 4, w + 8, ... of the split, each into its own ring: no barrier between warps until
// the merge, whose buffer then reuses the rings. A ring row is head_dim + 8 elements: the 16 bytes of
// padding put the 8 rows an ldmatrix reads in 8 different bank groups.
//   scores  S^T (16 keys x 8 queries) = K Q^T: A by ldmatrix from the K rows, B the tile's queries
//           (up to 8, zero-padded) in registers, head_dim in order;
//   softmax as paged_decode_mma.cu (running max per query over the 16 keys, p rounded to 16 bits);
//   output  O^T (head_dim x 8 queries) += V^T P^T, tile i = head_dim rows 16i .. 16i + 15.
//
// Sections: header (after paged_decode_mma.cu's header: kernels/source.py), partial (pass 1 up to
// the warps' merge; `merge` and the epilogues come from paged_decode.cu). Template constants:
// those of paged_decode_mma.cu, and STAGES (slots per warp's ring, >= 2). Dynamic shared memory:
// 4 warps x STAGES x (K, V) x 16 rows x (head_dim + 8) x 2 bytes (decode.staged_bytes).

//// header
// 16 bytes global -> shared, not cached in L1 (each K/V byte is read once).
__device__ __forceinline__ void pkv_copy16(void* to, const void* from) {
  const unsigned int address = static_cast<unsigned int>(__cvta_generic_to_shared(to));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(address), "l"(from) : "memory");
}

__device__ __forceinline__ void pkv_copies_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}

// Wait until at most N of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void pkv_copies_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Four 8x8 matrices of 16-bit values from shared memory: lane l gives the address of row l % 8 of
// matrix l / 8; register i holds matrix i (transposed with TRANS) in the mma fragment spread.
template <bool TRANS>
__device__ __forceinline__ void pkv_ldmatrix4(unsigned int* out, const void* row) {
  const unsigned int address = static_cast<unsigned int>(__cvta_generic_to_shared(row));
  if (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(out[0]), "=r"(out[1]), "=r"(out[2]), "=r"(out[3])
                 : "r"(address)
                 : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(out[0]), "=r"(out[1]), "=r"(out[2]), "=r"(out[3])
                 : "r"(address)
                 : "memory");
  }
}

//// partial
  constexpr int NSG = 4;         // warps, each its own key stream and ring until the merge
  constexpr int ROW = D + 8;     // a ring row, elements: 16 bytes of padding (bank groups)
  constexpr int SLOT = 16 * ROW; // one group's K (or its V) in a slot, elements
  constexpr int CHUNKS = D / 8;  // 16-byte pieces of a K/V row
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

  // B of the scores, k-step j (head_dim 16j .. 16j + 15): query r of the tile (zero past QT),
  // elements 16j + 2t, + 1 and 16j + 8 + 2t, + 1. Read 2 bytes at a time: a query row need not
  // start 4-byte aligned.
  const unsigned short* query = reinterpret_cast<const unsigned short*>(queries) +
                                ((size_t)b * HQ + head0 + r) * D + 2 * t;
  unsigned int qf[D / 16][2];
#pragma unroll
  for (int j = 0; j < D / 16; j++) {
    qf[j][0] = qf[j][1] = 0u;
    if (r < QT) {
      qf[j][0] = query[16 * j] | (unsigned int)query[16 * j + 1] << 16;
      qf[j][1] = query[16 * j + 8] | (unsigned int)query[16 * j + 9] << 16;
    }
  }
  const float qscale = scale[0] * PKV_LOG2E;

  // This warp's ring: slot s holds a group's K rows, then its V rows.
  extern __shared__ __align__(16) unsigned char pkv_shared[];
  unsigned short* ring = reinterpret_cast<unsigned short*>(pkv_shared) + warp * STAGES * 2 * SLOT;

  // Copy the group of 16 keys from `base` into slot `s`. Lane l looks up the pool slot of key
  // l % 16 (keys past the split's end repeat its last key: masked below); then 32 consecutive
  // 16-byte pieces of the group's rows go per copy instruction, whole rows contiguous, each
  // lane taking its row's slot from the lane that looked it up.
  auto copy_group = [&](int base, int s) {
    const int key = min(base + lane % 16, t_end - 1);
    const int my_slot = table[key / BS] * BS + key % BS;
    unsigned short* k_slot = ring + s * 2 * SLOT;
#pragma unroll
    for (int i = 0; i < CHUNKS / 2; i++) {
      const int piece = 32 * i + lane, row = piece / CHUNKS, c = piece % CHUNKS;
      const int pool_slot = __shfl_sync(0xffffffffu, my_slot, row);
      const size_t offset = ((size_t)pool_slot * KVH + kvh) * D + 8 * c;
      pkv_copy16(k_slot + row * ROW + 8 * c, k_pool + offset);
      pkv_copy16(k_slot + SLOT + row * ROW + 8 * c, v_pool + offset);
    }
  };

  // Online softmax for queries 2t and 2t + 1: running max m, this lane's part of the sum l, and
  // acc: O^T in D / 16 tiles of 16 head_dim rows x 8 queries (c0, c1 row r; c2, c3 row r + 8).
  float m[2] = {PKV_NEG_BIG, PKV_NEG_BIG}, l[2] = {0.f, 0.f};
  float acc[D / 16][4];
#pragma unroll
  for (int i = 0; i < D / 16; i++) {
#pragma unroll
    for (int e = 0; e < 4; e++) acc[i][e] = 0.f;
  }

  // The warp's groups start at first_base + g * stride. STAGES - 1 are copied ahead; every
  // iteration commits one copy group (empty past the last), so "wait until STAGES - 1 remain"
  // always means "this iteration's group has landed".
  const int first_base = t_begin + 16 * warp, stride = 16 * NSG;
  const int groups = first_base < t_end ? (t_end - first_base + stride - 1) / stride : 0;
#pragma unroll
  for (int s = 0; s < STAGES - 1; s++) {
    if (s < groups) copy_group(first_base + s * stride, s);
    pkv_copies_commit();
  }
  // ldmatrix row addresses of this lane (matrix lane / 8, its row lane % 8): K as A (keys
  // 8 (lane / 8 % 2) + lane % 8, piece + lane / 16), V^T as A (keys 8 (lane / 16) + lane % 8,
  // piece + lane / 8 % 2).
  const int k_row = 8 * (lane / 8 % 2) + lane % 8, k_piece = lane / 16;
  const int v_row = 8 * (lane / 16) + lane % 8, v_piece = lane / 8 % 2;
  for (int g = 0; g < groups; g++) {
    if (g + STAGES - 1 < groups) {
      copy_group(first_base + (g + STAGES - 1) * stride, (g + STAGES - 1) % STAGES);
    }
    pkv_copies_commit();
    pkv_copies_wait<STAGES - 1>();
    __syncwarp();  // every lane's copies of this group are visible to the whole warp
    const unsigned short* k_slot = ring + (g % STAGES) * 2 * SLOT;
    const unsigned short* v_slot = k_slot + SLOT;
    const int base = first_base + g * stride;

    // Scores S^T: one k-step per 16 elements of head_dim.
    float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int j = 0; j < D / 16; j++) {
      unsigned int a[4];
      pkv_ldmatrix4<false>(a, k_slot + k_row * ROW + 8 * (2 * j + k_piece));
      pkv_mma<KIND>(s, a[0], a[1], a[2], a[3], qf[j][0], qf[j][1]);
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
    // O^T += V^T P^T, tile i: A is V^T's head_dim rows 16i .. 16i + 15 over the 16 keys.
#pragma unroll
    for (int i = 0; i < D / 16; i++) {
      unsigned int a[4];
      pkv_ldmatrix4<true>(a, v_slot + v_row * ROW + 8 * (2 * i + v_piece));
#pragma unroll
      for (int e = 0; e < 4; e++) acc[i][e] *= correction[e % 2];
      pkv_mma<KIND>(acc[i], a[0], a[1], a[2], a[3], p_a, p_b);
    }
    __syncwarp();  // the slot is read before a later iteration copies into it
  }
  pkv_copies_wait<0>();  // only empty groups can remain; none may land in the merge buffer

  // The warp's sums over its key rows, then the NSG warps merge through shared memory, in the
  // rings' place once every warp is done with its ring.
#pragma unroll
  for (int q = 0; q < 2; q++) {
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) l[q] += __shfl_xor_sync(0xffffffffu, l[q], o);
  }
  __syncthreads();
  float(*sm_acc)[QT][D] = reinterpret_cast<float(*)[QT][D]>(pkv_shared);
  float(*sm_m)[QT] = reinterpret_cast<float(*)[QT]>(pkv_shared + sizeof(float) * NSG * QT * D);
  float(*sm_l)[QT] = sm_m + NSG;
#pragma unroll
  for (int i = 0; i < D / 16; i++) {
#pragma unroll
    for (int q = 0; q < 2; q++) {
      if (2 * t + q < QT) {
        sm_acc[warp][2 * t + q][16 * i + r] = acc[i][q];
        sm_acc[warp][2 * t + q][16 * i + r + 8] = acc[i][q + 2];
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
  __syncthreads();
