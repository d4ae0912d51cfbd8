// Paged decode attention for mx.fast.cuda_kernel: the split-K algorithm of
// pagedkv/spec/split_k.py, reading K/V in place from the layout-A pools
// [blocks, block_size, kv_heads, head_dim] through int32 block tables.
// paged_decode.metal is the same kernel, line for line, for Apple GPUs.
//
// Sections (split on the "//// " lines by kernels/source.py):
//   header   helpers placed before the generated kernel signature
//   partial  pass 1 body: one threadblock per (split, kv head x query tile, sequence)
//   merge    pass 1: its lane groups' states merged per output element (opens a loop)
//   final    pass 1 epilogue when one split covers the sequence: normalised output
//   split    pass 1 epilogue when several splits do: unnormalised partials
//   reduce   pass 2 body: one threadblock per (sequence, query head) row; its merge is
//   merge_splits  the splits of one row merged (pass 2, and the single launch's last block)
//
// Template constants (MLX turns them into constexprs): D head_dim, BS block_size,
// KVH kv heads, G query heads per kv head, QT query heads per threadblock, L lanes
// per key row, U keys in flight per lane group, KIND pool dtype (0 float32,
// 1 float16, 2 bfloat16), HAS_SINKS. Types: TQ (queries and output).
// Scores live in log2 units (queries pre-scaled by scale * log2(e)), so exp2 is exact
// to the spec's exp; the merge is the same in both units.

//// header
#define PKV_LOG2E 1.4426950408889634f
#define PKV_NEG_BIG -1e30f  // "no key yet": finite, so exp2(PKV_NEG_BIG - max) == 0 without NaN
#define PKV_NEG_INF __int_as_float(0xff800000)  // a masked key's score
#define PKV_PARTIAL(x) (x)  // a split's partial (the single launch reads it through L2)

// 16 bytes of the pool as floats: 4 float32, or 8 float16 / bfloat16 (KIND).
template <int KIND>
__device__ __forceinline__ void pkv_unpack(const uint4& raw, float* out) {
  const unsigned int words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; i++) {
    unsigned int w = words[i];
    if (KIND == 0) {
      out[i] = __uint_as_float(w);
    } else if (KIND == 1) {
      out[2 * i] = __half2float(__ushort_as_half((unsigned short)(w & 0xffffu)));
      out[2 * i + 1] = __half2float(__ushort_as_half((unsigned short)(w >> 16)));
    } else {
      out[2 * i] = __uint_as_float(w << 16);
      out[2 * i + 1] = __uint_as_float(w & 0xffff0000u);
    }
  }
}

//// partial
  constexpr int VEC = KIND == 0 ? 4 : 8;  // elements per 16-byte load
  constexpr int NCH = D / VEC;            // 16-byte chunks in one key row
  constexpr int CH = (NCH + L - 1) / L;   // chunks per lane
  constexpr int E = CH * VEC;             // elements per lane
  constexpr int NSG = 128 / L;            // lane groups per threadblock, each its own key stream
  constexpr int QTILES = G / QT;
  constexpr int HQ = KVH * G;

  const int split = blockIdx.x, num_splits = gridDim.x;
  const int kvh = blockIdx.y / QTILES, head0 = kvh * G + (blockIdx.y % QTILES) * QT;
  const int b = blockIdx.z;
  const int lane = threadIdx.x % L, group = threadIdx.x / L;
  const unsigned int lanes = L == 32 ? 0xffffffffu
                                     : (((1u << L) - 1u) << ((threadIdx.x % 32) / L * L));

  // This split's keys: whole blocks of the visible range [first, length).
  const int first = bounds[2 * b], length = bounds[2 * b + 1];
  const int first_block = first / BS;
  const int blocks = (length + BS - 1) / BS - first_block;
  const int per_split = (blocks + num_splits - 1) / num_splits;
  const int t_begin = max(first, (first_block + split * per_split) * BS);
  const int t_end = min(length, (first_block + (split + 1) * per_split) * BS);
  const int* table = tables + (size_t)b * tables_shape[1];

  // The tile's queries in registers, pre-scaled into log2 units.
  const float qscale = scale[0] * PKV_LOG2E;
  float q[QT][E];
