"""The one Arrow schema per table. Every stage, writer and reader refers to these.

Column docs live in the field metadata (``doc``) so the DuckDB catalog can ``COMMENT ON`` them.
"""
from __future__ import annotations

import pyarrow as pa


def _f(name: str, typ: pa.DataType, doc: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, typ, nullable=nullable, metadata={"doc": doc})


VIDEOS = pa.schema([
    _f("video_id", pa.string(), "sha256 of the file bytes (first 16 hex digits); a renamed copy has the same id", False),
    _f("uri", pa.string(), "where the file was read from", False),
    _f("bytes", pa.int64(), "file size in bytes"),
    _f("container", pa.string(), "container format name as probed (mp4, matroska/webm, image/jpeg, ...)"),
    _f("codec", pa.string(), "video codec name (h264, vp8, vp9, mjpeg, ...)"),
    _f("width", pa.int32(), "coded width in pixels"),
    _f("height", pa.int32(), "coded height in pixels"),
    _f("rotation", pa.int16(), "display rotation in degrees from the container's display matrix"),
    _f("sample_aspect", pa.float32(), "sample (pixel) aspect ratio; 1.0 for square pixels"),
    _f("display_width", pa.int32(), "width as shown: rotation and sample aspect applied"),
    _f("display_height", pa.int32(), "height as shown: rotation and sample aspect applied"),
    _f("display_aspect", pa.float32(), "display_width / display_height"),
    _f("fps", pa.float64(), "average frame rate (frames / duration)"),
    _f("fps_variable", pa.bool_(), "true when frame durations vary by more than a few percent"),
    _f("frames", pa.int64(), "decodable frame count (from PyAV, after edit lists)"),
    _f("duration", pa.float64(), "seconds"),
    _f("has_audio", pa.bool_(), "an audio stream is present"),
    _f("is_image", pa.bool_(), "a still image, treated as a one-frame clip"),
    _f("decoder", pa.string(), "decoder that produced the frames: decord or pyav (or pillow for images)"),
    _f("probe_seconds", pa.float64(), "wall time of probing the file"),
    _f("cut_frames", pa.list_(pa.int64()), "0-based frame numbers where a detected scene starts, before clip limits: "
       "hard cuts, and the middle of the black frames of each fade or black stretch between two scenes"),
    _f("cut_detector", pa.string(), "scene detector and its settings"),
    _f("num_clips", pa.int32(), "clip spans cut from this video (kept or not)"),
    _f("overlay_score", pa.float32(), "static overlay evidence across the video's scenes in [0,1]: fine edges that "
       "stay in place while different scenes pass behind them (clips of one scene are pooled first, so a locked-off "
       "background is no evidence); null with fewer than two distinct scenes; each clip gets it as "
       "overlay_video_score"),
    _f("overlay_box", pa.list_(pa.float32()), "[x0, y0, x1, y1] fractions of the video-level overlay; null when none"),
    _f("fade_frames", pa.list_(pa.list_(pa.int64())),
       "[start, end) frame ranges of fades through black and black stretches (fade-out start to fade-in end, from "
       "each frame's mean luma in the one decode); no clip overlaps them; empty when none; null for still images"),
    _f("is_grayscale", pa.bool_(), "black-and-white footage: >= 95% of the non-black frames have no chroma (mean "
       "|Cr-128|,|Cb-128| < [scenecut] gray_chroma_max); the cut detector then scores luma only; null for images"),
    _f("no_clip_reason", pa.string(), "why a video gave 0 clips, null when it gave any: all_black, too_short "
       "(shorter than min_clip_s plus both trims), damaged (salvaged pieces too short), mostly_black (fades and "
       "black take half the frames or more), scenes_too_short (every scene, after trimming, under min_clip_s)"),
    _f("damaged_frames", pa.list_(pa.list_(pa.int64())),
       "[start, end) frame ranges (0-based, end exclusive) that did not decode cleanly and were salvaged around: "
       "no clip covers them; empty when the whole video decoded; null in runs curated before it was recorded"),
    _f("run_id", pa.string(), "curation run that produced this row", False),
])

