"""End to end on the built-in sample plus bad inputs: real decoders, in-process Ray, real Parquet."""
from __future__ import annotations

import base64
import io
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.analyze import analyze_video
from pipeline.sample import generate_sample, write_bad_inputs
from pipeline.settings import CurateConfig

pytestmark = pytest.mark.slow


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory, ray_local):
    from pipeline.run import curate

    root = tmp_path_factory.mktemp("curate")
    raw = root / "raw"
    truth = generate_sample(raw)
    bad = write_bad_inputs(raw)
    cfg = CurateConfig.load(None, {"run": {"input": str(raw), "output": str(root / "out")},
                                   "models": {"standin_dir": str(root / "standins")}})
    summary = curate(cfg)
    tables = {t: pq.read_table(root / "out" / f"{t}.parquet").to_pylist() for t in ("videos", "clips", "rejects", "runs")}
    return {"raw": raw, "truth": truth, "bad": bad, "summary": summary, "cfg": cfg, **tables}


def _video(run, name):
    return next(v for v in run["videos"] if Path(v["uri"]).name == name)


def _clips(run, name):
    vid = _video(run, name)["video_id"]
    return sorted((c for c in run["clips"] if c["video_id"] == vid), key=lambda c: c["start_frame"])


def test_every_input_is_a_video_or_a_reject(sample_run):
    inputs = sorted(p.name for p in sample_run["raw"].iterdir() if p.suffix in (".mp4", ".jpg", ".m4a"))
    seen = sorted([Path(v["uri"]).name for v in sample_run["videos"]] + [Path(r["uri"]).name for r in sample_run["rejects"]])
    assert seen == inputs
    assert len({v["video_id"] for v in sample_run["videos"]}) == len(sample_run["videos"])
    assert len({c["clip_id"] for c in sample_run["clips"]}) == len(sample_run["clips"])


def test_bad_inputs_are_rejects_with_clear_reasons(sample_run):
    rejects = {Path(r["uri"]).name: r for r in sample_run["rejects"]}
    for path in sample_run["bad"].values():
        r = rejects[path.name]
        assert r["stage"] in ("probe", "decode"), r
        assert r["error_class"].endswith("Error") and len(r["message"]) > 20 and "expected" in r["message"]
    by_class = {Path(r["uri"]).name: r["error_class"] for r in sample_run["rejects"]}
    assert by_class[sample_run["bad"]["empty"].name] == "EmptyFileError"
    assert by_class[sample_run["bad"]["audio_only"].name] == "NoVideoStreamError"


def test_cuts_found_within_one_frame(sample_run):
    truth = sample_run["truth"].item("cuts.mp4").cut_frames
    found = _video(sample_run, "cuts.mp4")["cut_frames"]
    assert len(found) == len(truth)
    assert all(abs(f - t) <= 1 for f, t in zip(found, truth)), (found, truth)
    spans = [(c["start_frame"], c["end_frame"]) for c in _clips(sample_run, "cuts.mp4")]
    for s, e in spans:  # no clip straddles a cut
        assert not any(s < t < e for t in truth), (spans, truth)


def test_logo_clip_has_the_highest_overlay_score_and_a_box_over_the_logo(sample_run):
    logo = _clips(sample_run, "logo.mp4")
    logo_free = [c for c in sample_run["clips"] if c["video_id"] != _video(sample_run, "logo.mp4")["video_id"]
                 and c["overlay_score"] is not None]
    assert logo and logo_free
    assert min(c["overlay_score"] for c in logo) > max(c["overlay_score"] for c in logo_free)
    truth_box = sample_run["truth"].item("logo.mp4").logo_box
    assert all(_iou(c["overlay_box"], truth_box) >= 0.5 for c in logo), [c["overlay_box"] for c in logo]


def test_defocused_twin_is_less_sharp_and_static_shot_has_no_motion(sample_run):
    sharp, blurred = _clips(sample_run, "sharp.mp4")[0], _clips(sample_run, "defocused.mp4")[0]
    assert blurred["sharpness_median"] < sharp["sharpness_median"]
    assert blurred["sharpness_min"] < sharp["sharpness_min"]
    static, moving = _clips(sample_run, "static.mp4")[0], _clips(sample_run, "moving.mp4")[0]
    assert static["motion_mean"] < 0.1 < moving["motion_mean"]
    assert static["motion_mean"] < moving["motion_mean"] / 20


