"""Fields and filters: conditions parsed and applied as Python would, filtered top-k equal to brute force (exact,
through each index kind), fields stored by encoding and kept in step by updates, captions as a collection."""
from __future__ import annotations

import fnmatch
import json
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clipsearch.search as search_module
from clipsearch.cli.encode import main as encode_main
from clipsearch.fields import FilterError, glob_pattern, parse_condition, parse_date
from clipsearch.index import build_index
from clipsearch.metadata import MetadataTable, RowSet
from clipsearch.query_terms import TermError, parse_weighted
from clipsearch.search import Searcher
from clipsearch.store import StoreError, load_collection, order_fingerprint, read_shard, write_shard


def encode(checkpoint, dataset, emb_path, *extra):
    argv = ["--load_model", str(checkpoint), "--dataset_path", str(dataset), "--emb_path", str(emb_path)]
    return encode_main([*argv, "--num_workers", "0", "--no_progress", "--accelerator", "cpu", *extra])


# ---------------------------------------------------------------------------------------------
# Conditions and terms as written
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("taken>=2023-06-01", ("taken", ">=", "2023-06-01")),
    ("path~*/2023/*", ("path", "~", "*/2023/*")),
    (" caption = 'a dog' ", ("caption", "=", "a dog")),
    ("likes!=3", ("likes", "!=", "3")),
    ("path!~*.png", ("path", "!~", "*.png")),
    ("url=http://x/a=b", ("url", "=", "http://x/a=b")),  # the first operator splits; the value keeps its own
    ("my field<5", ("my field", "<", "5")),
])
def test_conditions_parse(text, expected):
    condition = parse_condition(text)
    assert (condition.field, condition.op, condition.value) == expected


@pytest.mark.parametrize("text", ["likes", "=3", "likes>", "  ", "~x"])
def test_malformed_conditions_are_one_clear_error(text):
    with pytest.raises(FilterError, match="filter"):
        parse_condition(text)


@pytest.mark.parametrize("glob", ["*/2023/*", "*.JPG", "img[0-9].png", "img[!0-9].png", "a[]]b", "x[", "a.b", "*dog*", "?at"])
def test_globs_match_as_fnmatch_does(glob):
    import re

    names = ["/a/2023/x.jpg", "a.jpg", "A.JPG", "img3.png", "imgx.png", "a]b", "x[", "axb", "a.b", "hot\ndog", "cat"]
    assert [bool(re.match(glob_pattern(glob), name)) for name in names] == [fnmatch.fnmatchcase(name, glob) for name in names]


def test_dates_parse_at_their_precision():
    assert parse_date("2023") == "2023" and parse_date("2023-06") == "2023-06"
    assert parse_date("2023:06:01 10:30:00") == "2023-06-01T10:30:00"  # EXIF's way
    assert parse_date("2023-06-01 10:30") == "2023-06-01T10:30"
    assert parse_date("2023-13-01") is None and parse_date("2023-02-30") is None and parse_date("yesterday") is None


def test_term_weights():
    assert parse_weighted("2:golden retriever") == (2.0, "golden retriever")
    assert parse_weighted("-0.5:grass") == (-0.5, "grass")
    assert parse_weighted("photo: a dog") == (1.0, "photo: a dog")  # not a number in front: text as written
    assert parse_weighted("http://x") == (1.0, "http://x")
    for bad in ("1x:dog", "0:dog", "1e999:dog", "2:"):
        with pytest.raises(TermError):
            parse_weighted(bad, "--add")


# ---------------------------------------------------------------------------------------------
# A table of fields against Python's own evaluation
# ---------------------------------------------------------------------------------------------


