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