def test_captions_for_kept_clips_only(sample_run):
    kept = [c for c in sample_run["clips"] if not c["reject_reasons"]]
    dropped = [c for c in sample_run["clips"] if c["reject_reasons"]]
    assert kept and dropped
    assert all(c["caption"] and c["caption_model"] and c["caption_tokens"] > 0 for c in kept)
    assert all(c["caption_similarity"] is not None for c in kept)
    # Prefiltered on cheap scores: no model ran on them.
    cheap = [c for c in dropped if set(c["reject_reasons"]) & {"blurry", "static", "static_overlay"}]
    assert cheap and all(c["caption"] is None and c["aesthetic_mean"] is None for c in cheap)
    still = _clips(sample_run, "still.jpg")
    assert len(still) == 1 and still[0]["is_image"] and still[0]["frames"] == 1


def test_standins_are_named_in_the_output(sample_run):
    run = sample_run["runs"][-1]
    assert run["standin_models"] is True
    kept = [c for c in sample_run["clips"] if not c["reject_reasons"]]
    # Every model stage is a named stand-in, except OCR, which runs the real PP-OCRv4 weights its wheel ships.
    assert all(v.startswith("PP-OCRv4-det:") if k == "ocr" else v.startswith("standin:") for c in kept for k, v in c["models"])
    assert all(any(k == "ocr" for k, _ in c["models"]) for c in kept)
    counts = json.loads(run["counts"])
    assert counts["videos"] == len(sample_run["videos"]) and counts["rejects"] == len(sample_run["rejects"])
    blurry = sum("blurry" in c["reject_reasons"] for c in sample_run["clips"])
    assert blurry >= 1 and counts["reject:blurry"] == blurry


def test_rerun_is_a_no_op_with_identical_tables(sample_run, tmp_path):
    from pipeline.run import curate

    before = {t: pq.read_table(sample_run["summary"].output / f"{t}.parquet") for t in ("videos", "clips", "rejects")}
    again = curate(sample_run["cfg"])
    assert again.counts["processed_now"] == 0 and again.run_id == sample_run["summary"].run_id
    for t, table in before.items():
        assert pq.read_table(sample_run["summary"].output / f"{t}.parquet").equals(table), t


# --- captions tied to the right clip, through an OpenAI-compatible endpoint on loopback ------------------


