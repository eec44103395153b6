"""Querybank normalisation: the bias against the inverted softmax, recall with it, its command, and search with it."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from clipsearch.cli.evaluate import main as evaluate_main
from clipsearch.cli.querybank import main as querybank_main
from clipsearch.cli.search import main as search_main
from clipsearch.errors import UserError
from clipsearch.metrics import retrieval_metrics
from clipsearch.querybank import QUERYBANK_FILE, QueryBank, QueryBankMismatchError, hub_bias
from clipsearch.search import SearchEngine, Searcher


def test_bias_ranks_as_the_inverted_softmax_in_any_chunking():
    generator = torch.Generator().manual_seed(0)
    images, bank, queries = (F.normalize(torch.randn(n, 16, generator=generator), dim=-1) for n in (40, 300, 25))
    temperature = 12.0
    bias = hub_bias(images, bank, temperature)
    torch.testing.assert_close(hub_bias(images, bank, temperature, chunk_rows=7), bias)
    # Inverted softmax: each query's score for image j over the bank's total pull on j.
    inverted = torch.exp(temperature * queries @ images.T) / torch.exp(temperature * bank @ images.T).sum(dim=0)
    assert torch.equal((queries @ images.T + bias).argsort(dim=1, descending=True), inverted.argsort(dim=1, descending=True))
    with pytest.raises(ValueError, match="16-d"):
        hub_bias(images, torch.randn(3, 8), temperature)


def test_a_hub_loses_the_captions_it_stole_and_image_to_text_stays():
    # Image 0 sits between both captions of image 1 and the bank, which points at it: a hub.
    images = F.normalize(torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    captions = F.normalize(torch.tensor([[0.9, 1.0, 0.0], [1.0, 0.6, 0.0], [1.0, 0.5, 0.1], [0.0, 0.1, 1.0]]), dim=-1)
    caption_images = torch.tensor([0, 1, 1, 2])
    bank = F.normalize(torch.tensor([[1.0, 1.0, 0.1], [0.8, 1.0, 0.0], [0.1, 0.0, 1.0]]), dim=-1)
    plain = retrieval_metrics(images, captions, caption_images)
    normalised = retrieval_metrics(images, captions, caption_images, image_bias=hub_bias(images, bank, 10.0))
    assert plain["text_to_image_R@1"] == 50.0
    assert normalised["text_to_image_R@1"] == 100.0
    assert {k: v for k, v in normalised.items() if k.startswith("image_to_text")} == {
        k: v for k, v in plain.items() if k.startswith("image_to_text")}


@pytest.fixture()
def caption_tables(tmp_path, colour_images):
    """The colour images' dev table, and a train table whose captions make the bank."""
    root, paths = colour_images
    names = ["red", "green", "blue", "dark", "bright", "grey"]
    (tmp_path / "dev.tsv").write_text("image\tcaption\n" + "".join(
        f"{path}\ta {names[index % 6]} picture\n{path}\tcolour {index}\n" for index, path in enumerate(paths)))
    (tmp_path / "train.tsv").write_text("image\tcaption\n" + "".join(
        f"{path}\t{name} square number {index}\n" for index, path in enumerate(paths) for name in names[:3]))
    return tmp_path


def test_evaluate_scores_both_ways_with_a_querybank(tmp_path, tiny_checkpoint, caption_tables):
    out = tmp_path / "eval.json"
    result = evaluate_main(["--load_model", str(tiny_checkpoint), "--dataset_path", str(caption_tables),
                            "--querybank", "train", "--num_workers", "0", "--out", str(out)])
    assert json.loads(out.read_text())["querybank"] == result["querybank"]
    bank = result["querybank"]
    assert bank["split"] == "train" and bank["captions"] == 36
    from clipsearch.checkpoint import load_bundle

    assert bank["temperature"] == pytest.approx(math.exp(load_bundle(tiny_checkpoint).model.logit_scale.item()), rel=1e-5)
    for key in ("image_to_text_R@1", "image_to_text_R@10", "image_to_text_mean_rank"):
        assert result["metrics"][key] == result["metrics_without_querybank"][key]
    with pytest.raises(UserError, match="holds no 'test' table"):
        evaluate_main(["--load_model", str(tiny_checkpoint), "--dataset_path", str(caption_tables), "--querybank", "test"])
    with pytest.raises(UserError, match="only with --querybank"):
        evaluate_main(["--load_model", str(tiny_checkpoint), "--dataset_path", str(caption_tables), "--querybank_size", "5"])


