"""Search: exact top-k against brute force, shard loading and its errors, the engine and the search CLI."""
import builtins

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clipsearch.search as search_module
from clipsearch import score_kernels
from clipsearch.cli.encode import main as encode_main
from clipsearch.cli.search import main as search_main
from clipsearch.errors import UserError
from clipsearch.search import EmbeddingMismatchError, Hit, SearchEngine, Searcher
from clipsearch.store import (
    EncodingMismatchError,
    MissingEmbeddingsError,
    load_collection,
    write_json,
    write_shard,
)


def random_collection(count=500, dim=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [f"/images/{index}.jpg" for index in range(count)], torch.randn(count, dim, generator=generator)


def brute_force(embeddings, queries, top_k):
    scores = F.normalize(queries, dim=-1) @ F.normalize(embeddings, dim=-1).T
    return scores.topk(min(top_k, embeddings.shape[0]), dim=1)


def assert_matches_reference(hits, reference_scores, reference_rows, paths):
    assert [[hit.id for hit in query_hits] for query_hits in hits] == reference_rows.tolist()
    assert all(hit.path == paths[hit.id] for query_hits in hits for hit in query_hits)
    scores = torch.tensor([[hit.score for hit in query_hits] for query_hits in hits])
    torch.testing.assert_close(scores, reference_scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("max_score_bytes", [256 * 2**20, 4 * 37, 1])
@pytest.mark.parametrize("query_count", [1, 7])
def test_exact_search_equals_brute_force_whole_and_chunked(max_score_bytes, query_count):
    paths, embeddings = random_collection()
    queries = torch.randn(query_count, 32, generator=torch.Generator().manual_seed(1))
    searcher = Searcher(paths, embeddings, max_score_bytes=max_score_bytes)
    reference_scores, reference_rows = brute_force(embeddings, queries, 10)
    assert_matches_reference(searcher.search(queries, 10), reference_scores, reference_rows, paths)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rising", [False, True], ids=["random rows", "rows rising for one query"])
def test_many_blocks_keep_the_exact_top_k_of_several_queries(dtype, rising):
    # Blocks of 2,048 rows, enough groups in each that a block's candidates are the groups beating
    # each query's k-th score so far; with rows sorted by the first query's score, each block beats
    # the last everywhere for that query, and the block's best groups are ranked instead.
    paths, embeddings = random_collection(count=20_000, dim=32)
    queries = torch.randn(7, 32, generator=torch.Generator().manual_seed(1))
    embeddings = F.normalize(embeddings, dim=-1)
    if rising:
        embeddings = embeddings[(embeddings @ queries[0]).argsort()]
    embeddings = embeddings.to(dtype)
    searcher = Searcher(paths, embeddings, assume_normalised=True, max_score_bytes=4 * 7 * 2048)
    reference_scores, reference_rows = (F.normalize(queries, dim=-1) @ embeddings.float().T).topk(10, dim=1)
    assert_matches_reference(searcher.search(queries, 10), reference_scores, reference_rows, paths)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_that_tie_across_blocks_give_the_exact_top_k_scores(dtype):
    # 40 distinct rows, each repeated 500 times through the collection: every block holds rows
    # that tie with a query's k-th score so far, which the merge must neither lose nor let in twice.
    distinct = F.normalize(torch.randn(40, 32, generator=torch.Generator().manual_seed(2)), dim=-1)
    embeddings = distinct.repeat(500, 1).to(dtype)
    paths = [f"{row}.jpg" for row in range(len(embeddings))]
    queries = F.normalize(torch.randn(7, 32, generator=torch.Generator().manual_seed(3)), dim=-1)
    searcher = Searcher(paths, embeddings, assume_normalised=True, max_score_bytes=4 * 7 * 2048)
    scores, rows = searcher.exact_top_k(queries, 25)
    all_scores = queries @ embeddings.float().T
    torch.testing.assert_close(scores, all_scores.topk(25, dim=1).values, atol=1e-5, rtol=0)
    assert all(len(set(query_rows)) == 25 for query_rows in rows.tolist())  # no row twice
    torch.testing.assert_close(all_scores.gather(1, rows), scores, atol=1e-5, rtol=0)  # each row's own score


def test_search_edges_and_input_left_untouched():
    paths, embeddings = random_collection(count=6, dim=8)
    original = embeddings.clone()
    searcher = Searcher(paths, embeddings)
    assert torch.equal(embeddings, original)
    assert len(searcher) == 6 and searcher.dim == 8 and searcher.paths == paths
    assert torch.allclose(searcher.embeddings.norm(dim=1), torch.ones(6))
    hits = searcher.search(embeddings[2], top_k=100)  # one query as a vector, top_k above N
    assert len(hits) == 1 and len(hits[0]) == 6
    assert hits[0][0] == Hit(2, paths[2], pytest.approx(1.0, abs=1e-5))
    assert searcher.search(embeddings[:2], top_k=0) == [[], []]
    with pytest.raises(EmbeddingMismatchError, match="8-d"):
        searcher.search(torch.randn(1, 5), 3)


@pytest.mark.parametrize("native", [True, False], ids=["native kernels", "torch"])
def test_fp16_storage_is_close_to_fp32(tmp_path, monkeypatch, native):
    if not native:  # as where the native kernels cannot be built (score_kernels)
        monkeypatch.setattr(score_kernels, "load", lambda: None)
    # Small slabs, so torch's multi-query scoring widens several, the last one partial (300 = 2 x 128 + 44).
    monkeypatch.setattr(search_module, "UPCAST_SLAB_ROWS", 128)
    paths, embeddings = random_collection(count=300, dim=64)
    write_shard(tmp_path / "0-000-64.ckpt", paths, embeddings)
    full = Searcher.from_collection(load_collection(tmp_path))
    half = Searcher.from_collection(load_collection(tmp_path, dtype=torch.float16))
    assert half.embeddings.dtype == torch.float16
    queries = embeddings[:5] + 0.1 * torch.randn(5, 64)
    for batch in (queries, queries[:1]):  # the multi-query and the single-query paths
        for full_hits, half_hits in zip(full.search(batch, 5), half.search(batch, 5)):
            assert full_hits[0].id == half_hits[0].id
            assert [hit.score for hit in half_hits] == pytest.approx([hit.score for hit in full_hits], abs=5e-3)
    assert torch.allclose(half.scores(queries), full.scores(queries), atol=5e-3)


def test_plain_folder_loads_in_numeric_order_and_skips_temporary_files(tmp_path):
    paths, embeddings = random_collection(count=9, dim=4)
    write_shard(tmp_path / "10-000-2.ckpt", paths[6:], embeddings[6:])
    write_shard(tmp_path / "2-000-2.ckpt", paths[:3], embeddings[:3])
    write_shard(tmp_path / "2-001-2.ckpt", paths[3:6], embeddings[3:6])
    (tmp_path / "2-002-2.ckpt.tmp").write_bytes(b"half a shard")
    searcher = Searcher.from_collection(load_collection(tmp_path))
    assert searcher.paths == paths
    torch.testing.assert_close(searcher.embeddings, F.normalize(embeddings, dim=-1))


def test_collection_errors_are_clear(tmp_path):
    with pytest.raises(MissingEmbeddingsError, match="not found"):
        load_collection(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no embedding shards"):
        load_collection(tmp_path)
    write_shard(tmp_path / "0-000-2.ckpt", ["a"], torch.randn(1, 4))
    write_shard(tmp_path / "1-000-2.ckpt", ["b"], torch.randn(1, 6))
    with pytest.raises(EncodingMismatchError, match="1-000-2.ckpt has 6-d.*0-000-2.ckpt has 4-d"):
        load_collection(tmp_path)


def test_engine_refuses_another_models_embeddings_naming_both_runs(tmp_path, tiny_checkpoint):
    run = tmp_path / "models" / "run-a"
    run.mkdir(parents=True)
    (run / "best.ckpt").symlink_to(tiny_checkpoint)
    (tmp_path / "models" / "latest").symlink_to(run)
    (tmp_path / "emb").mkdir()
    write_shard(tmp_path / "emb" / "0-000-2.ckpt", ["a"], torch.randn(1, 64))
    old_model = {"format": 2, "fingerprint": "aaaa", "load_model": "/old/models/run-b/best.ckpt", "run": "run-b"}
    write_json(tmp_path / "emb" / "model.json", old_model)
    (tmp_path / "emb" / "update-000.json").write_text('{"update": 0, "shards": ["0-000-2.ckpt"], "removed": []}')
    with pytest.raises(EmbeddingMismatchError) as raised:
        SearchEngine.from_files(tmp_path / "models" / "latest" / "best.ckpt", tmp_path / "emb")
    message = str(raised.value)
    # The resolved checkpoint, never the models/latest link, and the run each side came from.
    assert "run run-b (/old/models/run-b/best.ckpt" in message and f"({tiny_checkpoint}" in message
    assert "latest" not in message.replace(str(tmp_path / "emb"), "")


# ---------------------------------------------------------------------------------------------
# The engine and the CLI, on the tiny model and the colour images
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def colour_embeddings(tmp_path_factory, tiny_checkpoint, colour_images):
    root, _ = colour_images
    emb_path = tmp_path_factory.mktemp("colour_emb")
    encode_main(
        ["--load_model", str(tiny_checkpoint), "--dataset_path", str(root), "--emb_path", str(emb_path)]
        + ["--num_workers", "0", "--no_progress"]
    )
    return emb_path


def test_engine_text_and_image_queries(tiny_checkpoint, colour_embeddings, colour_images):
    _, paths = colour_images
    engine = SearchEngine.from_files(tiny_checkpoint, colour_embeddings)
    text_hits = engine.search_text(["a red square", "blue"], top_k=4)
    assert [len(hits) for hits in text_hits] == [4, 4]
    assert all(engine.path_of(hit.id) == hit.path for hits in text_hits for hit in hits)
    image_hits = engine.search_image([Image.open(paths[5]), Image.open(paths[8])], top_k=3)
    assert [hits[0].path for hits in image_hits] == [str(paths[5]), str(paths[8])]
    assert image_hits[0][0].score == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(EmbeddingMismatchError, match="64-d.*8-d"):
        SearchEngine(engine.bundle, Searcher(["a"], torch.randn(1, 8)))


def test_mapped_search_answers_as_the_loaded_collection(tiny_checkpoint, colour_embeddings, colour_images, monkeypatch):
    """--mmap: the consolidated fp16 matrix, memory-mapped, gives the same ranking as the shards, and
    once it is built a search process reads no shard (paths and fields come mapped with it)."""
    import clipsearch.mmap_store as mmap_store
    import clipsearch.store as store_module

    _, paths = colour_images
    loaded = SearchEngine.from_files(tiny_checkpoint, colour_embeddings)
    SearchEngine.from_files(tiny_checkpoint, colour_embeddings, mapped=True)  # builds the store

    def no_shards(*args, **kwargs):
        raise AssertionError("a shard was read")

    monkeypatch.setattr(store_module, "read_catalog", no_shards)
    monkeypatch.setattr(mmap_store, "read_catalog", no_shards)
    mapped = SearchEngine.from_files(tiny_checkpoint, colour_embeddings, mapped=True)
    assert mapped.row_of(str(paths[3])) == loaded.row_of(str(paths[3])) and mapped.row_of("/nowhere.png") is None
    assert mapped.fields.fields == loaded.fields.fields
    assert (colour_embeddings / "consolidated" / "embeddings.f16").is_file()
    assert mapped.searcher.storage.dtype == torch.float16
    queries = [Image.open(path) for path in paths[:4]]
    for expected, got in zip(loaded.search_image(queries, top_k=5), mapped.search_image(queries, top_k=5)):
        assert [hit.path for hit in got][:1] == [hit.path for hit in expected][:1]
        assert [hit.score for hit in got] == pytest.approx([hit.score for hit in expected], abs=2e-3)
    with pytest.raises(UserError, match="--mmap"):
        SearchEngine.from_files(tiny_checkpoint, colour_embeddings, mapped=True, fold_duplicates=True)


def test_cli_writes_named_grids_inside_out_dir(tmp_path, tiny_checkpoint, colour_embeddings, colour_images):
    _, paths = colour_images
    out_dir = tmp_path / "deep" / "out"
    search_main(
        ["--load_model", str(tiny_checkpoint), "--emb_path", str(colour_embeddings), "--out_dir", str(out_dir)]
        + ["--top_k", "3", "--query", "Hello World", "--query", "../../x", "--image", str(paths[0])]
    )
    written = sorted(path.name for path in out_dir.iterdir())
    assert written == ["Hello World.png", "_.._x.png", "image-image00.png"]
    assert sorted(path.name for path in tmp_path.rglob("*") if path.is_file()) == written
    assert Image.open(out_dir / "Hello World.png").size[0] > 3 * 160


def test_cli_interactive_prompt_ends_on_empty_line_or_eof(
    tmp_path, monkeypatch, capsys, tiny_checkpoint, colour_embeddings
):
    argv = ["--load_model", str(tiny_checkpoint), "--emb_path", str(colour_embeddings), "--out_dir", str(tmp_path)]
    for lines, expected in ((["red", "", "never asked"], ["red.png"]), (["green"], ["green.png", "red.png"])):
        remaining = iter(lines)
        prompts = []

        def fake_input(prompt, remaining=remaining, prompts=prompts):
            prompts.append(prompt)
            try:
                return next(remaining)
            except StopIteration:
                raise EOFError from None

        monkeypatch.setattr(builtins, "input", fake_input)
        search_main([*argv, "--top_k", "2"])
        assert prompts == ["Search: ", "Search: "]
        assert sorted(path.name for path in tmp_path.iterdir()) == expected
    assert "2 results for 'green'" in capsys.readouterr().out


def test_mirror_average_travels_with_the_checkpoint_to_shards_and_queries(tmp_path, tiny_checkpoint):
    from clipsearch.checkpoint import model_fingerprint
    from clipsearch.cli.export import main as export_main
    from clipsearch.models import ImageViews, embed_images
    from clipsearch.models.released import load_model

    # A bar on the left of each image: its mirror image embeds differently.
    paths = []
    for index in range(4):
        image = Image.new("RGB", (64, 48), (200, 40 * index, 90))
        image.paste((10, 10, 10), (0, 0, 8 + 6 * index, 48))
        paths.append(tmp_path / "images" / f"{index}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        image.save(paths[-1])
    mirrored_path = tmp_path / "mirror.ckpt"
    export_main(["--load_model", str(tiny_checkpoint), "--out", str(mirrored_path), "--mirror_average", "on"])
    plain, mirrored = load_model(str(tiny_checkpoint)), load_model(str(mirrored_path))
    assert mirrored.mirror_average and not plain.mirror_average
    assert model_fingerprint(mirrored) != model_fingerprint(plain)  # shards of one never pass for the other's

    pixels = torch.stack([mirrored.eval_transform(Image.open(path).convert("RGB")) for path in paths])
    with torch.no_grad():
        own = F.normalize(plain.model.encode_image(pixels), dim=-1)
        flipped = F.normalize(plain.model.encode_image(pixels.flip(-1)), dim=-1)
        expected = F.normalize(own + flipped, dim=-1)
        assert (own * flipped).sum(dim=1).max() < 0.9999
        torch.testing.assert_close(F.normalize(embed_images(mirrored.model, pixels, ImageViews(mirror=True)), dim=-1), expected)

    emb_path = tmp_path / "emb"
    encode_main(["--load_model", str(mirrored_path), "--dataset_path", str(tmp_path / "images"),
                 "--emb_path", str(emb_path), "--num_workers", "0", "--no_progress"])
    collection = load_collection(emb_path)
    rows = [collection.paths.index(str(path)) for path in paths]
    torch.testing.assert_close(collection.embeddings[rows].float(), expected, atol=1e-5, rtol=0)
    engine = SearchEngine.from_files(mirrored_path, emb_path)
    hits = engine.search_image([Image.open(paths[2])], top_k=1)
    assert hits[0][0].path == str(paths[2]) and hits[0][0].score == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(EmbeddingMismatchError):
        SearchEngine.from_files(tiny_checkpoint, emb_path)


def test_images_embed_a_few_at_a_time_on_the_cpu_with_the_same_rows(tiny_checkpoint):
    from clipsearch.models import ImageViews, embed_images
    from clipsearch.models.bundle import CPU_IMAGE_CHUNK
    from clipsearch.models.released import load_model

    model = load_model(str(tiny_checkpoint)).model.eval()
    calls = []
    whole = model.encode_image
    model.encode_image = lambda images: calls.append(images.shape[0]) or whole(images)
    pixels = torch.randn(CPU_IMAGE_CHUNK * 2 + 3, 3, 64, 64)
    with torch.inference_mode():
        chunked = embed_images(model, pixels, ImageViews(mirror=True))
        one_by_one = [embed_images(model, image[None], ImageViews(mirror=True)) for image in pixels]
    # Twice the images (each and its mirror image), CPU_IMAGE_CHUNK at a time.
    assert calls[:5] == [CPU_IMAGE_CHUNK] * 4 + [6]
    torch.testing.assert_close(chunked, torch.cat(one_by_one), atol=1e-5, rtol=1e-4)
