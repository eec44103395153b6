"""Top-k search over embedding shards: exact by default, through a faiss index when one is given."""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from clipsearch.encoding.writer import list_shards, read_json, read_shard

logger = logging.getLogger(__name__)

# Scores of a query batch against the whole collection are held at once only below this size;
# above it the collection is scanned in chunks whose partial top-k lists are merged.
DEFAULT_MAX_SCORE_BYTES = 256 * 2**20
# Normalising a large matrix is done this many rows at a time so it needs no second full copy.
NORMALISE_ROWS = 65_536
# Rows of an fp16 collection widened to fp32 at a time for multi-query scoring: 16 MB at 512-d.
UPCAST_SLAB_ROWS = 8192


class EmbeddingMismatchError(ValueError):
    """Embeddings and query model (or index) do not belong together."""


@dataclass(frozen=True)
class Hit:
    id: int  # row in the collection (stable for a loaded collection)
    path: str
    score: float


def order_fingerprint(paths: Sequence[str], dim: int) -> str:
    """Identity of a collection's row order, so an index built on other rows is never trusted."""
    digest = hashlib.sha256(f"{len(paths)}:{dim}\n".encode())
    for path in paths:
        digest.update(path.encode("utf-8", errors="surrogateescape"))
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def normalise_rows(embeddings: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Unit-length rows in a new contiguous tensor, normalised in float32 then stored as `dtype`."""
    dtype = dtype or (embeddings.dtype if embeddings.is_floating_point() else torch.float32)
    normalised = torch.empty(embeddings.shape, dtype=dtype)
    for start in range(0, embeddings.shape[0], NORMALISE_ROWS):
        rows = embeddings[start : start + NORMALISE_ROWS].float()
        normalised[start : start + NORMALISE_ROWS] = F.normalize(rows, dim=-1).to(dtype)
    return normalised


class Searcher:
    """Pure search: unit-length embeddings in, ranked hits out. Scores are cosine similarities.

    fp32 collections are stored transposed, one column per image ([dim, count]), and scored with
    numpy's OpenBLAS: its vector-matrix and matrix-matrix kernels stream that layout over all cores
    at memory speed (1M x 512, one query: the time of one read of the matrix), where torch's MKL
    path took twice as long for one query and 1.6x for 64 (benchmarks/profile_search.py). fp16
    collections stay row-major: CPU BLAS has no fast fp16 vector-matrix kernel, but torch.mv's
    fp16 path reads the half-size matrix faster than any fp32 scan.
    """

    def __init__(
        self,
        paths: list[str],
        embeddings: torch.Tensor,
        index=None,
        *,
        assume_normalised: bool = False,
        max_score_bytes: int = DEFAULT_MAX_SCORE_BYTES,
    ):
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be a [count, dim] matrix, got shape {tuple(embeddings.shape)}")
        if len(paths) != embeddings.shape[0]:
            raise ValueError(f"{len(paths)} paths but {embeddings.shape[0]} embeddings")
        self.paths = list(paths)
        if not (assume_normalised and embeddings.device.type == "cpu"):
            embeddings = normalise_rows(embeddings.cpu())
        self.column_major = embeddings.dtype == torch.float32
        # `storage` is [dim, count] when column-major, else [count, dim]; both contiguous.
        self.storage = (embeddings.T if self.column_major else embeddings).contiguous()
        self.max_score_bytes = int(max_score_bytes)
        self.index = index
        if index is not None:
            self._check_index(index)

    def _check_index(self, index) -> None:
        if index.count != len(self):
            raise EmbeddingMismatchError(
                f"the index holds {index.count} vectors but the collection has {len(self)}; rebuild it with "
                "python -m clipsearch.index --emb_path <folder>"
            )
        expected = order_fingerprint(self.paths, self.dim)
        if getattr(index, "order_fingerprint", expected) != expected:
            raise EmbeddingMismatchError(
                "the index was built on other embeddings (or another row order) than these shards; rebuild it "
                "with python -m clipsearch.index --emb_path <folder>"
            )

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return int(self.storage.shape[0 if self.column_major else 1])

    @property
    def embeddings(self) -> torch.Tensor:
        """The collection as rows [count, dim] (a view of the storage)."""
        return self.storage.T if self.column_major else self.storage

    def scores(self, queries: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Inner products [q, end - start] of `queries` (already in the storage dtype) with rows start..end."""
        if self.column_major:
            columns = self.storage[:, start:end].numpy()  # a strided view: BLAS reads it in place
            return torch.from_numpy(queries.contiguous().numpy() @ columns)
        rows = self.storage[start:end]
        if queries.shape[0] == 1:
            return torch.mv(rows, queries[0]).unsqueeze(0)
        # Many queries against fp16 rows: ATen's half-precision GEMM is slow on CPUs, so each slab
        # of rows is widened to fp32 and multiplied in torch (1M x 512, 64 queries: 0.87 s against
        # 1.8 s). Mixing in numpy here is far slower: OpenBLAS's and torch's thread pools, taking
        # turns slab by slab, spin against each other on few cores.
        queries = queries.float()
        out = torch.empty(queries.shape[0], rows.shape[0])
        for slab_start in range(0, rows.shape[0], UPCAST_SLAB_ROWS):
            slab = rows[slab_start : slab_start + UPCAST_SLAB_ROWS]
            torch.mm(queries, slab.float().T, out=out[:, slab_start : slab_start + slab.shape[0]])
        return out

    @classmethod
    def from_shards(
        cls,
        emb_path: str | os.PathLike,
        expected_dim: int | None = None,
        expected_fingerprint: str | None = None,
        dtype: torch.dtype = torch.float32,
        index_path: str | os.PathLike | None = None,
        **searcher_options,
    ) -> Searcher:
        """Load every `*.ckpt` shard of a folder (rank, then step order) into one contiguous matrix."""
        emb_path = Path(emb_path)
        if not emb_path.is_dir():
            raise FileNotFoundError(f"embedding folder not found: {emb_path} (make it with 2_inference_encode.sh)")
        identity = read_json(emb_path / "model.json")
        if expected_fingerprint is not None and identity is not None:
            if identity.get("fingerprint") != expected_fingerprint:
                raise EmbeddingMismatchError(
                    f"{emb_path} was encoded with another model ({identity.get('load_model')}, fingerprint "
                    f"{identity.get('fingerprint')}) than the query model (fingerprint {expected_fingerprint}); "
                    "re-encode with the query model, or search with the model that encoded them."
                )
        shard_paths = list_shards(emb_path)
        if not shard_paths:
            raise FileNotFoundError(
                f"no embedding shards (*.ckpt) in {emb_path}; encode images first with 2_inference_encode.sh"
            )
        if identity is not None and not (emb_path / "manifest.json").is_file():
            logger.warning("%s has no manifest.json: its encoding run has not finished; searching what exists", emb_path)

        shards, dim, first_name = [], None, None
        for shard_path in shard_paths:
            shard = _read_shard_lazily(shard_path)
            embeddings, shard_image_paths = shard.get("emb"), shard.get("path")
            if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2 or shard_image_paths is None:
                raise ValueError(f"{shard_path} is not an embedding shard: expected {{'path': [...], 'emb': [n, d]}}")
            if len(shard_image_paths) != embeddings.shape[0]:
                raise ValueError(f"{shard_path}: {len(shard_image_paths)} paths but {embeddings.shape[0]} embeddings")
            if dim is None:
                dim, first_name = int(embeddings.shape[1]), shard_path.name
            elif embeddings.shape[1] != dim:
                raise EmbeddingMismatchError(
                    f"shard {shard_path} has {embeddings.shape[1]}-d embeddings but {first_name} has {dim}-d; "
                    "one folder must hold one model's embeddings"
                )
            shards.append((shard_image_paths, embeddings))
        if expected_dim is not None and dim != expected_dim:
            raise EmbeddingMismatchError(
                f"embeddings in {emb_path} are {dim}-d but the query model makes {expected_dim}-d embeddings"
            )

        # One preallocated matrix, in the searcher's layout, filled shard by shard: peak memory is
        # the collection once, not twice.
        total = sum(len(image_paths) for image_paths, _ in shards)
        rows = torch.empty(total, dim, dtype=dtype) if dtype != torch.float32 else torch.empty(dim, total, dtype=dtype).T
        paths: list[str] = []
        for image_paths, embeddings in shards:
            rows[len(paths) : len(paths) + len(image_paths)] = normalise_rows(embeddings, dtype)
            paths.extend(str(path) for path in image_paths)
        index = None
        if index_path is not None:
            from clipsearch.index import load_index

            index = load_index(index_path)
        return cls(paths, rows, index, assume_normalised=True, **searcher_options)

    def search(self, queries: torch.Tensor, top_k: int) -> list[list[Hit]]:
        """The `top_k` best rows for each query of `queries` [q, d] (or one query [d]), best first."""
        if queries.ndim == 1:
            queries = queries.unsqueeze(0)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise EmbeddingMismatchError(
                f"queries of shape {tuple(queries.shape)} do not match {self.dim}-d collection embeddings"
            )
        top_k = min(int(top_k), len(self))
        if top_k <= 0 or queries.shape[0] == 0:
            return [[] for _ in range(queries.shape[0])]
        queries = F.normalize(queries.detach().float().cpu(), dim=-1)
        if self.index is not None:
            scores, ids = self.index.search(queries.numpy(), top_k)
            scores, ids = torch.as_tensor(scores), torch.as_tensor(ids)
        else:
            scores, ids = self.exact_top_k(queries, top_k)
        return [
            [Hit(int(row), self.paths[int(row)], float(score)) for score, row in zip(query_scores, query_ids) if row >= 0]
            for query_scores, query_ids in zip(scores.tolist(), ids.tolist())
        ]

    def exact_top_k(self, queries: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and rows of the exact top-k by inner product; memory stays under `max_score_bytes`."""
        queries = queries.to(self.storage.dtype)
        count, query_count = len(self), queries.shape[0]
        if query_count * count * 4 <= self.max_score_bytes:
            # One BLAS call over the whole matrix: the scan is bound by memory bandwidth, a single
            # query pays no per-chunk Python overhead, and the scores come out row-major, so top-k
            # runs along contiguous memory.
            best_scores, best_rows = self.scores(queries).float().topk(top_k, dim=1)
            return best_scores, best_rows
        # Too many scores at once: take query blocks, and scan the collection in row chunks,
        # keeping a running top-k per query. Blocks keep chunks at least a few thousand rows long.
        query_block = max(1, min(query_count, self.max_score_bytes // (4 * 4096)))
        rows_per_chunk = max(1, self.max_score_bytes // (4 * query_block))
        all_scores, all_rows = [], []
        for query_start in range(0, query_count, query_block):
            block = queries[query_start : query_start + query_block]
            best_scores = best_rows = None
            for row_start in range(0, count, rows_per_chunk):
                chunk_scores = self.scores(block, row_start, row_start + rows_per_chunk).float()
                chunk_best, chunk_rows = chunk_scores.topk(min(top_k, chunk_scores.shape[1]), dim=1)
                chunk_rows += row_start
                if best_scores is None:
                    best_scores, best_rows = chunk_best, chunk_rows
                else:
                    merged_scores = torch.cat([best_scores, chunk_best], dim=1)
                    merged_rows = torch.cat([best_rows, chunk_rows], dim=1)
                    best_scores, order = merged_scores.topk(min(top_k, merged_scores.shape[1]), dim=1)
                    best_rows = merged_rows.gather(1, order)
            all_scores.append(best_scores)
            all_rows.append(best_rows)
        return torch.cat(all_scores), torch.cat(all_rows)


def _read_shard_lazily(path: Path) -> dict:
    """Memory-map a shard so loading many shards costs no more memory than the final matrix."""
    try:
        return read_shard(path, mmap=True)
    except RuntimeError:
        # Files saved in torch's legacy (non-zip) format cannot be memory-mapped.
        return read_shard(path)


class SearchEngine:
    """A model bundle to embed queries, and a Searcher over a collection embedded by the same model."""

    def __init__(self, bundle, searcher: Searcher):
        if bundle.embed_dim != searcher.dim:
            raise EmbeddingMismatchError(
                f"the query model makes {bundle.embed_dim}-d embeddings but the collection holds "
                f"{searcher.dim}-d embeddings"
            )
        self.bundle = bundle
        self.searcher = searcher
        self.bundle.model.eval()

    @classmethod
    def from_files(
        cls,
        load_model: str | os.PathLike,
        emb_path: str | os.PathLike,
        index_path: str | os.PathLike | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> SearchEngine:
        from clipsearch.checkpoint import model_fingerprint
        from clipsearch.models.released import load_model as load_any_model

        bundle = load_any_model(load_model)
        try:
            searcher = Searcher.from_shards(
                emb_path,
                expected_dim=bundle.embed_dim,
                expected_fingerprint=model_fingerprint(bundle),
                dtype=dtype,
                index_path=index_path,
            )
        except EmbeddingMismatchError as error:
            raise EmbeddingMismatchError(f"query model {load_model}: {error}") from error
        return cls(bundle, searcher)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            return F.normalize(self.bundle.model.encode_text(self.bundle.tokenizer(list(texts))).float(), dim=-1)

    def encode_images(self, images: list) -> torch.Tensor:
        pixels = torch.stack([self.bundle.eval_transform(image.convert("RGB")) for image in images])
        with torch.inference_mode():
            return F.normalize(self.bundle.model.encode_image(pixels).float(), dim=-1)

    def search_text(self, texts: list[str], top_k: int) -> list[list[Hit]]:
        if not texts:
            return []
        return self.searcher.search(self.encode_texts(texts), top_k)

    def search_image(self, images: list, top_k: int) -> list[list[Hit]]:
        if not images:
            return []
        return self.searcher.search(self.encode_images(images), top_k)

    def path_of(self, hit_id: int) -> str:
        return self.searcher.paths[hit_id]
