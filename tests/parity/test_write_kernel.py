"""The in-place write kernel itself (pagedkv/mlx_backend/kernels/write.py): its host side (one
kernel object per variant, the launch's inputs and threads) on any device; on a CUDA GPU, the
rows it writes byte for byte and readers through the tables it returns ordered after lazy chains
of writes (skipped elsewhere with that reason). The adapter's in-place path end to end is
tests/parity/test_in_place_writes.py.
"""

from __future__ import annotations

import re
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from pagedkv import Config
from pagedkv.mlx_backend.attention import decode_batch, gather_decode
from pagedkv.mlx_backend.kernels import decode, write
from pagedkv.mlx_backend.storage import KVStorage

on_cuda = pytest.mark.skipif(
    not write.in_place_device(),
    reason="the in-place write kernel is CUDA only (mx.fast.cuda_kernel): the CPU and Metal keep "
    "functional writes",
)


def test_the_write_kernel_is_built_once_per_variant_and_launched_over_rows_and_tables(monkeypatch):
    """Host side of `write.write_rows`, with a fake kernel object: one object per (pool dtype,
    row size) under a name of its own; the inputs in the declared order, every declared name but
    `after` used by the source; threads for every row element and every table entry; the output a
    tables-shaped int32 array."""
    built, launched = [], []

    def fake_cuda_kernel(**spec):
        built.append(spec)

        def launch(**call):
            launched.append(call)
            return [mx.zeros(call["output_shapes"][0], call["output_dtypes"][0])]

        return launch

    monkeypatch.setattr(write.mx.fast, "cuda_kernel", fake_cuda_kernel)
    write._kernel.cache_clear()
    try:
        pool = mx.zeros((8, 4, 2, 64), mx.float16)
        keys, slots = mx.zeros((3, 2, 64), mx.float16), mx.array([1, 9, 30], dtype=mx.int32)
        tables = mx.zeros((3, 700), mx.int32)
        args = (pool, pool, keys, keys, slots, tables, tables)
        out = write.write_rows(*args)
        write.write_rows(*args)
        write.write_rows(pool.astype(mx.bfloat16), pool, keys, keys, slots[:1], tables[:1], tables)
    finally:
        write._kernel.cache_clear()
    assert out.shape == (3, 700) and out.dtype == mx.int32
    assert len(built) == 2  # float16 once, bfloat16 once
    names = [spec["name"] for spec in built]
    assert len(set(names)) == 2 and "float16_r128" in names[0] and "bfloat16_r128" in names[1]
    for spec in built:
        assert spec["output_names"] == ["tables_out"]
        assert spec["input_names"][-1] == "after"  # read by no one: only its data edge matters
        for name in (*spec["input_names"][:-1], *spec["output_names"]):
            assert re.search(rf"\b{name}\b", spec["source"]), name
        assert "//" not in spec["source"] and "constexpr int ROW = 128;" in spec["source"]
    first, second, third = launched
    assert [a is b for a, b in zip(first["inputs"], args)] == [True] * 7
    assert first["grid"] == (2176, 1, 1)  # 2100 table entries > 384 row elements, in 128s
    assert third["grid"] == (768, 1, 1)  # 700 entries: 6 threadblocks of 128
    assert first["threadgroup"] == (128, 1, 1) and first["output_dtypes"] == [mx.int32]


def _pool_and_rows(dtype, blocks, block_size, heads, dim, count, seed):
    rng = np.random.default_rng(seed)
    pool = rng.normal(size=(blocks, block_size, heads, dim)).astype(np.float32)
    rows = rng.normal(size=(2, count, heads, dim)).astype(np.float32)
    return (
        mx.array(pool).astype(dtype), mx.array(pool * 2).astype(dtype),
        mx.array(rows[0]).astype(dtype), mx.array(rows[1]).astype(dtype),
    )  # fmt: skip


