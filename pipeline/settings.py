"""Config sections of a curation run. Each part of the pipeline reads only its own section."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catalog.config import ConfigError, from_dict, load_toml


@dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """[decode]: the one downscaled frame stream every per-clip stage shares."""

    max_side: int = 384          # longer side of the analysis frames handed to scorers and models
    analysis_fps: float = 4.0    # frames kept per second for sharpness / overlay (scene cut sees every frame)
    motion_fps: float = 2.0      # optical flow runs on this subset
    model_fps: float = 1.0       # frames per second handed to watermark / aesthetic models
    model_frames_max: int = 8    # cap on frames per clip sent to model stages (captioner picks from these)
    # auto/pyav: one PyAV pass that feeds the scene detector from the YUV planes and converts only the
    # kept frames (fastest here); decord: decord's RGB frames for everything (plain CFR H.264/HEVC mp4 only)
    backend: str = "auto"
    # libavcodec threads of the analysis decode. 0: by frame size (one thread up to SINGLE_THREAD_MAX_PIXELS, FFmpeg's
    # frame threads, one per CPU of the machine, above); 1: always one thread (least CPU per frame: for a node whose
    # every CPU runs its own task); N > 1: N frame threads.
    threads: int = 0
    # OpenCV's worker threads in the process running the analysis (cv2.setNumThreads is per process: a Ray analysis
    # task sets it for its worker). The analysis runs its decode, conversions and scoring in threads of its own, so
    # OpenCV's pool (one thread per CPU) on top only oversubscribes the task's CPUs: bench/curate_cpu.py's clip,
    # 10 paired runs, 1 thread against OpenCV's 2: 3.5 % less CPU, 2 % less wall time, the same scores. 0 leaves
    # OpenCV's own setting.
    opencv_threads: int = 1
    # Largest video frame (width x height, coded) the analysis decodes; a larger one is a `probe` reject before
    # any frame is decoded (one 16000x16000 frame is 384 MB of YUV, and a decoder holds several). Below it every
    # frame is shrunk to max_side as it is decoded, so what the analysis holds does not grow with the source size.
    # Default: 8K DCI (8192x4320). Still images have their own limit in pipeline.media.
    max_pixels: int = 8192 * 4320

    def __post_init__(self) -> None:
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ConfigError(f"[decode] threads: expected an integer >= 0 (0: by frame size), got {self.threads!r}")
        if not isinstance(self.opencv_threads, int) or self.opencv_threads < 0:
            raise ConfigError(f"[decode] opencv_threads: expected an integer >= 0 (0: OpenCV's own setting), got "
                              f"{self.opencv_threads!r}")


@dataclass(frozen=True, kw_only=True)
class PrefilterConfig:
    """[prefilter]: curation-time cut-offs. A clip failing any gets a reject reason and skips later model stages.

    None disables a cut-off (the score is still recorded). The catalog's `thresholds` table is where the
    final "kept" decision lives; these only decide where model time is spent.
    """

    # Lowest clips.sharpness_low kept (10th percentile over frames of the sharpest-tiles focus measure): in-focus
    # real footage 0.37-1.14 on the development set, 3 px defocus 0.09-0.18 (pipeline.scoring.sharpness).
    sharpness_min: float | None = 0.25
    # "static" = frozen: lowest clips.pixel_change kept (share of pixels changing between frames ~0.5 s apart);
    # stills <= 0.0004, calm tripod / webcam footage >= 0.014 on the development set.
    change_min: float | None = 0.002
    # "calm": lowest clips.motion_mean (px/s) kept. Off: talking heads and tripod shots (0.3-1 px/s) are wanted.
    motion_min: float | None = None
    motion_max: float | None = None
    overlay_max: float | None = 0.5
    # OCR stage (PP-OCRv4 text detection): share of the frame covered by text in any sampled frame (subtitles,
    # captions, title cards), and share covered by text that stays in place across the clip (watermark, OSD)
    text_area_max: float | None = 0.02
    text_persistent_max: float | None = 0.003
    # ...and the confidence of text read in a corner of the clip's mean frame (PP-OCRv4 recognition, 2+ characters
    # with a letter):
    # marks over static content read at 0.62-0.98 on the logo dev set, clean footage at <= 0.36.
    text_mark_max: float | None = 0.5
    watermark_max: float | None = 0.8
    aesthetic_min: float | None = 4.0
    caption_similarity_min: float | None = None


@dataclass(frozen=True, kw_only=True)
class ModelsConfig:
    """[models]: where model weights come from. Local paths or hub ids, loaded through the real loaders."""

    standins: bool = True               # build tiny random stand-ins locally and use them instead of the names below
    standin_dir: str = ""               # default: <output>/_standins
    device: str = "auto"                # auto | cpu | cuda
    num_gpus: float = 0.0               # GPUs per model actor (fractions share a GPU)
    watermark: str = "laion/watermark-detector-efficientnet-b3a"
    clip_model: str = "ViT-L-14-quickgelu"
    clip_pretrained: str = "openai"
    aesthetic_mlp: str = "sac+logos+ava1-l14-linearMSE.pth"


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    """[ray]: how the run is laid out on the cluster."""

    address: str = ""            # empty: RAY_ADDRESS if set (ray job submit sets it), else an in-process cluster
    task_cpus: float = 1.0       # per decode+score task
    actor_cpus: float = 0.2      # per model actor: fractional so one decode task and five actors fit on 2 CPUs
    actors_per_stage: int = 1
    batch_size: int = 8          # clips per model batch


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """[run]: what to curate and which stages to run after the CPU stage."""

    input: str = ""              # empty: generate the built-in sample into <output>/sample_input
    output: str = "out/curate"
    stages: tuple[str, ...] = ("ocr", "watermark", "aesthetic", "caption", "caption_qa")
    extensions: tuple[str, ...] = (
        ".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".m4a", ".jpg", ".jpeg", ".png", ".webp",
        ".gif", ".avif", ".heic", ".heif",
    )
    register_catalog: bool = True


SECTIONS = ("run", "decode", "scenecut", "prefilter", "models", "caption", "ray")


@dataclass(frozen=True, kw_only=True)
class CurateConfig:
    run: RunConfig = field(default_factory=RunConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    scenecut: Any = None
    prefilter: PrefilterConfig = field(default_factory=PrefilterConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    caption: Any = None
    ray: RayConfig = field(default_factory=RayConfig)

    @staticmethod
    def from_mapping(data: dict[str, Any]) -> CurateConfig:
        from pipeline.models.captioner import CaptionConfig
        from pipeline.scenecut import SceneCutConfig

        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown section(s) {unknown}; expected some of {list(SECTIONS)}")
        return CurateConfig(
            run=from_dict(RunConfig, data.get("run", {}), where="run"),
            decode=from_dict(DecodeConfig, data.get("decode", {}), where="decode"),
            scenecut=from_dict(SceneCutConfig, data.get("scenecut", {}), where="scenecut"),
            prefilter=from_dict(PrefilterConfig, data.get("prefilter", {}), where="prefilter"),
            models=from_dict(ModelsConfig, data.get("models", {}), where="models"),
            caption=from_dict(CaptionConfig, data.get("caption", {}), where="caption"),
            ray=from_dict(RayConfig, data.get("ray", {}), where="ray"),
        )

    @staticmethod
    def load(path: str | Path | None, overrides: dict[str, dict[str, Any]] | None = None) -> CurateConfig:
        data = load_toml(path) if path else {}
        for section, values in (overrides or {}).items():
            data.setdefault(section, {}).update(values)
        return CurateConfig.from_mapping(data)
