"""`pagedkv serve` end to end over real HTTP: mlx-lm's own server code on the paged store.

A tiny llama saved with mlx-lm's own save functions and a word-level tokenizer built here are
served twice in-process, by mlx-lm's stock server and by pagedkv's, with the same requests:
concurrent streaming and non-streaming chats sharing a system prompt, then a second turn that
repeats the first reply. The paged server answers with the same greedy text, the second turn hits
the first turn's reply blocks, and a client that disconnects mid-stream gets its request removed
and its blocks released.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import pytest

from tests.parity.models import save_tiny_llama

SYSTEM = " ".join(f"w{i}" for i in range(10, 40))  # 30 words shared by every chat
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}w1 {% elif m['role'] == 'user' %}w2 "
    "{% else %}w3 {% endif %}{{ m['content'] }} w4 {% endfor %}{% if add_generation_prompt %}w3"
    "{% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), TEMPLATE)


def _chat(port, messages, stream, max_tokens, **extra):
    body = dict(messages=messages, stream=stream, max_tokens=max_tokens, temperature=0.0, **extra)
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        if not stream:
            out = json.loads(response.read())
            details = out["usage"].get("prompt_tokens_details") or {}
            return out["choices"][0]["message"]["content"], details.get("cached_tokens", 0)
        text = ""
        for line in response:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0].get("delta", {})
                text += delta.get("content") or ""
        return text, None


def _disconnect(port):
    """A streaming request whose client reads a little and goes away."""
    body = json.dumps(
        dict(messages=[{"role": "user", "content": "w7 w8"}], stream=True, max_tokens=3000)
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = b""
        while b"data:" not in received:  # keepalive lines first, then the first tokens
            chunk = sock.recv(4096)
            assert chunk, "the server closed the stream before any token"
            received += chunk
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


def _conversation(port):
    """Three concurrent first turns (two streamed), a second turn on the first reply, and a
    request mlx-lm serves on its single-request path."""
    users = ["w50 w51 w52", "w60 w61", "w70 w71 w72 w73"]
    firsts = [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": u}] for u in users
    ]
    results = [None] * 3
    threads = [
        threading.Thread(
            target=lambda i=i: results.__setitem__(i, _chat(port, firsts[i], i != 1, 12 + 3 * i))
        )
        for i in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    second = firsts[1] + [
        {"role": "assistant", "content": results[1][0]},
        {"role": "user", "content": "w80 w81"},
    ]
    reply, cached = _chat(port, second, False, 10)
    # A request with a seed is not batchable: mlx-lm serves it alone (stream_generate).
    alone, _ = _chat(port, firsts[2], False, 6, seed=1)
    return [r[0] for r in results] + [reply, alone], cached


def test_paged_server_matches_mlx_lm(model_dir):
    from pagedkv.mlx_lm.serve import Server

    argv = ["--model", model_dir, "--port", "0", "--host", "127.0.0.1", "--log-level", "ERROR"]
    stock = Server(argv, None)
    try:
        expected, _ = _conversation(stock.port)
    finally:
        stock.stop()
    assert all(expected) and len(set(expected)) > 1

    paged = Server(argv, num_blocks=1024, block_size=4)
    try:
        got, cached = _conversation(paged.port)
        assert got == expected
        # The second turn's prompt repeats turn one (system, user, reply): its blocks hit.
        first_prompt = 1 + 30 + 1 + 1 + 2 + 1 + 1  # w1 SYSTEM w4 w2 user(2) w4 w3
        assert cached >= (first_prompt // 4) * 4 + 4
        _disconnect(paged.port)
        _chat(paged.port, [{"role": "user", "content": "w9"}], False, 2)
        stats = _idle_stats(paged)
        assert stats["cancelled"] == 1
        assert stats["in_use_blocks"] == 0 and stats["live_requests"] == 0
        assert stats["learned_tokens"] > 0 and stats["hit_tokens"] >= cached
        assert stats["admitted"] >= 6 and stats["preempted"] == 0
        paged.prompt_cache.store.check_invariants()
    finally:
        paged.stop()


def _idle_stats(server):
    """The prompt cache's stats once no request is live: the counters are read until then (they
    are safe from any thread), the store only after (nothing runs on the generation thread)."""
    for _ in range(400):
        counters = server.prompt_cache.counters()
        if counters["live_requests"] == 0 and counters["cancelled"]:
            break
        time.sleep(0.05)
    return server.prompt_cache.stats()


def test_a_prompt_the_pool_can_never_hold_is_refused_alone(model_dir):
    """Its client gets an HTTP error that says why; the server keeps serving everyone else."""
    import urllib.error

    from pagedkv.mlx_lm.serve import Server

    argv = ["--model", model_dir, "--port", "0", "--host", "127.0.0.1", "--log-level", "ERROR"]
    server = Server(argv, num_blocks=8, block_size=4)  # prompts of up to 28 tokens fit
    try:
        huge = " ".join(f"w{10 + i % 200}" for i in range(60))
        with pytest.raises(urllib.error.HTTPError) as refused:
            _chat(server.port, [{"role": "user", "content": huge}], False, 4)
        assert "can never fit" in refused.value.read().decode()
        reply, _ = _chat(server.port, [{"role": "user", "content": "w9 w10"}], False, 3)
        assert reply
        assert server.prompt_cache.counters()["refused"] == 1
    finally:
        server.stop()
