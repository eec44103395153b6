"""Native kernels for scoring an fp16 collection: built from score_kernels.c on first use, or absent.

PyTorch's CPU kernels read an fp16 matrix slowly: ATen's fp16 matrix-vector product converts
element by element (1.6x the time of one read of the matrix on a 2-core EPYC), and a product with
several queries has to widen the rows into an fp32 copy before MKL sees them (issue 32). The C
kernels widen with F16C as they multiply: one query scans at the speed of a plain read, and with
64 queries the register tile computes at MKL's square-product rate while its operands are in cache
(BENCHMARKS.md, "Search: where the time goes").

The library is compiled once with the system's C compiler (`$CC`, else `cc`) into
`$XDG_CACHE_HOME/clipsearch/kernels/`, under a name that hashes the source and flags, and loaded
with ctypes (which releases the GIL during a call, so the rows are split over a thread pool).
Where it cannot be built or run (no compiler, not x86-64, a CPU without AVX2/FMA/F16C, or
CLIPSEARCH_NATIVE_KERNELS=0), `load()` returns None, the reason is logged once, and search
scores with torch as before: slower, same results.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
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
# Queries a packed block holds (TILE_QUERIES in the C source).
TILE_QUERIES = 16


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipsearch" / "kernels"


@functools.cache
def load() -> ctypes.CDLL | None:
    """The kernels' library, built if needed; None where they cannot run (the reason logged once)."""
    library, reason = _build_and_load()
    if library is None:
        log.info("fp16 search scores with torch's kernels: %s", reason)
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
    library.clipsearch_pack_queries.argtypes = [pointer, count, count, pointer]
    library.clipsearch_pack_queries.restype = None
    library.clipsearch_score_many_f16.argtypes = [pointer, count, count, pointer, count, pointer, pointer, count]
    library.clipsearch_score_many_f16.restype = ctypes.c_int
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


class HalfRowScorer:
    """Scores of fp32 `queries` [q, dim] against a row-major fp16 matrix [count, dim], in fp32, on
    torch's thread count.

    Build one per search (the queries are packed once) with `create`, which returns None where the
    kernels cannot serve it; then call it per block of rows.
    """

    def __init__(self, library: ctypes.CDLL, queries: torch.Tensor, storage: torch.Tensor):
        self.library, self.storage = library, storage
        self.queries = queries.detach().float().contiguous().numpy()
        self.query_count, self.dim = self.queries.shape
        if self.query_count > 1:
            self.packed = np.empty(-(-self.query_count // TILE_QUERIES) * self.dim * TILE_QUERIES, dtype=np.float32)
            library.clipsearch_pack_queries(self.queries.ctypes.data, self.query_count, self.dim, self.packed.ctypes.data)
        self.threads = max(1, torch.get_num_threads())

    @staticmethod
    def serves(storage: torch.Tensor) -> bool:
        """Whether the kernels can score `storage`: contiguous fp16 rows on the CPU, of a width that
        is a multiple of 8."""
        return (storage.dtype == torch.float16 and storage.device.type == "cpu" and storage.is_contiguous()
                and storage.shape[-1] % DIM_MULTIPLE == 0 and load() is not None)

    @classmethod
    def create(cls, queries: torch.Tensor, storage: torch.Tensor) -> HalfRowScorer | None:
        return cls(load(), queries, storage) if cls.serves(storage) else None

    def __call__(self, first: int, last: int, out: np.ndarray, maxima: np.ndarray | None = None,
                 group_rows: int = 1) -> None:
        """Write the scores of rows first..last into `out` [last - first, q] (fp32, C order), and with
        several queries, when `maxima` [ceil((last - first) / group_rows), q] is given, each query's
        largest score over every `group_rows` consecutive rows into it."""
        count = last - first
        _check_out(out, (count, self.query_count))
        if maxima is not None:
            if self.query_count == 1:
                raise ValueError("group maxima are computed for several queries only")
            _check_out(maxima, (-(-count // group_rows), self.query_count))
        if count == 0:
            return
        # Each thread's share is whole groups, so no two threads write the same group's maxima.
        share = -(-count // self.threads)
        share = -(-share // group_rows) * group_rows
        calls = [(first + start, min(share, count - start), out.ctypes.data + start * self.query_count * 4,
                  None if maxima is None else maxima.ctypes.data + start // group_rows * self.query_count * 4,
                  group_rows)
                 for start in range(0, count, share)]
        others = [_pool(os.getpid(), self.threads).submit(self._score, *call) for call in calls[1:]]
        self._score(*calls[0])  # this thread takes the first share
        for done in others:
            done.result()

    def _score(self, first: int, count: int, out_address: int, maxima_address: int | None, group_rows: int) -> None:
        rows_address = self.storage.data_ptr() + first * self.dim * 2
        if self.query_count == 1:
            self.library.clipsearch_score_one_f16(rows_address, count, self.dim, self.queries.ctypes.data, out_address)
        elif self.library.clipsearch_score_many_f16(rows_address, count, self.dim, self.packed.ctypes.data,
                                                    self.query_count, out_address, maxima_address, group_rows):
            raise MemoryError("the score kernel could not allocate its row panel")


def _check_out(array: np.ndarray, shape: tuple[int, int]) -> None:
    if array.shape != shape or array.dtype != np.float32 or not array.flags.c_contiguous:
        raise ValueError(f"expected a C-ordered float32 array of shape {shape}, got {array.dtype} {array.shape}")
