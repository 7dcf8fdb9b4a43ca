"""Loader benchmark, Python side (issue #5): test JPEGs and the Pillow baseline.

    python bench/loader_pil.py make DIR [N]   # N (50) photo-like 640x480 JPEGs, quality 90
    python bench/loader_pil.py bench DIR      # decode + letterbox 560 + CLIP normalise, 1 process

The baseline is what a PyTorch data loader worker does per image with Pillow and numpy:
`Image.open().convert("RGB")`, bicubic resize of the longer side to 560, paste on a black
560x560 canvas at the top left, then `(x / 255 - mean) / std` in float32, channels first.
Prints one JSON line, as the Rust bench (`worker/benches/loader.rs`) does.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 560
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32).reshape(3, 1, 1)
WIDTH, HEIGHT = 640, 480
PASSES = 3


def photo(rng: np.random.Generator) -> np.ndarray:
    """A 640x480 RGB image with a photo's mix of frequencies: smooth colour blobs,
    oriented texture, a few hard-edged objects and sensor-like noise."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    img = np.zeros((HEIGHT, WIDTH, 3), np.float32) + rng.uniform(40, 200, 3)
    for _ in range(6):
        cx, cy = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT)
        r = rng.uniform(60, 250)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-90, 90, 3)
    for _ in range(3):
        angle, period = rng.uniform(0, np.pi), rng.uniform(3, 40)
        wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
        img += wave[..., None] * rng.uniform(2, 18)
    for _ in range(4):
        x0, y0 = rng.integers(0, WIDTH - 40), rng.integers(0, HEIGHT - 40)
        w, h = rng.integers(20, 220), rng.integers(20, 180)
        img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make(out: Path, n: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240605)
    for i in range(n):
        Image.fromarray(photo(rng)).save(out / f"{i:04d}.jpg", quality=90)


def prepare(path: Path) -> np.ndarray:
    img = Image.open(path).convert("RGB")
    w, h = img.size
    scale = SIZE / max(w, h)
    resized = img.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
    canvas = Image.new("RGB", (SIZE, SIZE))
    canvas.paste(resized, (0, 0))
    x = np.asarray(canvas).transpose(2, 0, 1).astype(np.float32) / 255.0
    return (x - MEAN) / STD


def bench(folder: Path) -> None:
    files = sorted(folder.glob("*.jpg"))
    for f in files:  # warm-up: page cache, code paths
        prepare(f)
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(PASSES):
        for f in files:
            prepare(f)
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu
    images = PASSES * len(files)
    print(
        json.dumps(
            {
                "case": "pil.student_per_core",
                "images": images,
                "seconds": round(seconds, 4),
                "images_per_s": round(images / seconds, 2),
                "cpu_s": round(cpu, 4),
                "images_per_cpu_s": round(images / cpu, 2),
                "pillow": Image.__version__,
                "numpy": np.__version__,
            }
        )
    )


def main() -> None:
    command, folder = sys.argv[1], Path(sys.argv[2])
    if command == "make":
        make(folder, int(sys.argv[3]) if len(sys.argv) > 3 else 50)
    elif command == "bench":
        bench(folder)
    else:
        sys.exit(f"unknown command {command!r}")


if __name__ == "__main__":
    main()
