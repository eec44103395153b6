"""faiss indexes and the memory-mapped store: budgets kept, recall recorded, same answers mapped or read, exports readable."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from clipsearch.cli.export_clip_retrieval import main as export_main
from clipsearch.cli.index import KINDS as CLI_KINDS
from clipsearch.cli.index import main as index_main
from clipsearch.index import KINDS, build_index, default_nlist, exact_neighbours, load_index, plan_index
from clipsearch.mmap_store import consolidate, open_store
from clipsearch.search import EmbeddingMismatchError, Searcher
from clipsearch.store import load_collection, order_fingerprint, write_shard


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
    assert plan_index(count * 100, dim, 2**40).factory.startswith("IVF16384_HNSW32")  # many lists: HNSW quantizer
    with pytest.raises(ValueError, match="raise --max_memory"):
        plan_index(count, dim, 2**20)
    assert default_nlist(1_000_000) == 2048 and default_nlist(2_000) == 2_000 // 39


def test_budgeted_index_fits_records_recall_and_answers_mapped_as_in_memory(tmp_path):
    embeddings = clustered(4_000)
    write_folder(tmp_path, embeddings)
    budget = 150 * 1024
    built = index_main(["--emb_path", str(tmp_path), "--max_memory", "150KB", "--recall_queries", "200"])
    assert built.info["kind"] == "ivf_pq" and built.info["params"]["rerank_factor"] > 0
    assert (tmp_path / "index.faiss").stat().st_size <= budget
    assert built.info["index_bytes"] <= budget and built.info["estimated_bytes"] <= budget
    assert built.info["recall_at_10"] >= 0.9 and built.info["recall_queries"] == "200 held-out rows"
    assert built.info["recall_at_10"] == max(built.info["recall_by_nprobe"].values())

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
    assert built.info["recall_queries"] == "100 given queries" and built.info["recall_at_10"] >= 0.95
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
    assert store.paths == paths and store.embeddings.dtype == torch.float16
    torch.testing.assert_close(store.embeddings.float(), embeddings[:200], atol=1e-3, rtol=0)
    matrix = store.folder / "embeddings.f16"
    first_write = matrix.stat().st_mtime_ns
    assert consolidate(tmp_path).paths == paths and matrix.stat().st_mtime_ns == first_write  # up to date: reused

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
