"""faiss indexes and the memory-mapped store: budgets kept, recall recorded, same answers mapped or read, exports readable."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clipsearch.cli.export_clip_retrieval import main as export_main
from clipsearch.cli.index import KINDS as CLI_KINDS
from clipsearch.cli.index import main as index_main
from clipsearch.index import (
    KINDS,
    build_index,
    build_index_in_parts,
    build_memory,
    default_nlist,
    exact_neighbours,
    load_index,
    overlap_recall,
    plan_index,
    recall_lower_bound,
)
from clipsearch.mmap_store import consolidate, open_store
from clipsearch.search import EmbeddingMismatchError, Searcher
from clipsearch.store import load_collection, order_fingerprint, write_shard

REPO = Path(__file__).resolve().parents[1]


def clustered(count, dim=32, clusters=40, seed=0):
    """Vectors around a few centres, like image embeddings of a collection with themes."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=generator)
    members = centres[torch.randint(0, clusters, (count,), generator=generator)]
    return torch.nn.functional.normalize(members + 0.5 * torch.randn(count, dim, generator=generator), dim=-1)


def write_folder(folder, embeddings, shards=2):
    paths = [f"/images/{row}.jpg" for row in range(len(embeddings))]
    bounds = np.linspace(0, len(embeddings), shards + 1).astype(int)
    for rank, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        write_shard(folder / f"{rank}-000-64.ckpt", paths[start:end], embeddings[start:end])
    return paths


def recall_at(searcher, queries, top_k=10) -> float:
    _, exact_rows = searcher.exact_top_k(queries, top_k)
    index_hits = searcher.search(queries, top_k)
    found = sum(len(set(exact.tolist()) & {hit.id for hit in hits}) for exact, hits in zip(exact_rows, index_hits))
    return found / (len(queries) * top_k)


def test_plan_takes_the_most_accurate_layout_that_fits():
    count, dim = 1_000_000, 512
    assert CLI_KINDS == KINDS
    assert plan_index(count, dim).kind == "ivf"  # no budget: full vectors
    assert plan_index(count, dim, 2 * 2**30).kind == "ivf_sq8"  # 2 GB of full vectors do not fit in 0.9 * 2 GB
    small = plan_index(count, dim, 100 * 2**20)
    assert (small.kind, small.pq_m) == ("ivf_pq", 64) and small.estimated_bytes <= 0.9 * 100 * 2**20
    assert plan_index(10_000, dim, 2**30).kind == "flat"
    # A build that re-ranks from the store takes fast-scan PQ at a million rows and more, never in parts.
    fast = plan_index(count, dim, 2 * 2**30, reranks=True)
    assert (fast.kind, fast.pq_m, fast.factory) == ("ivf_pq_fast", 256, "IVF2048,PQ256x4fs")
    assert fast.estimated_bytes < 0.3 * plan_index(count, dim, 2 * 2**30).estimated_bytes  # 128 + 8 bytes a row against 512 + 8
    assert plan_index(count - 1, dim, 2 * 2**30, reranks=True).kind == "ivf_sq8"
    assert plan_index(count, dim, 2 * 2**30, reranks=True, ivf_only=True).kind == "ivf_sq8"
    with pytest.raises(ValueError, match="on-disk inverted lists"):
        plan_index(count, dim, kind="ivf_pq_fast", ivf_only=True)
    assert plan_index(count * 100, dim, 2**40).factory.startswith("IVF16384,")  # text queries need a flat quantizer
    assert plan_index(count * 100, dim, 2**40, nlist=65_536).factory.startswith("IVF65536_HNSW32")  # then a graph
    with pytest.raises(ValueError, match="raise --max_memory"):
        plan_index(count, dim, 2**20)
    assert default_nlist(1_000_000) == 2048 and default_nlist(2_000) == 2_000 // 39


def test_recall_lower_bound_takes_the_sampling_error_off_the_mean():
    assert recall_lower_bound(np.ones(500)) == 1.0
    # 500 queries averaging 0.951 (as 20M rows tuned to) can be 0.946 on others: short of 0.95 once the error is off.
    shares = np.where(np.arange(500) % 10 < 7, 1.0, 0.8367)
    assert abs(shares.mean() - 0.951) < 1e-3 and 0.94 < recall_lower_bound(shares) < 0.95