#pragma unroll
  for (int g = 0; g < QT; g++) {
#pragma unroll
    for (int i = 0; i < E; i++) {
      int chunk = (i / VEC) * L + lane;
      q[g][i] = chunk < NCH
          ? static_cast<float>(queries[((size_t)b * HQ + head0 + g) * D + chunk * VEC + i % VEC]) * qscale
          : 0.f;
    }
  }

  // Online softmax per query: running max m, running sum l, unnormalised output acc.
  float m[QT], l[QT], acc[QT][E];
#pragma unroll
  for (int g = 0; g < QT; g++) {
    m[g] = PKV_NEG_BIG;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < E; i++) acc[g][i] = 0.f;
  }

  for (int base = t_begin; base < t_end; base += NSG * U) {
    // Issue every load of U keys before any math: U * CH * 2 16-byte loads in flight.
    uint4 kraw[U][CH], vraw[U][CH];
#pragma unroll
    for (int u = 0; u < U; u++) {
      int t = min(base + u * NSG + group, t_end - 1);  // clamped: masked out below
      size_t row = (((size_t)table[t / BS] * BS + t % BS) * KVH + kvh) * D;
#pragma unroll
      for (int c = 0; c < CH; c++) {
        int chunk = c * L + lane;
        if (chunk < NCH) {
          kraw[u][c] = *reinterpret_cast<const uint4*>(k_pool + row + chunk * VEC);
          vraw[u][c] = *reinterpret_cast<const uint4*>(v_pool + row + chunk * VEC);
        } else {
          kraw[u][c] = make_uint4(0, 0, 0, 0);
          vraw[u][c] = make_uint4(0, 0, 0, 0);
        }
      }
    }
    // Scores of the U keys for every query of the tile.
    float s[QT][U];
#pragma unroll
    for (int u = 0; u < U; u++) {
      float k[E];
#pragma unroll
      for (int c = 0; c < CH; c++) pkv_unpack<KIND>(kraw[u][c], k + c * VEC);
      bool valid = base + u * NSG + group < t_end;
#pragma unroll
      for (int g = 0; g < QT; g++) {
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < E; i++) dot += q[g][i] * k[i];
#pragma unroll
        for (int o = L / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(lanes, dot, o);
        s[g][u] = valid ? dot : PKV_NEG_INF;
      }
    }
    // One rescale per U keys: new max, then p = exp2(s - max).
#pragma unroll
    for (int g = 0; g < QT; g++) {
      float top = m[g];
#pragma unroll
      for (int u = 0; u < U; u++) top = fmaxf(top, s[g][u]);
      float correction = exp2f(m[g] - top);
      m[g] = top;
      l[g] *= correction;
#pragma unroll
      for (int i = 0; i < E; i++) acc[g][i] *= correction;
#pragma unroll
      for (int u = 0; u < U; u++) {
        s[g][u] = exp2f(s[g][u] - top);
        l[g] += s[g][u];
      }
    }
#pragma unroll
    for (int u = 0; u < U; u++) {
      float v[E];
#pragma unroll
      for (int c = 0; c < CH; c++) pkv_unpack<KIND>(vraw[u][c], v + c * VEC);
#pragma unroll
      for (int g = 0; g < QT; g++) {
#pragma unroll
        for (int i = 0; i < E; i++) acc[g][i] += s[g][u] * v[i];
      }
    }
  }

  // Merge the NSG lane groups of this threadblock through shared memory.
  __shared__ float sm_acc[NSG][QT][D];
  __shared__ float sm_m[NSG][QT];
  __shared__ float sm_l[NSG][QT];
#pragma unroll
  for (int g = 0; g < QT; g++) {
#pragma unroll
    for (int i = 0; i < E; i++) {
      int chunk = (i / VEC) * L + lane;
      if (chunk < NCH) sm_acc[group][g][chunk * VEC + i % VEC] = acc[g][i];
    }
    if (lane == 0) {
      sm_m[group][g] = m[g];
      sm_l[group][g] = l[g];
    }
  }
  __syncthreads();
