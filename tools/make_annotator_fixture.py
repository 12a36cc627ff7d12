#!/usr/bin/env python3
"""Generate the ControlNet annotator fixture: tests/fixtures/annotators/.

Draws one small deterministic test image and runs the SD web UI ControlNet extension's
(sd-webui-controlnet, ``scripts/processor.py`` / ``annotator/canny``) preprocessors on it with
OpenCV, exactly as the extension calls them (without the resize to the processor resolution,
which Studio does separately), so ``tests/tests/annotators.rs`` can compare Studio's pure-Rust
``studio_inference::diffusion::annotators`` with them:

* ``input.png``: a 96x80 RGB image: a gradient background, filled shapes and lines in different
  colours (so that the strongest gradient comes from a different channel in different places),
  thin dark strokes (for the scribble lines), plus mild noise from a seeded numpy RNG;
* ``canny_100_200.png`` / ``canny_50_120.png``: ``cv2.Canny(img, low, high)`` on the 3-channel
  RGB image (the extension's ``apply_canny``), single channel, 255 = edge;
* ``scribble_xdog_32.png``: the extension's ``scribble_xdog`` with ``thr_a = 32`` (difference of
  ``cv2.GaussianBlur`` of the float32 image with sigma 0.5 and 5.0, minimum over channels,
  thresholded with the extension's own uint8 arithmetic), single channel, 255 = line.

Run from the repository root with numpy and opencv-python-headless installed:

    python3 tools/make_annotator_fixture.py
"""

from pathlib import Path

import cv2
import numpy as np

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "annotators"
W, H = 96, 80


def draw_input() -> np.ndarray:
    """The test image, RGB uint8 (H, W, 3)."""
    rng = np.random.default_rng(20240611)
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.zeros((H, W, 3), np.float64)
    img[..., 0] = 40 + 120 * xx / (W - 1)  # red ramps left to right
    img[..., 1] = 60 + 80 * yy / (H - 1)  # green ramps top to bottom
    img[..., 2] = 150
    img = img.astype(np.uint8)
    # Drawn in RGB order (cv2 only sees three channels).
    cv2.rectangle(img, (8, 6), (38, 30), (230, 40, 40), thickness=-1)  # red square
    cv2.circle(img, (66, 24), 15, (30, 200, 60), thickness=-1)  # green disc
    cv2.ellipse(img, (30, 58), (20, 11), 25, 0, 360, (40, 60, 220), thickness=-1)  # blue ellipse
    pts = np.array([[58, 50], [90, 46], [82, 74], [60, 70]], np.int32)
    cv2.fillPoly(img, [pts], (200, 200, 60))  # yellow quad
    cv2.line(img, (2, 40), (93, 36), (20, 20, 20), thickness=1)  # thin dark stroke
    cv2.line(img, (48, 2), (52, 77), (10, 10, 120), thickness=2)  # navy stroke
    cv2.line(img, (4, 76), (40, 44), (250, 250, 250), thickness=1)  # light stroke
    cv2.circle(img, (20, 18), 6, (250, 220, 30), thickness=1)  # ring inside the square
    noise = rng.normal(0.0, 4.0, size=img.shape)
    return np.clip(img.astype(np.float64) + noise, 0, 255).round().astype(np.uint8)


def scribble_xdog(img: np.ndarray, thr_a: float) -> np.ndarray:
    """sd-webui-controlnet's ``scribble_xdog``, without its resize and pad."""
    g1 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    result = np.zeros_like(img, dtype=np.uint8)
    result[2 * (255 - dog) > thr_a] = 255
    return result


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    img = draw_input()

    def save(name: str, arr: np.ndarray) -> None:
        # cv2.imwrite takes BGR; a single channel is written as grey.
        if arr.ndim == 3:
            arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
        assert cv2.imwrite(str(OUT / name), arr), name

    save("input.png", img)
    for low, high in [(100, 200), (50, 120)]:
        edges = cv2.Canny(img, low, high)
        print(f"canny {low}/{high}: {int((edges > 0).sum())} edge pixels")
        save(f"canny_{low}_{high}.png", edges)
    xdog = scribble_xdog(img, 32)
    print(f"scribble_xdog 32: {int((xdog[..., 0] > 0).sum())} line pixels")
    save("scribble_xdog_32.png", np.ascontiguousarray(xdog[..., 0]))
    print(f"cv2 {cv2.__version__}, numpy {np.__version__}: wrote {OUT}")


if __name__ == "__main__":
    main()
