"""Search an encoded image collection by text or by image, printing ranked paths and saving a contact sheet."""
from __future__ import annotations

import argparse
import errno
import io
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from clipsearch.cli.common import (
    DEFAULT_EMB_PATH,
    DEFAULT_OUTPUTS_DIR,
    DEFAULT_TOP_K,
    CommandParser,
    UserError,
    model_for,
    non_negative_int,
    positive_int,
    recorded_dataset,
    run_command,
)
from clipsearch.fields import CONDITION_HELP
from clipsearch.model_reference import HELP as LOAD_MODEL_HELP
from clipsearch.model_reference import check_model_reference
from clipsearch.query_terms import COMBINE_HELP
from clipsearch.tars import is_remote, list_tars, looks_like_tars

EPILOG = """\
Examples:
  bash 3_inference_search.sh --query "a red circle" --query "two stars"
  bash 3_inference_search.sh --image photo.jpg --top_k 10
  bash 3_inference_search.sh --query "a dog" --add ./beach.jpg --subtract grass   (one combined query)
  bash 3_inference_search.sh --query "2:golden retriever" --add pool.jpg --where "taken>=2023-06-01"
  bash 3_inference_search.sh --query "a dog" --where "path~*/2023/*" --where "caption!~*cat*"
  bash 3_inference_search.sh --query "a dog" --json --no_grid   (one JSON object per query on stdout)
  bash 3_inference_search.sh                      (interactive: type queries, empty line ends)
  bash 3_inference_search.sh --serve --port 8000  (web page and JSON API)
Combined queries: --add and --subtract change the --query or --image they follow (repeatable); a TERM
naming an existing file is an image, anything else text, and W:TERM weighs it (2:beach, 0.5:./a.jpg):
"""+COMBINE_HELP+""". Separate --query flags stay separate queries.
Filters (--where, repeatable, all must hold): """+CONDITION_HELP+""". Fields: path, and
what encoding stored: size, mtime, taken (EXIF), width, height, and every column of a table (caption, url...).
Each query's top-k thumbnails are saved as <out_dir>/<query>.png (image queries: image-<name>.png).
The web server sends only image files under the dataset folder the embeddings were encoded from
(symlinks resolved); --serve_root adds folders, --serve_any_path lifts the check.
"""
HISTORY_LENGTH = 1000


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = CommandParser(prog="3_inference_search.sh", description=__doc__, epilog=EPILOG)
    model = parser.add_argument_group("model")
    model.add_argument("--load_model", default=None, help=LOAD_MODEL_HELP + " (default: the model that encoded --emb_path, as its model.json records, else models/latest/best.ckpt)")

    data = parser.add_argument_group("data")
    data.add_argument("--emb_path", default=DEFAULT_EMB_PATH, help="folder of embedding shards to search")
    data.add_argument(
        "--index_path",
        default=None,
        help="faiss index to answer through (built by ./clipsearch index); load only indexes you "
        "built or trust: faiss files are not safe against tampering",
    )
    data.add_argument("--fp16", action="store_true", help="hold the embeddings as float16: half the memory")
    data.add_argument("--mmap", action="store_true",
                      help="search a memory-mapped fp16 copy of the collection (<emb_path>/consolidated/, built on "
                           "first use, rebuilt when the shards change): a large collection starts without being read "
                           "into memory")
    data.add_argument("--fold_duplicates", nargs="?", const=True, default=False, metavar="REPORT",
                      help="answer images with the same bytes as one result that lists every path; given the "
                           "duplicates.json of ./clipsearch duplicates, its near-duplicate groups too")
    data.add_argument("--querybank", action="store_true",
                      help="rank text queries by cosine plus each image's querybank bias, which lowers images that "
                           "come up for too many queries (compute it once with ./clipsearch querybank)")

    query = parser.add_argument_group("queries")
    query.add_argument("--query", action=QueryPart, default=[], help="text query; repeat for several")
    query.add_argument("--image", action=QueryPart, default=[], help="image file to search by; repeatable")
    query.add_argument("--add", action=QueryPart, metavar="TERM", default=argparse.SUPPRESS,
                       help="a text or image term ([W:]TERM) added to the --query or --image it follows; repeatable")
    query.add_argument("--subtract", action=QueryPart, metavar="TERM", default=argparse.SUPPRESS,
                       help="a text or image term ([W:]TERM) subtracted from the --query or --image it follows; repeatable")
    query.add_argument("--where", action="append", default=[], metavar="CONDITION",
                       help="keep only rows where FIELD OP VALUE holds; repeatable, all must hold (see below)")
    query.add_argument("--top_k", type=positive_int, default=DEFAULT_TOP_K, help="results per query")
    query.add_argument("--offset", type=non_negative_int, default=0, help="results to skip first: --offset 24 is page two")

    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print one JSON object per query instead of text")
    output.add_argument("--no_grid", action="store_true", help="save no contact sheets")
    output.add_argument("--out_dir", default=os.path.join(DEFAULT_OUTPUTS_DIR, "search"), help="folder for the result grids")
    output.add_argument("--thumb_size", type=positive_int, default=160, help="thumbnail size in the grids, pixels")
    output.add_argument("--columns", type=positive_int, default=5, help="thumbnails per grid row")

    server = parser.add_argument_group("server")
    server.add_argument("--serve", action="store_true", help="serve a search page and API instead of answering here")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    server.add_argument("--port", type=positive_int, default=8000, help="port to listen on")
    server.add_argument(
        "--serve_root",
        action="append",
        default=[],
        help="folder the server may send images from, besides the encoded dataset folder; repeatable",
    )
    server.add_argument(
        "--serve_any_path",
        action="store_true",
        help="send any file the shards list, even outside the dataset folder (only for shards you trust)",
    )

    args = parser.parse_args(argv)
    args.queries = getattr(args, "queries", [])
    if args.serve and (args.query or args.image):
        parser.error("--serve answers queries over HTTP; leave out --query/--image")
    if args.serve and (args.where or args.offset):
        parser.error("--where and --offset shape answers here; the web page and API take their own")
    if not args.serve and (args.serve_root or args.serve_any_path):
        parser.error("--serve_root and --serve_any_path apply only with --serve")
    return args


