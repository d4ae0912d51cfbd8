// Paged decode attention for mx.fast.metal_kernel: paged_decode.cu, line for line, in
// Metal (warp -> simdgroup, __shfl_xor_sync -> simd_shuffle_xor, __shared__ ->
// threadgroup). UNVERIFIED ON APPLE HARDWARE: no Mac has run it yet. Before first use
// on real shapes, pagedkv/mlx_backend/kernels/dispatch.py checks it against the gather
// path (correctness and speed) and falls back to gather if either check fails.
//
// Small inputs (< 8 elements) arrive as `constant` pointers in MLX's generated
// signature, so the inputs are only indexed, or read through `pkv_load16`, which has a
// form for either address space (a pool of one slot is that small). Metal-only:
// tests/unit/test_kernel_sources.py allows its name. Sections, template constants and
// types: see paged_decode.cu.

//// header
#define PKV_LOG2E 1.4426950408889634f
#define PKV_NEG_BIG -1e30f  // "no key yet": finite, so exp2(PKV_NEG_BIG - max) == 0 without NaN
#define PKV_NEG_INF (-INFINITY)  // a masked key's score
#define PKV_PARTIAL(x) (x)  // a split's partial (CUDA's single launch reads it through L2)

// 16 bytes of the pool as floats: 4 float32, or 8 float16 / bfloat16 (KIND).
template <int KIND>
inline void pkv_unpack(uint4 raw, thread float* out) {
  const uint words[4] = {raw.x, raw.y, raw.z, raw.w};
  for (int i = 0; i < 4; i++) {
    uint w = words[i];
    if (KIND == 0) {
      out[i] = as_type<float>(w);
    } else if (KIND == 1) {
      out[2 * i] = float(as_type<half>(ushort(w & 0xffffu)));
      out[2 * i + 1] = float(as_type<half>(ushort(w >> 16)));
    } else {
      out[2 * i] = as_type<float>(w << 16);
      out[2 * i + 1] = as_type<float>(w & 0xffff0000u);
    }
  }
}

// The 16 bytes at `p`, a pool in the device or (under 8 elements) the constant address space.
template <typename T>
inline uint4 pkv_load16(const device T* p) { return *(const device uint4*)p; }
template <typename T>
inline uint4 pkv_load16(const constant T* p) { return *(const constant uint4*)p; }

