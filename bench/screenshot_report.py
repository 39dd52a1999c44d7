"""Render a run report in a real headless browser and save a full-page screenshot.

    python bench/screenshot_report.py runs/quickstart                    # -> runs/quickstart/report.png
    python bench/screenshot_report.py runs/quickstart/report.html --out docs/report.png --width 1280
    make report-screenshot RUN=runs/quickstart OUT=docs/report.png

The browser is the first found of: Playwright for Python (`pip install playwright`, in the
`bench` extra) driving its own Chromium (`playwright install chromium`) or, where that was never
downloaded, a Chromium or Chrome on PATH (e.g. Debian's `apt-get install chromium`); else a
Chromium, Chrome, Firefox or wkhtmltoimage executable alone. Driven by Playwright the page is also
checked: every section heading (h2) is laid out with a non-zero size, and no request leaves the
file (any http(s) request is blocked and counted; the report must need none); the command exits 1
when either check fails. Executables alone only take the screenshot. With no browser at all the
command says so and exits with status 3 (tests skip on it).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUMS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
EXECUTABLES = (*CHROMIUMS, "firefox", "wkhtmltoimage")
NO_BROWSER = 3
PLAYWRIGHT = "playwright"


def find_browser() -> str | None:
    """'playwright' when Playwright and its own Chromium are installed; 'playwright:EXE' when
    Playwright is installed and a Chromium or Chrome EXE is on PATH (Playwright drives any recent
    Chromium); else the first executable of EXECUTABLES on PATH; else None."""
    system_chromium = next((shutil.which(name) for name in CHROMIUMS if shutil.which(name)), None)
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            if Path(p.chromium.executable_path).exists():
                return PLAYWRIGHT
        if system_chromium:
            return f"{PLAYWRIGHT}:{system_chromium}"
    except Exception:  # noqa: BLE001 - not installed, or no browser it can start
        pass
    return next((shutil.which(name) for name in EXECUTABLES if shutil.which(name)), None)


def _with_playwright(page_file: Path, out: Path, width: int, executable: str | None = None) -> dict:
    from playwright.sync_api import sync_playwright

    external: list[str] = []
    with sync_playwright() as p:
        # A system Chromium started by Playwright: sandbox off (it may run as root in a container)
        # and no background traffic of its own (update checks and the like), so that every request
        # counted below is the page's.
        options = {} if executable is None else {"executable_path": executable, "args": [
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"]}
        browser = p.chromium.launch(**options)
        page = browser.new_page(viewport={"width": width, "height": 900})

        def block(route):
            external.append(route.request.url)
            route.abort()

        # A predicate rather than a glob: Playwright's globs do not match a wildcard in the scheme.
        page.route(lambda url: url.startswith(("http://", "https://")), block)
        page.goto(page_file.resolve().as_uri())
        sections = page.eval_on_selector_all(
            "h2", "els => els.map(e => [e.textContent, e.getBoundingClientRect().height > 0])")
        page.screenshot(path=str(out), full_page=True)
        browser.close()
    return {"external_requests": external, "sections": sections}


def _with_executable(exe: str, page_file: Path, out: Path, width: int) -> dict:
    url = page_file.resolve().as_uri()
    name = Path(exe).name
    if name == "wkhtmltoimage":
        cmd = [exe, "--quiet", "--width", str(width), "--disable-javascript", str(page_file), str(out)]
    elif name == "firefox":
        cmd = [exe, "--headless", "--window-size", f"{width},6000", "--screenshot", str(out.resolve()), url]
    else:  # Chromium and Chrome
        cmd = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--window-size={width},6000", f"--screenshot={out.resolve()}", url]
    with tempfile.TemporaryDirectory() as profile:  # no state of the user's browser is read or written
        env_cmd = cmd + ([f"--user-data-dir={profile}"] if name not in ("wkhtmltoimage", "firefox") else [])
        subprocess.run(env_cmd, check=True, timeout=120, capture_output=True)
    return {"external_requests": None, "sections": None}


def screenshot(report: Path, out: Path, width: int = 1280, browser: str | None = None) -> dict:
    """Screenshot `report` (a report.html, or a run directory holding one) into `out`; returns what
    the browser saw (external requests and the sections' visibility, with Playwright only)."""
    page_file = report / "report.html" if report.is_dir() else report
    if not page_file.is_file():
        raise FileNotFoundError(f"{page_file}: no report (write one with `posttrain report RUN_DIR`)")
    browser = browser or find_browser()
    if browser is None:
        raise LookupError("no headless browser found: install Playwright's Chromium (pip install playwright && "
                          f"playwright install chromium) or one of {', '.join(EXECUTABLES)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if browser.startswith(PLAYWRIGHT):
        seen = _with_playwright(page_file, out, width, browser.partition(":")[2] or None)
    else:
        seen = _with_executable(browser, page_file, out, width)
    if not out.is_file() or out.stat().st_size == 0:
        raise RuntimeError(f"{browser} wrote no screenshot to {out}")
    return {"browser": browser, **seen}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="a run directory or its report.html")
    parser.add_argument("--out", type=Path, help="PNG to write (default: report.png beside the report)")
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args(argv)
    out = args.out or (args.report if args.report.is_dir() else args.report.parent) / "report.png"
    try:
        seen = screenshot(args.report, out, args.width)
    except LookupError as e:
        print(f"screenshot_report: {e}", file=sys.stderr)
        return NO_BROWSER
    print(f"{seen['browser']}: wrote {out}")
    if seen["sections"] is not None:
        hidden = [title for title, visible in seen["sections"] if not visible]
        print(f"sections: {len(seen['sections'])}, hidden: {hidden or 'none'}; "
              f"external requests: {len(seen['external_requests'])}")
        if hidden or seen["external_requests"]:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