class QueryPart(argparse.Action):
    """--query and --image start a query, --add and --subtract add a term to the last one started; the
    order on the command line is kept in `queries` (one list of (flag, text) per query)."""

    def __call__(self, parser, namespace, value, option_string=None):
        flag = self.option_strings[0]
        queries = getattr(namespace, "queries", None)
        if queries is None:
            queries = []
            namespace.queries = queries
        if flag in ("--query", "--image"):
            getattr(namespace, self.dest).append(value)
            queries.append([(flag, value)])
        elif not queries:
            parser.error(f"{flag} {value!r} changes a query: put it after the --query or --image it belongs to")
        else:
            queries[-1].append((flag, value))


def query_terms(parts: list[tuple[str, str]]) -> list:
    """One query's terms, weights parsed and images told from text (a TermError for a bad weight); images
    stay paths until the query is answered."""
    from clipsearch.query_terms import IMAGE, TEXT, Term, parse_weighted

    terms = []
    for flag, text in parts:
        if flag == "--query":
            terms.append(Term(TEXT, text, 1.0, text))
        elif flag == "--image":
            terms.append(Term(IMAGE, text, 1.0, text))
        else:
            weight, term = parse_weighted(text, flag)
            weight = -weight if flag == "--subtract" else weight
            kind = IMAGE if os.path.isfile(term) else TEXT
            terms.append(Term(kind, term, weight, term))
    return terms


