// Decode rows written into the pools' own buffers, for mx.fast.cuda_kernel (kernels/write.py
// says why and how readers are ordered after it). One thread per element of the new rows and
// per entry of the block tables' copy, the output every reader of the step takes as its tables.
//
// Inputs: k_pool, v_pool [blocks, block_size, kv_heads, head_dim] (written through, never
// replaced); k_new, v_new [n, kv_heads, head_dim] in the pool's dtype; slots [n] int32 (block *
// block_size + row); tables [B, T] int32; after (the previous write's output, or tables: only
// its data edge matters). Output: tables_out, a copy of tables.
// Template constants: T the pool's element type, ROW = kv_heads * head_dim.

//// write
const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
const long table_entries = (long)tables_shape[0] * tables_shape[1];
if (i < table_entries) tables_out[i] = tables[i];
const long elements = (long)slots_shape[0] * ROW;
if (i < elements) {
  const long at = (long)slots[i / ROW] * ROW + i % ROW;
  ((T*)k_pool)[at] = k_new[i];  // the pools arrive as const T*: written through on purpose
  ((T*)v_pool)[at] = v_new[i];
}