def test_budgeted_index_fits_records_recall_and_answers_mapped_as_in_memory(tmp_path):
    embeddings = clustered(4_000)
    write_folder(tmp_path, embeddings)
    budget = 150 * 1024
    built = index_main(["--emb_path", str(tmp_path), "--max_memory", "150KB", "--recall_queries", "200"])
    assert built.info["kind"] == "ivf_pq" and built.info["params"]["rerank_factor"] > 0
    assert (tmp_path / "index.faiss").stat().st_size <= budget
    assert built.info["index_bytes"] <= budget and built.info["estimated_bytes"] <= budget
    assert built.info["recall_at_10"] >= 0.9 and built.info["recall_queries"] == "200 held-out rows"
    # No model.json names a model to encode captions with: tuned on image rows, and the record says why.
    assert built.info["tuned_on"] == "image rows" and "records no model" in built.info["text_recall_note"]
    chosen = [setting for setting in built.info["tuning"] if setting["nprobe"] == built.info["params"]["nprobe"]
              and setting["rerank_factor"] == built.info["params"]["rerank_factor"]]
    # The tuning queries are a sample: the chosen setting clears the target by its standard error, not just on average.
    assert chosen and chosen[0]["recall_lower_bound"] >= 0.95 and chosen[0]["recall_at_10"] > chosen[0]["recall_lower_bound"]
    assert built.info["recall_lower_bound"] >= 0.95

    queries = clustered(50, seed=3).numpy()  # other themes than the collection's: answers must still agree
    mapped, read = load_index(tmp_path), load_index(tmp_path, mmap=False)
    assert mapped.info["memory_mapped"] and not read.info["memory_mapped"] and mapped.reranks
    for answer in (mapped.search(queries, 10), read.search(queries, 10)):
        np.testing.assert_array_equal(answer[1], built.search(queries, 10)[1])
        np.testing.assert_allclose(answer[0], built.search(queries, 10)[0], atol=1e-6)


def test_recall_is_tuned_on_given_queries(tmp_path):
    embeddings, queries = clustered(3_100).split([3_000, 100])
    write_folder(tmp_path, embeddings)
    np.save(tmp_path / "queries.npy", queries.numpy())
    built = index_main(["--emb_path", str(tmp_path), "--kind", "ivf", "--tune_queries", str(tmp_path / "queries.npy")])
    assert built.info["recall_queries"].startswith("100 given queries") and built.info["recall_at_10"] >= 0.95
    paths = [f"/images/{row}.jpg" for row in range(3_000)]
    assert recall_at(Searcher(paths, embeddings, built), queries) == built.info["recall_at_10"]


def test_ivf_and_hnsw_agree_with_exact_search():
    embeddings, queries = clustered(6_100).split([6_000, 100])  # fresh queries from the same themes
    paths = [f"{row}.jpg" for row in range(6_000)]
    exact = Searcher(paths, embeddings)
    ivf = build_index(embeddings, order_fingerprint(paths, 32), kind="ivf", recall_queries=100)
    assert ivf.info["recall_at_10"] >= 0.95 and ivf.info["params"]["nprobe"] < ivf.info["params"]["nlist"]
    assert recall_at(Searcher(paths, embeddings, ivf), queries) >= 0.9
    hnsw = build_index(embeddings, order_fingerprint(paths, 32), kind="hnsw", recall_queries=0)
    assert recall_at(Searcher(paths, embeddings, hnsw), queries) >= 0.9
    flat = build_index(embeddings, order_fingerprint(paths, 32), kind="flat")
    assert [[hit.id for hit in hits] for hits in Searcher(paths, embeddings, flat).search(queries[:5], 10)] == [
        [hit.id for hit in hits] for hits in exact.search(queries[:5], 10)
    ]
    chunked = exact_neighbours(embeddings.numpy(), queries.numpy(), 10, rows_per_chunk=999)  # merges across chunks
    assert [set(rows) for rows in chunked.tolist()] == [set(rows) for rows in exact.exact_top_k(queries, 10)[1].tolist()]