def check_inputs(args: argparse.Namespace) -> None:
    """Stop on a missing file before the model loads (seconds), naming the flag to fix."""
    # Checkpoint files are checked here; other model names are the model loader's to resolve. Without
    # --load_model, the model is the one the embedding folder records, so the folder comes first.
    if args.load_model is not None:
        check_model_reference(args.load_model)
    if not os.path.isdir(args.emb_path):
        raise UserError(f"--emb_path {args.emb_path}: no such folder (make it with 2_inference_encode.sh)")
    if args.load_model is None:
        args.load_model = model_for(args.emb_path, None)
        check_model_reference(args.load_model)
    if args.fold_duplicates not in (True, False) and not os.path.isfile(args.fold_duplicates):
        raise UserError(f"--fold_duplicates {args.fold_duplicates}: no such report (./clipsearch duplicates writes one)")
    if args.index_path is not None and not os.path.exists(args.index_path):
        raise UserError(f"--index_path {args.index_path}: no such file (build it with ./clipsearch index)")
    for image_path in args.image:
        if not os.path.isfile(image_path):
            raise UserError(f"--image {image_path}: no such file")
    from clipsearch.fields import parse_conditions

    args.where = list(parse_conditions(args.where))  # a FilterError is one line: bad syntax answers at once
    args.queries = [query_terms(parts) for parts in args.queries]
    for root in args.serve_root:
        if not os.path.isdir(root):
            raise UserError(f"--serve_root {root}: no such folder")


def bind_listener(host: str, port: int) -> socket.socket:
    """The server's socket, bound now: a port in use fails before the model loads, and nobody takes it meanwhile."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as error:
        raise UserError(f"--host {host}: cannot resolve it ({error.strerror})") from None
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        if error.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use; stop what holds it or pass --port <another>") from None
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    return listener


def collection_roots(args: argparse.Namespace) -> list[str] | None:
    """The folders the server may send images from (None: any), from the encoding run's records and --serve_root."""
    if args.serve_any_path:
        return None
    roots = list(args.serve_root)
    recorded = recorded_dataset(args.emb_path)
    if recorded is not None and looks_like_tars(recorded):  # the folders of the local tars it names
        try:
            roots.extend(sorted({os.path.dirname(tar) for tar in list_tars(recorded) if not is_remote(tar)}))
        except UserError:  # its tars are gone: nothing local to serve
            pass
    elif recorded is not None:
        roots.append(recorded)
    else:
        # No record names the dataset (an older or unfinished run): the default layout keeps the
        # embeddings inside it, <dataset>/emb.
        roots.append(str(Path(args.emb_path).resolve().parent))
    return roots


# File facts every image row has: in --json, left out of the text lines (which show captions, dates, urls).
QUIET_FIELDS = ("size", "mtime", "width", "height", "tar", "key")  # a tar's row: its path names both


def hit_records(hits, rank_from: int = 1) -> list[dict]:
    from clipsearch.images import display_path

    records = []
    for rank, hit in enumerate(hits, start=rank_from):
        record = {"rank": rank, "id": hit.id, "path": display_path(hit.path), "score": round(float(hit.score), 6)}
        if hit.duplicates:
            record["duplicates"] = [display_path(path) for path in hit.duplicates]
        if hit.fields:
            record["fields"] = {name: display_path(value) if isinstance(value, str) else value
                                for name, value in hit.fields.items()}
        records.append(record)
    return records


def format_hits(hits, rank_from: int = 1) -> str:
    from clipsearch.images import display_path

    def line(rank: int, hit) -> str:
        same = f"  (duplicates: {', '.join(display_path(path) for path in hit.duplicates)})" if hit.duplicates else ""
        shown = {name: value for name, value in hit.fields.items() if name not in QUIET_FIELDS}
        fields = "".join(f"\n{'':15}{name}: {display_path(str(value)).replace(chr(10), ' | ')}"
                         for name, value in shown.items())
        return f"{rank:4d}  {hit.score:+.4f}  {display_path(hit.path)}{same}{fields}"

    return "\n".join(line(rank, hit) for rank, hit in enumerate(hits, start=rank_from))