CLIPS = pa.schema([
    _f("clip_id", pa.string(), "video_id + ':' + start-end frame span; stable across runs", False),
    _f("video_id", pa.string(), "source video (videos.video_id)", False),
    _f("start_frame", pa.int64(), "first frame, 0-based, inclusive"),
    _f("end_frame", pa.int64(), "last frame, exclusive"),
    _f("start_s", pa.float64(), "start time in seconds"),
    _f("end_s", pa.float64(), "end time in seconds"),
    _f("frames", pa.int64(), "frame count of the span"),
    _f("duration", pa.float64(), "seconds"),
    _f("fps", pa.float64(), "source average frame rate"),
    _f("width", pa.int32(), "display width of the source"),
    _f("height", pa.int32(), "display height of the source"),
    _f("is_image", pa.bool_(), "one-frame clip from a still image"),
    _f("sharpness_min", pa.float32(), "lowest per-frame focus measure: var(Laplacian) / mean squared gradient of luma on a 256 px grid, in the sharpest quarter of the frame's detailed 32 px tiles (~0.35-1.1 in focus, < 0.2 blurred); low = a blurred frame"),
    _f("sharpness_low", pa.float32(), "10th percentile over the clip's frames (~4 fps) of the per-frame focus measure: what the prefilter's sharpness_min judges; a defocused or motion-blurred stretch pulls it down, one odd frame does not"),
    _f("sharpness_median", pa.float32(), "median per-frame focus measure"),
    _f("motion_mean", pa.float32(), "mean optical-flow speed, pixels per second at 256 px longer side, sampled at ~2 fps; ~0 for a static shot"),
    _f("motion_max", pa.float32(), "largest per-pair mean flow speed (same units as motion_mean)"),
    _f("pixel_change", pa.float32(), "median over frame pairs ~0.5 s apart of the share of pixels whose luma changes by more than 6 levels: ~0 (< 0.002) only for frozen footage (stills, slideshows), >= 0.01 for calm tripod or talking-head shots"),
    _f("overlay_score", pa.float32(), "static overlay evidence in [0,1] (logos, channel bugs, burned-in marks): the "
       "stronger of overlay_clip_score and overlay_video_score; what the overlay_max threshold reads"),
    _f("overlay_box", pa.list_(pa.float32()), "[x0, y0, x1, y1] of the static overlay behind overlay_score, as "
       "fractions of width/height; null when there is no evidence (score < 0.05)"),
    _f("overlay_clip_score", pa.float32(), "the clip's own overlay evidence: fine edges that persist in the frame "
       "while its content changes"),
    _f("overlay_video_score", pa.float32(), "the video's overlay evidence: edges that stay in place across its "
       "different scenes (videos.overlay_score); null for a video with fewer than two distinct scenes"),
    _f("overlay_video_box", pa.list_(pa.float32()), "[x0, y0, x1, y1] fractions of the video-level overlay; null "
       "when there is none"),
    _f("text_area_max", pa.float32(), "largest share of one frame covered by detected text boxes (PP-OCRv4 "
       "detection, ~1 fps frames, no recognition): subtitles, captions, title cards, marks; ~0 on clean footage"),
    _f("text_area_mean", pa.float32(), "mean share of the frame covered by text boxes over the sampled frames"),
    _f("text_boxes", pa.int32(), "most text boxes (lines or words) detected in one sampled frame"),
    _f("text_persistent_area", pa.float32(), "share of the frame covered by text that stays in place with the same "
       "glyphs across the clip (watermark, timestamp OSD, channel name; also a subtitle line held for the whole "
       "clip and scene text on a locked-off camera); 0 when text only comes and goes"),
    _f("text_persistent_box", pa.list_(pa.float32()), "[x0, y0, x1, y1] fractions: bounding box of the persistent "
       "text; null when no text persists"),
    _f("text_mark", pa.string(), "text read (PP-OCRv4 recognition, no detection box) in a corner of the clip's mean "
       "frame, at least 2 characters with a letter among them: a channel bug, fansub or copyright mark, also over "
       "content that does not change (digits alone, as a ticking timestamp, are text_persistent_area's); null when "
       "no corner reads as such"),
    _f("text_mark_confidence", pa.float32(), "mean character probability of text_mark (0 when nothing was read): "
       "marks 0.6-1, clean footage <= 0.36"),
    _f("text_mark_box", pa.list_(pa.float32()), "[x0, y0, x1, y1] fractions: where text_mark was read; null when "
       "nothing was"),
    _f("watermark_prob", pa.float32(), "watermark classifier probability (mean over sampled frames)"),
    _f("watermark_max", pa.float32(), "largest per-frame watermark probability"),
    _f("aesthetic_mean", pa.float32(), "LAION aesthetic score (about 1-10), mean over ~1 fps frames"),
    _f("aesthetic_min", pa.float32(), "lowest per-frame aesthetic score"),
    _f("caption", pa.string(), "dense caption written by the VLM; null when prefiltered"),
    _f("caption_model", pa.string(), "captioner model id"),
    _f("caption_tokens", pa.int32(), "generated tokens"),
    _f("caption_latency_s", pa.float32(), "seconds spent captioning this clip"),
    _f("caption_similarity", pa.float32(), "CLIP cosine similarity between the caption and the clip's frames"),
    _f("models", pa.map_(pa.string(), pa.string()), "stage -> model id used for this row (stand-ins are named 'standin:...')"),
    _f("stage_versions", pa.map_(pa.string(), pa.string()), "stage -> code version that computed its columns"),
    _f("reject_reasons", pa.list_(pa.string()), "why the clip is dropped at curation time; empty when kept", False),
    _f("preview_jpeg", pa.binary(), "JPEG strip of up to 3 frames across the span (1 for images), 128 px high, cut from the frames curation decoded anyway; what the report's contact sheets show; null in runs curated before previews were kept"),
    _f("run_id", pa.string(), "curation run that produced this row", False),
])

