"""Near-duplicates: pairs equal to brute force, exactly and through an index's range search; the command's groups,
sheets and report; search folding by the report; bad thresholds."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clipsearch.near_duplicates as near_duplicates
from clipsearch.cli.duplicates import main as duplicates_main
from clipsearch.index import build_index
from clipsearch.near_duplicates import DuplicatesError, find_duplicates, merge_groups
from clipsearch.store import order_fingerprint, write_shard


def planted(count=3000, dim=32, copies=60, seed=0):
    """Clustered unit vectors, the first `copies` rows each with a near copy (cosine about 0.99) at the end."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, dim, generator=generator)
    base = centres[torch.randint(0, 20, (count,), generator=generator)] + 0.6 * torch.randn(count, dim, generator=generator)
    base = F.normalize(base, dim=-1)
    noise = F.normalize(torch.randn(copies, dim, generator=generator), dim=-1)
    near = F.normalize(base[:copies] + 0.12 * noise, dim=-1)
    return F.normalize(torch.cat([base, near]), dim=-1)


def brute_pairs(embeddings, threshold):
    scores = embeddings @ embeddings.T
    rows_i, rows_j = torch.nonzero(torch.triu(scores >= threshold, diagonal=1), as_tuple=True)
    return set(zip(rows_i.tolist(), rows_j.tolist()))


def pairs_of(report):
    return {(min(a, b), max(a, b)) for group in report.groups for a in group.rows for b in group.rows if a < b}


