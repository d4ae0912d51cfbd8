// Split-K decode in one launch (CUDA): pass 1 with several splits, then the last threadblock of
// each (sequence, kv head, query tile) to finish merges the splits' partials itself, so no
// second kernel is launched. Appended to pass 1's `split` epilogue (paged_decode.cu or
// paged_decode_mma.cu), followed by paged_decode.cu's `merge_splits` once per query of the tile
// and a closing brace (kernels/source.py: `once_body`).
//
// Why: a decode call at batch 1 waits on the host, not the GPU (two custom-kernel launches cost
// about 29 us of host time on the H200 against cuDNN's 6; docs/benchmarks.md section 3), and the
// second launch also waits for the first to drain. The arithmetic is the two-launch form's: the
// same partials, merged by the same code in the same order, so outputs are bitwise equal.
//
// `arrivals` (int32, one per threadblock group: [sequence][kv head x query tile], zero at launch)
// counts the splits done. The input is const to MLX; the kernel writes it anyway, as
// write_rows.cu does the pools. Independent kernels may run at the same time under MLX's CUDA
// graphs, so kernels/decode.py gives every call counters no other call uses; the last block puts
// its counter back to zero all the same, so a replayed launch (mx.compile) starts from zero.
// Metal keeps two launches: ordering between threadgroups of one dispatch is not something this
// project can test without Apple hardware.

//// arrive
  // Every thread's partials reach L2 before its block is counted (fence, then barrier).
  __shared__ bool pkv_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    int* arrived = const_cast<int*>(arrivals) + (size_t)b * gridDim.y + blockIdx.y;
    pkv_last = atomicAdd(arrived, 1) == num_splits - 1;
    if (pkv_last) *arrived = 0;  // every other split has counted itself: reset for a replay
  }
  __syncthreads();
  if (!pkv_last) return;
  __threadfence();  // the other blocks' partials, read below through L2, are complete
  for (int g = 0; g < QT; g++) {
    const int row = b * HQ + head0 + g;