REJECTS = pa.schema([
    _f("uri", pa.string(), "input that could not be processed", False),
    _f("video_id", pa.string(), "content hash when the file could be read at all"),
    _f("stage", pa.string(), "stage that failed (probe, decode, scenecut, score, caption, ...)", False),
    _f("error_class", pa.string(), "exception class", False),
    _f("message", pa.string(), "what was expected and what came", False),
    _f("run_id", pa.string(), "curation run that recorded it", False),
])

SKIPPED = pa.schema([
    _f("uri", pa.string(), "directory entry under the input that is not media to curate (invalid UTF-8 bytes in a "
       "name are shown as \\xNN escapes)", False),
    _f("reason", pa.string(), "why it was not curated: extension (not an accepted media extension), broken_symlink, "
       "symlink_loop, not_a_file (FIFO, socket, device, a symlink to a folder: not followed), hidden (a dot-file or "
       "inside a dot-folder), vanished (gone between listing and reading), unreadable (permission denied)", False),
    _f("detail", pa.string(), "what was found: the extension, the link target, the file type or the OS error"),
    _f("run_id", pa.string(), "curation run that listed it", False),
])

# The reasons a directory entry can be skipped for (skipped.reason).
SKIP_REASONS = ("extension", "broken_symlink", "symlink_loop", "not_a_file", "hidden", "vanished", "unreadable")

RUNS = pa.schema([
    _f("run_id", pa.string(), "hash of the config and the input listing; a resumed run keeps its id", False),
    _f("started_at", pa.timestamp("us", tz="UTC"), "when this attempt started"),
    _f("finished_at", pa.timestamp("us", tz="UTC"), "when this attempt finished"),
    _f("wall_seconds", pa.float64(), "wall time of this attempt"),
    _f("input", pa.string(), "input folder or prefix"),
    _f("output", pa.string(), "output folder"),
    _f("config", pa.string(), "the full config as JSON"),
    _f("package_versions", pa.string(), "JSON of package -> version"),
    _f("counts", pa.string(), "JSON of counter -> value per stage (inputs, videos, clips, kept, rejects, resumed, ...)"),
    _f("standin_models", pa.bool_(), "true when tiny randomly initialised stand-ins replaced the real models"),
])

