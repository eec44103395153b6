"""Native kernels for scoring a collection: built from score_kernels.c on first use, or absent.

fp16: PyTorch's CPU kernels read an fp16 matrix slowly: ATen's fp16 matrix-vector product converts
element by element (1.6x the time of one read of the matrix on a 2-core EPYC), and a product with
several queries has to widen the rows into an fp32 copy before MKL sees them (issue 32). The C
kernels widen with F16C as they multiply: one query scans at the speed of a plain read, and with
64 queries the register tile computes at MKL's square-product rate while its operands are in cache.

fp32: a BLAS product of 64 queries with 1M columns packs (transposes) every block of the
collection before its register tile sees it, and ran at 150 to 160 GFLOP/s against its square
product's 185 to 210. Stored in panels of 16 rows laid out element by element (`to_panels`), the
rows are already in the order a register tile reads them: the kernel multiplies them where they lie,
at the square product's rate, and one query reads them at the speed of a plain read
(BENCHMARKS.md, "Search: where the time goes").

The library is compiled once with the system's C compiler (`$CC`, else `cc`) into
`$XDG_CACHE_HOME/clipsearch/kernels/`, under a name that hashes the source and flags, and loaded
with ctypes (which releases the GIL during a call, so the rows are split over a thread pool).
Where it cannot be built or run (no compiler, not x86-64, a CPU without AVX2/FMA/F16C, or
CLIPSEARCH_NATIVE_KERNELS=0), `load()` returns None, the reason is logged once, and search
scores with torch (`panel_scores` for fp32): slower, same results.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from clipsearch import durable

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("score_kernels.c")
FLAGS = ("-O3", "-std=gnu11", "-shared", "-fPIC")  # the kernels name their instruction sets themselves
DISABLE_VARIABLE = "CLIPSEARCH_NATIVE_KERNELS"
# The kernels read 8 elements at a time (every CLIP width is a multiple of 8: 512, 640, 768, 1024).
DIM_MULTIPLE = 8
# Queries a packed block holds for fp16 rows (TILE_QUERIES in the C source), and for fp32 panels
# (PANEL_QUERIES); rows a panel holds (PANEL_ROWS).
TILE_QUERIES = 16
PANEL_QUERIES = 6
PANEL_ROWS = 16


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipsearch" / "kernels"


@functools.cache
def load() -> ctypes.CDLL | None:
    """The kernels' library, built if needed; None where they cannot run (the reason logged once)."""
    library, reason = _build_and_load()
    if library is None:
        log.info("search scores with torch's kernels: %s", reason)
    return library


def _build_and_load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get(DISABLE_VARIABLE, "1") == "0":
        return None, f"{DISABLE_VARIABLE}=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the native kernels are x86-64 only (this is {platform.machine()})"
    compiler = shutil.which(os.environ.get("CC", "cc"))
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    try:
        target = cache_folder() / f"score_kernels-{digest}.so"
    except RuntimeError as error:  # no home folder to hold the cache
        return None, f"no cache folder for the built kernels ({error}); set XDG_CACHE_HOME"
    if not target.exists():
        if compiler is None:
            return None, f"no C compiler found ({os.environ.get('CC', 'cc')}; set CC to use another)"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _compile(compiler, target)
        except (OSError, subprocess.SubprocessError, RuntimeError) as error:
            return None, f"building {SOURCE.name} into {target.parent} failed: {error}"
    try:
        library = ctypes.CDLL(str(target))
    except OSError as error:
        return None, f"loading {target} failed: {error}"
    if not library.clipsearch_cpu_supported():
        return None, "this CPU lacks AVX2, FMA or F16C"
    pointer, count = ctypes.c_void_p, ctypes.c_int64
    library.clipsearch_score_one_f16.argtypes = [pointer, count, count, pointer, pointer]
    library.clipsearch_score_one_f16.restype = None
    library.clipsearch_pack_queries_by.argtypes = [pointer, count, count, count, pointer]
    library.clipsearch_pack_queries_by.restype = None
    library.clipsearch_score_many_f16.argtypes = [pointer, count, count, pointer, count, pointer, pointer, count]
    library.clipsearch_score_many_f16.restype = ctypes.c_int
    library.clipsearch_score_one_f32.argtypes = [pointer, count, count, count, pointer, pointer]
    library.clipsearch_score_one_f32.restype = None
    library.clipsearch_score_many_f32.argtypes = [pointer, count, count, count, pointer, count, pointer, count,
                                                  pointer, count]
    library.clipsearch_score_many_f32.restype = None
    return library, ""