//// partial
  constexpr int VEC = KIND == 0 ? 4 : 8;  // elements per 16-byte load
  constexpr int NCH = D / VEC;            // 16-byte chunks in one key row
  constexpr int CH = (NCH + L - 1) / L;   // chunks per lane
  constexpr int E = CH * VEC;             // elements per lane
  constexpr int NSG = 128 / L;            // lane groups per threadgroup, each its own key stream
  constexpr int QTILES = G / QT;
  constexpr int HQ = KVH * G;

  const int split = threadgroup_position_in_grid.x, num_splits = threadgroups_per_grid.x;
  const int kvh = threadgroup_position_in_grid.y / QTILES;
  const int head0 = kvh * G + (threadgroup_position_in_grid.y % QTILES) * QT;
  const int b = threadgroup_position_in_grid.z;
  const int lane = thread_position_in_threadgroup.x % L, group = thread_position_in_threadgroup.x / L;

  // This split's keys: whole blocks of the visible range [first, length).
  const int first = bounds[2 * b], length = bounds[2 * b + 1];
  const int first_block = first / BS;
  const int blocks = (length + BS - 1) / BS - first_block;
  const int per_split = (blocks + num_splits - 1) / num_splits;
  const int t_begin = max(first, (first_block + split * per_split) * BS);
  const int t_end = min(length, (first_block + (split + 1) * per_split) * BS);
  const int table = b * int(tables_shape[1]);

  // The tile's queries in registers, pre-scaled into log2 units.
  const float qscale = scale[0] * PKV_LOG2E;
  float q[QT][E];
  for (int g = 0; g < QT; g++) {
    for (int i = 0; i < E; i++) {
      int chunk = (i / VEC) * L + lane;
      q[g][i] = chunk < NCH
          ? static_cast<float>(queries[(b * HQ + head0 + g) * D + chunk * VEC + i % VEC]) * qscale
          : 0.f;
    }
  }

  // Online softmax per query: running max m, running sum l, unnormalised output acc.
  float m[QT], l[QT], acc[QT][E];
  for (int g = 0; g < QT; g++) {
    m[g] = PKV_NEG_BIG;
    l[g] = 0.f;
    for (int i = 0; i < E; i++) acc[g][i] = 0.f;
  }

  for (int base = t_begin; base < t_end; base += NSG * U) {
    // Issue every load of U keys before any math: U * CH * 2 16-byte loads in flight.
    uint4 kraw[U][CH], vraw[U][CH];
    for (int u = 0; u < U; u++) {
      int t = min(base + u * NSG + group, t_end - 1);  // clamped: masked out below
      size_t row = ((size_t(tables[table + t / BS]) * BS + t % BS) * KVH + kvh) * D;
      for (int c = 0; c < CH; c++) {
        int chunk = c * L + lane;
        if (chunk < NCH) {
          kraw[u][c] = pkv_load16(k_pool + row + chunk * VEC);
          vraw[u][c] = pkv_load16(v_pool + row + chunk * VEC);
        } else {
          kraw[u][c] = uint4(0);
          vraw[u][c] = uint4(0);
        }
      }
    }
    // Scores of the U keys for every query of the tile.
    float s[QT][U];
    for (int u = 0; u < U; u++) {
      float k[E];
      for (int c = 0; c < CH; c++) pkv_unpack<KIND>(kraw[u][c], k + c * VEC);
      bool valid = base + u * NSG + group < t_end;
      for (int g = 0; g < QT; g++) {
        float dot = 0.f;
        for (int i = 0; i < E; i++) dot += q[g][i] * k[i];
        for (int o = L / 2; o > 0; o >>= 1) dot += simd_shuffle_xor(dot, ushort(o));
        s[g][u] = valid ? dot : PKV_NEG_INF;
      }
    }
    // One rescale per U keys: new max, then p = exp2(s - max).
    for (int g = 0; g < QT; g++) {
      float top = m[g];
      for (int u = 0; u < U; u++) top = max(top, s[g][u]);
      float correction = exp2(m[g] - top);
      m[g] = top;
      l[g] *= correction;
      for (int i = 0; i < E; i++) acc[g][i] *= correction;
      for (int u = 0; u < U; u++) {
        s[g][u] = exp2(s[g][u] - top);
        l[g] += s[g][u];
      }
    }
    for (int u = 0; u < U; u++) {
      float v[E];
      for (int c = 0; c < CH; c++) pkv_unpack<KIND>(vraw[u][c], v + c * VEC);
      for (int g = 0; g < QT; g++) {
        for (int i = 0; i < E; i++) acc[g][i] += s[g][u] * v[i];
      }
    }
  }

  // Merge the NSG lane groups of this threadgroup through threadgroup memory.
  threadgroup float sm_acc[NSG][QT][D];
  threadgroup float sm_m[NSG][QT];
  threadgroup float sm_l[NSG][QT];
  for (int g = 0; g < QT; g++) {
    for (int i = 0; i < E; i++) {
      int chunk = (i / VEC) * L + lane;
      if (chunk < NCH) sm_acc[group][g][chunk * VEC + i % VEC] = acc[g][i];
    }
    if (lane == 0) {
      sm_m[group][g] = m[g];
      sm_l[group][g] = l[g];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
//// merge
  // Every output element: the lane groups' (m, l, acc) in threadgroup memory merged to one (top, sum, out_d);
  // the epilogue below closes the loop.
  for (int idx = thread_position_in_threadgroup.x; idx < QT * D; idx += 128) {
    const int g = idx / D, d = idx % D, head = head0 + g;
    float top = PKV_NEG_BIG;
    for (int w = 0; w < NSG; w++) top = max(top, sm_m[w][g]);
    float sum = 0.f, out_d = 0.f;
    for (int w = 0; w < NSG; w++) {
      float weight = exp2(sm_m[w][g] - top);
      sum += weight * sm_l[w][g];
      out_d += weight * sm_acc[w][g][d];
    }

//// final
    if (HAS_SINKS) {  // a sink is one more logit in the denominator, with no value
      float sink = sinks[head] * PKV_LOG2E;
      float new_top = max(top, sink);
      float correction = exp2(top - new_top);
      sum = sum * correction + exp2(sink - new_top);
      out_d *= correction;
    }
    out[(b * HQ + head) * D + d] = static_cast<TQ>(out_d / sum);
  }

//// split
    size_t row = size_t(b * HQ + head) * num_splits + split;
    o_acc[row * D + d] = out_d;
    if (d == 0) {
      o_ml[2 * row] = top;
      o_ml[2 * row + 1] = sum;
    }
  }

//// reduce
  // One threadgroup per (sequence, query head) row: merge its splits' partials (`merge_splits`,
  // written for MR rows at once like paged_decode.cu's; Metal always merges one).
  constexpr int HQ = KVH * G;
  constexpr int MR = 1;
  const int row0 = threadgroup_position_in_grid.x, num_splits = o_ml_shape[1];

//// merge_splits
  // Merge the splits of the MR consecutive rows from `row0` (num_splits each). Weights
  // exp2(m_s - max) go to threadgroup memory once; then each thread sums its output elements
  // over the splits (coalesced reads of the partials, independent loads). A row's arithmetic,
  // and its order, is the same whatever MR is.
  const int tid = thread_position_in_threadgroup.x, lane = tid % 32, warp = tid / 32;
  threadgroup float weights[MR][MAX_SPLITS];
  threadgroup float across[MR][4];
  float top[MR], sink[MR], sum[MR];
  for (int r = 0; r < MR; r++) top[r] = PKV_NEG_BIG;

  for (int s = tid; s < num_splits; s += 128) {
    for (int r = 0; r < MR; r++) {
      const size_t ml = (size_t(row0 + r) * num_splits + s) * 2;
      top[r] = max(top[r], PKV_PARTIAL(o_ml[ml]));
    }
  }
  for (int r = 0; r < MR; r++) {
    for (int o = 16; o > 0; o >>= 1) top[r] = max(top[r], simd_shuffle_xor(top[r], ushort(o)));
    if (lane == 0) across[r][warp] = top[r];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int r = 0; r < MR; r++) {
    top[r] = max(max(across[r][0], across[r][1]), max(across[r][2], across[r][3]));
    sink[r] = HAS_SINKS ? sinks[(row0 + r) % HQ] * PKV_LOG2E : PKV_NEG_BIG;
    top[r] = max(top[r], sink[r]);
    sum[r] = 0.f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);  // everyone has read `across` before reuse

  for (int s = tid; s < num_splits; s += 128) {
    for (int r = 0; r < MR; r++) {
      const size_t ml = (size_t(row0 + r) * num_splits + s) * 2;
      float weight = exp2(PKV_PARTIAL(o_ml[ml]) - top[r]);
      weights[r][s] = weight;
      sum[r] += weight * PKV_PARTIAL(o_ml[ml + 1]);
    }
  }
  for (int r = 0; r < MR; r++) {
    for (int o = 16; o > 0; o >>= 1) sum[r] += simd_shuffle_xor(sum[r], ushort(o));
    if (lane == 0) across[r][warp] = sum[r];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int r = 0; r < MR; r++) {
    sum[r] = across[r][0] + across[r][1] + across[r][2] + across[r][3];
    if (HAS_SINKS) sum[r] += exp2(sink[r] - top[r]);
  }

  for (int d = tid; d < D; d += 128) {
    float out_d[MR];
    for (int r = 0; r < MR; r++) out_d[r] = 0.f;
    for (int s = 0; s < num_splits; s++) {
      for (int r = 0; r < MR; r++) {
        const size_t partial = (size_t(row0 + r) * num_splits + s) * D;
        out_d[r] += weights[r][s] * PKV_PARTIAL(o_acc[partial + d]);
      }
    }
    for (int r = 0; r < MR; r++) out[size_t(row0 + r) * D + d] = static_cast<TQ>(out_d[r] / sum[r]);
  }
