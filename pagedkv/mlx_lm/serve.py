"""`pagedkv serve`: mlx-lm's own OpenAI-compatible server, its caches on the paged store.

Nothing of mlx-lm's server is copied. Its `main()` parses the command line (every mlx-lm server
option works) and builds its `ModelProvider`; its `ResponseGenerator` runs the generation thread
and its `_run_http_server` the HTTP side. pagedkv changes two things, by the names the server looks
up at run time:

- the prompt cache handed to `ResponseGenerator` is a `PagedPromptCache` (the store's trie instead
  of an LRU of deep-copied caches), so every batched request runs on paged caches;
- the generation thread of a paged server builds an `AdmittingBatchGenerator` where the server says
  `BatchGenerator` (mlx-lm's class with admission added; other threads still get mlx-lm's own).

MLX streams belong to threads: the store is built on the generation thread at its first request
(`PagedPromptCache._pool_for`), and only that thread touches the pools. HTTP threads only queue.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
from http.server import ThreadingHTTPServer

import mlx_lm.server as mlx_server
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import LRUPromptCache

from pagedkv.errors import OutOfBlocksError
from pagedkv.mlx_lm.admission import AdmittingBatchGenerator, require_fits
from pagedkv.mlx_lm.prompt_cache import PagedPromptCache

_PAGED: dict[threading.Thread, PagedPromptCache] = {}  # generation thread -> its prompt cache


def _batch_generator(model, **kwargs):
    """What mlx-lm's server gets for `BatchGenerator(...)`: admitting on a paged server's
    generation thread, mlx-lm's own class anywhere else."""
    prompt_cache = _PAGED.get(threading.current_thread())
    if prompt_cache is None:
        return BatchGenerator(model, **kwargs)
    return AdmittingBatchGenerator(model, admission=lambda: prompt_cache.admission, **kwargs)


class _PagedGenerator(mlx_server.ResponseGenerator):
    """mlx-lm's ResponseGenerator; a prompt the pool can never hold is refused before it joins
    the batch. mlx-lm's loop hands that one request the error (its client gets an HTTP error with
    the message) and keeps serving the others."""

    def _tokenize(self, tokenizer, request, args):
        tokenized = super()._tokenize(tokenizer, request, args)
        cache = self.prompt_cache
        try:
            require_fits(len(tokenized[0]), cache.block_size, cache.num_blocks)
        except OutOfBlocksError:
            cache.counts["refused"] += 1
            raise
        return tokenized


class Server:
    """One running server: `port`, `prompt_cache`, `generator` (mlx-lm's ResponseGenerator)."""

    def __init__(self, argv: list[str], num_blocks: int | None, block_size: int = 16) -> None:
        provider = _model_provider(argv)
        if num_blocks is None:  # mlx-lm's own server, for comparison
            self.prompt_cache = LRUPromptCache(provider.cli_args.prompt_cache_size)
        else:
            model_of = lambda key: provider.model if key == provider.model_key else None  # noqa: E731
            self.prompt_cache = PagedPromptCache(model_of, num_blocks, block_size)
            mlx_server.BatchGenerator = _batch_generator
        self.provider = provider
        generator_class = mlx_server.ResponseGenerator if num_blocks is None else _PagedGenerator
        self.generator = generator_class(provider, self.prompt_cache)
        if num_blocks is not None:
            _PAGED[self.generator._generation_thread] = self.prompt_cache
        self.httpd: ThreadingHTTPServer | None = None
        ready = threading.Event()
        owner = self

        class Recording(ThreadingHTTPServer):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                owner.httpd = self
                ready.set()

        args = provider.cli_args
        self._thread = threading.Thread(
            target=mlx_server._run_http_server,
            args=(args.host, args.port, self.generator),
            kwargs=dict(server_class=Recording),
            daemon=True,
        )
        self._thread.start()
        ready.wait(30)
        self.port = self.httpd.server_address[1]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.generator.stop_and_join()
        _PAGED.pop(self.generator._generation_thread, None)

    def wait(self) -> None:
        self._thread.join()


def _model_provider(argv: list[str]):
    """mlx-lm's server `main()` parsing `argv`, stopped where it would start serving."""
    captured = {}

    def capture(host, port, model_provider, *args, **kwargs):
        captured["provider"] = model_provider

    with _patched(mlx_server, "run", capture), _patched(sys, "argv", ["mlx_lm.server", *argv]):
        mlx_server.main()
    return captured["provider"]


@contextlib.contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def main(argv: list[str]) -> int:
    """`pagedkv serve --model PATH --num-blocks N [--block-size B] [mlx-lm server options]`."""
    parser = argparse.ArgumentParser(prog="pagedkv serve", add_help=False)
    parser.add_argument("--num-blocks", type=int, required=True, help="blocks per pool")
    parser.add_argument("--block-size", type=int, default=16, help="positions per block")
    ours, rest = parser.parse_known_args(argv)
    if ours.num_blocks < 2 or ours.block_size < 1:
        print("pagedkv serve: --num-blocks >= 2 and --block-size >= 1", file=sys.stderr)
        return 2
    server = Server(rest, ours.num_blocks, ours.block_size)
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop()
    return 0