def save_grid(hits, title: str, out_dir: Path, name: str, thumb_size: int = 160, columns: int = 5,
              rank_from: int = 1, image_of: Callable | None = None) -> Path:
    """Write the hits' contact sheet as <out_dir>/<name>.png; `name` must already be a safe file name.

    `image_of(hit)` names the file each hit shows (a caption's image); by default its path.
    """
    from clipsearch.durable import atomic_write
    from clipsearch.grid import make_grid
    from clipsearch.images import display_path

    out_dir.mkdir(parents=True, exist_ok=True)
    grid_path = out_dir / f"{name}.png"
    # safe_filename already forbids separators; this guards against a future change to it.
    if grid_path.resolve().parent != out_dir.resolve():
        raise ValueError(f"refusing to write {grid_path} outside {out_dir}")

    def label(rank: int, hit) -> str:
        shown = hit.fields.get("caption") if image_of is not None else None
        return f"{rank}. {hit.score:.3f} {display_path(shown or Path(hit.path).name)}"

    labels = [label(rank, hit) for rank, hit in enumerate(hits, start=rank_from)]
    images = [(image_of(hit) if image_of is not None else hit.path) or "" for hit in hits]
    grid = make_grid(images, labels, title=title, thumb_size=thumb_size, columns=columns)
    encoded = io.BytesIO()
    grid.save(encoded, format="PNG")
    return atomic_write(grid_path, encoded.getbuffer())


def report(engine, hits, query: dict, heading: str, grid_title: str, grid_name: str, args: argparse.Namespace) -> None:
    """Print one query's hits (text or a JSON line) and save its grid unless --no_grid."""
    from clipsearch.store import ROWS_CAPTIONS

    grid_path = None
    rank_from = args.offset + 1
    if not args.no_grid:
        image_of = (lambda hit: engine.image_of(hit.id)) if engine.rows_kind == ROWS_CAPTIONS else None
        grid_path = save_grid(hits, grid_title, Path(args.out_dir), grid_name, args.thumb_size, args.columns,
                              rank_from, image_of)
    if args.json:
        record = {"query": query, "top_k": args.top_k, "offset": args.offset, "where": [str(c) for c in args.where],
                  "results": hit_records(hits, rank_from)}
        record["grid"] = str(grid_path) if grid_path else None
        print(json.dumps(record, ensure_ascii=False), flush=True)
        return
    where = f" where {' and '.join(str(condition) for condition in args.where)}" if args.where else ""
    print(f"\n{len(hits)} results {heading}{where}:\n{format_hits(hits, rank_from)}")
    if grid_path:
        print(f"grid: {grid_path}")


def answer_text(engine, query: str, args: argparse.Namespace) -> None:
    from clipsearch.grid import safe_filename
    from clipsearch.images import display_path

    hits = engine.search_text([query], args.top_k, args.where, args.offset)[0]
    shown = display_path(query)  # arguments that are not UTF-8 arrive as surrogates, which JSON cannot carry
    report(engine, hits, {"kind": "text", "text": shown}, f"for {query!r}", query, safe_filename(shown), args)


def answer_image(engine, image_path: str, args: argparse.Namespace) -> bool:
    """Search by one image file; False (after saying why on stderr) when it cannot be read."""
    from clipsearch.grid import safe_filename
    from clipsearch.images import display_path

    image = read_query_image(image_path)
    if image is None:
        return False
    hits = engine.search_image([image], args.top_k, args.where, args.offset)[0]
    shown = display_path(image_path)
    name = safe_filename("image-" + Path(shown).stem)
    report(engine, hits, {"kind": "image", "path": shown}, f"like {shown}", f"like {shown}", name, args)
    return True


def read_query_image(image_path: str):
    """An image a query names, decoded as encoding decodes; None (after saying why on stderr) when it cannot be."""
    from clipsearch.images import SkipReasons, display_path, load_image

    reasons = SkipReasons(log=False)
    image = load_image(image_path, reasons)
    if image is None:
        print(f"error: cannot search by {display_path(image_path)}: {reasons.reason or 'unreadable'}", file=sys.stderr)
    return image