def test_saved_index_answers_through_the_searcher_and_refuses_other_rows(tmp_path):
    embeddings = clustered(2_000, dim=16)
    paths = write_folder(tmp_path, embeddings)
    built = index_main(["--emb_path", str(tmp_path), "--kind", "ivf", "--nlist", "16", "--nprobe", "16"])
    assert built.info["recall_at_10"] == 1.0  # every list scanned: exact

    exact = Searcher.from_collection(load_collection(tmp_path))
    indexed = Searcher.from_collection(load_collection(tmp_path), load_index(tmp_path / "index.faiss"))
    assert indexed.index.kind == "ivf"
    for indexed_hits, exact_hits in zip(indexed.search(embeddings[:3], 5), exact.search(embeddings[:3], 5)):
        assert [(hit.id, hit.path) for hit in indexed_hits] == [(hit.id, hit.path) for hit in exact_hits]
        assert [hit.score for hit in indexed_hits] == pytest.approx([hit.score for hit in exact_hits], abs=1e-2)
    with pytest.raises(EmbeddingMismatchError, match="holds 2000 vectors but the collection has 1000"):
        Searcher(paths[:1_000], embeddings[:1_000], load_index(tmp_path))
    with pytest.raises(EmbeddingMismatchError, match="other embeddings"):
        Searcher(list(reversed(paths)), embeddings, load_index(tmp_path))


def test_consolidated_store_is_built_once_and_rebuilt_when_a_shard_is_added(tmp_path):
    embeddings = clustered(300)
    paths = write_folder(tmp_path, embeddings[:200])
    store = consolidate(tmp_path)
    assert list(store.paths) == paths and store.embeddings.dtype == torch.float16
    torch.testing.assert_close(store.embeddings.float(), embeddings[:200], atol=1e-3, rtol=0)
    matrix = store.folder / "embeddings.f16"
    first_write = matrix.stat().st_mtime_ns
    assert list(consolidate(tmp_path).paths) == paths and matrix.stat().st_mtime_ns == first_write  # up to date: reused

    (tmp_path / "other-index.faiss").write_bytes(b"")
    (tmp_path / "other-index.json").write_text("{}")  # an index's record is no input
    assert open_store(tmp_path) is not None
    write_shard(tmp_path / "2-000-64.ckpt", [f"/images/new-{row}.jpg" for row in range(100)], embeddings[200:])
    assert open_store(tmp_path) is None  # stale: never served
    grown = consolidate(tmp_path)
    assert len(grown) == 300 and grown.paths[200:] == [f"/images/new-{row}.jpg" for row in range(100)]
    torch.testing.assert_close(grown.embeddings[200:].float(), embeddings[200:], atol=1e-3, rtol=0)
    # Exact search straight on the mapped matrix: no copy, same answers as the shards read into memory.
    mapped = Searcher(grown.paths, grown.embeddings, assume_normalised=True)
    assert mapped.storage.data_ptr() == grown.embeddings.data_ptr()
    loaded = Searcher.from_collection(load_collection(tmp_path, dtype=torch.float16))
    assert [hit.path for hit in mapped.search(embeddings[:2], 5)[0]] == [hit.path for hit in loaded.search(embeddings[:2], 5)[0]]


def test_a_store_serves_paths_and_fields_memory_mapped_without_the_shards(tmp_path, monkeypatch):
    """The store's rows file holds every path byte for byte (a name no UTF-8 decodes included) and
    every field, so a search process over it never reads a shard nor holds a list of paths."""
    import clipsearch.mmap_store as mmap_store
    import clipsearch.store as store_module
    from clipsearch.metadata import PathColumn

    embeddings = clustered(70)
    paths = [f"/images/{row}.jpg" for row in range(68)] + ["/images/caf\udce9.jpg", "/images/été.jpg"]
    # A field named `path` (a table's column) must give way to the row's path, in the store as in memory.
    fields = [{"caption": f"photo {row}", "width": 100 + row, "path": "elsewhere"} if row % 3 else {"caption": None}
              for row in range(70)]
    write_shard(tmp_path / "0-000-40.ckpt", paths[:40], embeddings[:40], fields=fields[:40])
    write_shard(tmp_path / "1-000-40.ckpt", paths[40:], embeddings[40:], fields=fields[40:])
    loaded = load_collection(tmp_path)
    consolidate(tmp_path)

    def no_shards(*args, **kwargs):
        raise AssertionError("a shard was read")

    monkeypatch.setattr(store_module, "read_catalog", no_shards)
    monkeypatch.setattr(mmap_store, "read_catalog", no_shards)
    store = open_store(tmp_path)
    assert isinstance(store.paths, PathColumn) and list(store.paths) == loaded.paths
    assert store.paths[-2] == "/images/caf\udce9.jpg" and store.paths[68:] == paths[68:] and store.paths[-1] == paths[-1]
    assert store.paths.index("/images/été.jpg") == 69 and "/images/none.jpg" not in store.paths
    assert store.order_fingerprint == loaded.order_fingerprint
    assert store.fields.fields == loaded.fields.fields
    assert [store.fields.row(row) for row in range(70)] == [loaded.fields.row(row) for row in range(70)]
    for where in (["width>=150"], ["caption~photo 1*"], ["path~*é*"]):
        assert store.fields.select(where).rows.tolist() == loaded.fields.select(where).rows.tolist(), where

    # A store written before the rows file (paths.json) is rebuilt once the shards can be read.
    monkeypatch.undo()
    (store.folder / "rows.arrow").unlink()
    (store.folder / "paths.json").write_text("[]")
    assert open_store(tmp_path) is None
    assert list(consolidate(tmp_path).paths) == loaded.paths and not (store.folder / "paths.json").exists()