def test_exact_pairs_equal_brute_force_across_blocks(monkeypatch):
    monkeypatch.setattr(near_duplicates, "QUERY_BLOCK", 700)  # blocks that do not divide the rows
    monkeypatch.setattr(near_duplicates, "COLUMN_BLOCK", 1100)
    embeddings = planted()
    rows_i, rows_j, scores = near_duplicates.exact_pairs(embeddings, 0.9)
    assert set(zip(rows_i.tolist(), rows_j.tolist())) == brute_pairs(embeddings, 0.9)
    torch.testing.assert_close(torch.from_numpy(scores), (embeddings[rows_i] * embeddings[rows_j]).sum(1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivf_sq8", "hnsw"])
def test_index_range_search_finds_the_exact_pairs(kind):
    embeddings = planted()
    paths = [f"/{row}" for row in range(len(embeddings))]
    index = build_index(embeddings, order_fingerprint(paths, 32), kind=kind, nlist=16, recall_queries=0, nprobe=4)
    through_index = find_duplicates(embeddings, 0.95, index=index, exact=False)
    exact = find_duplicates(embeddings, 0.95, exact=True)
    assert exact.pairs >= 60 and through_index.method.startswith("index")
    assert [group.rows for group in through_index.groups] == [group.rows for group in exact.groups]
    # Only rows a filter keeps are grouped.
    kept = np.arange(0, len(embeddings), 2)
    filtered = find_duplicates(embeddings, 0.95, rows=kept, index=index, exact=False)
    assert pairs_of(filtered) == {pair for pair in pairs_of(exact) if pair[0] % 2 == 0 and pair[1] % 2 == 0}
    assert [group.rows for group in filtered.groups] == [group.rows for group in find_duplicates(embeddings, 0.95, rows=kept, exact=True).groups]


def test_chains_join_into_one_group_and_groups_merge():
    embeddings = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.96, 0.28, 0.0], [0.84, 0.54, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    report = find_duplicates(embeddings, 0.95)
    assert [group.rows for group in report.groups] == [[0, 1, 2]]  # 0~1 and 1~2 above 0.95, 0 and 2 below
    assert report.groups[0].min_cosine < report.groups[0].max_cosine
    assert merge_groups(6, [[0, 1]], [[1, 4], [2, 3]]) == [[0, 1, 4], [2, 3]]
    for bad in (0, -0.5, 1.01, float("nan")):
        with pytest.raises(DuplicatesError, match=r"\(0, 1\]"):
            find_duplicates(embeddings, bad)


def planted_folder(tmp_path, dim=64):
    """Six photos and four smaller copies of each of the first two, on disk, with embeddings written as
    shards: each copy at cosine about 0.99 to its original, the distinct photos far apart. The model is
    left out on purpose (a tiny random one sees every picture alike); benchmarks/bench_duplicates.py
    measures real photos and their altered copies through a real model."""
    folder, emb_path = tmp_path / "photos", tmp_path / "emb"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    originals = F.normalize(torch.randn(6, dim, generator=generator), dim=-1)
    paths, rows, fields, copies = [], [], [], {}
    for number in range(6):
        path = folder / f"photo{number}.png"
        Image.new("RGB", (96, 80), (40 * number, 100, 200 - 30 * number)).save(path)
        paths.append(str(path)), rows.append(originals[number]), fields.append({"width": 96, "height": 80})
    for number in range(2):
        for name, size in (("small", (48, 40)), ("jpeg", (96, 80)), ("crop", (80, 70)), ("tint", (96, 80))):
            path = folder / "copies" / f"photo{number}-{name}.jpg"
            path.parent.mkdir(exist_ok=True)
            Image.new("RGB", size, (40 * number, 100, 200 - 30 * number)).save(path, quality=70)
            near = F.normalize(originals[number] + 0.1 * F.normalize(torch.randn(dim, generator=generator), dim=0), dim=0)
            # A copy the same size as its original is a newer, smaller file: the original stays first.
            paths.append(str(path)), rows.append(near), fields.append({"width": size[0], "height": size[1], "size": 1})
            copies.setdefault(str(folder / f"photo{number}.png"), []).append(str(path))
    fields[:6] = [{**values, "size": 10**6} for values in fields[:6]]
    emb_path.mkdir()
    write_shard(emb_path / "0-000-64.ckpt", paths, torch.stack(rows), fields=fields)
    return emb_path, copies


def test_the_command_groups_copies_with_sheets_and_a_report_that_search_folds_by(tmp_path, tiny_checkpoint, capsys):
    emb_path, copies = planted_folder(tmp_path)
    out_dir = tmp_path / "dups"
    record = duplicates_main(["--emb_path", str(emb_path), "--threshold", "0.97", "--out_dir", str(out_dir), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out_dir / "duplicates.json").read_text()) == json.loads(json.dumps(record))
    assert record["method"] == "exact" and record["rows"] == 14 and record["group_count"] == 2
    # Each original with its four copies, the original (the most pixels) first.
    assert [[group["paths"][0], sorted(group["paths"][1:])] for group in record["groups"]] == \
        [[original, sorted(its_copies)] for original, its_copies in copies.items()]
    assert all(0.97 <= group["min_cosine"] <= group["max_cosine"] <= 1 for group in record["groups"])
    assert [group["sheet"] for group in record["groups"]] == [str(out_dir / "group-0001.png"), str(out_dir / "group-0002.png")]
    assert Image.open(out_dir / "group-0001.png").size[0] > 5 * 160

    # Search folds a group into one hit that names the others.
    from clipsearch.cli.search import main as search_main

    search_main(["--load_model", str(tiny_checkpoint), "--emb_path", str(emb_path), "--query", "a photo", "--json",
                 "--no_grid", "--top_k", "14", "--fold_duplicates", str(out_dir / "duplicates.json")])
    results = json.loads(capsys.readouterr().out)["results"]
    assert len(results) == 6
    folded = [{result["path"], *result["duplicates"]} for result in results if "duplicates" in result]
    assert sorted(map(sorted, folded)) == sorted(sorted([original, *its_copies]) for original, its_copies in copies.items())

    # Fewer groups on a second run: the sheets of the first that it did not write again are gone.
    duplicates_main(["--emb_path", str(emb_path), "--threshold", "0.999999", "--out_dir", str(out_dir)])
    assert "0 groups of near-duplicates" in capsys.readouterr().out
    assert not list(out_dir.glob("group-*.png"))

    # A report made for other rows is refused, in one line.
    (tmp_path / "stale.json").write_text(json.dumps(dict(record, order_fingerprint="0" * 16)))
    from clipsearch.errors import UserError

    with pytest.raises(UserError, match="other rows"):
        search_main(["--load_model", str(tiny_checkpoint), "--emb_path", str(emb_path), "--query", "x", "--no_grid",
                     "--fold_duplicates", str(tmp_path / "stale.json")])


@pytest.mark.parametrize("threshold", ["0", "1.5", "-1", "nan", "high"])
def test_a_threshold_outside_0_1_is_one_line_before_torch(tmp_path, threshold):
    completed = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['torch'] = None; from clipsearch.cli.duplicates import main;"
         "from clipsearch.cli.common import run_command; run_command(main)", "--emb_path", str(tmp_path), "--threshold", threshold],
        capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 1
    assert completed.stderr.strip().count("\n") == 0 and "expected a cosine in (0, 1]" in completed.stderr
