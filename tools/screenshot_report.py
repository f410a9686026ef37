"""Screenshot a report.html in headless Chromium, to check that its plots render in a real browser.

    python tools/screenshot_report.py runs/digits/report.html --out docs/img/report.png

Also extracts one embedded plot as its own PNG with ``--plot latency --plot-out docs/img/latency.png``.
"""

from __future__ import annotations

import argparse
import base64
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    return next((c for c in CHROMIUM_CANDIDATES if Path(c).exists()), None) or shutil.which("chromium")


def screenshot(html_path: Path, out_png: Path, *, width: int = 1100, height: int = 2400, timeout: float = 90.0) -> Path:
    """Render ``html_path`` to ``out_png``; raises RuntimeError with Chromium's output when it fails."""
    browser = find_chromium()
    if browser is None:
        raise RuntimeError(f"no Chromium found (looked at {list(CHROMIUM_CANDIDATES)}); on Debian: apt-get install -y chromium")
    html_path, out_png = Path(html_path).resolve(), Path(out_png).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(f"{html_path} does not exist")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [browser, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={out_png}", f"--window-size={width},{height}", html_path.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out_png.is_file():
        raise RuntimeError(f"chromium failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return out_png


def extract_plot(html_path: Path, plot: str, out_png: Path) -> Path:
    """Write the base64 PNG embedded as ``<img id="plot-<plot>">`` to ``out_png``."""
    match = re.search(rf'id="plot-{re.escape(plot)}"[^>]*src="data:image/png;base64,([^"]+)"', Path(html_path).read_text())
    if match is None:
        raise ValueError(f"{html_path} has no plot {plot!r}")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    out_png.write_bytes(base64.b64decode(match.group(1)))
    return out_png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("html", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="screenshot PNG")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=2400)
    parser.add_argument("--plot", help="also extract this embedded plot: latency, layers, sizes, accuracy")
    parser.add_argument("--plot-out", type=Path)
    args = parser.parse_args(argv)
    print(screenshot(args.html, args.out, width=args.width, height=args.height))
    if args.plot:
        print(extract_plot(args.html, args.plot, args.plot_out or args.out.with_name(f"{args.plot}.png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
