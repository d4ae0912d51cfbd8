"""The rules of `pagedkv serve` (pagedkv/mlx_lm/serve.py): which options are pagedkv's and which
go on to mlx-lm's server untouched (`--help` included), the smallest pool it accepts, its exit
codes, what a Ctrl-C does, what a `Server` hands mlx-lm (a paged prompt cache of 16-token blocks
unless told, mlx-lm's own LRU cache without `num_blocks`, the admitting BatchGenerator on the paged
generation thread only, which model a key opens) and how a prompt the pool can never hold is
refused and counted. The command line is driven with a stand-in `Server` (no model, no socket);
the two tests that build a real one load a tiny llama saved here and listen on 127.0.0.1, port 0,
as tests/parity/test_serve_http.py does."""

from __future__ import annotations

import json
import threading
import urllib.request
from types import SimpleNamespace

import pytest

pytest.importorskip("mlx_lm")

import mlx_lm.server as mlx_server  # noqa: E402
from mlx_lm.generate import BatchGenerator  # noqa: E402
from mlx_lm.models.cache import LRUPromptCache  # noqa: E402

from pagedkv.errors import OutOfBlocksError  # noqa: E402
from pagedkv.mlx_lm import serve  # noqa: E402
from pagedkv.mlx_lm.admission import AdmittingBatchGenerator  # noqa: E402
from pagedkv.mlx_lm.prompt_cache import PagedPromptCache  # noqa: E402
from tests.parity.models import save_tiny_llama, tiny_model  # noqa: E402

REFUSAL = "pagedkv serve: --num-blocks >= 2 and --block-size >= 1"


class _StandIn:
    """What `main` builds instead of a real Server: records its arguments; `wait` returns at once
    or raises what it is told to (KeyboardInterrupt for a Ctrl-C)."""

    built: list[_StandIn] = []
    interrupt: BaseException | None = None

    def __init__(self, argv, num_blocks, block_size):
        self.args = (argv, num_blocks, block_size)
        self.stopped = 0
        _StandIn.built.append(self)

    def wait(self):
        if _StandIn.interrupt is not None:
            raise _StandIn.interrupt

    def stop(self):
        self.stopped += 1


@pytest.fixture
def built(monkeypatch):
    """The stand-in Servers `serve.main` builds, in order."""
    monkeypatch.setattr(serve, "Server", _StandIn)
    monkeypatch.setattr(_StandIn, "built", [])
    monkeypatch.setattr(_StandIn, "interrupt", None)
    return _StandIn.built


def test_num_blocks_is_required(built, capsys):
    """Without --num-blocks, argparse's usage error (exit 2) names it; nothing is built."""
    with pytest.raises(SystemExit) as exit_:
        serve.main(["--model", "m", "--block-size", "4"])
    assert exit_.value.code == 2
    assert "--num-blocks" in capsys.readouterr().err
    assert built == []


def test_our_options_come_out_and_the_rest_go_to_mlx_lm(built):
    """--num-blocks and --block-size are pagedkv's; every other option, in order, is mlx-lm's."""
    argv = ["--model", "m", "--num-blocks", "8", "--port", "0", "--block-size", "4", "--x", "y"]
    assert serve.main(argv) == 0
    assert [s.args for s in built] == [(["--model", "m", "--port", "0", "--x", "y"], 8, 4)]


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_is_mlx_lm_servers(built, flag):
    """`pagedkv serve --num-blocks N --help` is no help of pagedkv's own: the flag goes on to
    mlx-lm's server, whose help lists every option it takes."""
    assert serve.main(["--num-blocks", "8", flag]) == 0
    assert [s.args for s in built] == [([flag], 8, 16)]


def test_block_size_defaults_to_16(built):
    """Without --block-size, blocks hold 16 positions."""
    assert serve.main(["--num-blocks", "8"]) == 0
    assert built[0].args == ([], 8, 16)


def test_the_smallest_pool_is_two_blocks_of_one_position(built):
    """--num-blocks 2 and --block-size 1 are both accepted (the bounds are inclusive)."""
    assert serve.main(["--num-blocks", "2", "--block-size", "1"]) == 0
    assert built[0].args == ([], 2, 1)


TOO_SMALL = [
    ["--num-blocks", "1"],  # too few blocks alone (blocks of the default 16)
    ["--num-blocks", "8", "--block-size", "0"],  # empty blocks alone
    ["--num-blocks", "-3", "--block-size", "4"],
    ["--num-blocks", "0", "--block-size", "0"],
]


@pytest.mark.parametrize("ours", TOO_SMALL)
def test_a_pool_too_small_is_refused(built, capsys, ours):
    """Fewer than 2 blocks, or blocks of fewer than 1 position, either one alone: exit status 2,
    the rule on stderr, no server built."""
    assert serve.main(["--model", "m", *ours]) == 2
    assert capsys.readouterr().err.strip() == REFUSAL
    assert built == []


def test_the_command_exits_0_when_the_server_ends(built):
    """A server that ends by itself is not stopped again; the exit status is 0."""
    assert serve.main(["--num-blocks", "4"]) == 0
    assert built[0].stopped == 0


def test_ctrl_c_stops_the_server_and_exits_0(built):
    """A KeyboardInterrupt while serving stops the server (once) and is a clean exit, status 0."""
    _StandIn.interrupt = KeyboardInterrupt()
    assert serve.main(["--num-blocks", "4"]) == 0
    assert built[0].stopped == 1


