"""iter_analysis: the curation decode agrees with open_frames on every frame it keeps."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from pipeline.media import DecodeError, iter_analysis, open_frames, output_size, probe

_spec = importlib.util.spec_from_file_location("media_cases", Path(__file__).with_name("test_media.py"))


def _keep(i: int) -> bool:
    return i % 5 == 0


def _compare(path: Path, max_side: int = 384) -> None:
    info = probe(path)
    ref = {i: f for i, f in open_frames(path, info, max_side=None, backend="pyav")}
    got = list(iter_analysis(path, info, detect_width=160, max_side=max_side, keep=_keep))
    assert [i for i, _, _ in got] == list(range(info.frames))
    w, h = output_size(info, max_side)
    for i, small, rgb in got:
        assert small.dtype == np.uint8 and small.shape[2] == 3 and small.shape[1] <= 160
        if not _keep(i):
            assert rgb is None
            continue
        assert rgb.shape == (h, w, 3)
        # Same picture, same orientation: compare at the analysis size.
        import cv2

        expect = cv2.resize(ref[i], (w, h), interpolation=cv2.INTER_AREA)
        assert np.abs(rgb.astype(int) - expect.astype(int)).mean() < 4, i
        # The detector's copy is the same frame too (BGR, coded orientation: compare colour means).
        if info.rotation == 0:
            assert np.abs(small[..., ::-1].reshape(-1, 3).mean(0) - ref[i].reshape(-1, 3).mean(0)).max() < 6


def test_sample_videos_agree(sample_dir):
    for name in ("cuts.mp4", "logo.mp4", "moving.mp4"):
        _compare(sample_dir / name)


def test_rotated_video_agrees(tmp_path):
    cases = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(cases)
    path = cases._encode(tmp_path / "rot.mp4", cases._marker_frames(24, 64, 32), rotation_ccw=90)
    _compare(path, max_side=32)


def test_real_full_range_and_vp8_agree(media_dir):
    for name in ("again.mkv", "stream-of-water.webm"):
        _compare(media_dir / name)


def test_undecodable_frames_raise(bad_inputs):
    path = bad_inputs["undecodable"]
    with pytest.raises(DecodeError):
        info = probe(path)
        list(iter_analysis(path, info, detect_width=160, max_side=384, keep=_keep))


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_decode_ahead_in_chunks_keeps_order_and_delivers_what_came_before_an_error(chunk):
    from pipeline.media import _prefetched

    def source(fail_at):
        for i in range(10):
            if i == fail_at:
                raise DecodeError(f"frame {i} is damaged")
            yield i

    assert list(_prefetched(source(None), 16, name="t", chunk=chunk)) == list(range(10))
    got = []
    with pytest.raises(DecodeError, match="frame 7"):
        for item in _prefetched(source(7), 16, name="t", chunk=chunk):
            got.append(item)
    assert got == list(range(7))  # the frames decoded before the damage still reach the consumer, in order
    stream = _prefetched(source(None), 16, name="t", chunk=chunk)
    assert [next(stream), next(stream)] == [0, 1]
    stream.close()  # a consumer that stops early ends the worker instead of hanging on a full queue


def test_decode_ahead_closed_from_its_own_worker_thread_ends_cleanly():
    # Garbage collection can free (and so close) a dropped prefetching generator on any thread, its own worker's
    # included; that must not try to wait for itself ("cannot join current thread").
    import threading

    from pipeline.media import _prefetched

    consumer_out, attempted, outcome = threading.Event(), threading.Event(), {}

    def source():
        yield 0
        assert consumer_out.wait(30), "the consumer never took the first item"
        try:
            stream.close()  # runs on the worker thread, while the consumer is outside the generator
            outcome["closed"] = True
        except BaseException as e:  # noqa: BLE001 - recorded for the assertion below
            outcome["error"] = e
        attempted.set()
        yield 1

    stream = _prefetched(source(), 4, name="t")
    assert next(stream) == 0
    consumer_out.set()
    assert attempted.wait(30), "the worker never reached its close"
    assert outcome == {"closed": True}, outcome
