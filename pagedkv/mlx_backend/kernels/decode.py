"""Launching the paged decode kernel: its shape choices, its kernel objects, and the call.

The algorithm is `pagedkv.spec.split_k.split_k_decode` (read that first); the sources are
`paged_decode.cu` / `paged_decode.metal`. This module decides, per call:

- lanes per key row `L` (a power of two: 16-byte loads across the row), lane groups per
  threadblock `NSG = 128 / L`, keys in flight per lane group `U`;
- the query tile `QT`: how many of a kv head's G query heads one threadblock serves from each
  K/V load (G itself when the registers and the merge buffer allow);
- the split count: enough splits that a launch fills the GPU, none shorter than MIN_SPLIT_KEYS
  keys (`split_count`). One split is one pass; several write partials that a second kernel
  merges. On CUDA they can instead merge in pass 1's own launch (`paged_decode_once.cu`: the
  last threadblock of each group merges them): the same output, no faster on the H100, so off
  and kept for A/B runs on other GPUs (`ONE_LAUNCH`; ADR 0002, fourteenth session);
- on CUDA GPUs with tensor cores (sm_80 and later), for 16-bit pools read by queries of the same
  dtype and head_dim a multiple of 32 up to 128, pass 1 is `paged_decode_mma.cu` instead
  (`Shape.tensor_cores`): the same algorithm, launch and epilogues, with mma instructions;
- on CUDA, whether the pools go to the kernels whole or as one-element views of their buffers
  (`POOL_VIEWS`, off until it has run on a GPU: MLX counts a kernel's inputs whole towards
  ending its CUDA graph; ADR 0002, eighteenth session).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, lru_cache

import mlx.core as mx

from pagedkv.mlx_backend.kernels import source

THREADS = 128  # per threadblock / threadgroup: 4 warps or simdgroups
TARGET_BLOCKS = 512  # threadblocks a launch aims at: one wave, ~4 per SM on an H100 (split_count)
TARGET_BLOCKS_MMA = 256  # the same for the tensor-core pass 1: 2 per SM (198 registers at d128)
MIN_SPLIT_KEYS = 256  # no split reads fewer keys: shorter ones cost more to merge than they add
MAX_SPLITS = 256  # the merge kernel keeps one weight per split in shared memory
# CUDA: merge the splits in pass 1's launch instead of a second kernel. Bit-for-bit the same
# output on the H100, but no faster there (ADR 0002, fourteenth session), so off; kept so that
# tools/split_sweep.py can repeat the A/B on another GPU or MLX version (tests cover both forms).
ONE_LAUNCH = False
# CUDA: hand each pool to a kernel as a one-element view of its buffer (`pool_view`). MLX's CUDA
# backend ends a graph once its kernels' inputs add up to MLX_MAX_MB_PER_BUFFER (1000 "MB" on an
# H100, counted in elements), every input counted whole at every use: whole pools end a graph
# every few layers, and the GPU was seen idle ~13 us per call at 32k x 1 (ADR 0002, eighteenth
# session; that the two are linked is inferred, not traced).
# Off until it has run on a GPU: written when the session's device time had run out. The
# GPU suite's view tests and `tools/variant_ab.py --variants whole,two` are the check.
POOL_VIEWS = False
MERGE_BUFFER_BYTES = 24 * 1024  # shared memory for the in-block merge; fits Metal's 32 KiB
POOL_KIND = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2}
HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)  # the head sizes the GPU parity suite runs
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class DecodeBatch:
    """What every layer of one decode step reads besides its pools: built once per step."""

    tables: mx.array  # [B, T] int32 block tables; entries past a row's length are never read
    bounds: mx.array  # [B, 2] int32: (first visible position, length) per row
    longest: int  # the most visible keys of any row (host int: picks the split count)


@dataclass(frozen=True)
class Shape:
    """Everything that selects a compiled variant."""

    query_dtype: mx.Dtype
    pool_dtype: mx.Dtype
    head_dim: int
    block_size: int
    kv_heads: int
    group: int  # query heads per kv head
    has_sinks: bool
    tensor_cores: bool = False  # pass 1 is paged_decode_mma.cu (see `tensor_core_shape`)

    @property
    def lanes(self) -> int:
        chunks = self.head_dim * self.pool_dtype.size // 16
        lanes = 1
        while lanes < min(chunks, 32):
            lanes *= 2
        return lanes

    @property
    def lane_groups(self) -> int:
        return THREADS // self.lanes

    @property
    def unroll(self) -> int:
        chunks_per_lane = -(-self.head_dim * self.pool_dtype.size // 16 // self.lanes)
        return 4 if chunks_per_lane == 1 else 2

    @property
    def query_tile(self) -> int:
        if self.tensor_cores:  # the queries are the 8 columns of an mma tile
            return max(t for t in range(1, 9) if self.group % t == 0)
        per_query = self.lane_groups * (self.head_dim + 2) * 4
        fits = [
            t for t in range(1, 9) if self.group % t == 0 and t * per_query <= MERGE_BUFFER_BYTES
        ]
        return max(fits)

    @property
    def label(self) -> str:
        """For messages: what this variant is, in words."""
        return (
            f"{self.query_dtype} queries over a {self.pool_dtype} pool, head_dim {self.head_dim}, "
            f"block {self.block_size}, {self.kv_heads} kv heads x {self.group}"
        )

    def name(self, part: str) -> str:
        """A unique kernel name per variant (MLX caches compiled kernels by name)."""
        q, p = str(self.query_dtype).split(".")[-1], str(self.pool_dtype).split(".")[-1]
        sinks = "_sinks" if self.has_sinks else ""
        cores = "_mma" if self.tensor_cores and part != "reduce" else ""
        return (
            f"pagedkv_decode_{part}{cores}_q{q}_p{p}_d{self.head_dim}_bs{self.block_size}"
            f"_kv{self.kv_heads}_g{self.group}{sinks}"
        )


def supported(head_dim: int, pool_dtype: mx.Dtype, query_dtype: mx.Dtype) -> str | None:
    """None if the kernel covers this case, else the reason it does not."""
    if pool_dtype not in POOL_KIND or query_dtype not in POOL_KIND:
        return f"dtype {pool_dtype}/{query_dtype} (the kernel reads float32, float16, bfloat16)"
    if head_dim * pool_dtype.size % 16 or head_dim > MAX_HEAD_DIM:
        return (
            f"head_dim {head_dim} with a {pool_dtype} pool (the kernel reads 16-byte pieces of "
            f"a K/V row: head_dim * itemsize a multiple of 16, head_dim <= {MAX_HEAD_DIM})"
        )
    return None


def tensor_core_shape(head_dim: int, pool_dtype: mx.Dtype, query_dtype: mx.Dtype) -> bool:
    """Whether `paged_decode_mma.cu` covers a case (on a GPU that has mma: `cuda_arch() >= 80`):
    16-bit pools read by queries of the same dtype (the queries are an mma operand as they are),
    head_dim a multiple of 32 (a lane's 16-byte pieces) and at most 128 (its registers)."""
    return (
        pool_dtype in (mx.float16, mx.bfloat16)
        and query_dtype == pool_dtype
        and head_dim % 32 == 0
        and head_dim <= 128
    )


@cache
def cuda_arch() -> int:
    """The CUDA GPU's compute capability as 10 * major + minor (90 on an H100), 0 if unknown
    (then no tensor-core pass 1: the other kernel runs on every GPU)."""
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    arch = str(info.get("architecture", ""))
    if arch.startswith("sm_") and arch[3:].isdigit():
        return int(arch[3:])
    major, minor = info.get("compute_capability_major"), info.get("compute_capability_minor")
    return 10 * int(major) + int(minor) if major is not None and minor is not None else 0


def backend() -> str | None:
    """'cuda' or 'metal' when the default device is a GPU with a kernel backend, else None."""
    if mx.default_device() != mx.gpu:
        return None
    if mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


@cache
def _kernel(backend_name: str, name: str, part: str, constants: str = ""):
    """One kernel object per variant name, built once (compiled by MLX at first call).
    `backend_name`: "cuda", "cuda_mma" (the tensor-core pass 1) or "metal".
    `constants`: declarations put before the body (CUDA: the variant's template values)."""
    parts = source.sections(backend_name)
    if part == "reduce":
        inputs, outputs = ["o_acc", "o_ml", "sinks"], ["out"]
        body = source.reduce_body(backend_name)
    elif part == "once":  # CUDA only: pass 1 and the merge in one launch
        inputs = ["queries", "k_pool", "v_pool", "tables", "bounds", "scale", "sinks", "arrivals"]
        outputs, body = ["o_acc", "o_ml", "out"], source.once_body(backend_name)
    else:
        inputs = ["queries", "k_pool", "v_pool", "tables", "bounds", "scale", "sinks"]
        split = part == "split"
        outputs = ["o_acc", "o_ml"] if split else ["out"]
        body = source.pass1_body(backend_name, split)
    make = mx.fast.cuda_kernel if backend_name.startswith("cuda") else mx.fast.metal_kernel
    return make(
        name=name,
        input_names=inputs,
        output_names=outputs,
        source=constants + body,
        header=parts["header"],
    )


CUDA_TYPES = {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16"}


def cuda_constants(template: list) -> str:
    """A template's values as constants at the top of a CUDA kernel body. A call with template
    arguments makes MLX convert and hash them and rebuild the source every time (about 2 µs more
    host time per call on the H100: tools/template_cost.py)."""
    lines = []
    for name, value in template:
        if isinstance(value, mx.Dtype):
            lines.append(f"using {name} = {CUDA_TYPES[value]};")
        elif isinstance(value, bool):
            lines.append(f"constexpr bool {name} = {'true' if value else 'false'};")
        else:
            lines.append(f"constexpr int {name} = {value};")
    return "".join(line + "\n" for line in lines)


@cache
def _scalar(value: float) -> mx.array:
    return mx.array([value], dtype=mx.float32)


@lru_cache(maxsize=64)
def zero_counters(count: int) -> mx.array:
    """Arrival counters for the single-launch merge (`paged_decode_once.cu`): `count` + 1 zeros
    as a broadcast view of one scalar. A kernel takes its inputs row-contiguous, so MLX copies
    this view into a fresh zeroed buffer inside every launch's own evaluation: no two launches
    count on one counter, not even two that MLX's CUDA graph runs at the same time or replays of
    one call under mx.compile, and no counter needs putting back. One more element than
    counted: a one-element view would count as contiguous and not be copied."""
    zeros = mx.broadcast_to(mx.array(0, dtype=mx.int32), (count + 1,))
    mx.eval(zeros)
    return zeros


def pool_view(pool: mx.array) -> mx.array:
    """The pool's buffer as a one-element array (`POOL_VIEWS`): the same pointer for the kernel,
    which reads the buffer through its block tables, and one element for MLX to count. Also
    orders like the pool: MLX's CUDA graph tracks dependencies by buffer."""
    return mx.as_strided(pool, (1,), (1,))


def uses_pool_views() -> bool:
    """POOL_VIEWS where the default device is a CUDA GPU (the CPU tests' stand-in kernels read
    whole arrays, and turn the views off where they stand in on a GPU host)."""
    return POOL_VIEWS and backend() == "cuda"


def split_count(shape: Shape, batch: int, longest: int) -> int:
    """Splits per row: enough that the launch has about one wave of threadblocks (TARGET_BLOCKS,
    TARGET_BLOCKS_MMA for the tensor-core pass 1, which holds fewer per SM), none shorter than
    MIN_SPLIT_KEYS keys, at most MAX_SPLITS. A small batch needs many: at batch 1 with 8 kv heads
    one pass is 8 threadblocks on a 132-SM GPU, and reading a 2k row that way took 80 us where 8
    splits took 31 (H100, cold caches, docs/adr/0002-paged-decode-kernel.md); more than a wave
    costs time again (a second wave, more partials). One pass where the rows alone fill the GPU
    or are short."""
    blocks_per_row = batch * shape.kv_heads * (shape.group // shape.query_tile)
    target = TARGET_BLOCKS_MMA if shape.tensor_cores else TARGET_BLOCKS
    wanted = -(-target // blocks_per_row)
    return max(1, min(wanted, longest // MIN_SPLIT_KEYS, MAX_SPLITS))


def pass1_template(shape: Shape) -> list:
    """Pass 1's template constants for a shape, as (name, value) pairs (the single launch adds
    MAX_SPLITS). The tensor-core pass 1 has no lanes or keys in flight to set."""
    template = [
        ("TQ", shape.query_dtype), ("D", shape.head_dim), ("BS", shape.block_size),
        ("KVH", shape.kv_heads), ("G", shape.group), ("QT", shape.query_tile),
        ("L", shape.lanes), ("U", shape.unroll), ("KIND", POOL_KIND[shape.pool_dtype]),
        ("HAS_SINKS", shape.has_sinks),
    ]  # fmt: skip
    if shape.tensor_cores:
        template = [item for item in template if item[0] not in ("L", "U")]
    return template


@dataclass(frozen=True)
class Plan:
    """Launch data for one shape on one backend, computed once: the kernel objects and templates."""

    shape: Shape
    template: list  # template arguments per call (Metal; CUDA bakes them into the source)
    reduce_template: list
    heads_grid: int  # threadblocks per row along y: kv heads x query tiles
    final: object  # kernel objects (built once; MLX compiles each template at first call)
    split: object
    reduce: object
    once: object | None  # CUDA: `split` and `reduce` in one launch (None on Metal)

    @staticmethod
    @cache
    def of(shape: Shape, backend_name: str) -> Plan:
        template = pass1_template(shape)
        reduce_template = [
            ("TQ", shape.query_dtype), ("D", shape.head_dim), ("KVH", shape.kv_heads),
            ("G", shape.group), ("HAS_SINKS", shape.has_sinks), ("MAX_SPLITS", MAX_SPLITS),
        ]  # fmt: skip
        parts = (("final", template), ("split", template), ("reduce", reduce_template))
        if backend_name == "cuda":  # the values go into the source; the calls pass none
            pass1 = "cuda_mma" if shape.tensor_cores else "cuda"
            parts += (("once", template + [("MAX_SPLITS", MAX_SPLITS)]),)
            kernels = [
                _kernel("cuda" if p == "reduce" else pass1, shape.name(p), p, cuda_constants(t))
                for p, t in parts
            ]
            template, reduce_template = [], []
        else:  # Metal keeps template arguments (what has been written for it so far)
            kernels = [_kernel(backend_name, shape.name(p), p) for p, _ in parts] + [None]
        heads_grid = shape.kv_heads * (shape.group // shape.query_tile)
        return Plan(shape, template, reduce_template, heads_grid, *kernels)


_PLANS: dict[tuple, Plan] = {}  # (dtypes, sizes, sinks, backend) -> Plan: the per-call lookup


def plan_for(queries: mx.array, k_pool: mx.array, has_sinks: bool, backend_name: str) -> Plan:
    q_heads, head_dim = queries.shape[1], queries.shape[-1]
    _, block_size, kv_heads, _ = k_pool.shape
    key = (
        queries.dtype,
        k_pool.dtype,
        head_dim,
        block_size,
        kv_heads,
        q_heads,
        has_sinks,
        backend_name,
    )
    plan = _PLANS.get(key)
    if plan is None:
        tensor_cores = (
            backend_name == "cuda"
            and tensor_core_shape(head_dim, k_pool.dtype, queries.dtype)
            and cuda_arch() >= 80
        )
        shape = Shape(
            queries.dtype, k_pool.dtype, head_dim, block_size, kv_heads, q_heads // kv_heads,
            has_sinks, tensor_cores,
        )  # fmt: skip
        plan = _PLANS[key] = Plan.of(shape, backend_name)
    return plan


@dataclass(frozen=True)
class Launch:
    """The kernel call for one decode step and one query shape, prepared once (plan, split count,
    grid, the step's tables and bounds) and made per layer with that layer's queries and pools."""

    plan: Plan
    splits: int
    grid: tuple[int, int, int]
    step_inputs: tuple  # (tables, bounds, scale): the same for every layer of the step
    queries_shape: tuple
    queries_dtype: mx.Dtype
    one_launch: bool  # several splits merged in pass 1's launch (`Plan.once`)
    pool_views: bool = False  # pools handed over as `pool_view`s (CUDA, POOL_VIEWS)

    def __call__(self, queries, k_pool, v_pool, sinks=None, tables=None) -> mx.array:
        """`queries` of the prepared shape and dtype; pools of the prepared pool's shape.
        `tables`: the step's tables as an in-place write returned them (kernels/write.py)."""
        sinks = _scalar(0.0) if sinks is None else sinks.astype(mx.float32)
        step_tables, bounds, scale = self.step_inputs
        tables = step_tables if tables is None else tables
        if self.pool_views:
            k_pool, v_pool = pool_view(k_pool), pool_view(v_pool)
        inputs = [queries, k_pool, v_pool, tables, bounds, scale, sinks]
        plan, shape = self.plan, self.queries_shape
        if self.splits == 1:
            (out,) = plan.final(
                inputs=inputs, template=plan.template, grid=self.grid,
                threadgroup=(THREADS, 1, 1), output_shapes=[shape],
                output_dtypes=[self.queries_dtype],
            )  # fmt: skip
            return out
        rows, q_heads, head_dim = shape[0], shape[1], shape[-1]
        partials = [(rows * q_heads, self.splits, head_dim), (rows * q_heads, self.splits, 2)]
        if self.one_launch:
            arrivals = zero_counters(rows * plan.heads_grid)
            _, _, out = plan.once(
                inputs=inputs + [arrivals], template=plan.template, grid=self.grid,
                threadgroup=(THREADS, 1, 1), output_shapes=partials + [shape],
                output_dtypes=[mx.float32, mx.float32, self.queries_dtype],
            )  # fmt: skip
            return out
        o_acc, o_ml = plan.split(
            inputs=inputs, template=plan.template, grid=self.grid, threadgroup=(THREADS, 1, 1),
            output_shapes=partials, output_dtypes=[mx.float32, mx.float32],
        )  # fmt: skip
        (out,) = plan.reduce(
            inputs=[o_acc, o_ml, sinks], template=plan.reduce_template,
            grid=(rows * q_heads * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
            output_shapes=[shape], output_dtypes=[self.queries_dtype],
        )  # fmt: skip
        return out


def prepare(
    queries: mx.array,  # [B, q_heads, head_dim] or [B, q_heads, 1, head_dim] (same memory)
    k_pool: mx.array,  # [blocks, block_size, kv_heads, head_dim]
    batch: DecodeBatch,
    scale: float,
    has_sinks: bool,
    num_splits: int | None = None,
    backend_name: str | None = None,
) -> Launch:
    """The launch of `paged_decode` for queries and pools of these shapes and dtypes."""
    if num_splits is not None and not 1 <= num_splits <= MAX_SPLITS:  # before any work
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    plan = plan_for(queries, k_pool, has_sinks, backend_name or backend())
    rows = queries.shape[0]
    splits = num_splits if num_splits is not None else split_count(plan.shape, rows, batch.longest)
    grid = (splits * THREADS, plan.heads_grid, rows)
    step_inputs = (batch.tables, batch.bounds, _scalar(float(scale)))
    one_launch = ONE_LAUNCH and splits > 1 and plan.once is not None
    views = plan.once is not None and uses_pool_views()  # CUDA plans have `once`
    return Launch(
        plan, splits, grid, step_inputs, tuple(queries.shape), queries.dtype, one_launch, views
    )


def paged_decode(
    queries: mx.array,  # [B, q_heads, head_dim] or [B, q_heads, 1, head_dim] (same memory)
    k_pool: mx.array,  # [blocks, block_size, kv_heads, head_dim]
    v_pool: mx.array,
    batch: DecodeBatch,
    scale: float,
    sinks: mx.array | None = None,  # [q_heads] logits that take softmax mass but carry no value
    num_splits: int | None = None,
    backend_name: str | None = None,
) -> mx.array:  # queries' shape and dtype
    """Decode attention of one query per row over its paged K/V, with no gathered copy.
    Inputs are trusted (the callers validate them); see `pagedkv.spec.split_k` for the math."""
    launch = prepare(queries, k_pool, batch, scale, sinks is not None, num_splits, backend_name)
    return launch(queries, k_pool, v_pool, sinks)