SHARDS = pa.schema([
    _f("shard", pa.string(), "tar path relative to the shard output folder", False),
    _f("bucket", pa.string(), "FxHxW", False),
    _f("frames", pa.int32(), "frames per sample (1 for images)"),
    _f("height", pa.int32(), "sample height"),
    _f("width", pa.int32(), "sample width"),
    _f("fps", pa.float32(), "bucket frame rate"),
    _f("num_samples", pa.int64(), "samples in the tar"),
    _f("bytes", pa.int64(), "tar size"),
    _f("output", pa.string(), "shard output folder"),
    _f("selection", pa.string(), "SQL WHERE over kept_clips that chose the clips"),
])

SHARD_SAMPLES = pa.schema([
    _f("key", pa.string(), "WebDataset __key__", False),
    _f("clip_id", pa.string(), "clips.clip_id", False),
    _f("video_id", pa.string(), "videos.video_id", False),
    _f("shard", pa.string(), "shards.shard", False),
    _f("bucket", pa.string(), "FxHxW", False),
    _f("output", pa.string(), "shard output folder"),
])

CHECKPOINTS = pa.schema([
    _f("checkpoint", pa.string(), "checkpoint folder (absolute path): the id of the checkpoint", False),
    _f("run", pa.string(), "training run name ([ray] name); its checkpoints share it", False),
    _f("stage", pa.string(), "which step of the recipe: vae_stage1, vae_stage2, dit, dit_hq, ...", False),
    _f("kind", pa.string(), "trainer that wrote it: vae or dit"),
    _f("step", pa.int64(), "optimizer steps the checkpoint holds"),
    _f("config", pa.string(), "the stage config as JSON"),
    _f("init_from", pa.string(), "checkpoint whose weights started this run (the previous stage); null from scratch"),
    _f("shards_output", pa.string(), "shard folder it trained on (shards.output / shard_samples.output)"),
    _f("shard_manifest_sha256", pa.string(), "sha256 of that folder's manifest.json when training started"),
    _f("buckets", pa.list_(pa.string()), "buckets (FxHxW) of that folder the stage drew from"),
    _f("selection", pa.string(), "SQL WHERE over kept_clips that chose the training clips"),
    _f("selection_rows", pa.int64(), "clips that WHERE selected when the stage was built"),
    _f("selection_sha256", pa.string(), "sha256 of the selected clip ids, sorted and newline-joined"),
    _f("metrics", pa.string(), "the last logged metrics as JSON (loss, tokens/s, ...)"),
    _f("registered_at", pa.timestamp("us", tz="UTC"), "when the checkpoint was registered"),
])

CHECKPOINT_CLIPS = pa.schema([
    _f("checkpoint", pa.string(), "checkpoints.checkpoint", False),
    _f("clip_id", pa.string(), "clips.clip_id of a sample the checkpoint's own stage trained on", False),
    _f("video_id", pa.string(), "videos.video_id", False),
    _f("bucket", pa.string(), "FxHxW it was trained at", False),
    _f("shard", pa.string(), "shard_samples.shard", False),
    _f("output", pa.string(), "shard_samples.output", False),
])

TABLES: dict[str, pa.Schema] = {
    "videos": VIDEOS,
    "clips": CLIPS,
    "rejects": REJECTS,
    "skipped": SKIPPED,
    "runs": RUNS,
    "shards": SHARDS,
    "shard_samples": SHARD_SAMPLES,
    "checkpoints": CHECKPOINTS,
    "checkpoint_clips": CHECKPOINT_CLIPS,
}


def empty(name: str) -> pa.Table:
    return TABLES[name].empty_table()


def to_table(name: str, rows: list[dict]) -> pa.Table:
    """Rows -> table with exactly the schema's columns; a key not in the schema is an error."""
    schema = TABLES[name]
    names = set(schema.names)
    for row in rows:
        extra = set(row) - names
        if extra:
            raise KeyError(f"table {name!r} has no column(s) {sorted(extra)}; columns are {schema.names}")
    cols = {f.name: [row.get(f.name) for row in rows] for f in schema}
    return pa.table(cols, schema=schema)
