"""Bounded load run of the web search server on loopback: p50/p99 latency and error count under concurrency.

    .venv/bin/python benchmarks/bench_server.py                      # 500 requests, 16 concurrent, 10k items
    .venv/bin/python benchmarks/bench_server.py --requests 2000 --concurrency 32

The server runs in its own process (as `--serve` would) over a tiny random ViT and a synthetic collection of
random unit vectors; the client mixes text searches, similar-by-id searches and image uploads. A summary
table is printed; with --report, results go to benchmarks/results/server.json and the "Web server" section
of BENCHMARKS.md, otherwise to a scratch folder.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import socket
import statistics
import sys
import time

import common
import httpx

from clipsearch.cli.common import DEFAULT_TOP_K, non_negative_int, positive_int

QUERIES = ("a red circle", "two blue squares", "a dog on the beach", "a yellow star on green", "city at night")
# Fractions of the request mix; uploads cost a full image-tower forward, so they are the rarer kind.
REQUEST_MIX = (("text", 0.60), ("similar", 0.25), ("image", 0.15))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=positive_int, default=500, help="total requests sent")
    parser.add_argument("--concurrency", type=positive_int, default=16, help="requests in flight at once")
    parser.add_argument("--warmup", type=non_negative_int, default=20, help="untimed requests sent first")
    parser.add_argument("--collection_size", type=positive_int, default=10_000, help="synthetic collection items")
    parser.add_argument("--top_k", type=positive_int, default=DEFAULT_TOP_K, help="results asked for per search")
    common.add_report_flags(parser)
    return parser.parse_args(argv)


def build_synthetic_engine(collection_size: int):
    """A tiny random ViT over `collection_size` random unit vectors: real model and searcher, no files."""
    import torch

    from clipsearch.models import build_from_spec
    from clipsearch.models.openai_clip import openai_clip_spec
    from clipsearch.search import SearchEngine, Searcher

    torch.manual_seed(0)
    bundle = build_from_spec(openai_clip_spec("ViT-Tiny-16"))
    bundle.model.eval()
    embeddings = torch.nn.functional.normalize(torch.randn(collection_size, bundle.embed_dim), dim=-1)
    paths = [f"synthetic/{index:06d}.jpg" for index in range(collection_size)]
    return SearchEngine(bundle, Searcher(paths, embeddings))


def run_server(port: int, collection_size: int) -> None:
    from clipsearch.server import make_server

    make_server(build_synthetic_engine(collection_size), "127.0.0.1", port, log_level="warning").run()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def upload_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.radial_gradient("L").convert("RGB").resize((160, 120)).save(buffer, format="JPEG")
    return buffer.getvalue()


def request_plan(count: int, collection_size: int) -> list[str]:
    """A fixed, interleaved sequence of request kinds in the REQUEST_MIX proportions."""
    plan, credit = [], dict.fromkeys((kind for kind, _ in REQUEST_MIX), 0.0)
    for _ in range(count):
        for kind, share in REQUEST_MIX:
            credit[kind] += share
        kind = max(credit, key=credit.get)
        credit[kind] -= 1.0
        plan.append(kind)
    return plan


async def send(client: httpx.AsyncClient, kind: str, number: int, collection_size: int, top_k: int, image: bytes):
    if kind == "text":
        return await client.get("/api/search", params={"q": f"{QUERIES[number % len(QUERIES)]} {number}", "top_k": top_k})
    if kind == "similar":
        return await client.get(f"/api/similar/{(number * 7919) % collection_size}", params={"top_k": top_k})
    files = {"image": ("query.jpg", image, "image/jpeg")}
    return await client.post("/api/search/image", params={"top_k": top_k}, files=files)


async def load_run(base_url: str, args: argparse.Namespace) -> dict:
    image = upload_bytes()
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as client:
        for number, kind in enumerate(request_plan(args.warmup, args.collection_size)):
            await send(client, kind, number, args.collection_size, args.top_k, image)

        gate = asyncio.Semaphore(args.concurrency)
        timings: dict[str, list[float]] = {kind: [] for kind, _ in REQUEST_MIX}
        failures: list[str] = []

        async def one(number: int, kind: str):
            async with gate:
                started = time.perf_counter()
                try:
                    response = await send(client, kind, number, args.collection_size, args.top_k, image)
                    if response.status_code != 200 or len(response.json()["results"]) != args.top_k:
                        failures.append(f"{kind}: HTTP {response.status_code} {response.text[:120]}")
                except (httpx.HTTPError, ValueError, KeyError) as error:
                    failures.append(f"{kind}: {type(error).__name__}: {error}")
                timings[kind].append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        plan = request_plan(args.requests, args.collection_size)
        await asyncio.gather(*(one(number, kind) for number, kind in enumerate(plan)))
        elapsed = time.perf_counter() - started
    return {"timings_ms": timings, "failures": failures, "elapsed_s": elapsed}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def wait_until_healthy(base_url: str, server: multiprocessing.Process, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.is_alive():
            raise RuntimeError(f"the server process exited with code {server.exitcode}")
        try:
            return httpx.get(base_url + "/api/health", timeout=2).json()
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"the server did not answer {base_url}/api/health within {timeout_s:.0f} s")


def report_markdown(results: dict) -> str:
    mix = ", ".join(f"{kind} {share:.0%}" for kind, share in results["request_mix"].items())
    model = results["model"]  # /api/health's description: a name, or a dict with the architecture
    model = model.get("architecture", model) if isinstance(model, dict) else model
    return common.report_section("Web server", results, [
        f"- {results['requests']} requests, {results['concurrency']} concurrent, on loopback; collection of "
        f"{results['collection_size']:,} random {results['embedding_dim']}-d vectors, model {model} "
        f"(random weights), top-{results['top_k']}; mix {mix}",
        "",
        *common.markdown_table(["p50 ms", "p99 ms", "mean ms", "max ms", "requests/s", "errors"], [[
            f"{results['p50_ms']:.1f}", f"{results['p99_ms']:.1f}", f"{results['mean_ms']:.1f}", f"{results['max_ms']:.1f}",
            f"{results['throughput_rps']:.1f}", results["errors"],
        ]], "rrrrrr"),
        "",
        *common.markdown_table(["request kind", "count", "p50 ms", "p99 ms"], [
            [kind, row["count"], f"{row['p50_ms']:.1f}", f"{row['p99_ms']:.1f}"] for kind, row in results["by_kind"].items()
        ], "lrrr"),
    ])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    header = common.run_header()
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    # A separate process keeps the client's own Python work from competing for the server's GIL.
    server = multiprocessing.get_context("spawn").Process(
        target=run_server, args=(port, args.collection_size), daemon=True
    )
    server.start()
    try:
        health = wait_until_healthy(base_url, server)
        run = asyncio.run(load_run(base_url, args))
    finally:
        server.terminate()
        server.join(timeout=10)

    every_timing = [value for values in run["timings_ms"].values() for value in values]
    results = {
        **header,
        "load_average_end": common.load_average(),
        "command": common.command_line("bench_server.py", argv),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "collection_size": health["collection_size"],
        "embedding_dim": health["embedding_dim"],
        "model": health["model"],
        "top_k": args.top_k,
        "request_mix": dict(REQUEST_MIX),
        "p50_ms": round(percentile(every_timing, 0.50), 2),
        "p99_ms": round(percentile(every_timing, 0.99), 2),
        "mean_ms": round(statistics.fmean(every_timing), 2),
        "max_ms": round(max(every_timing), 2),
        "throughput_rps": round(args.requests / run["elapsed_s"], 1),
        "errors": len(run["failures"]),
        "first_errors": run["failures"][:5],
        "by_kind": {
            kind: {
                "count": len(values),
                "p50_ms": round(percentile(values, 0.50), 2),
                "p99_ms": round(percentile(values, 0.99), 2),
            }
            for kind, values in run["timings_ms"].items()
            if values
        },
    }
    markdown = report_markdown(results)
    print(markdown)
    common.publish("server", results, markdown, args.report)
    for failure in results["first_errors"]:
        print(f"error: {failure}", file=sys.stderr)
    return results


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
