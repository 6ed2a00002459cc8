"""Write scikit-learn's 8x8 handwritten digits as an image folder, one subfolder per class:

  python recipes/make_digits_folder.py                  # data/digits-folder/<digit>/<n>.png
  python recipes/make_digits_folder.py --size 32 --format jpg --copies 10 --out data/digits-32

1,797 grey PNGs by default (values 0..16 scaled to 0..255). `--size` upscales each image
(nearest, so the digit stays crisp), `--copies K` writes each digit K times with a different
whole-pixel shift (a larger folder for benchmarks), `--format jpg` writes JPEGs. The output is
deterministic; `data/` is git-ignored. recipes/digits_folder_lazy.yaml trains on it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def write_digits(
    out: Path, size: int = 8, copies: int = 1, fmt: str = "png", limit: int | None = None
) -> int:
    """Write the folder (the first `limit` digits only, if given); returns the file count."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images[:limit] * (255 / 16)).astype(np.uint8)  # [N, 8, 8]
    written, opts = 0, ({"quality": 90} if fmt == "jpg" else {})
    for label in range(10):
        (out / str(label)).mkdir(parents=True, exist_ok=True)
    for copy in range(copies):
        dy, dx = (copy // 3) % 3 - 1, copy % 3 - 1  # copy 0: unshifted; then the 8 neighbours
        for n, (img, label) in enumerate(zip(pixels, digits.target[:limit], strict=True)):
            shifted = np.roll(img, (dy, dx), axis=(0, 1)) if copy else img
            pic = Image.fromarray(shifted)  # uint8 2-D: grey (L)
            if size != 8:
                pic = pic.resize((size, size), Image.Resampling.NEAREST)
            name = f"{n:05d}" if copies == 1 else f"{n:05d}_{copy:03d}"
            pic.save(out / str(label) / f"{name}.{fmt}", **opts)
            written += 1
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/digits-folder", help="output directory")
    parser.add_argument("--size", type=int, default=8, help="side of the written images")
    parser.add_argument("--copies", type=int, default=1, help="shifted copies of each digit")
    parser.add_argument("--format", default="png", choices=["png", "jpg"])
    parser.add_argument("--limit", type=int, default=None, help="the first N digits only")
    args = parser.parse_args(argv)
    n = write_digits(Path(args.out), args.size, args.copies, args.format, args.limit)
    print(f"wrote {n} images to {args.out}/<digit>/")


if __name__ == "__main__":
    main()