def _compile(compiler: str, target: Path) -> None:
    """Compile to a temporary beside `target`, then rename: a second process sees all or nothing."""
    temporary = durable.temporary_path(target)
    try:
        done = subprocess.run([compiler, *FLAGS, "-o", str(temporary), str(SOURCE)],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            first_line = (done.stderr.strip().splitlines() or ["(no message)"])[0]
            raise RuntimeError(f"{Path(compiler).name} exited {done.returncode}: {first_line}")
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


@functools.cache
def _pool(process: int, threads: int) -> ThreadPoolExecutor:
    # Keyed by process: a forked child inherits the pool object but not its threads.
    return ThreadPoolExecutor(threads, thread_name_prefix="clipsearch-scores")


class NativeScorer:
    """Scores of fp32 `queries` [q, dim] against a Searcher's storage, in fp32, on torch's thread
    count: fp16 rows [count, dim], or fp32 panels [ceil(count / 16), dim, 16] (`to_panels`).

    Build one per search (the queries are packed once) with `create`, which returns None where the
    kernels cannot serve it; then call it per block of rows.
    """

    def __init__(self, library: ctypes.CDLL, queries: torch.Tensor, storage: torch.Tensor):
        self.library, self.storage = library, storage
        self.panelled = storage.dtype == torch.float32
        self.queries = queries.detach().float().contiguous().numpy()
        self.query_count, self.dim = self.queries.shape
        if self.query_count > 1:
            width = PANEL_QUERIES if self.panelled else TILE_QUERIES
            self.packed = np.empty(-(-self.query_count // width) * self.dim * width, dtype=np.float32)
            library.clipsearch_pack_queries_by(self.queries.ctypes.data, self.query_count, self.dim, width,
                                               self.packed.ctypes.data)
        self.threads = max(1, torch.get_num_threads())

    @staticmethod
    def serves(storage: torch.Tensor) -> bool:
        """Whether the kernels can score `storage` (contiguous, on the CPU, of a width that is a
        multiple of 8): fp16 rows, or fp32 panels."""
        layout_known = ((storage.dtype == torch.float16 and storage.ndim == 2)
                        or (storage.dtype == torch.float32 and storage.ndim == 3 and storage.shape[2] == PANEL_ROWS))
        return (layout_known and storage.device.type == "cpu" and storage.is_contiguous()
                and storage.shape[1] % DIM_MULTIPLE == 0 and load() is not None)

    @classmethod
    def create(cls, queries: torch.Tensor, storage: torch.Tensor) -> NativeScorer | None:
        return cls(load(), queries, storage) if cls.serves(storage) else None

    @property
    def query_major(self) -> bool:
        """Whether `out` is [q, rows] (several queries against panels) rather than [rows, q]."""
        return self.panelled and self.query_count > 1

    def __call__(self, first: int, last: int, out: np.ndarray, maxima: np.ndarray | None = None,
                 group_rows: int = 1) -> None:
        """Write the scores of rows first..last into `out`, fp32: [last - first, q] in C order, or,
        when `query_major`, [q, last - first] with contiguous rows (a slice of a wider buffer will
        do). With several queries, when `maxima` [ceil((last - first) / group_rows), q] is given,
        each query's largest score over every `group_rows` consecutive rows goes into it."""
        count = last - first
        if self.query_major:
            _check_out(out, (self.query_count, count), rows_contiguous_only=True)
        else:
            _check_out(out, (count, self.query_count))
        if maxima is not None:
            if self.query_count == 1:
                raise ValueError("group maxima are computed for several queries only")
            _check_out(maxima, (-(-count // group_rows), self.query_count))
        if count == 0:
            return
        # Each thread's share is whole groups (no two threads write one group's maxima) and, over
        # panels, whole panels when `first` starts one.
        share = -(-count // self.threads)
        align = group_rows * PANEL_ROWS // math.gcd(group_rows, PANEL_ROWS) if self.panelled else group_rows
        share = -(-share // align) * align
        column_bytes = 4 if self.query_major else self.query_count * 4
        calls = [(first + start, min(share, count - start), out.ctypes.data + start * column_bytes,
                  None if maxima is None else maxima.ctypes.data + start // group_rows * self.query_count * 4,
                  out.strides[0] // 4, group_rows)
                 for start in range(0, count, share)]
        others = [_pool(os.getpid(), self.threads).submit(self._score, *call) for call in calls[1:]]
        self._score(*calls[0])  # this thread takes the first share
        for done in others:
            done.result()

    def _score(self, first: int, count: int, out_address: int, maxima_address: int | None, out_stride: int,
               group_rows: int) -> None:
        library, storage = self.library, self.storage.data_ptr()
        if self.panelled and self.query_count == 1:
            library.clipsearch_score_one_f32(storage, first, count, self.dim, self.queries.ctypes.data, out_address)
        elif self.panelled:
            library.clipsearch_score_many_f32(storage, first, count, self.dim, self.packed.ctypes.data,
                                              self.query_count, out_address, out_stride, maxima_address, group_rows)
        elif self.query_count == 1:
            library.clipsearch_score_one_f16(storage + first * self.dim * 2, count, self.dim, self.queries.ctypes.data,
                                             out_address)
        elif library.clipsearch_score_many_f16(storage + first * self.dim * 2, count, self.dim, self.packed.ctypes.data,
                                               self.query_count, out_address, maxima_address, group_rows):
            raise MemoryError("the score kernel could not allocate its row panel")


def to_panels(rows: torch.Tensor) -> torch.Tensor:
    """fp32 rows [count, dim] as panels [ceil(count / 16), dim, 16]: rows 16p..16p+15 side by side,
    element by element, the last panel padded with zero rows; one copy."""
    count, dim = rows.shape
    panels = torch.empty(-(-count // PANEL_ROWS), dim, PANEL_ROWS, dtype=torch.float32)
    whole = count // PANEL_ROWS
    panels[:whole].copy_(rows[: whole * PANEL_ROWS].view(whole, PANEL_ROWS, dim).transpose(1, 2))
    if whole < panels.shape[0]:
        tail = torch.zeros(PANEL_ROWS, dim)
        tail[: count - whole * PANEL_ROWS] = rows[whole * PANEL_ROWS :]
        panels[whole] = tail.T
    return panels


def panel_rows(panels: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (ids) of a panelled collection as [len(rows), dim]."""
    return panels[rows // PANEL_ROWS, :, rows % PANEL_ROWS]


def panel_scores(panels: torch.Tensor, queries: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """Scores [q, last - first] of `queries` [q, dim] with rows first..last of a panelled
    collection, by torch (where the kernels cannot run)."""
    first_panel = first // PANEL_ROWS
    scores = torch.matmul(queries, panels[first_panel : -(-last // PANEL_ROWS)])  # [panels, q, 16]
    offset = first - first_panel * PANEL_ROWS
    return scores.permute(1, 0, 2).reshape(queries.shape[0], -1)[:, offset : offset + last - first]


def _check_out(array: np.ndarray, shape: tuple[int, int], rows_contiguous_only: bool = False) -> None:
    laid_out = (array.strides[1] == 4 and array.strides[0] >= 4 * shape[1]) if rows_contiguous_only else array.flags.c_contiguous
    if array.shape != shape or array.dtype != np.float32 or not laid_out:
        order = "contiguous rows" if rows_contiguous_only else "C order"
        raise ValueError(f"expected a float32 array of shape {shape} in {order}, got {array.dtype} {array.shape}")