@pytest.fixture()
def encoded_colours(tmp_path, tiny_checkpoint, colour_images):
    from clipsearch.cli.encode import main as encode_main

    root, _ = colour_images
    emb_path = tmp_path / "emb"
    encode_main(["--load_model", str(tiny_checkpoint), "--dataset_path", str(root), "--emb_path", str(emb_path),
                 "--num_workers", "0", "--no_progress"])
    return emb_path


def test_search_ranks_text_by_cosine_plus_the_stored_bias(tiny_checkpoint, encoded_colours, caption_tables, colour_images, capsys):
    with pytest.raises(UserError, match="./clipsearch querybank"):
        SearchEngine.from_files(tiny_checkpoint, encoded_colours, querybank=True)
    querybank_main(["--emb_path", str(encoded_colours), "--load_model", str(tiny_checkpoint),
                    "--dataset_path", str(caption_tables), "--size", "20"])
    assert "20 captions" in capsys.readouterr().out
    plain = SearchEngine.from_files(tiny_checkpoint, encoded_colours)
    engine = SearchEngine.from_files(tiny_checkpoint, encoded_colours, querybank=True)
    bias = engine.querybank.bias
    assert bias.shape == (12,) and bias.std() > 0
    query = "a red picture"
    cosines = {hit.path: hit.score for hit in plain.search_text([query], top_k=12)[0]}
    rows = {path: row for row, path in enumerate(plain.searcher.paths)}
    expected = sorted(((cosines[path] + float(bias[rows[path]]), path) for path in cosines), reverse=True)[:5]
    hits = engine.search_text([query], top_k=5)[0]
    assert [hit.path for hit in hits] == [path for _, path in expected]
    assert [hit.score for hit in hits] == pytest.approx([score for score, _ in expected], abs=1e-5)
    # Image queries keep the plain cosine: the bank holds captions.
    _, paths = colour_images
    from PIL import Image

    assert engine.search_image([Image.open(paths[3])], 3) == plain.search_image([Image.open(paths[3])], 3)
    # The CLI's --querybank ranks the same way.
    search_main(["--load_model", str(tiny_checkpoint), "--emb_path", str(encoded_colours), "--querybank",
                 "--query", query, "--top_k", "5", "--json", "--no_grid"])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [result["path"] for result in record["results"]] == [path for _, path in expected]


def test_a_querybank_for_other_rows_or_another_model_is_refused(tmp_path, encoded_colours, tiny_checkpoint, caption_tables):
    bank = querybank_main(["--emb_path", str(encoded_colours), "--load_model", str(tiny_checkpoint),
                           "--dataset_path", str(caption_tables)])
    from clipsearch.store import load_collection, order_fingerprint

    collection = load_collection(encoded_colours)
    order, count = collection.order_fingerprint, len(collection.paths)
    fewer = order_fingerprint(collection.paths[:-1], collection.dim)
    with pytest.raises(QueryBankMismatchError, match="other rows"):
        QueryBank.load(encoded_colours, fewer, count - 1, bank.model_fingerprint)
    with pytest.raises(QueryBankMismatchError, match="another model"):
        QueryBank.load(encoded_colours, order, count, "0" * 16)
    (encoded_colours / QUERYBANK_FILE).write_bytes(b"not a torch file")
    with pytest.raises(QueryBankMismatchError, match="not a querybank file"):
        QueryBank.load(encoded_colours, order, count, bank.model_fingerprint)
    empty = tmp_path / "empty"
    (empty / "dev.tsv").parent.mkdir()
    (empty / "train.tsv").write_text("image\tcaption\n")
    with pytest.raises(UserError, match="no captions"):
        querybank_main(["--emb_path", str(encoded_colours), "--load_model", str(tiny_checkpoint), "--dataset_path", str(empty)])


class ExactIndex:
    """An index object as the Searcher uses one: `count` and `search(queries, k)` by plain cosine."""

    def __init__(self, embeddings):
        self.embeddings = F.normalize(embeddings, dim=-1)
        self.count = embeddings.shape[0]

    def search(self, queries, k):
        scores, rows = (torch.from_numpy(queries) @ self.embeddings.T).topk(k, dim=1)
        return scores.numpy(), rows.numpy()


def test_an_index_answers_with_its_candidates_re_ranked_by_the_bias():
    generator = torch.Generator().manual_seed(3)
    embeddings, queries = torch.randn(200, 16, generator=generator), torch.randn(6, 16, generator=generator)
    bias = 0.02 * torch.randn(200, generator=generator)
    paths = [f"/images/{row}.jpg" for row in range(200)]
    exact = Searcher(paths, embeddings).search(queries, 10, bias)
    through_index = Searcher(paths, embeddings, ExactIndex(embeddings)).search(queries, 10, bias)
    assert [[hit.id for hit in hits] for hits in through_index] == [[hit.id for hit in hits] for hits in exact]
