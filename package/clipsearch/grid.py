"""Contact sheets of search results, and file names that are safe to make from any query text."""
from __future__ import annotations

import unicodedata

from PIL import Image, ImageDraw, ImageFont, ImageOps

from clipsearch.images import load_image

BACKGROUND = (255, 255, 255)
PLACEHOLDER = (200, 200, 200)
TEXT = (20, 20, 20)
PADDING = 6
LINE_HEIGHT = 14
# Characters that are path separators or reserved on Windows, where result folders get copied to.
UNSAFE_CHARACTERS = set('/\\<>:"|?*')
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{n}" for n in range(1, 10)), *(f"LPT{n}" for n in range(1, 10))}
# Most file systems cap a name at 255 bytes; leave room for an extension and a suffix.
MAX_NAME_BYTES = 200


def _thumbnail(image_path: str, thumb_size: int) -> Image.Image:
    """The image scaled into a thumb_size square, or a grey placeholder if it cannot be read."""
    image = load_image(image_path) if image_path else None
    cell = Image.new("RGB", (thumb_size, thumb_size), PLACEHOLDER if image is None else BACKGROUND)
    if image is None:
        draw = ImageDraw.Draw(cell)
        draw.line([(0, 0), (thumb_size - 1, thumb_size - 1)], fill=(150, 150, 150), width=2)
        draw.line([(0, thumb_size - 1), (thumb_size - 1, 0)], fill=(150, 150, 150), width=2)
        return cell
    # contain() also enlarges small images, so every cell of a sheet reads at the same scale.
    image = ImageOps.contain(image, (thumb_size, thumb_size))
    cell.paste(image, ((thumb_size - image.width) // 2, (thumb_size - image.height) // 2))
    return cell


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Shorten `text` with an ellipsis until it fits `width` pixels; its spaces widened so words stay apart."""
    # Pillow's built-in font draws a space 0.2 em wide (2 px at its 10 px size): words of titles and
    # labels ran together ("HelloWorld"). Two spaces read as one ordinary space.
    text = text.replace(" ", "  ")
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def make_grid(
    image_paths: list[str],
    labels: list[str],
    title: str | None = None,
    thumb_size: int = 160,
    columns: int = 5,
) -> Image.Image:
    """Thumbnails in rows of `columns`, each with its label underneath; unreadable images become placeholders."""
    if len(labels) != len(image_paths):
        raise ValueError(f"{len(image_paths)} images but {len(labels)} labels")
    columns = max(1, min(columns, len(image_paths))) if image_paths else 1
    rows = max(1, -(-len(image_paths) // columns))
    font = ImageFont.load_default()
    cell_width, cell_height = thumb_size + PADDING, thumb_size + LINE_HEIGHT + 2 * PADDING
    title_height = LINE_HEIGHT + 2 * PADDING if title else 0
    sheet = Image.new("RGB", (columns * cell_width + PADDING, title_height + rows * cell_height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((PADDING, PADDING), _fit_text(draw, title, font, sheet.width - 2 * PADDING), fill=TEXT, font=font)
    if not image_paths:
        draw.text((PADDING, title_height + PADDING), "no results", fill=TEXT, font=font)
    for position, (image_path, label) in enumerate(zip(image_paths, labels)):
        left = PADDING + (position % columns) * cell_width
        top = title_height + (position // columns) * cell_height
        sheet.paste(_thumbnail(image_path, thumb_size), (left, top))
        draw.text((left, top + thumb_size + 2), _fit_text(draw, label, font, thumb_size), fill=TEXT, font=font)
    return sheet


def safe_filename(query: str, max_length: int = 100) -> str:
    """A single file-name component made from free text: no separators, control characters or leading dots.

    Readable text is kept ("Hello World" stays "Hello World"); anything that could leave the
    output folder or upset a file system becomes "_". Never empty.
    """
    text = unicodedata.normalize("NFC", str(query))
    characters = []
    for character in text:
        if character.isspace():  # tabs and newlines too: they read as spaces
            characters.append(" ")
        elif character in UNSAFE_CHARACTERS or unicodedata.category(character).startswith("C"):
            characters.append("_")
        else:
            characters.append(character)
    name = " ".join("".join(characters).split())  # collapse runs of whitespace
    name = name[: max(1, max_length)]
    while len(name.encode("utf-8")) > MAX_NAME_BYTES:
        name = name[:-1]
    # Leading dots hide files or mean "." and ".."; trailing dots and spaces vanish on Windows.
    name = name.lstrip(". ").rstrip(". ")
    if not name:
        name = "query"
    if name.split(".")[0].upper() in WINDOWS_RESERVED:
        name = ("_" + name)[: max(1, max_length)]
    return name