def answer_combined(engine, terms: list, args: argparse.Namespace) -> bool:
    """Search by one query of several terms; False (after saying why) when one of its images cannot be read."""
    from dataclasses import replace

    from clipsearch.grid import safe_filename
    from clipsearch.images import display_path
    from clipsearch.query_terms import IMAGE, describe_query

    loaded = []
    for term in terms:
        if term.kind == IMAGE:
            image = read_query_image(term.value)
            if image is None:
                return False
            term = replace(term, value=image, label=Path(display_path(term.label)).name)
        loaded.append(term)
    hits = engine.search(loaded, args.top_k, args.where, args.offset)
    described = display_path(describe_query(loaded))
    query = {"kind": "combined", "terms": [
        {"kind": term.kind, "weight": term.weight, ("path" if term.kind == IMAGE else "text"): display_path(original.value)}
        for term, original in zip(loaded, terms)
    ]}
    report(engine, hits, query, f"for {described}", described, safe_filename(described), args)
    return True


def history_file() -> Path:
    """Where interactive queries are kept across sessions, like a shell's history."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipsearch" / "search_history"


def enable_line_editing() -> Callable[[], None] | None:
    """Arrow keys, editing and the saved history for `input()`; returns what saves the history, if readline exists."""
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input still works
        return None
    path = history_file()
    readline.set_history_length(HISTORY_LENGTH)
    try:
        readline.read_history_file(path)
    except OSError:  # the first session has none yet
        pass

    def save_history() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError as error:
            print(f"warning: search history not saved to {path}: {error.strerror}", file=sys.stderr)

    return save_history


def interactive(engine, args: argparse.Namespace) -> int:
    """Answer queries typed at a `Search: ` prompt until an empty line or end of input."""
    # Only a person at a terminal gets line editing and a history; piped queries stay out of it.
    save_history = enable_line_editing() if sys.stdin.isatty() else None
    answered = 0
    try:
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
    finally:
        if save_history is not None:
            save_history()
    return answered


def check_server_installed() -> None:
    """The web server's own packages, looked for before the model loads."""
    from importlib.util import find_spec

    for package in ("fastapi", "uvicorn"):
        if find_spec(package) is None:
            raise UserError(f"the web server needs the package {package!r}; install package/requirements.txt")


def load_engine(args: argparse.Namespace):
    import torch

    from clipsearch.search import SearchEngine

    try:
        return SearchEngine.from_files(
            args.load_model,
            args.emb_path,
            index_path=args.index_path,
            dtype=torch.float16 if args.fp16 else torch.float32,
            fold_duplicates=args.fold_duplicates,
            mapped=args.mmap,
            querybank=args.querybank,
        )
    except (FileNotFoundError, ValueError) as error:  # ValueError: not shards, or another model's (EmbeddingMismatchError)
        raise UserError(str(error)) from error


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    check_inputs(args)
    listener = None
    if args.serve:
        check_server_installed()
        listener = bind_listener(args.host, args.port)
    try:
        engine = load_engine(args)
        print(f"searching {len(engine.searcher)} images in {args.emb_path}", file=sys.stderr)
        if engine.searcher.index is not None and engine.searcher.index.recall_warning():
            print(engine.searcher.index.recall_warning(), file=sys.stderr)
        if args.serve:
            from clipsearch.server import serve

            roots = collection_roots(args)
            where = "any path" if roots is None else ", ".join(roots)
            print(f"serving images from under: {where}", file=sys.stderr)
            print(f"search page: http://{args.host}:{args.port}/ (Ctrl-C stops)", file=sys.stderr)
            serve(engine, host=args.host, port=args.port, serve_roots=roots, listener=listener)
            return
    finally:
        if listener is not None:
            listener.close()
    if not args.queries:
        interactive(engine, args)
        return
    from clipsearch.query_terms import TEXT

    unanswered = 0
    for terms in args.queries:
        if len(terms) > 1:
            unanswered += not answer_combined(engine, terms, args)
        elif terms[0].kind == TEXT:
            answer_text(engine, terms[0].value, args)
        else:
            unanswered += not answer_image(engine, terms[0].value, args)
    if unanswered:
        raise UserError(f"{unanswered} of {len(args.queries)} queries could not be answered: an --image or term file "
                        "could not be read")


if __name__ == "__main__":
    run_command(main)
