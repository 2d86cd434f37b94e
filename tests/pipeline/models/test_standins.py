from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.models.standins import MARKER, build_standins


def test_every_standin_is_named_as_one(standins):
    from pipeline.models.aesthetic import load_aesthetic
    from pipeline.models.captioner import load_captioner
    from pipeline.models.clipsim import load_clip_similarity
    from pipeline.models.watermark import load_watermark

    ids = [
        load_watermark(standins.watermark).model_id,
        load_aesthetic(standins.clip_model, standins.clip_pretrained, standins.aesthetic_mlp).model_id,
        load_clip_similarity(standins.clip_model, standins.clip_pretrained).model_id,
        load_captioner(standins.caption_config()).model_id,
    ]
    assert all(i.startswith("standin:") for i in ids), ids


def test_second_build_reuses_the_directory(standins):
    before = {p: p.stat().st_mtime_ns for p in Path(standins.root).rglob("*") if p.is_file()}
    again = build_standins(standins.root)
    assert again == standins
    assert {p: p.stat().st_mtime_ns for p in Path(standins.root).rglob("*") if p.is_file()} == before


def test_a_stale_recipe_is_rebuilt(tmp_path):
    root = tmp_path / "st"
    first = build_standins(root)
    marker = root / MARKER
    marker.write_text(json.dumps({"recipe": "older"}))
    rebuilt = build_standins(root)
    assert rebuilt == first
    assert json.loads(marker.read_text())["recipe"] != "older"
    assert Path(rebuilt.watermark).is_file() and Path(rebuilt.captioner, "config.json").is_file()


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="expected an empty or stand-in directory"):
        build_standins(root)
    assert (root / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"], "no temporary build directory may be left behind"


def _real_clips(media: Path) -> list:
    """Real footage as the pipeline hands it over: a ~1 fps sample of a video and a very wide photo, longer side 384."""
    import av
    import numpy as np
    from PIL import Image

    with av.open(str(media / "stream-of-water.webm")) as container:
        frames = [f.to_image() for f in container.decode(video=0)]
    picked = [frames[i] for i in (0, 30, 60, len(frames) - 1)]
    video = np.stack([np.asarray(im.resize((384, 288))) for im in picked])  # (4, 288, 384, 3)
    photo = Image.open(media / "leopard.jpg").convert("RGB")
    image = np.asarray(photo.resize((384, round(384 * photo.height / photo.width))))[None]  # (1, 128, 384, 3)
    return [video, image]


@pytest.mark.media
def test_real_footage_through_every_standin(standins, shared_media):
    import numpy as np

    from pipeline.models.aesthetic import load_aesthetic
    from pipeline.models.captioner import load_captioner
    from pipeline.models.clipsim import load_clip_similarity
    from pipeline.models.watermark import load_watermark

    clips = _real_clips(shared_media)
    watermark = load_watermark(standins.watermark)
    aesthetic = load_aesthetic(standins.clip_model, standins.clip_pretrained, standins.aesthetic_mlp)
    similarity = load_clip_similarity(standins.clip_model, standins.clip_pretrained)
    captions = load_captioner(standins.caption_config()).caption(clips)
    assert len(captions) == 2 and all(c.caption.strip() for c in captions)
    for clip, caption in zip(clips, captions, strict=True):
        probs = watermark.probs(clip)
        scores = aesthetic.scores(clip)
        assert probs.shape == scores.shape == (len(clip),)
        assert np.all((probs >= 0) & (probs <= 1)) and np.all(np.isfinite(scores))
        assert -1 <= similarity.similarity(clip, caption.caption) <= 1


@pytest.mark.gpu
def test_standins_on_cuda_match_cpu(standins, make_clip):
    import numpy as np

    from pipeline.models.aesthetic import load_aesthetic
    from pipeline.models.captioner import load_captioner
    from pipeline.models.watermark import load_watermark

    clip = make_clip(2, 96, 128, seed=30)
    cpu_wm, gpu_wm = load_watermark(standins.watermark), load_watermark(standins.watermark, device="cuda")
    np.testing.assert_allclose(gpu_wm.probs(clip), cpu_wm.probs(clip), atol=0.05)  # bf16 autocast on GPU
    args = (standins.clip_model, standins.clip_pretrained, standins.aesthetic_mlp)
    np.testing.assert_allclose(load_aesthetic(*args, device="cuda").scores(clip), load_aesthetic(*args).scores(clip), atol=0.05)
    [result] = load_captioner(standins.caption_config(), device="cuda").caption([clip])
    assert result.caption.strip() and result.tokens >= 1
