"""Search an encoded image collection by text or by image, printing ranked paths and saving a contact sheet."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipsearch.model_reference import HELP, exit_on_bad_model

EPILOG = """\
Examples:
  bash 3_inference_search.sh --query "a red circle" --query "two stars"
  bash 3_inference_search.sh --image photo.jpg --top_k 10
  bash 3_inference_search.sh                      (interactive: type queries, empty line ends)
  bash 3_inference_search.sh --serve --port 8000  (web page and JSON API)
Each query's top-k thumbnails are saved as <out_dir>/<query>.png (image queries: image-<name>.png).
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="3_inference_search.sh",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--load_model", default="models/latest/best.ckpt", help=HELP)

    data = parser.add_argument_group("data")
    data.add_argument("--emb_path", default="dataset/sample/emb", help="folder of embedding shards to search")
    data.add_argument(
        "--index_path", default=None, help="faiss index to answer through (built by python -m clipsearch.index)"
    )
    data.add_argument("--fp16", action="store_true", help="hold the embeddings as float16: half the memory")

    query = parser.add_argument_group("queries")
    query.add_argument("--query", action="append", default=[], help="text query; repeat for several")
    query.add_argument("--image", action="append", default=[], help="image file to search by; repeatable")
    query.add_argument("--top_k", type=int, default=25, help="results per query")

    output = parser.add_argument_group("output")
    output.add_argument("--out_dir", default="outputs/search", help="folder for the result grids")
    output.add_argument("--thumb_size", type=int, default=160, help="thumbnail size in the grids, pixels")
    output.add_argument("--columns", type=int, default=5, help="thumbnails per grid row")

    server = parser.add_argument_group("server")
    server.add_argument("--serve", action="store_true", help="serve a search page and API instead of answering here")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    server.add_argument("--port", type=int, default=8000, help="port to listen on")

    args = parser.parse_args(argv)
    for name in ("top_k", "thumb_size", "columns"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.serve and (args.query or args.image):
        parser.error("--serve answers queries over HTTP; leave out --query/--image")
    return args


def format_hits(hits) -> str:
    return "\n".join(f"{rank:4d}  {hit.score:+.4f}  {hit.path}" for rank, hit in enumerate(hits, start=1))


def save_grid(hits, title: str, out_dir: Path, name: str, thumb_size: int = 160, columns: int = 5) -> Path:
    """Write the hits' contact sheet as <out_dir>/<name>.png; `name` must already be a safe file name."""
    from clipsearch.grid import make_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    grid_path = out_dir / f"{name}.png"
    # safe_filename already forbids separators; this guards against a future change to it.
    if grid_path.resolve().parent != out_dir.resolve():
        raise ValueError(f"refusing to write {grid_path} outside {out_dir}")
    labels = [f"{rank}. {hit.score:.3f} {Path(hit.path).name}" for rank, hit in enumerate(hits, start=1)]
    grid = make_grid([hit.path for hit in hits], labels, title=title, thumb_size=thumb_size, columns=columns)
    grid.save(grid_path)
    return grid_path


def answer_text(engine, query: str, args: argparse.Namespace) -> Path:
    from clipsearch.grid import safe_filename

    hits = engine.search_text([query], args.top_k)[0]
    print(f"\n{len(hits)} results for {query!r}:\n{format_hits(hits)}")
    grid_path = save_grid(hits, query, Path(args.out_dir), safe_filename(query), args.thumb_size, args.columns)
    print(f"grid: {grid_path}")
    return grid_path


def answer_image(engine, image_path: str, args: argparse.Namespace) -> Path | None:
    from clipsearch.data import DataReport, load_image
    from clipsearch.grid import safe_filename

    report = DataReport()
    image = load_image(image_path, report)
    if image is None:
        print(f"cannot search by {image_path}: {', '.join(report.skipped()) or 'unreadable'}", file=sys.stderr)
        return None
    hits = engine.search_image([image], args.top_k)[0]
    print(f"\n{len(hits)} results like {image_path}:\n{format_hits(hits)}")
    name = safe_filename("image-" + Path(image_path).stem)
    grid_path = save_grid(hits, f"like {image_path}", Path(args.out_dir), name, args.thumb_size, args.columns)
    print(f"grid: {grid_path}")
    return grid_path


def interactive(engine, args: argparse.Namespace) -> int:
    """Answer queries typed at a `Search: ` prompt until an empty line or end of input."""
    answered = 0
    while True:
        try:
            query = input("Search: ").strip()
        except EOFError:
            print()
            break
        if not query:
            break
        answer_text(engine, query, args)
        answered += 1
    return answered


def serve(engine, args: argparse.Namespace) -> None:
    try:
        from clipsearch.server import serve as serve_engine
    except ImportError as error:
        if error.name and error.name.startswith("clipsearch.server"):
            sys.exit("error: the web server (clipsearch.server) is not part of this installation")
        sys.exit(f"error: the web server needs the package {error.name!r}; install package/requirements.txt")
    serve_engine(engine, host=args.host, port=args.port)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    exit_on_bad_model(args.load_model)
    import torch

    from clipsearch.search import EmbeddingMismatchError, SearchEngine

    try:
        engine = SearchEngine.from_files(
            args.load_model,
            args.emb_path,
            index_path=args.index_path,
            dtype=torch.float16 if args.fp16 else torch.float32,
        )
    except (FileNotFoundError, EmbeddingMismatchError, ValueError) as error:
        if argv is not None:  # called from Python (tests, notebooks): let the caller see the exception
            raise
        sys.exit(f"error: {error}")
    print(f"searching {len(engine.searcher)} images in {args.emb_path}", file=sys.stderr)
    if args.serve:
        serve(engine, args)
        return
    if not args.query and not args.image:
        interactive(engine, args)
        return
    for query in args.query:
        answer_text(engine, query, args)
    for image_path in args.image:
        answer_image(engine, image_path, args)


if __name__ == "__main__":
    main()