def random_fields(count=400, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        fields = {}
        if rng.random() < 0.9:
            fields["likes"] = rng.choice([rng.randint(0, 100), rng.random() * 100])
        if rng.random() < 0.8:
            fields["taken"] = f"20{rng.randint(18, 24)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T10:00:00"
        if rng.random() < 0.7:
            fields["caption"] = rng.choice(["a dog", "a cat on a mat", "two dogs", "Dog", "birds"])
        rows.append(fields)
    paths = [f"/photos/{2018 + row % 7}/{'sub/' if row % 3 else ''}img{row}.jpg" for row in range(count)]
    return paths, rows


def python_passes(value, op, wanted, kind):
    if value is None:
        return False
    if op in ("~", "!~"):
        matched = fnmatch.fnmatchcase(value, wanted)
        return matched if op == "~" else not matched
    if kind == "date":
        value = value[: len(wanted)]
    elif kind == "number":
        wanted = float(wanted)
    return {"=": value == wanted, "!=": value != wanted, "<": value < wanted, "<=": value <= wanted,
            ">": value > wanted, ">=": value >= wanted}[op]


def test_selected_rows_match_python_for_every_operator(tmp_path):
    paths, rows = random_fields()
    half = len(paths) // 2  # two shards: a field's kind and values are joined across them
    write_shard(tmp_path / "0-000-64.ckpt", paths[:half], torch.randn(half, 8), fields=rows[:half])
    write_shard(tmp_path / "0-001-64.ckpt", paths[half:], torch.randn(len(paths) - half, 8), fields=rows[half:])
    table = load_collection(tmp_path).fields
    assert table.fields == {"path": "text", "likes": "number", "taken": "date", "caption": "text"}
    conditions = [("likes", ">", "50"), ("likes", "<=", "20.5"), ("likes", "=", "7"), ("likes", "!=", "7"),
                  ("taken", ">=", "2023-06-01"), ("taken", "=", "2021"), ("taken", "<", "2020-02"), ("taken", "~", "2022-0*"),
                  ("caption", "=", "a dog"), ("caption", "~", "*dog*"), ("caption", "!~", "*dog*"), ("caption", ">", "b"),
                  ("path", "~", "*/2023/*"), ("path", "!~", "*/sub/*")]
    for field, op, value in conditions:
        kind = table.fields[field]
        values = paths if field == "path" else [row.get(field) for row in rows]
        expected = [row for row, value_of_row in enumerate(values) if python_passes(value_of_row, op, value, kind)]
        selected = table.select([f"{field}{op}{value}"])
        assert selected.rows.tolist() == expected, f"{field}{op}{value}"
    both = table.select(["likes>50", "caption~*dog*"]).rows.tolist()
    assert both == sorted(set(table.select(["likes>50"]).rows.tolist()) & set(table.select(["caption~*dog*"]).rows.tolist()))
    assert table.row(0) == {name: value for name, value in rows[0].items()}


@pytest.mark.parametrize("condition, message", [
    ("colour=red", "no field 'colour'; its fields: caption, likes, path, taken"),
    ("likes>many", "likes holds numbers, and 'many' is not one"),
    ("taken>=2023-13-01", "does not parse as one"),
    ("likes~1*", "likes holds numbers; ~ matches text and dates"),
])
def test_filters_the_collection_cannot_apply_are_one_clear_error(tmp_path, condition, message):
    paths, rows = random_fields(count=20)
    write_shard(tmp_path / "0-000-64.ckpt", paths, torch.randn(20, 8), fields=rows)
    with pytest.raises(FilterError, match=message):
        load_collection(tmp_path).fields.select([condition])


# ---------------------------------------------------------------------------------------------
# Filtered search against brute force
# ---------------------------------------------------------------------------------------------


def brute_force(embeddings, queries, mask, top_k, bias=None):
    scores = F.normalize(queries, dim=-1) @ F.normalize(embeddings, dim=-1).T
    if bias is not None:
        scores = scores + bias
    scores[:, ~torch.from_numpy(mask)] = float("-inf")
    best = scores.topk(min(top_k, int(mask.sum())), dim=1)
    return best.values, best.indices


def collection(count=3000, dim=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(30, dim, generator=generator)
    vectors = centres[torch.randint(0, 30, (count,), generator=generator)] + 0.5 * torch.randn(count, dim, generator=generator)
    return [f"/i/{row}.jpg" for row in range(count)], F.normalize(vectors, dim=-1)


@pytest.mark.parametrize("kept", [0.5, 0.05, 0.004, 0.0])
@pytest.mark.parametrize("path", ["subset", "masked"])
def test_filtered_exact_search_equals_brute_force(monkeypatch, kept, path):
    # Both ways of answering a filter: its rows gathered and scored alone, or every row scored with the others masked.
    monkeypatch.setattr(search_module, "SUBSET_MIN_ROWS", 10**9 if path == "subset" else 0)
    monkeypatch.setattr(search_module, "SUBSET_FRACTION", 1.0 if path == "subset" else 0.0)
    paths, embeddings = collection()
    queries = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    mask = np.random.default_rng(2).random(len(paths)) < kept
    bias = 0.05 * torch.randn(len(paths), generator=torch.Generator().manual_seed(3))
    searcher = Searcher(paths, embeddings)
    for query_bias in (None, bias):
        hits = searcher.search(queries, 10, query_bias, RowSet(mask))
        scores, rows = brute_force(embeddings, queries, mask, 10, query_bias)
        assert [[hit.id for hit in found] for found in hits] == rows.tolist()
        torch.testing.assert_close(torch.tensor([[hit.score for hit in found] for found in hits]).reshape(scores.shape),
                                   scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivf_sq8", "hnsw"])
def test_filtered_index_search_keeps_only_passing_rows_and_fills_top_k(monkeypatch, kind):
    monkeypatch.setattr(search_module, "SUBSET_MIN_ROWS", 0)  # the index answers even small filters here
    monkeypatch.setattr(search_module, "SUBSET_FRACTION", 0.0)
    paths, embeddings = collection()
    index = build_index(embeddings, order_fingerprint(paths, 32), kind=kind, nlist=16, recall_queries=0, nprobe=2)
    searcher = Searcher(paths, embeddings, index)
    queries = embeddings[:8] + 0.3 * torch.randn(8, 32, generator=torch.Generator().manual_seed(4))
    rng = np.random.default_rng(5)
    for kept in (0.6, 0.05, 0.003):
        mask = rng.random(len(paths)) < kept
        hits = searcher.search(queries, 10, allowed=RowSet(mask))
        _, exact = brute_force(embeddings, queries, mask, 10)
        assert all(mask[hit.id] for found in hits for hit in found)
        assert [len(found) for found in hits] == [min(10, int(mask.sum()))] * len(queries)
        if kind in ("flat",):
            assert [[hit.id for hit in found] for found in hits] == exact.tolist()
    # Every list probed, an IVF index over full vectors is exact on the rows that pass.
    if kind == "ivf":
        index.set_nprobe(16)
        mask = rng.random(len(paths)) < 0.3
        hits = searcher.search(queries, 10, allowed=RowSet(mask))
        assert [[hit.id for hit in found] for found in hits] == brute_force(embeddings, queries, mask, 10)[1].tolist()


def test_a_query_the_index_leaves_short_is_answered_exactly(monkeypatch):
    monkeypatch.setattr(search_module, "SUBSET_MIN_ROWS", 0)
    monkeypatch.setattr(search_module, "SUBSET_FRACTION", 0.0)
    paths, embeddings = collection()
    index = build_index(embeddings, order_fingerprint(paths, 32), kind="ivf", nlist=64, recall_queries=0, nprobe=1)

    def starved(queries, top_k, bitmap, kept):  # an index that finds nothing among the rows kept
        return np.full((len(queries), top_k), -np.inf, np.float32), np.full((len(queries), top_k), -1)

    monkeypatch.setattr(index, "search_among", starved)
    mask = np.random.default_rng(6).random(len(paths)) < 0.5
    queries = embeddings[:3]
    hits = Searcher(paths, embeddings, index).search(queries, 7, allowed=RowSet(mask))
    assert [[hit.id for hit in found] for found in hits] == brute_force(embeddings, queries, mask, 7)[1].tolist()


def test_folded_duplicates_and_a_filter_together(monkeypatch):
    paths, embeddings = collection(count=200)
    embeddings[1] = embeddings[0]  # rows 0, 1, 2 one group
    embeddings[2] = embeddings[0]
    mask = np.ones(200, dtype=bool)
    mask[0] = False
    searcher = Searcher(paths, embeddings, duplicates=[[0, 1, 2]])
    hits = searcher.search(embeddings[0], 5, allowed=RowSet(mask))[0]
    assert hits[0].id in (1, 2) and len({hit.id for hit in hits} & {0, 1, 2}) == 1 and len(hits) == 5


def test_engine_combines_terms_and_filters(tiny_checkpoint):
    from clipsearch.checkpoint import load_bundle
    from clipsearch.query_terms import ROW, TEXT, Term
    from clipsearch.search import SearchEngine

    bundle = load_bundle(tiny_checkpoint)
    paths, embeddings = collection(count=300, dim=bundle.embed_dim)
    fields = MetadataTable(paths, {"group": "number"}, {"group": __import__("pyarrow").array([row % 3 for row in range(300)])})
    engine = SearchEngine(bundle, Searcher(paths, embeddings), fields=fields)
    text = engine.encode_texts(["a red square"])[0]
    combined = engine.embed_terms([Term(TEXT, "a red square", 2.0), Term(ROW, 5, -1.0)])
    expected = F.normalize(2.0 * text - F.normalize(embeddings[5], dim=0), dim=0)
    torch.testing.assert_close(combined, expected, atol=1e-5, rtol=0)
    hits = engine.search([Term(TEXT, "a red square", 2.0), Term(ROW, 5, -1.0)], 10, ["group=1"])
    _, rows = brute_force(embeddings, expected[None], np.array([row % 3 == 1 for row in range(300)]), 10)
    assert [hit.id for hit in hits] == rows[0].tolist() and all(hit.fields == {"group": 1} for hit in hits)
    page_two = engine.search([Term(TEXT, "a red square", 2.0), Term(ROW, 5, -1.0)], 5, ["group=1"], offset=5)
    assert [hit.id for hit in page_two] == rows[0, 5:].tolist()
    assert 7 not in [hit.id for hit in engine.similar(7, 10)]
    with pytest.raises(TermError, match="cancel out"):
        engine.embed_terms([Term(ROW, 5, 1.0), Term(ROW, 5, -1.0)])
    with pytest.raises(TermError, match="no collection item"):
        engine.embed_terms([Term(ROW, 300)])


# ---------------------------------------------------------------------------------------------
# Fields stored by encoding, kept in step by updates; captions as a collection
# ---------------------------------------------------------------------------------------------


def photo(path, colour, size=(40, 32), taken=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    if taken:
        exif.get_ifd(0x8769)[0x9003] = taken
    Image.new("RGB", size, colour).save(path, exif=exif)
    return path


def write_table(dataset, rows):
    lines = ["image\tcaption\turl\tlikes", *("\t".join(map(str, row)) for row in rows)]
    (dataset / "train.tsv").write_text("\n".join(lines) + "\n")


def test_encoding_stores_fields_and_updates_keep_them_in_step(tmp_path, tiny_checkpoint):
    dataset, emb_path = tmp_path / "data", tmp_path / "emb"
    photo(dataset / "2022" / "a.jpg", (200, 10, 10), (60, 30), "2022:05:01 09:00:00")
    photo(dataset / "2023" / "b.jpg", (10, 200, 10), taken="2023:07:04 18:30:00")
    photo(dataset / "2023" / "c.png", (10, 10, 200))
    write_table(dataset, [("2022/a.jpg", "a red photo", "http://x/a", 5), ("2022/a.jpg", "red again", "http://x/a", 5),
                          ("2023/b.jpg", "a green photo", "http://x/b", 50), ("2023/c.png", "blue", "", "007")])
    encode(tiny_checkpoint, dataset, emb_path)
    table = load_collection(emb_path).fields
    by_name = {os.path.basename(path): table.row(row) for row, path in enumerate(table.paths)}
    a, b, c = by_name["a.jpg"], by_name["b.jpg"], by_name["c.png"]
    assert a["caption"] == "a red photo\nred again" and a["url"] == "http://x/a" and a["likes"] == "5"
    assert (a["width"], a["height"], a["taken"]) == (60, 30, "2022-05-01T09:00:00")
    assert a["size"] == (dataset / "2022" / "a.jpg").stat().st_size and a["mtime"].startswith("20")
    assert b["taken"] == "2023-07-04T18:30:00" and "taken" not in c and "url" not in c
    assert c["likes"] == "007"  # an id-like value keeps its digits: the column is text
    assert table.select(["taken>=2023"]).count == 1 and table.select(["path~*/2023/*"]).count == 2

    # An edited caption re-reads that row only; a new image arrives with its fields; a deleted one leaves with them.
    before = {path.name: path.stat().st_mtime_ns for path in emb_path.glob("*.ckpt")}
    photo(dataset / "2024" / "d.jpg", (90, 90, 0))
    (dataset / "2023" / "c.png").unlink()
    write_table(dataset, [("2022/a.jpg", "a red photo", "http://x/a", 5), ("2023/b.jpg", "a GREEN photo", "http://x/b", 50),
                          ("2024/d.jpg", "yellow", "http://x/d", 9)])
    manifest = encode(tiny_checkpoint, dataset, emb_path)
    assert manifest["this_update"]["encoded"] == 3  # a (one caption gone), b (edited), d (new)
    assert all(path.stat().st_mtime_ns == before[path.name] for path in emb_path.glob("*.ckpt") if path.name in before)
    table = load_collection(emb_path).fields
    by_name = {os.path.basename(path): table.row(row) for row, path in enumerate(table.paths)}
    assert sorted(by_name) == ["a.jpg", "b.jpg", "d.jpg"]
    assert by_name["a.jpg"]["caption"] == "a red photo" and by_name["b.jpg"]["caption"] == "a GREEN photo"
    assert by_name["d.jpg"]["url"] == "http://x/d" and table.fields["likes"] == "number"
    assert encode(tiny_checkpoint, dataset, emb_path)["this_update"]["encoded"] == 0  # nothing changed: nothing read

    # The export carries the fields beside the paths, row for row.
    import pyarrow.parquet as pq

    from clipsearch.cli.export_clip_retrieval import main as export_main

    export_main(["--emb_path", str(emb_path), "--out", str(tmp_path / "export")])
    exported = pq.read_table(tmp_path / "export" / "metadata" / "metadata_0.parquet").to_pylist()
    assert [os.path.basename(row["image_path"]) for row in exported] == [os.path.basename(path) for path in table.paths]
    assert [row["caption"] for row in exported] == [table.row(row).get("caption") for row in range(len(table))]


def test_shards_without_fields_give_their_files_size_and_time(tmp_path):
    write_shard(tmp_path / "0-000-64.ckpt", ["/a.jpg", "/b.jpg"], torch.randn(2, 8), stats=[(123, 1_600_000_000 * 10**9), None])
    shard = read_shard(tmp_path / "0-000-64.ckpt")
    assert set(shard) == {"path", "emb", "skipped", "stat"}  # the interchange format, as older encoders wrote it
    table = load_collection(tmp_path).fields
    assert table.row(0)["size"] == 123 and table.row(0)["mtime"].startswith("2020-09-1") and table.row(1) == {}
    with pytest.raises(ValueError, match="2 paths but 1 rows of fields"):
        write_shard(tmp_path / "0-001-64.ckpt", ["/a.jpg", "/b.jpg"], torch.randn(2, 8), fields=[{}])


def test_captions_encode_as_a_collection_an_image_finds(tmp_path, tiny_checkpoint):
    from clipsearch.checkpoint import load_bundle
    from clipsearch.search import SearchEngine

    dataset = tmp_path / "data"
    photo(dataset / "a.jpg", (200, 10, 10))
    photo(dataset / "b.jpg", (10, 200, 10))
    write_table(dataset, [("a.jpg", "a red square", "http://x/a", 1), ("a.jpg", "something red", "http://x/a", 1),
                          ("b.jpg", "a green square", "http://x/b", 2), ("b.jpg", "a green square", "http://x/b", 2)])
    captions = tmp_path / "emb-captions"
    manifest = encode(tiny_checkpoint, dataset, captions, "--captions")
    assert manifest["counts"]["encoded"] == 3  # the repeated (image, caption) pair is one row
    engine = SearchEngine.from_files(tiny_checkpoint, captions)
    assert engine.rows_kind == "captions"
    bundle = load_bundle(tiny_checkpoint)
    texts = ["a red square", "something red", "a green square"]
    expected = F.normalize(bundle.model.encode_text(bundle.tokenizer(texts)).float(), dim=-1)
    by_caption = {engine.fields.row(row)["caption"]: row for row in range(3)}
    for text, embedding in zip(texts, expected):
        torch.testing.assert_close(engine.searcher.embeddings[by_caption[text]], embedding, atol=1e-5, rtol=0)
    hits = engine.search_image([Image.open(dataset / "a.jpg")], 3)[0]
    assert {hit.fields["image"] for hit in hits} == {str(dataset / "a.jpg"), str(dataset / "b.jpg")}
    assert all(engine.image_of(hit.id) == hit.fields["image"] for hit in hits)
    assert engine.search_image([Image.open(dataset / "a.jpg")], 3, ["image~*/b.jpg"])[0][0].fields["caption"] == "a green square"
    # Images and captions never share a folder.
    with pytest.raises(StoreError, match="holds embeddings of captions"):
        encode(tiny_checkpoint, dataset, captions)
    assert json.loads((captions / "model.json").read_text())["rows"] == "captions"
