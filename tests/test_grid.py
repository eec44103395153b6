"""Result grids survive bad images; file names made from queries stay inside their folder."""
import os

import pytest
from PIL import Image

from clipsearch.grid import PLACEHOLDER, make_grid, safe_filename


def test_grid_shows_placeholders_for_unreadable_images(tmp_path, colour_images):
    _, paths = colour_images
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not a picture")
    image_paths = [str(paths[0]), str(tmp_path / "missing.png"), str(tmp_path / "empty.jpg"), str(tmp_path / "text.png")]
    grid = make_grid(image_paths, [f"{rank}. 0.5" for rank in range(1, 5)], title="a query", thumb_size=40, columns=3)
    assert isinstance(grid, Image.Image) and grid.mode == "RGB"
    assert grid.width > 3 * 40 and grid.height > 2 * 40
    first_cell_centre = grid.getpixel((6 + 20, 26 + 5))
    assert first_cell_centre == Image.open(paths[0]).convert("RGB").getpixel((0, 0))
    assert grid.getpixel((6 + 46 + 10, 26 + 5)) == PLACEHOLDER


def test_grid_edge_cases():
    assert make_grid([], [], title="nothing found").size[0] > 0
    with pytest.raises(ValueError, match="labels"):
        make_grid(["a.png"], [])


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("Hello World", "Hello World"),
        ("../../x", "_.._x"),
        ("..", "query"),
        ("", "query"),
        ("  \t ", "query"),
        ("a/b\\c", "a_b_c"),
        ("tab\there\x00nul\nline", "tab here_nul line"),
        (".hidden", "hidden"),
        ("CON", "_CON"),
        ('what?*:<>|"', "what_______"),
        ("café ☕", "café ☕"),
    ],
)
def test_safe_filename(query, expected):
    assert safe_filename(query) == expected


def test_safe_filename_is_capped_and_never_leaves_its_folder(tmp_path):
    assert len(safe_filename("x" * 500)) == 100
    assert len(safe_filename("x" * 500, max_length=10)) == 10
    assert len(safe_filename("é" * 500, max_length=500).encode()) <= 200
    for hostile in ("../../etc/passwd", "/abs/path", "..\\..\\win", "\x1b[31mred", "." * 20):
        name = safe_filename(hostile)
        assert name and os.sep not in name and "\\" not in name and not name.startswith(".")
        assert (tmp_path / name).resolve().parent == tmp_path.resolve()


def test_grid_title_keeps_its_spaces():
    def title_ink_width(title):
        sheet = make_grid([], [], title=title)
        ink = [x for x in range(sheet.width) for y in range(2, 20) if sheet.getpixel((x, y))[0] < 128]
        return max(ink) - min(ink)

    assert title_ink_width("a b c d") > title_ink_width("abcd") + 6
