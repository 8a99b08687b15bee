"""Reward and KL curves of a PPO / GRPO run, from its metrics.jsonl, as one PNG.

  python scripts/ppo_curves.py RUN_DIR OUT.png [--keys reward_mean kl]

Uses matplotlib when it is installed; otherwise draws the panels itself (numpy + zlib, a
3x5 pixel font for the labels), so it needs nothing beyond jaxalign's own dependencies.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import zlib
from pathlib import Path

import numpy as np


def read_curves(run_dir: str | Path, keys) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"ppo_curves: {path} does not exist")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"ppo_curves: {path} has no records")
    missing = [k for k in keys if k not in rows[0]]
    if missing:
        raise SystemExit(f"ppo_curves: {path} has no {missing}; keys: {sorted(rows[0])}")
    steps = np.array([r["step"] for r in rows], float)
    return steps, {k: np.array([r.get(k, math.nan) for r in rows], float) for k in keys}


# ----------------------------------------------------------------------------- PNG fallback

_FONT = {  # 3x5 glyphs, rows top to bottom, '#' = ink
    "0": "###,#.#,#.#,#.#,###", "1": ".#.,##.,.#.,.#.,###", "2": "###,..#,###,#..,###",
    "3": "###,..#,###,..#,###", "4": "#.#,#.#,###,..#,..#", "5": "###,#..,###,..#,###",
    "6": "###,#..,###,#.#,###", "7": "###,..#,.#.,.#.,.#.", "8": "###,#.#,###,#.#,###",
    "9": "###,#.#,###,..#,###", ".": "...,...,...,...,.#.", "-": "...,...,###,...,...",
    "_": "...,...,...,...,###", " ": "...,...,...,...,...", "/": "..#,..#,.#.,#..,#..",
    "A": ".#.,#.#,###,#.#,#.#", "B": "##.,#.#,##.,#.#,##.", "C": "###,#..,#..,#..,###",
    "D": "##.,#.#,#.#,#.#,##.", "E": "###,#..,##.,#..,###", "F": "###,#..,##.,#..,#..",
    "G": "###,#..,#.#,#.#,###", "H": "#.#,#.#,###,#.#,#.#", "I": "###,.#.,.#.,.#.,###",
    "J": "..#,..#,..#,#.#,###", "K": "#.#,##.,#..,##.,#.#", "L": "#..,#..,#..,#..,###",
    "M": "#.#,###,###,#.#,#.#", "N": "##.,#.#,#.#,#.#,#.#", "O": "###,#.#,#.#,#.#,###",
    "P": "###,#.#,###,#..,#..", "Q": "###,#.#,#.#,###,..#", "R": "##.,#.#,##.,#.#,#.#",
    "S": "###,#..,###,..#,###", "T": "###,.#.,.#.,.#.,.#.", "U": "#.#,#.#,#.#,#.#,###",
    "V": "#.#,#.#,#.#,#.#,.#.", "W": "#.#,#.#,###,###,#.#", "X": "#.#,#.#,.#.,#.#,#.#",
    "Y": "#.#,#.#,.#.,.#.,.#.", "Z": "###,..#,.#.,#..,###",
}


def _text(img: np.ndarray, x: int, y: int, text: str, scale: int = 2, color=(0, 0, 0)) -> None:
    for ch in text.upper():
        glyph = _FONT.get(ch, _FONT[" "]).split(",")
        for r, row in enumerate(glyph):
            for c, on in enumerate(row):
                if on == "#":
                    img[y + r * scale:y + (r + 1) * scale, x + c * scale:x + (c + 1) * scale] = color
        x += 4 * scale


def _line(img: np.ndarray, x0, y0, x1, y1, color) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.linspace(x0, x1, n).round().astype(int)
    ys = np.linspace(y0, y1, n).round().astype(int)
    h, w = img.shape[:2]
    for dx in (0, 1):  # two pixels wide
        ok = (xs + dx < w) & (ys < h) & (xs >= 0) & (ys >= 0)
        img[ys[ok], xs[ok] + dx] = color


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _panel(img, x0, y0, w, h, steps, values, title, color) -> None:
    img[y0:y0 + h, x0] = img[y0 + h - 1, x0:x0 + w] = (0, 0, 0)        # axes
    _text(img, x0 + 8, y0 - 16, title)
    ok = np.isfinite(values)
    if not ok.any():
        return
    lo, hi = float(values[ok].min()), float(values[ok].max())
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    s_lo, s_hi = float(steps.min()), float(max(steps.max(), steps.min() + 1))
    px = lambda s: x0 + 2 + (s - s_lo) / (s_hi - s_lo) * (w - 6)
    py = lambda v: y0 + h - 3 - (v - lo) / (hi - lo) * (h - 6)
    for frac in (0.25, 0.5, 0.75):                                      # light grid
        img[int(py(lo + frac * (hi - lo))), x0 + 1:x0 + w:4] = (200, 200, 200)
    pts = [(px(s), py(v)) for s, v in zip(steps[ok], values[ok])]
    for (a, b), (c, d) in zip(pts, pts[1:]):
        _line(img, a, b, c, d, color)
    _text(img, x0 - 6 - 8 * len(_fmt(hi)), y0, _fmt(hi))
    _text(img, x0 - 6 - 8 * len(_fmt(lo)), y0 + h - 10, _fmt(lo))
    _text(img, x0, y0 + h + 6, _fmt(s_lo))
    _text(img, x0 + w - 8 * len(_fmt(s_hi)), y0 + h + 6, _fmt(s_hi))


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """An 8-bit RGB PNG: signature, IHDR, one zlib IDAT (filter 0 per row), IEND."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[r].astype(np.uint8).tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n"
                           + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def plot_plain(steps, curves: dict, out: str | Path, title: str) -> None:
    panel_w, panel_h, left, top, gap = 520, 220, 90, 60, 70
    n = len(curves)
    img = np.full((top + n * (panel_h + gap), left + panel_w + 30, 3), 255, np.uint8)
    _text(img, left, 14, title[:60], scale=3)
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    for i, (key, values) in enumerate(curves.items()):
        _panel(img, left, top + i * (panel_h + gap), panel_w, panel_h, steps, values,
               f"{key} / iteration", colors[i % len(colors)])
    write_png(out, img)


def plot_matplotlib(steps, curves: dict, out: str | Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(curves), 1, figsize=(7, 2.8 * len(curves)), sharex=True)
    for ax, (key, values) in zip(np.atleast_1d(axes), curves.items()):
        ax.plot(steps, values)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[-1].set_xlabel("iteration")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("out")
    ap.add_argument("--keys", nargs="+", default=["reward_mean", "kl"])
    args = ap.parse_args(argv)
    steps, curves = read_curves(args.run_dir, args.keys)
    title = Path(args.run_dir).resolve().name
    try:
        plot_matplotlib(steps, curves, args.out, title)
    except ImportError:
        plot_plain(steps, curves, args.out, title)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
