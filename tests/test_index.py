"""faiss indexes: agree with exact search, answer through the same Searcher call, refuse other rows."""
import pytest
import torch

from clipsearch.index import build_index, choose_kind, default_nlist, load_index
from clipsearch.index import main as index_main
from clipsearch.search import EmbeddingMismatchError, Searcher
from clipsearch.store import load_collection, write_shard


def clustered(count, dim=64, clusters=50, seed=0):
    """Vectors around a few centres, like image embeddings of a collection with themes."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=generator)
    members = centres[torch.randint(0, clusters, (count,), generator=generator)]
    return members + 0.5 * torch.randn(count, dim, generator=generator)


def recall_at(searcher, queries, top_k=10) -> float:
    _, exact_rows = searcher.exact_top_k(torch.nn.functional.normalize(queries, dim=-1), top_k)
    index_hits = searcher.search(queries, top_k)
    found = sum(len(set(exact.tolist()) & {hit.id for hit in hits}) for exact, hits in zip(exact_rows, index_hits))
    return found / (len(queries) * top_k)


def test_auto_kind_rule():
    assert [choose_kind(count) for count in (10, 49_999, 50_000, 3_999_999, 4_000_000)] == [
        "flat", "flat", "ivf", "ivf", "hnsw"
    ]
    assert default_nlist(1_000_000) == 4000 and default_nlist(20_000) == 20_000 // 39


def test_ivf_agrees_with_exact_search():
    embeddings = clustered(20_000)
    searcher = Searcher([f"{index}.jpg" for index in range(20_000)], embeddings)
    searcher.index = build_index(searcher, "ivf")
    queries = clustered(200, seed=1)
    assert recall_at(searcher, queries) >= 0.95


def test_flat_is_exact_and_hnsw_answers(tmp_path):
    embeddings = clustered(3_000)
    paths = [f"{index}.jpg" for index in range(3_000)]
    exact = Searcher(paths, embeddings)
    queries = clustered(20, seed=2)
    flat = Searcher(paths, embeddings, build_index(exact, "flat"))
    assert [[hit.id for hit in hits] for hits in flat.search(queries, 10)] == [
        [hit.id for hit in hits] for hits in exact.search(queries, 10)
    ]
    hnsw = Searcher(paths, embeddings, build_index(exact, "hnsw"))
    assert recall_at(hnsw, queries) >= 0.9
    assert [len(hits) for hits in hnsw.search(queries[:2], 100)] == [100, 100]


def test_saved_index_answers_through_from_shards_and_refuses_other_rows(tmp_path):
    embeddings = clustered(2_000, dim=16)
    paths = [f"/images/{index}.jpg" for index in range(2_000)]
    write_shard(tmp_path / "0-000-64.ckpt", paths[:1_000], embeddings[:1_000])
    write_shard(tmp_path / "1-000-64.ckpt", paths[1_000:], embeddings[1_000:])
    built = index_main(["--emb_path", str(tmp_path), "--kind", "ivf", "--nlist", "16", "--nprobe", "16"])
    assert built.info["estimated_recall_at_10"] == 1.0  # every list scanned: exact
    assert load_index(tmp_path).info == built.info

    exact = Searcher.from_collection(load_collection(tmp_path))
    indexed = Searcher.from_collection(load_collection(tmp_path), load_index(tmp_path / "index.faiss"))
    assert indexed.index.kind == "ivf"
    for indexed_hits, exact_hits in zip(indexed.search(embeddings[:3], 5), exact.search(embeddings[:3], 5)):
        assert [(hit.id, hit.path) for hit in indexed_hits] == [(hit.id, hit.path) for hit in exact_hits]
        assert [hit.score for hit in indexed_hits] == pytest.approx([hit.score for hit in exact_hits], abs=1e-5)

    with pytest.raises(EmbeddingMismatchError, match="holds 2000 vectors but the collection has 1000"):
        Searcher(paths[:1_000], embeddings[:1_000], load_index(tmp_path))
    with pytest.raises(EmbeddingMismatchError, match="other embeddings"):
        Searcher(list(reversed(paths)), embeddings, load_index(tmp_path))
