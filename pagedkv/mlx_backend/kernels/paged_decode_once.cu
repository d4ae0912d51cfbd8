// Split-K decode in one launch (CUDA): pass 1 with several splits, then the last threadblock of
// each (sequence, kv head, query tile) to finish merges the splits' partials itself, so no
// second kernel is launched. `arrive` follows pass 1's `split` epilogue (paged_decode.cu or
// paged_decode_mma.cu) and opens a scope for paged_decode.cu's `merge_splits`, run for the
// tile's QT rows at once, closed by `close` (kernels/source.py: `once_body`).
//
// Why: a decode call at batch 1 waits on the host, not the GPU (two custom-kernel launches cost
// about 29 us of host time on the H200 against cuDNN's 6; docs/benchmarks.md section 3), and the
// second launch also waits for the first to drain. The arithmetic is the two-launch form's: the
// same partials, merged by the same code in the same order, so outputs are bitwise equal.
//
// `arrivals` (int32, one per threadblock group: [sequence][kv head x query tile], zero at launch)
// counts the splits done. The input is const to MLX; the kernel writes it anyway. It is a copy
// MLX makes for this launch alone (kernels/decode.py: `zero_counters`): independent kernels may
// run at the same time under MLX's CUDA graphs, so no two launches may share a counter.
// Metal keeps two launches: ordering between threadgroups of one dispatch is not something this
// project can test without Apple hardware.

//// arrive
  // Release: every thread's partials are visible device-wide before its block is counted.
  // Acquire: the counting thread fences after seeing the count, before the barrier that lets
  // its block read the other blocks' partials (through L2: PKV_PARTIAL).
  __shared__ bool pkv_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    int* arrived = const_cast<int*>(arrivals) + (size_t)b * gridDim.y + blockIdx.y;
    pkv_last = atomicAdd(arrived, 1) == num_splits - 1;
    __threadfence();
  }
  __syncthreads();
  if (!pkv_last) return;
#undef PKV_PARTIAL
#define PKV_PARTIAL(x) __ldcg(&(x))  // written by other threadblocks during this launch
  {  // merge_splits declares names pass 1 has used
    constexpr int MR = QT;
    const int row0 = b * HQ + head0;

//// close
  }
