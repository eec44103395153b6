"""The native score kernels: fp32 products of fp16 rows and of fp32 panels, split over threads,
writing only their rows; and search falling back to torch, with one logged reason, where they
cannot be built."""
import logging

import numpy as np
import pytest
import torch

from clipsearch import score_kernels
from clipsearch.score_kernels import NativeScorer, panel_rows, panel_scores, to_panels
from clipsearch.search import Searcher


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """load() as in a new process whose kernel cache is an empty folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    score_kernels.load.cache_clear()
    yield tmp_path / "cache" / "clipsearch" / "kernels"
    score_kernels.load.cache_clear()


def unit_rows(count, dim, seed):
    rows = torch.randn(count, dim, generator=torch.Generator().manual_seed(seed))
    return rows / rows.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("thread_count", [1, 2])
@pytest.mark.parametrize(("count", "dim", "query_count"), [
    (1, 8, 1), (1003, 512, 1), (13, 40, 1),       # one query: 32-wide steps, then 8-wide ones
    (1003, 512, 64), (13, 40, 17), (7, 768, 5),  # several: partial tiles of rows and of queries
    (2, 24, 16), (40, 16, 6),
])
def test_kernels_give_the_fp32_products_of_fp16_rows(count, dim, query_count, thread_count, threads):
    if score_kernels.load() is None:
        pytest.skip("the native kernels cannot run here (the log says why)")
    threads(thread_count)
    # The rows scored are 3..3+count of a larger matrix, so the kernels' offsets count.
    storage = unit_rows(count + 5, dim, 0).half()
    rows = storage[3 : 3 + count]
    queries = unit_rows(query_count, dim, 1)
    scorer = NativeScorer.create(queries, storage)
    assert scorer is not None
    # A row of NaN after the block: a kernel writing past its rows would overwrite it.
    out = np.full((count + 1, query_count), np.nan, dtype=np.float32)
    scorer(3, 3 + count, out[:count])
    expected = (rows.double() @ queries.double().T).numpy()
    np.testing.assert_allclose(out[:count], expected, rtol=0, atol=1e-6)
    assert np.isnan(out[count]).all()
    scorer(3, 3, out[:0])  # no rows: nothing to do
    if query_count > 1:  # each query's maxima over groups of 4 rows, the last one partial where 4 does not divide
        groups = -(-count // 4)
        maxima = np.full((groups + 1, query_count), np.nan, dtype=np.float32)
        scorer(3, 3 + count, out[:count], maxima[:groups], group_rows=4)
        padded = np.full((groups * 4, query_count), -np.inf)
        padded[:count] = expected
        np.testing.assert_allclose(maxima[:groups], padded.reshape(groups, 4, query_count).max(axis=1), rtol=0, atol=1e-6)
        assert np.isnan(maxima[groups]).all()


@pytest.mark.parametrize("native", [True, False], ids=["native kernels", "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_the_block_top_k_over_group_maxima_finds_the_exact_top_k(native, dtype, monkeypatch):
    if not native:
        monkeypatch.setattr(score_kernels, "load", lambda: None)
    # Blocks of 1,100 rows: 17 whole groups of 64 and 12 rows after them, the last block shorter.
    rows, queries = unit_rows(5000, 64, 0).to(dtype), unit_rows(7, 64, 1)
    searcher = Searcher([str(row) for row in range(5000)], rows, assume_normalised=True,
                        max_score_bytes=4 * 7 * 1100)
    for top_k in (3, 8):  # 17 groups is more than 2 x 3 (the maxima decide) and fewer than 2 x 8 (all rows)
        scores, found = searcher.exact_top_k(queries, top_k)
        expected = (queries @ rows.float().T).topk(top_k)
        assert torch.equal(found, expected.indices)
        torch.testing.assert_close(scores, expected.values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("thread_count", [1, 2])
@pytest.mark.parametrize(("count", "first", "dim", "query_count"), [
    (1, 0, 8, 1), (1003, 0, 512, 1), (45, 3, 40, 1),  # one query: whole panels, then a range that starts and ends inside one
    (1003, 0, 512, 64), (45, 3, 40, 17), (7, 9, 768, 5),  # several: partial panels and blocks of queries
    (200, 16, 24, 6), (130, 0, 16, 2),
])
def test_kernels_give_the_fp32_products_of_panelled_rows(count, first, dim, query_count, thread_count, threads):
    if score_kernels.load() is None:
        pytest.skip("the native kernels cannot run here (the log says why)")
    threads(thread_count)
    matrix = unit_rows(first + count + 5, dim, 0)
    storage = to_panels(matrix)
    rows = matrix[first : first + count]
    queries = unit_rows(query_count, dim, 1)
    scorer = NativeScorer.create(queries, storage)
    assert scorer is not None and scorer.query_major == (query_count > 1)
    expected = (rows.double() @ queries.double().T).numpy()
    if query_count == 1:
        # A NaN after the rows: a kernel writing past them would overwrite it.
        out = np.full((count + 1, 1), np.nan, dtype=np.float32)
        scorer(first, first + count, out[:count])
        np.testing.assert_allclose(out[:count], expected, rtol=0, atol=1e-6)
        assert np.isnan(out[count]).all()
        return
    # Query-major, each query's scores a row of a wider buffer: the columns past `count` stay NaN.
    out = np.full((query_count, count + 7), np.nan, dtype=np.float32)
    scorer(first, first + count, out[:, :count])
    np.testing.assert_allclose(out[:, :count], expected.T, rtol=0, atol=1e-6)
    assert np.isnan(out[:, count:]).all()
    for group_rows in (64, 4):  # groups of whole panels, and groups inside a panel
        groups = -(-count // group_rows)
        maxima = np.full((groups + 1, query_count), np.nan, dtype=np.float32)
        scorer(first, first + count, out[:, :count], maxima[:groups], group_rows=group_rows)
        padded = np.full((groups * group_rows, query_count), -np.inf)
        padded[:count] = expected
        np.testing.assert_allclose(maxima[:groups], padded.reshape(groups, group_rows, query_count).max(axis=1),
                                   rtol=0, atol=1e-6)
        assert np.isnan(maxima[groups]).all()


def test_panels_hold_the_rows_and_torch_scores_them_as_the_kernels_do():
    rows, queries = unit_rows(37, 24, 0), unit_rows(3, 24, 1)
    panels = to_panels(rows)
    assert panels.shape == (3, 24, 16)
    assert torch.equal(panels[2, :, 5:], torch.zeros(24, 11))  # the last panel padded with zero rows
    picked = torch.tensor([0, 15, 16, 36, 2])
    assert torch.equal(panel_rows(panels, picked), rows[picked])
    torch.testing.assert_close(panel_scores(panels, queries, 5, 33), queries @ rows[5:33].T)


def test_the_kernels_serve_contiguous_fp16_rows_of_a_width_they_read():
    rows = unit_rows(10, 64, 0)
    assert not NativeScorer.serves(rows)                           # fp32 rows, not panels
    assert not NativeScorer.serves(rows.half().T)                  # not contiguous
    assert not NativeScorer.serves(unit_rows(10, 36, 0).half())    # width not a multiple of 8
    assert not NativeScorer.serves(to_panels(rows)[:, :, :8])      # not panels of 16
    assert NativeScorer.serves(rows.half()) == (score_kernels.load() is not None)
    assert NativeScorer.serves(to_panels(rows)) == (score_kernels.load() is not None)


@pytest.mark.parametrize("compiler", ["missing", "failing"])
def test_where_the_kernels_cannot_be_built_search_uses_torch_and_logs_why_once(
        compiler, fresh_build, monkeypatch, caplog):
    # `false` is a compiler that exits 1 with no message.
    monkeypatch.setenv("CC", "no-such-compiler-here" if compiler == "missing" else "false")
    with caplog.at_level(logging.INFO, logger="clipsearch.score_kernels"):
        assert score_kernels.load() is None
        assert score_kernels.load() is None
    reasons = [record.getMessage() for record in caplog.records]
    expected = "no C compiler found (no-such-compiler-here" if compiler == "missing" else "false exited 1"
    assert len(reasons) == 1 and reasons[0].startswith("search scores with torch's kernels: ") and expected in reasons[0]
    assert not fresh_build.exists() or list(fresh_build.iterdir()) == []  # no half-built library left

    rows, queries = unit_rows(300, 64, 0), unit_rows(3, 64, 1)
    for stored in (rows.half(), rows):
        searcher = Searcher([str(row) for row in range(300)], stored, assume_normalised=True)
        _, found = searcher.exact_top_k(queries, 5)
        assert torch.equal(found, (queries @ stored.float().T).topk(5).indices)


def test_a_first_use_builds_the_library_once_into_the_cache(fresh_build):
    if score_kernels.load() is None:
        pytest.skip("the native kernels cannot run here (the log says why)")
    built = list(fresh_build.iterdir())
    assert len(built) == 1 and built[0].name.startswith("score_kernels-") and built[0].suffix == ".so"
    modified = built[0].stat().st_mtime_ns
    score_kernels.load.cache_clear()
    assert score_kernels.load() is not None
    assert list(fresh_build.iterdir()) == built and built[0].stat().st_mtime_ns == modified  # reused, not rebuilt


def test_without_a_home_folder_for_the_cache_search_uses_torch_and_says_so(fresh_build, monkeypatch, caplog):
    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(score_kernels, "cache_folder", no_home)
    with caplog.at_level(logging.INFO, logger="clipsearch.score_kernels"):
        assert score_kernels.load() is None
    assert "set XDG_CACHE_HOME" in caplog.records[0].getMessage()