def test_a_full_disk_while_consolidating_is_one_line_naming_the_matrix_and_leaves_nothing(tmp_path, monkeypatch):
    """The matrix is written inside the rows file's writer: the disk filling under it gets the matrix's
    own line (not the rows file's), and the half-built store folder is gone."""
    import errno
    import os

    from clipsearch import durable

    write_folder(tmp_path, clustered(300))
    before = sorted(path.name for path in tmp_path.iterdir())
    original = durable._Stream.write

    def full_on_large_writes(self, data):
        if memoryview(data).nbytes > 10_000:  # the matrix's chunk (19 KB), not the rows file's batches
            self.full = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, data)

    monkeypatch.setattr(durable._Stream, "write", full_on_large_writes)
    with pytest.raises(durable.DiskFullError, match=r"no space left in .*: writing embeddings\.f16 needs "):
        consolidate(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == before  # no store, no temporary, no lock
    monkeypatch.undo()
    assert len(consolidate(tmp_path)) == 300


def test_clip_retrieval_export_is_readable_in_order(tmp_path):
    import pyarrow.parquet as pq

    embeddings = clustered(230, dim=8)
    (tmp_path / "emb").mkdir()
    paths = write_folder(tmp_path / "emb", embeddings)
    files = export_main(["--emb_path", str(tmp_path / "emb"), "--out", str(tmp_path / "out"), "--rows_per_file", "20"])
    assert [file.name for file in files][:3] == ["img_emb_00.npy", "img_emb_01.npy", "img_emb_02.npy"] and len(files) == 12
    matrices = [np.load(file) for file in sorted((tmp_path / "out" / "img_emb").glob("*.npy"))]
    tables = [pq.read_table(file) for file in sorted((tmp_path / "out" / "metadata").glob("*.parquet"))]
    assert [len(matrix) for matrix in matrices] == [table.num_rows for table in tables]
    assert sum((table.column("image_path").to_pylist() for table in tables), []) == paths
    np.testing.assert_allclose(np.concatenate(matrices).astype(np.float32), embeddings.numpy(), atol=1e-3)


def test_commands_answer_before_importing_faiss(tmp_path):
    probe = (
        "import sys\nfrom clipsearch.cli.common import run_command\nfrom clipsearch.cli.index import main\n"
        "try:\n    run_command(main, sys.argv[1:])\nfinally:\n"
        "    print(sorted(name for name in ('faiss', 'torch') if name in sys.modules))"
    )
    missing = subprocess.run(
        [sys.executable, "-c", probe, "--emb_path", str(tmp_path / "nowhere")], capture_output=True, text=True
    )
    assert missing.returncode == 1 and "error: --emb_path" in missing.stderr and missing.stdout.strip() == "[]"
    typo = subprocess.run([sys.executable, "-c", probe, "--max-memory", "4XB"], capture_output=True, text=True)
    assert typo.returncode == 2 and "expected a size such as 4GB" in typo.stderr
    library = subprocess.run(
        [sys.executable, "-c", "import sys, clipsearch.index; print('clipsearch.search' in sys.modules)"],
        capture_output=True,
        text=True,
    )
    assert library.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# Recall on the queries users send: text, which lies in another cone than the images
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def clip_like(monkeypatch):
    """benchmarks/clip_like.py: CLIP-like image vectors and text queries with a modality gap."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import clip_like

    return clip_like


def test_tuning_on_text_queries_reaches_the_target_that_tuning_on_image_rows_misses(clip_like):
    space = clip_like.ClipLikeSpace(dim=64, clusters=100)
    images = next(space.images(10_000))
    draws = np.random.default_rng(1)
    captions = space.texts(images[draws.choice(10_000, 300, replace=False)], seed=3)
    fresh = space.texts(images[draws.choice(10_000, 300, replace=False)], seed=4)  # other captions, as search gets
    truth = exact_neighbours(images, fresh, 10)
    by_rows = build_index(images, "rows", kind="ivf", recall_queries=300)
    by_text = build_index(images, "rows", kind="ivf", recall_queries=300, queries=captions,
                          queries_description="300 captions")
    assert by_rows.info["tuned_on"] == "image rows" and by_rows.info["image_recall_at_10"] >= 0.95
    assert overlap_recall(by_rows.search(fresh, 10)[1], truth) < 0.9  # what its index.json does not tell
    assert by_text.info["tuned_on"] == "text queries" and by_text.info["text_queries"] == "300 captions"
    assert by_text.info["params"]["nprobe"] > by_rows.info["params"]["nprobe"]
    assert by_text.info["text_recall_at_10"] >= 0.95 and by_text.info["image_recall_at_10"] >= 0.95
    assert overlap_recall(by_text.search(fresh, 10)[1], truth) >= 0.93


def test_pq_rerank_depth_is_tuned_when_nprobe_alone_cannot_reach_the_target(clip_like, tmp_path):
    """Few bytes a code: the true top 10 of a text query lie past 10 x 10 PQ candidates, whatever nprobe."""
    space = clip_like.ClipLikeSpace(dim=64, clusters=100)
    images = torch.from_numpy(next(space.images(6_000)))
    write_folder(tmp_path, images)
    store = consolidate(tmp_path)
    captions = space.texts(images[:200].numpy(), seed=3)
    built = build_index(store.embeddings, store.order_fingerprint, max_memory=195 * 1024, nlist=32, rerank_rows=store.rows,
                        queries=captions, recall_queries=200)
    at_depth_10 = max(setting["recall_at_10"] for setting in built.info["tuning"] if setting["rerank_factor"] == 10)
    assert built.info["params"]["pq_m"] == 8 and at_depth_10 < 0.95
    assert built.info["params"]["rerank_factor"] > 10 and built.info["text_recall_at_10"] >= 0.95


def test_fast_scan_pq_reranks_to_the_target_on_text_queries_and_answers_mapped_as_in_memory(clip_like, tmp_path):
    """4-bit fast-scan codes rank text queries coarsely: the re-rank depth is tuned until the target is met."""
    space = clip_like.ClipLikeSpace(dim=64, clusters=100)
    images = torch.from_numpy(next(space.images(8_000)))
    write_folder(tmp_path, images)
    store = consolidate(tmp_path)
    captions, held_out = space.texts(images[:200].numpy(), seed=3), space.texts(images[200:300].numpy(), seed=4)
    built = build_index(store.embeddings, store.order_fingerprint, kind="ivf_pq_fast", nlist=64, rerank_rows=store.rows,
                        queries=captions, recall_queries=200)
    assert built.info["factory"] == "IVF64,PQ32x4fs" and built.reranks
    assert built.info["params"]["rerank_factor"] > 10 and built.info["text_recall_at_10"] >= 0.95
    exact = exact_neighbours(store.embeddings, held_out.astype(np.float32), 10)
    assert overlap_recall(built.search(held_out, 10)[1], exact, None, 10) >= 0.9  # other captions than the tuning's
    built.save(tmp_path / "index.faiss")
    for loaded in (load_index(tmp_path), load_index(tmp_path, mmap=False)):
        assert loaded.reranks
        np.testing.assert_array_equal(loaded.search(held_out, 10)[1], built.search(held_out, 10)[1])
    # A store of the layout before the rows file (paths.json) still serves the re-rank, which reads the
    # matrix alone: an index built on it keeps its recall until the store is rebuilt.
    (store.folder / "rows.arrow").unlink()
    (store.folder / "paths.json").write_text("[]")
    assert open_store(tmp_path) is None and load_index(tmp_path).reranks


def encode_captioned(tmp_path, tiny_checkpoint, colour_images):
    """The colour images as a dataset with a table of captions, encoded by the tiny model."""
    from clipsearch.cli.encode import main as encode_main

    root, image_paths = colour_images
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    lines = ["image\tcaption"] + [f"{path}\ta photo of colour number {number}" for number, path in enumerate(image_paths)]
    (dataset / "train.tsv").write_text("\n".join(lines) + "\n")
    emb_path = tmp_path / "emb"
    encode_main(["--load_model", str(tiny_checkpoint), "--dataset_path", str(dataset), "--emb_path", str(emb_path),
                 "--num_workers", "0", "--no_progress"])
    return emb_path


def test_index_tunes_on_the_collections_captions_and_search_warns_below_target(tmp_path, tiny_checkpoint,
                                                                               colour_images, capsys):
    from clipsearch.cli.search import main as search_main

    emb_path = encode_captioned(tmp_path, tiny_checkpoint, colour_images)
    # One list of two scanned: text recall about half, below the target, and recorded so.
    built = index_main(["--emb_path", str(emb_path), "--kind", "ivf", "--nlist", "2", "--nprobe", "1",
                        "--recall_queries", "40"])
    described = built.info["text_queries"]
    assert described.startswith("40 text queries: 12 captions of ") and "28 generic captions" in described
    assert str(tiny_checkpoint) in described and built.info["tuned_on"] == "text queries"
    assert built.info["text_recall_at_10"] < 0.95 and 0 < built.info["image_recall_at_10"]
    assert "recall@10" in capsys.readouterr().out

    search_main(["--emb_path", str(emb_path), "--index_path", str(emb_path / "index.faiss"), "--query", "red",
                 "--no_grid", "--top_k", "3"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "of the exact top 10 for text queries, below its target 95%" in warnings[0]

    tuned = index_main(["--emb_path", str(emb_path), "--kind", "ivf", "--nlist", "2", "--recall_queries", "40"])
    assert tuned.info["text_recall_at_10"] >= 0.95 and tuned.recall_warning() is None


def test_a_model_that_cannot_be_loaded_falls_back_to_image_rows_and_says_so(tmp_path, tiny_checkpoint, colour_images):
    import json

    from clipsearch.cli.common import UserError

    emb_path = encode_captioned(tmp_path, tiny_checkpoint, colour_images)
    record = json.loads((emb_path / "model.json").read_text())
    (emb_path / "model.json").write_text(json.dumps({**record, "load_model": str(tmp_path / "moved.ckpt")}))
    built = index_main(["--emb_path", str(emb_path), "--kind", "ivf", "--nlist", "2"])
    assert built.info["tuned_on"] == "image rows" and "moved.ckpt could not be used" in built.info["text_recall_note"]
    assert "never measured" in built.recall_warning()
    with pytest.raises(UserError, match="--load_model .*missing.ckpt"):  # asked for by name: an error, not a fallback
        index_main(["--emb_path", str(emb_path), "--kind", "ivf", "--nlist", "2", "--load_model", str(tmp_path / "missing.ckpt")])


# ---------------------------------------------------------------------------------------------
# Larger than memory: built in parts, by ranks, merged into on-disk lists
# ---------------------------------------------------------------------------------------------


def answers(index, queries):
    return index.search(queries, 10)[1].tolist()


def test_built_in_parts_answers_as_built_in_memory(tmp_path):
    embeddings = clustered(5_000)
    write_folder(tmp_path, embeddings)
    store = consolidate(tmp_path)
    queries = clustered(40, seed=5).numpy()
    common = {"kind": "ivf_pq", "nlist": 64, "rerank_rows": store.rows, "queries": queries, "recall_queries": 100}
    in_memory = build_index(store.embeddings, store.order_fingerprint, **common)
    # A budget whose parts hold about 1,000 rows' lists: one rank writes several parts.
    in_parts = build_index_in_parts(store.embeddings, store.order_fingerprint, tmp_path / "parts.faiss",
                                    max_memory=400 * 2**20, **common)
    assert in_parts.info["built_in_parts"] == {"ranks": 1, "parts": 1}
    assert in_parts.info["params"] == in_memory.info["params"]
    assert in_parts.info["text_recall_at_10"] == in_memory.info["text_recall_at_10"]
    assert answers(in_parts, queries) == answers(in_memory, queries)
    assert not (tmp_path / "parts.faiss.parts").exists()  # the parts are gone once merged
    lists = tmp_path / in_parts.info["ivfdata"]
    assert lists.is_file() and in_parts.info["index_bytes"] > lists.stat().st_size

    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "parts.faiss").rename(moved / "index.faiss")
    (tmp_path / "parts.json").rename(moved / "index.json")
    lists.rename(moved / lists.name)
    loaded = load_index(moved / "index.faiss")  # lists found beside the index, wherever it went
    loaded.rerank_rows = store.rows
    assert loaded.info["memory_mapped"] and answers(loaded, queries) == answers(in_memory, queries)


def test_small_parts_and_a_rebuild_replace_the_lists_file(tmp_path, monkeypatch):
    import clipsearch.index as index_module

    embeddings = clustered(3_000)
    write_folder(tmp_path, embeddings)
    store = consolidate(tmp_path)
    monkeypatch.setattr(index_module, "build_memory", lambda *args, **kwargs: index_module.BuildMemory(2_000, 500, 30_000))
    first = build_index_in_parts(store.embeddings, store.order_fingerprint, tmp_path / "index.faiss", kind="ivf_sq8",
                                 nlist=16, nprobe=16, recall_queries=50, max_memory=2**30)
    assert first.info["built_in_parts"]["parts"] == 3  # two chunks of 500 rows, 40 bytes each, fill a 30 kB part
    assert first.info["image_recall_at_10"] > 0.9
    second = build_index_in_parts(store.embeddings, store.order_fingerprint, tmp_path / "index.faiss", kind="ivf_sq8",
                                  nlist=16, nprobe=16, recall_queries=50, max_memory=2**30)
    assert sorted(path.name for path in tmp_path.glob("*.ivfdata")) == [second.info["ivfdata"]]
    exact = clustered(20, seed=7).numpy()
    assert answers(load_index(tmp_path), exact) == answers(second, exact)


def test_two_ranks_build_parts_that_rank_zero_merges(tmp_path):
    """Two processes as torchrun starts them (RANK, WORLD_SIZE), meeting through the parts folder."""
    import os

    embeddings = clustered(4_000)
    write_folder(tmp_path, embeddings)
    command = [sys.executable, "-m", "clipsearch.cli.index", "--emb_path", str(tmp_path), "--kind", "ivf",
               "--nlist", "32", "--recall_queries", "100", "--out", str(tmp_path / "ranked.faiss")]
    ranks = [subprocess.Popen(command, env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2",
                                            "PYTHONPATH": os.pathsep.join(sys.path)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (1, 0)]
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    assert "rank 1 of 2: parts written" in outputs[0][0] and "wrote IVF32,Flat index of 4,000 vectors" in outputs[1][0]
    ranked = load_index(tmp_path / "ranked.faiss")
    assert ranked.info["built_in_parts"] == {"ranks": 2, "parts": 2}
    store = consolidate(tmp_path)
    in_memory = build_index(store.embeddings, store.order_fingerprint, kind="ivf", nlist=32, recall_queries=100)
    queries = clustered(30, seed=9).numpy()
    assert ranked.info["params"]["nprobe"] == in_memory.info["params"]["nprobe"]
    assert answers(ranked, queries) == answers(in_memory, queries)


def test_a_budget_too_small_for_any_index_is_one_line(tmp_path):
    write_folder(tmp_path, clustered(4_000))
    completed = subprocess.run([sys.executable, "-m", "clipsearch.cli.index", "--emb_path", str(tmp_path),
                                "--max_memory", "50KB"], capture_output=True, text=True)
    lines = completed.stderr.strip().splitlines()
    assert completed.returncode == 1 and len(lines) == 1, completed.stderr
    assert lines[0].startswith("error: no auto index of 4,000 x 32 vectors fits 0.05 MB") and "raise --max_memory" in lines[0]
    assert not (tmp_path / "index.faiss").exists()
    # In parts, the budget must hold the centroids and faiss's 39 training rows a list: 20M x 512 in 1 GB cannot.
    plan = plan_index(20_000_000, 512, 2**30, ivf_only=True)
    with pytest.raises(ValueError, match=r"in parts needs at least [\d,.]+ MB .* --max_memory 1,024.0 MB is too small"):
        build_memory(plan, 20_000_000, 512, 2**30, in_parts=True)
