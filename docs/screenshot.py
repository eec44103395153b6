"""Redraw docs/web-search.png: the search page over the encoded sample data, in headless Chromium.

    bash 1_pretrain_our.sh && bash 2_inference_encode.sh
    .venv/bin/python docs/screenshot.py --query "a small red circle on the left"
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from urllib.parse import urlencode

from playwright.sync_api import sync_playwright

from clipsearch.search import SearchEngine
from clipsearch.server import serve_in_background

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_web_e2e import CHROMIUM_ARGS  # noqa: E402 - the browser flags the end-to-end test uses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load_model", default=str(REPO / "models/latest/best.ckpt"), help="query model")
    parser.add_argument("--emb_path", default=str(REPO / "dataset/sample/emb"), help="encoded collection")
    parser.add_argument("--query", default="a small red circle on the left", help="text typed into the page")
    parser.add_argument("--top_k", type=int, default=12, help="results shown")
    parser.add_argument("--out", default=str(REPO / "docs/web-search.png"), help="PNG to write")
    args = parser.parse_args()
    engine = SearchEngine.from_files(args.load_model, args.emb_path)
    with serve_in_background(engine) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.goto(f"{url}/?{urlencode({'q': args.query, 'top_k': args.top_k})}")
        page.wait_for_function(
            "n => { const images = [...document.querySelectorAll('#results .card img')];"
            " return images.length === n && images.every(i => i.complete && i.naturalWidth > 0); }",
            arg=args.top_k,
        )
        page.mouse.move(5, 5)
        page.screenshot(path=args.out)
        browser.close()
    print("saved", args.out)


if __name__ == "__main__":
    main()