//// merge
  // Every output element: the lane groups' (m, l, acc) in shared memory merged to one (top, sum, out_d);
  // the epilogue below closes the loop.
  for (int idx = threadIdx.x; idx < QT * D; idx += 128) {
    const int g = idx / D, d = idx % D, head = head0 + g;
    float top = PKV_NEG_BIG;
    for (int w = 0; w < NSG; w++) top = fmaxf(top, sm_m[w][g]);
    float sum = 0.f, out_d = 0.f;
    for (int w = 0; w < NSG; w++) {
      float weight = exp2f(sm_m[w][g] - top);
      sum += weight * sm_l[w][g];
      out_d += weight * sm_acc[w][g][d];
    }

//// final
    if (HAS_SINKS) {  // a sink is one more logit in the denominator, with no value
      float sink = sinks[head] * PKV_LOG2E;
      float new_top = fmaxf(top, sink);
      float correction = exp2f(top - new_top);
      sum = sum * correction + exp2f(sink - new_top);
      out_d *= correction;
    }
    out[((size_t)b * HQ + head) * D + d] = static_cast<TQ>(out_d / sum);
  }

//// split
    size_t row = ((size_t)b * HQ + head) * num_splits + split;
    o_acc[row * D + d] = out_d;
    if (d == 0) {
      o_ml[2 * row] = top;
      o_ml[2 * row + 1] = sum;
    }
  }

//// reduce
  // One threadblock per (sequence, query head) row: merge its splits' partials
  // (`merge_splits`, which the single-launch form in paged_decode_once.cu also runs, there for
  // the QT rows of a query tile at once).
  constexpr int HQ = KVH * G;
  constexpr int MR = 1;
  const int row0 = blockIdx.x, num_splits = o_ml_shape[1];

//// merge_splits
  // Merge the splits of the MR consecutive rows from `row0` (num_splits each). Weights
  // exp2(m_s - max) go to shared memory once; then each thread sums its output elements over
  // the splits (coalesced reads of the partials, independent loads). The rows' loads are issued
  // together, so MR rows wait about as long as one; a row's arithmetic, and its order, is the
  // same whatever MR is.
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  __shared__ float weights[MR][MAX_SPLITS];
  __shared__ float across[MR][4];
  float top[MR], sink[MR], sum[MR];
#pragma unroll
  for (int r = 0; r < MR; r++) top[r] = PKV_NEG_BIG;

  for (int s = tid; s < num_splits; s += 128) {
#pragma unroll
    for (int r = 0; r < MR; r++) {
      const float* ml = o_ml + ((size_t)(row0 + r) * num_splits + s) * 2;
      top[r] = fmaxf(top[r], PKV_PARTIAL(ml[0]));
    }
  }
#pragma unroll
  for (int r = 0; r < MR; r++) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) top[r] = fmaxf(top[r], __shfl_xor_sync(0xffffffffu, top[r], o));
    if (lane == 0) across[r][warp] = top[r];
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < MR; r++) {
    top[r] = fmaxf(fmaxf(across[r][0], across[r][1]), fmaxf(across[r][2], across[r][3]));
    sink[r] = HAS_SINKS ? sinks[(row0 + r) % HQ] * PKV_LOG2E : PKV_NEG_BIG;
    top[r] = fmaxf(top[r], sink[r]);
    sum[r] = 0.f;
  }
  __syncthreads();  // everyone has read `across` before it is reused below

  for (int s = tid; s < num_splits; s += 128) {
#pragma unroll
    for (int r = 0; r < MR; r++) {
      const float* ml = o_ml + ((size_t)(row0 + r) * num_splits + s) * 2;
      float weight = exp2f(PKV_PARTIAL(ml[0]) - top[r]);
      weights[r][s] = weight;
      sum[r] += weight * PKV_PARTIAL(ml[1]);
    }
  }
#pragma unroll
  for (int r = 0; r < MR; r++) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], o);
    if (lane == 0) across[r][warp] = sum[r];
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < MR; r++) {
    sum[r] = across[r][0] + across[r][1] + across[r][2] + across[r][3];
    if (HAS_SINKS) sum[r] += exp2f(sink[r] - top[r]);
  }

  for (int d = tid; d < D; d += 128) {
    float out_d[MR];
#pragma unroll
    for (int r = 0; r < MR; r++) out_d[r] = 0.f;
#pragma unroll 8
    for (int s = 0; s < num_splits; s++) {
#pragma unroll
      for (int r = 0; r < MR; r++) {
        const float* partial = o_acc + ((size_t)(row0 + r) * num_splits + s) * D;
        out_d[r] += weights[r][s] * PKV_PARTIAL(partial[d]);
      }
    }
#pragma unroll
    for (int r = 0; r < MR; r++) out[(size_t)(row0 + r) * D + d] = static_cast<TQ>(out_d[r] / sum[r]);
  }
