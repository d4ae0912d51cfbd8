// An experiment (tools/queue_probe.py), not shipped: the tensor-core pass 1 of
// pagedkv/mlx_backend/kernels/paged_decode_mma.cu run by persistent threadblocks that take its
// work items, one split of one (sequence, kv head x query tile) each, from a per-launch counter,
// so a threadblock that memory served fast takes more items instead of idling while the slow
// ones finish (ADR 0002, eighteenth session: at 32k x 1 the shipped launch's threadblocks leave
// between 47.6 and 62.1 us). A threadblock takes its next item when it has read the current
// one's keys, and its warps load the next item's first keys while the current one's merge and
// partials are written. Every item's partial is
// computed by the shipped arithmetic in the shipped order and written to its own slot, so the
// partials, and the merge kernel's output, are those of the shipped split launch with the same
// split count, bit for bit, whichever threadblock took which item.
//
// Extra inputs: `counter` (int32, zero at launch: decode.zero_counters) and `items` (int32
// [3]: splits per row, threadblocks per row along y (kv heads x query tiles), total items).
// Put in by tools/queue_probe.py: at `//// queries`, `//// group`, `//// sums` and `//// stores`,
// the shipped pass 1's lines between its `// NAME` and `// end NAME` comments
// (paged_decode_mma.cu: the tile's queries loaded, one group of 16 keys computed, the warp's
// sums, its state into shared memory; the same variable names); at
// `//// epilogue`, the merge and split sections of paged_decode.cu.

  constexpr int NJ = D / 32;
  constexpr int NSG = 4;
  constexpr int QTILES = G / QT;
  constexpr int HQ = KVH * G;
  const int num_splits = items[0], heads_grid = items[1], total = items[2];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = lane / 4, t = lane % 4;
  const float qscale = scale[0] * PKV_LOG2E;
  int* taken = const_cast<int*>(counter);

  __shared__ float sm_acc[NSG][QT][D];
  __shared__ float sm_m[NSG][QT];
  __shared__ float sm_l[NSG][QT];

  // An item's keys, as the shipped kernel computes them for (split, blockIdx.y, blockIdx.z).
  // Items are the same for the whole threadblock: thread 0 fills them into shared memory (two
  // slots: the current item and the next), which keeps them out of the registers.
  struct Item {
    int split, b, kvh, head0, t_begin, t_end;
    const int* table;
  };
  __shared__ Item pkv_items[2];
  __shared__ int pkv_ids[2];
  auto fill = [&](int slot, int it) {
    pkv_ids[slot] = it;
    Item s = {0, 0, 0, 0, 0, 0, tables};
    if (it < total) {
      s.split = it % num_splits;
      const int y = (it / num_splits) % heads_grid;
      s.b = it / (num_splits * heads_grid);
      s.kvh = y / QTILES;
      s.head0 = s.kvh * G + (y % QTILES) * QT;
      const int first = bounds[2 * s.b], length = bounds[2 * s.b + 1];
      const int first_block = first / BS;
      const int blocks = (length + BS - 1) / BS - first_block;
      const int per_split = (blocks + num_splits - 1) / num_splits;
      s.t_begin = max(first, (first_block + s.split * per_split) * BS);
      s.t_end = min(length, (first_block + (s.split + 1) * per_split) * BS);
      s.table = tables + (size_t)s.b * tables_shape[1];
    }
    pkv_items[slot] = s;
  };
  auto row_of = [&](const Item& s, int key) {
    key = min(key, s.t_end - 1);
    return (((size_t)s.table[key / BS] * BS + key % BS) * KVH + s.kvh) * D + 8 * t;
  };

  if (threadIdx.x == 0) fill(0, atomicAdd(taken, 1));  // this threadblock's first item
  __syncthreads();
  int slot = 0;

  uint4 k_a[NJ], k_b[NJ], v_a[NJ], v_b[NJ];
  uint4 next_k_a[NJ], next_k_b[NJ], next_v_a[NJ], next_v_b[NJ];
  if (pkv_items[0].t_begin + 16 * warp < pkv_items[0].t_end) {
    const Item& cur = pkv_items[0];
    const int base = cur.t_begin + 16 * warp;
    pkv_load_group<NJ>(k_pool, v_pool, row_of(cur, base + r), row_of(cur, base + 8 + r), k_a,
                       k_b, v_a, v_b);
  }
  while (pkv_ids[slot] < total) {
    const Item& cur = pkv_items[slot];
    const Item& nxt = pkv_items[slot ^ 1];
    const int split = cur.split, b = cur.b, head0 = cur.head0, t_end = cur.t_end;

//// queries
    float m[2] = {PKV_NEG_BIG, PKV_NEG_BIG}, l[2] = {0.f, 0.f};
    float acc[D / 16][4];
#pragma unroll
    for (int i = 0; i < D / 16; i++) {
#pragma unroll
      for (int e = 0; e < 4; e++) acc[i][e] = 0.f;
    }

    for (int base = cur.t_begin + 16 * warp; base < t_end; base += 16 * NSG) {
      const int next = base + 16 * NSG;
      if (next < t_end) {
        pkv_load_group<NJ>(k_pool, v_pool, row_of(cur, next + r), row_of(cur, next + 8 + r),
                           next_k_a, next_k_b, next_v_a, next_v_b);
      }

//// group
    }
//// sums
//// stores
    // Take the next item only now that this one's keys are read: the counter's rest stays for
    // threadblocks that finish early. Its first keys load while this one's epilogue runs.
    if (threadIdx.x == 0) fill(slot ^ 1, atomicAdd(taken, 1));
    __syncthreads();
    if (nxt.t_begin + 16 * warp < nxt.t_end) {
      const int first = nxt.t_begin + 16 * warp;
      pkv_load_group<NJ>(k_pool, v_pool, row_of(nxt, first + r), row_of(nxt, first + 8 + r), k_a,
                         k_b, v_a, v_b);
    }
//// epilogue
    __syncthreads();  // everyone is done with sm_* and with this item's slot
    slot ^= 1;
  }
