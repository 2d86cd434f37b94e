"""Headless Chromium for the HTML report tests (catalog report, the end-to-end job's training page).

``chromium()`` finds the browser or skips the test (tests/catalog/install_chromium.sh installs Debian's).
``render(page, work)`` opens a page the way a user's browser would and returns its screenshot with what the page
laid out: the boxes of its loss-curve SVGs and images, whether each image decoded, and every resource (image,
stylesheet, script) that failed to load.
"""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (tests/catalog/install_chromium.sh installs it)")
    return exe


# Put first in the page (after its doctype, so the layout mode is the page's own): resource errors do not bubble,
# so they are caught in the capture phase from the start; after load the boxes are read in page coordinates.
_PROBE = """<base href="{base}"><script>
const failedLoads = [];
addEventListener("error", e => {{ const t = e.target; if (t && t !== window) failedLoads.push(t.src || t.href || t.tagName); }}, true);
addEventListener("load", () => {{
  const box = e => {{ const b = e.getBoundingClientRect(); return [b.left + scrollX, b.top + scrollY, b.width, b.height]; }};
  document.body.dataset.probe = JSON.stringify({{
    page: [document.documentElement.scrollWidth, document.documentElement.scrollHeight],
    svgs: [...document.querySelectorAll("svg")].map(e => ({{cls: e.getAttribute("class") || "", box: box(e)}})),
    imgs: [...document.querySelectorAll("img")].map(e => ({{box: box(e), decoded: e.complete && e.naturalWidth > 0}})),
    failed: failedLoads,
  }});
}});
</script>"""


@dataclass(frozen=True)
class Rendered:
    pixels: np.ndarray  # (H, W, 3) int16, CSS pixels (device scale factor 1)
    page: tuple[int, int]  # scroll width and height
    svgs: list[dict]  # {"cls", "box": [left, top, width, height]} in document order
    imgs: list[dict]  # {"box", "decoded"}
    failed: list[str]  # resources that failed to load


def render(page: Path, work: Path, width: int = 1400) -> Rendered:
    from PIL import Image

    exe = chromium()
    work.mkdir(parents=True, exist_ok=True)
    text = page.read_text()
    doctype = re.match(r"\s*<!doctype[^>]*>", text, re.IGNORECASE)
    cut = doctype.end() if doctype else 0
    probe = work / "probe.html"  # a copy whose relative links still resolve against the page's folder
    probe.write_text(text[:cut] + _PROBE.format(base=page.parent.resolve().as_uri() + "/") + text[cut:])
    common = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={work / 'profile'}", "--virtual-time-budget=5000",
              "--force-device-scale-factor=1"]
    dom = subprocess.run([*common, f"--window-size={width},1000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120, check=False)
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'data-probe="([^"]*)"', dom.stdout)
    assert found is not None, f"the page never finished loading: {dom.stdout[:500]}"
    info = json.loads(html.unescape(found.group(1)))
    shot = work / "screenshot.png"
    height = int(info["page"][1])
    proc = subprocess.run([*common, f"--window-size={width},{height}", f"--screenshot={shot}", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    return Rendered(pixels, tuple(info["page"]), info["svgs"], info["imgs"], info["failed"])


def crop(pixels: np.ndarray, box: list[float]) -> np.ndarray:
    left, top, w, h = (int(round(v)) for v in box)
    return pixels[top:top + h, left:left + w]


def share_near(pixels: np.ndarray, colour: tuple[int, int, int], tol: int = 40) -> float:
    return float((np.abs(pixels - np.array(colour)).max(axis=-1) <= tol).mean())