@on_cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize(
    "heads, dim, slots", [(2, 64, [9]), (8, 128, [3, 40, 17]), (1, 80, [0, 63])]
)
@pytest.mark.parametrize("views", [False, True])
def test_the_kernel_writes_exactly_its_rows_and_returns_the_tables(
    monkeypatch, dtype, heads, dim, slots, views
):
    """Also with the pools handed over as one-element views of their buffers (POOL_VIEWS)."""
    monkeypatch.setattr(decode, "POOL_VIEWS", views)
    k_pool, v_pool, keys, values = _pool_and_rows(dtype, 16, 4, heads, dim, len(slots), seed=dim)
    mx.eval(k_pool, v_pool, keys, values)
    want_k, want_v = np.array(k_pool.astype(mx.float32)), np.array(v_pool.astype(mx.float32))
    for i, slot in enumerate(slots):
        want_k[slot // 4, slot % 4] = np.array(keys[i].astype(mx.float32))
        want_v[slot // 4, slot % 4] = np.array(values[i].astype(mx.float32))
    tables = mx.array(np.arange(3 * 7, dtype=np.int32).reshape(3, 7))
    slot_array = mx.array(slots, dtype=mx.int32)
    out = write.write_rows(k_pool, v_pool, keys, values, slot_array, tables, tables)
    assert out.tolist() == tables.tolist()  # evaluates the write
    np.testing.assert_array_equal(np.array(k_pool.astype(mx.float32)), want_k)
    np.testing.assert_array_equal(np.array(v_pool.astype(mx.float32)), want_v)


@on_cuda
@pytest.mark.parametrize("path", ["kernel", "gather"])
def test_readers_through_the_returned_tables_run_after_lazy_chains_of_writes(path):
    """Twenty decode positions written in place, each read right after its write, all in one
    lazy graph evaluated once: read n equals attention over rows 0..n. Then the last position is
    written again, and the read after it sees the new row. (The rewrite comes after the first
    twenty reads are evaluated: a write is ordered after earlier writes and before the reads
    through its tables, not after earlier reads of the rows it overwrites.)"""
    dtype, heads, dim, block_size = mx.float16, 2, 64, 4
    config = Config(24, 4, num_layers=1, num_kv_heads=heads, head_dim=dim, dtype="float16")
    storage = KVStorage(config)
    rng = np.random.default_rng(0)
    rows = mx.array(rng.normal(size=(2, 21, heads, dim)).astype(np.float32)).astype(dtype)
    queries = mx.array(rng.normal(size=(21, 1, 4, 1, dim)).astype(np.float32)).astype(dtype)
    table = np.array([5, 2, 9, 0, 11, 7], np.int32)  # fragmented: positions 0..23
    positions = list(range(20)) + [19]  # the last: position 19 again, with row 20
    outputs = []
    for n, position in enumerate(positions):
        if n == 20:
            mx.eval(outputs)
        slot = mx.array([int(table[position // block_size]) * block_size + position % block_size])
        batch = decode_batch([table], [position + 1], None)
        k_pool, v_pool = storage.pools(0)
        tables = storage.write_in_place(
            0, slot, rows[0, n : n + 1], rows[1, n : n + 1], batch.tables
        )
        if path == "kernel":
            launch = decode.prepare(queries[n], k_pool, batch, 0.125, False)
            outputs.append(launch(queries[n], k_pool, v_pool, None, tables))
        else:
            read = replace(batch, tables=tables)
            outputs.append(gather_decode(queries[n], k_pool, v_pool, read, 0.125))
    mx.eval(outputs)
    for n, (position, out) in enumerate(zip(positions, outputs)):
        visible = list(range(position)) + [n]  # the rows at positions 0..position
        keys = rows[0][mx.array(visible)][None].transpose(0, 2, 1, 3)
        values = rows[1][mx.array(visible)][None].transpose(0, 2, 1, 3)
        want = mx.fast.scaled_dot_product_attention(queries[n], keys, values, scale=0.125)
        err = mx.abs(out.astype(mx.float32) - want.astype(mx.float32)).max().item()
        assert err <= 2e-3, (n, err)
