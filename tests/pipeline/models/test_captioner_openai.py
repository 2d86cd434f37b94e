"""The OpenAI-compatible captioner against a real HTTP server on 127.0.0.1 that imitates vLLM."""
from __future__ import annotations

import base64
import http.server
import io
import json
import socket
import threading
from collections import Counter
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from pipeline.models.captioner import CaptionConfig, CaptionError, load_captioner

# behaviour(request_json, attempt_for_this_clip) -> (status, response_json). A behaviour that must hold its
# reply waits on the server's events (FakeServer.wait_for_replies, FakeServer.released), never on a clock.
Behaviour = Callable[[dict, int], tuple[int, dict]]

# Upper bound on any wait inside the fake server: long enough that it never triggers on a loaded machine,
# finite so that a broken test fails instead of hanging the suite.
WAIT_S = 120.0


def _decode_images(body: dict) -> list[np.ndarray]:
    images = []
    for part in body["messages"][0]["content"]:
        if part["type"] == "image_url":
            header, data = part["image_url"]["url"].split(",", 1)
            assert header == "data:image/jpeg;base64", header
            images.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")))
    return images


def _grey(body: dict) -> int:
    """The clip's identity: each test clip is one flat grey level."""
    return int(round(_decode_images(body)[0].mean()))


def completion(text: str) -> dict:
    return {
        "object": "chat.completion",
        "model": "served",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": len(text.split()), "total_tokens": 10 + len(text.split())},
    }


def describe(body: dict, attempt: int) -> tuple[int, dict]:
    return 200, completion(f"grey {_grey(body)} with {len(_decode_images(body))} frames")


class FakeServer:
    """Records every request; answers with ``behaviour``. Loopback only, daemon threads, no sleeps: a reply that
    must wait waits on an event (another reply sent, or the test releasing it)."""

    def __init__(self) -> None:
        self.behaviour: Behaviour = describe
        self.requests: list[dict] = []
        self.attempts: Counter[int] = Counter()
        self.replied: list[int] = []  # grey level of each reply, in the order they were sent
        self.released = threading.Event()  # set on close: lets every held reply go
        self._lock = threading.Lock()
        self._reply_sent = threading.Condition(self._lock)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer._lock:
                    outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    key = _grey(body)
                    outer.attempts[key] += 1
                    attempt = outer.attempts[key]
                status, payload = outer.behaviour(body, attempt)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                with outer._reply_sent:
                    outer.replied.append(key)
                    outer._reply_sent.notify_all()

            def log_message(self, *args) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # a client that timed out leaves a broken pipe behind; expected here

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def wait_for_replies(self, n: int) -> bool:
        """Block until ``n`` replies have been sent (False if that never happened within WAIT_S)."""
        with self._reply_sent:
            return self._reply_sent.wait_for(lambda: len(self.replied) >= n, timeout=WAIT_S)

    def close(self) -> None:
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def server():
    srv = FakeServer()
    yield srv
    srv.close()


def grey_clip(level: int, n: int = 3, h: int = 90, w: int = 160) -> np.ndarray:
    return np.full((n, h, w, 3), level, dtype=np.uint8)


def config(server: FakeServer, **overrides) -> CaptionConfig:
    kwargs = dict(
        backend="openai", model="Qwen/Qwen2-VL-7B-Instruct", base_url=server.base_url, num_frames=4,
        image_max_side=64, timeout_s=5.0, retries=2, retry_backoff_s=0.01, concurrency=4, api_key_env="",
    )
    kwargs.update(overrides)
    return CaptionConfig(**kwargs)


def test_request_format(server, monkeypatch):
    monkeypatch.setenv("CURATION_TEST_KEY", "sk-test")
    cfg = config(server, api_key_env="CURATION_TEST_KEY", max_new_tokens=77, seed=5)
    [result] = load_captioner(cfg).caption([grey_clip(100, n=10)])
    [req] = server.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Content-Type"] == "application/json"
    assert req["headers"]["Authorization"] == "Bearer sk-test"
    body = req["body"]
    assert (body["model"], body["max_tokens"], body["temperature"], body["seed"]) == ("Qwen/Qwen2-VL-7B-Instruct", 77, 0.0, 5)
    [message] = body["messages"]
    assert message["role"] == "user"
    kinds = [part["type"] for part in message["content"]]
    assert kinds == ["image_url"] * 4 + ["text"]  # 10 frames sampled down to num_frames
    assert message["content"][-1]["text"] == cfg.prompt
    images = _decode_images(body)
    assert all(img.shape == (36, 64, 3) for img in images)  # 90×160 shrunk to image_max_side, aspect kept
    assert result.caption == "grey 100 with 4 frames"
    assert result.tokens == 5  # usage.completion_tokens as the server counted them
    assert result.model == "Qwen/Qwen2-VL-7B-Instruct"