def test_other_errors_while_serving_are_not_swallowed(built):
    """Only Ctrl-C is a clean exit: anything else raised while serving reaches the caller."""
    _StandIn.interrupt = RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        serve.main(["--num-blocks", "4"])


def test_admitting_batch_generator_only_on_a_paged_generation_thread(monkeypatch):
    """mlx-lm's server asks for `BatchGenerator(model, ...)`: on a thread registered as a paged
    server's generation thread it gets an AdmittingBatchGenerator whose admission is that prompt
    cache's (read when used, as the store is built later); anywhere else mlx-lm's own class."""
    model = tiny_model("llama")
    plain = serve._batch_generator(model, max_tokens=4)
    assert type(plain) is BatchGenerator
    prompt_cache = SimpleNamespace(admission=None)
    monkeypatch.setitem(serve._PAGED, threading.current_thread(), prompt_cache)
    admitting = serve._batch_generator(model, max_tokens=4)
    assert type(admitting) is AdmittingBatchGenerator
    assert admitting.admission is None
    prompt_cache.admission = marker = object()
    assert admitting._admission() is marker


@pytest.fixture
def paged_generator(monkeypatch):
    """A _PagedGenerator without its thread, on a pool of 8 blocks of 4 (prompts of up to 28
    tokens fit: one block is kept for a copied shared tail); mlx-lm's own `_tokenize` returns
    (prompt, segments, segment types, state, vision) for a prompt of `length` tokens."""
    generator = object.__new__(serve._PagedGenerator)
    generator.prompt_cache = SimpleNamespace(block_size=4, num_blocks=8, counts={"refused": 0})

    def tokenized(length):
        prompt = list(range(length))
        out = (prompt, [prompt], ["user"], "normal", None)
        monkeypatch.setattr(mlx_server.ResponseGenerator, "_tokenize", lambda *a: out)
        return out

    return generator, tokenized


def test_a_prompt_that_fits_passes_untouched(paged_generator):
    """The largest prompt the pool can hold goes on as mlx-lm tokenized it; nothing is counted."""
    generator, tokenized = paged_generator
    out = tokenized(28)
    assert generator._tokenize(None, None, None) is out
    assert generator.prompt_cache.counts["refused"] == 0


def test_a_prompt_that_never_fits_is_refused_and_counted_once(paged_generator):
    """One token more: OutOfBlocksError with the reason, and exactly one refusal counted. The
    length judged is the whole prompt's, not the number of segments."""
    generator, tokenized = paged_generator
    tokenized(29)
    with pytest.raises(OutOfBlocksError, match="29-token prompt can never fit the 8-block pool"):
        generator._tokenize(None, None, None)
    assert generator.prompt_cache.counts["refused"] == 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny llama with a word-level tokenizer, saved as mlx-lm loads it."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-serve"))


@pytest.fixture
def argv(model_dir):
    """mlx-lm server options for the tiny llama on 127.0.0.1, a free port. Afterwards every
    generation thread still running (a Server that failed half-built) is stopped, so a failing
    test fails instead of keeping the interpreter alive."""
    yield ["--model", model_dir, "--port", "0", "--host", "127.0.0.1", "--log-level", "ERROR"]
    for thread in threading.enumerate():
        owner = getattr(getattr(thread, "_target", None), "__self__", None)
        if isinstance(owner, mlx_server.ResponseGenerator):
            owner.stop_and_join()


def _health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as response:
        return json.loads(response.read())


def test_a_paged_server(argv):
    """Server(argv, num_blocks): a PagedPromptCache of 16-token blocks unless told, opening the
    provider's loaded model for the key it was loaded under and nothing for any other key; a
    _PagedGenerator registered under its generation thread until stopped; `port` the one
    actually bound (asked for port 0)."""
    server = serve.Server(argv, num_blocks=64)
    try:
        cache = server.prompt_cache
        assert type(cache) is PagedPromptCache
        assert (cache.num_blocks, cache.block_size) == (64, 16)
        server.provider.load_default()  # what the generation thread does at a first request
        key = server.provider.model_key
        assert server.provider.model is not None
        assert cache._model_of(key) is server.provider.model
        assert cache._model_of((*key[:2], "a-draft-model")) is None  # a key not loaded
        assert type(server.generator) is serve._PagedGenerator
        assert serve._PAGED[server.generator._generation_thread] is cache
        assert server.port != 0 and server.port == server.httpd.server_address[1]
        assert _health(server.port) == {"status": "ok"}
    finally:
        server.stop()
    assert server.generator._generation_thread not in serve._PAGED
    assert not server.generator._generation_thread.is_alive()


def test_the_stock_server(argv):
    """Server(argv, None) is mlx-lm's own server for comparison: its LRUPromptCache sized by
    --prompt-cache-size, its own ResponseGenerator, nothing registered as paged."""
    server = serve.Server([*argv, "--prompt-cache-size", "3"], None)
    try:
        assert type(server.prompt_cache) is LRUPromptCache
        assert server.prompt_cache.max_size == 3
        assert type(server.generator) is mlx_server.ResponseGenerator
        assert server.generator._generation_thread not in serve._PAGED
        assert _health(server.port) == {"status": "ok"}
    finally:
        server.stop()
