"""The MLX backend against the spec: identical operations, identical everything after every step.

Same return values or the same error type; equal snapshots (block tables, free-queue order, index
contents with their LRU ticks, stats); bit-identical gathered K/V (bfloat16 compared as its bits);
check_invariants() on both; and the dense model on top. Runs on MLX's default device: the CPU in CI,
the GPU when run on a GPU machine.
"""

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from tests.property.harness import CacheMachine
from tests.property.model import SpecImpl, mlx_native

mx = pytest.importorskip("mlx.core", reason="the differential machine needs MLX (pagedkv[mlx])")


class MLXImpl:
    name = "mlx"

    @staticmethod
    def make(config):
        from pagedkv.mlx_backend import PagedCache

        return PagedCache(config)

    to_native = staticmethod(mlx_native)

    @staticmethod
    def to_bits(array) -> np.ndarray:
        if array.dtype == mx.bfloat16:
            return np.array(array.view(mx.uint16)).view(np.uint8)
        return np.ascontiguousarray(np.array(array)).view(np.uint8)

    @staticmethod
    def to_float32(array, dtype: str) -> np.ndarray:
        return np.array(array.astype(mx.float32))

    @staticmethod
    def queries(array: np.ndarray):
        return mx.array(array)

    @staticmethod
    def output(array) -> np.ndarray:
        return np.array(array.astype(mx.float32))


class DifferentialMachine(CacheMachine):
    impls = (SpecImpl, MLXImpl)

    @precondition(lambda self: any(self.model.values()))
    @rule(data=st.data(), group=st.sampled_from([1, 2]))
    def attention_agrees(self, data, group):
        """Paged decode and prefill attention: the backend within float tolerance of the spec."""
        live = [s for s, tokens in self.model.items() if tokens]
        batch = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=4), label="batch")
        heads, dim = self.config.num_kv_heads * group, self.config.head_dim
        rng = np.random.default_rng(len(batch))
        queries = rng.standard_normal((len(batch), heads, dim)).astype(np.float32)
        tol = 1e-5 if self.config.dtype == "float32" else 1e-4
        results = [
            impl.output(c.attention_decode(0, batch, impl.queries(queries)))
            for impl, c in zip(self.impls, self.caches)
        ]
        np.testing.assert_allclose(results[1], results[0], atol=tol, rtol=tol)
        seq = batch[0]
        most = len(self.model[seq])  # rule 10: no query whose window reaches a released block
        holes = self.holes(self.caches[0].snapshot(), seq)
        if holes:
            most -= holes * self.config.block_size + self.config.window - 1
        if most < 1:
            return
        count = data.draw(st.integers(1, most), label="queries")
        queries = rng.standard_normal((count, heads, dim)).astype(np.float32)
        results = [
            impl.output(c.attention_prefill(seq, 0, impl.queries(queries)))
            for impl, c in zip(self.impls, self.caches)
        ]
        np.testing.assert_allclose(results[1], results[0], atol=tol, rtol=tol)


TestDifferentialMachine = DifferentialMachine.TestCase