def test_sampling_sends_the_temperature(server):
    load_captioner(config(server, do_sample=True, temperature=0.7)).caption([grey_clip(60)])
    assert server.requests[0]["body"]["temperature"] == pytest.approx(0.7)
    assert "Authorization" not in server.requests[0]["headers"]


def test_captions_map_back_to_their_clips_in_order(server):
    levels = [20, 180, 60, 140, 100, 40]

    def first_clip_answers_last(body, attempt):
        if _grey(body) == 20:  # the first clip submitted is held until every other clip has its reply
            server.wait_for_replies(len(levels) - 1)
        return describe(body, attempt)

    server.behaviour = first_clip_answers_last
    clips = [grey_clip(level, n=1 + i % 3) for i, level in enumerate(levels)]
    # concurrency 4 < 6 clips: the held request occupies one client thread while the other three serve the
    # rest; the generous timeout keeps the held request from being retried on a loaded machine.
    results = load_captioner(config(server, timeout_s=WAIT_S, retries=0)).caption(clips)
    assert [r.caption for r in results] == [f"grey {level} with {1 + i % 3} frames" for i, level in enumerate(levels)]
    # The client can hold the last reply before the server thread has recorded it: wait for the record.
    assert server.wait_for_replies(len(levels)), server.replied
    assert server.replied[-1] == 20, "the first clip's reply must have come last for this test to mean anything"
    assert load_captioner(config(server)).caption([]) == []


def test_503_is_retried_until_it_succeeds(server):
    def busy_twice(body, attempt):
        if attempt <= 2:
            return 503, {"object": "error", "message": "server overloaded"}
        return describe(body, attempt)

    server.behaviour = busy_twice
    results = load_captioner(config(server, retries=2)).caption([grey_clip(20), grey_clip(200)])
    assert [r.caption for r in results] == ["grey 20 with 3 frames", "grey 200 with 3 frames"]
    assert server.attempts == {20: 3, 200: 3}


def test_503_after_the_last_retry_is_an_error_with_the_server_message(server):
    server.behaviour = lambda body, attempt: (503, {"object": "error", "message": "server overloaded"})
    with pytest.raises(CaptionError, match=r"clip 0: .*failed after 2 attempts; last: HTTP 503: server overloaded") as info:
        load_captioner(config(server, retries=1)).caption([grey_clip(80)])
    assert info.value.index == 0
    assert server.attempts == {80: 2}


def test_client_errors_are_not_retried(server):
    server.behaviour = lambda body, attempt: (400, {"error": {"message": "too many images in prompt"}})
    with pytest.raises(CaptionError, match="refused the request: HTTP 400: too many images in prompt"):
        load_captioner(config(server)).caption([grey_clip(80)])
    assert server.attempts == {80: 1}


def test_a_hung_request_times_out_with_a_clear_error(server):
    def never_in_time(body, attempt):
        server.released.wait(WAIT_S)  # answers only once the test is over
        return 200, completion("too late")

    server.behaviour = never_in_time
    with pytest.raises(CaptionError, match=r"failed after 2 attempts; last: no response within timeout_s=0.2"):
        load_captioner(config(server, timeout_s=0.2, retries=1)).caption([grey_clip(80)])
    assert server.attempts == {80: 2}


def test_malformed_response_is_an_error(server):
    server.behaviour = lambda body, attempt: (200, {"choices": []})
    with pytest.raises(CaptionError, match="expected a chat completion with choices"):
        load_captioner(config(server)).caption([grey_clip(80)])


def test_connection_refused_is_retried_then_reported():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = CaptionConfig(backend="openai", base_url=f"http://127.0.0.1:{port}/v1", retries=1, retry_backoff_s=0.01, timeout_s=2.0)
    with pytest.raises(CaptionError, match="failed after 2 attempts; last: connection failed"):
        load_captioner(cfg).caption([grey_clip(80)])
