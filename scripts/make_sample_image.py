"""Draw the sample image fp-ray renders when no --image is given (fp_ray/assets/sample.png)."""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

W, H = 640, 480


def draw() -> Image.Image:
    im = Image.new("RGB", (W, H))
    d = ImageDraw.Draw(im)
    for y in range(H):  # sky to ground gradient
        t = y / H
        d.line([(0, y), (W, y)], fill=(int(90 + 120 * t), int(150 + 60 * t), int(235 - 120 * t)))
    d.ellipse([470, 50, 560, 140], fill=(255, 220, 120))
    d.polygon([(0, 330), (140, 180), (260, 300), (380, 160), (560, 320), (640, 260), (640, 480), (0, 480)], fill=(70, 110, 90))
    d.polygon([(330, 210), (380, 160), (430, 210)], fill=(240, 245, 250))
    d.rectangle([0, 380, W, H], fill=(60, 140, 70))
    d.rectangle([250, 300, 370, 390], fill=(200, 80, 60))
    d.polygon([(240, 300), (310, 250), (380, 300)], fill=(120, 50, 40))
    d.rectangle([295, 340, 325, 390], fill=(90, 60, 40))
    for x in range(20, W, 90):
        d.rectangle([x + 8, 405, x + 14, 440], fill=(90, 60, 40))
        d.ellipse([x - 6, 370, x + 28, 415], fill=(40, 100, 50))
    return im.filter(ImageFilter.SMOOTH)


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "fp_ray" / "assets" / "sample.png"
    draw().save(out, optimize=True)
    print(f"wrote {out}")