class _BrightnessVLM(BaseHTTPRequestHandler):
    """Answers each chat request with the mean brightness of the images it was sent."""

    def do_POST(self):  # noqa: N802 (http.server API)
        from PIL import Image

        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        means = []
        for part in body["messages"][-1]["content"]:
            if part.get("type") == "image_url":
                b64 = part["image_url"]["url"].split(",", 1)[1]
                means.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), np.float32).mean())
        if len(means) == 1:  # the still image: this endpoint refuses it, so one clip of a batch fails
            err = json.dumps({"error": {"message": "single images are not supported"}}).encode()
            self.send_response(400)
            self.send_header("Content-Length", str(len(err)))
            self.end_headers()
            self.wfile.write(err)
            return
        text = f"brightness {np.mean(means):.2f} over {len(means)} frames"
        out = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                          "usage": {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


def test_each_caption_belongs_to_its_clip(tmp_path, ray_local):
    from pipeline.models.captioner import sample_frames
    from pipeline.run import curate

    server = ThreadingHTTPServer(("127.0.0.1", 0), _BrightnessVLM)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        raw = tmp_path / "raw"
        generate_sample(raw)
        cfg = CurateConfig.load(None, {
            "run": {"input": str(raw), "output": str(tmp_path / "out"), "register_catalog": False},
            "models": {"standin_dir": str(tmp_path / "standins")},
            "prefilter": {"sharpness_min": None, "change_min": None, "motion_min": None, "overlay_max": None,
                          "text_area_max": None, "text_persistent_max": None,
                          "text_mark_max": None},
            "caption": {"backend": "openai", "model": "brightness-vlm", "base_url": f"http://127.0.0.1:{server.server_port}/v1",
                        "timeout_s": 30.0, "retries": 0, "concurrency": 2, "num_frames": 4},
            "ray": {"batch_size": 3},
        })
        curate(cfg)
    finally:
        server.shutdown()
    clips = pq.read_table(tmp_path / "out" / "clips.parquet").to_pylist()
    still = [c for c in clips if c["is_image"]]
    assert len(still) == 1 and still[0]["caption"] is None
    assert still[0]["reject_reasons"][0].startswith("caption_failed") and "not supported" in still[0]["reject_reasons"][0]
    clips = [c for c in clips if not c["is_image"]]
    assert len(clips) >= 8 and all(c["caption"] for c in clips)
    # Recompute, outside Ray, what each clip's frames look like.
    expected = {}
    for uri in sorted({str(p) for p in raw.iterdir() if p.suffix in (".mp4", ".jpg")}):
        res = analyze_video(uri, cfg.decode, cfg.scenecut, cfg.prefilter)
        for c in res.clips:
            expected[c.record["clip_id"]] = float(sample_frames(c.frames, 4).astype(np.float32).mean())
    assert set(expected) == {c["clip_id"] for c in clips} | {still[0]["clip_id"]}
    for c in clips:
        got = float(re.match(r"brightness ([\d.]+)", c["caption"]).group(1))
        nearest = min(expected, key=lambda k: abs(expected[k] - got))
        assert abs(expected[c["clip_id"]] - got) < 1.5, (c["clip_id"], got, expected[c["clip_id"]])
        assert nearest == c["clip_id"] or abs(expected[nearest] - expected[c["clip_id"]]) < 0.5
        assert c["caption_model"] == "brightness-vlm"


# --- a killed run, started again, finishes only what was left and matches an uninterrupted run ---------------

_VOLATILE = {"probe_seconds", "caption_latency_s"}


def _stable(table):
    return [{k: v for k, v in row.items() if k not in _VOLATILE} for row in table.to_pylist()]


def test_killed_run_resumes_to_the_same_tables(sample_run, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from pipeline.run import curate

    out = tmp_path / "out"
    standins = sample_run["cfg"].models.standin_dir
    cfg_file = tmp_path / "resume.toml"
    cfg_file.write_text(f'[models]\nstandin_dir = "{standins}"\n[ray]\nbatch_size = 1\n')
    done = out / "_parts" / "done"
    total = len(sample_run["videos"]) + len(sample_run["rejects"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.curate", "--input", str(sample_run["raw"]), "--output", str(out),
         "--config", str(cfg_file), "--no-catalog"],
        cwd=Path(__file__).resolve().parents[2], start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if done.is_dir() and len(list(done.glob("*.json"))) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    finished = len(list(done.glob("*.json")))
    assert 3 <= finished < total
    assert not (out / "clips.parquet").exists()

    cfg = CurateConfig.load(cfg_file, {"run": {"input": str(sample_run["raw"]), "output": str(out), "register_catalog": False}})
    resumed = curate(cfg)
    assert resumed.counts["processed_now"] == total - finished
    assert resumed.run_id == sample_run["summary"].run_id
    ref = sample_run["summary"].output
    for t in ("videos", "clips", "rejects"):
        assert _stable(pq.read_table(out / f"{t}.parquet")) == _stable(pq.read_table(ref / f"{t}.parquet")), t


def test_every_clip_keeps_a_preview_and_the_report_needs_no_source(sample_run, tmp_path):
    """Previews ride through the Ray stages into clips.parquet, rejected clips' too; with every source moved away,
    the catalog report still shows one per card."""
    from PIL import Image

    from catalog.db import register_run
    from catalog.report import ReportOptions, write_report
    from pipeline.analyze import PREVIEW_HEIGHT

    clips = sample_run["clips"]
    assert any(c["reject_reasons"] for c in clips) and any(not c["reject_reasons"] for c in clips)
    for c in clips:
        img = Image.open(io.BytesIO(c["preview_jpeg"]))
        assert img.format == "JPEG" and img.height == PREVIEW_HEIGHT, c["clip_id"]
    db = tmp_path / "catalog.duckdb"
    register_run(db, sample_run["summary"].output)
    raw, away = sample_run["raw"], tmp_path / "raw-away"
    raw.rename(away)
    try:
        summary = write_report(db, tmp_path / "report.html", ReportOptions(clips_per_sheet=len(clips)))
    finally:
        away.rename(raw)
    page = summary.path.read_text()
    cards = page.count('class="card kept"') + page.count('class="card rejected"')
    uris = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert cards == len(clips) and summary.missing_previews == 0 and summary.thumbnails == len(uris) == cards
    assert all(np.asarray(Image.open(io.BytesIO(base64.b64decode(u)))).std() > 5 for u in uris)
