"""Words on contact sheets (the shipped font, measuring, wrapping, ellipsizing), and the
few facts about OUT that the sheets (`pipeline.views.grid`) and the page (`pipeline.views.gallery`)
both read.

Sheets are drawn in DejaVu Sans, shipped inside the package (``pipeline/fonts``, Bitstream
Vera license), laid out by Pillow's BASIC engine: no system font or shaping library takes
part, so a sheet looks the same on every machine. The font covers Latin, Greek and
Cyrillic; a character it lacks (CJK, emoji) is drawn as ``?``, and the exact text stays in
the sheet's metadata and in index.html. Only when the font file cannot be read (a broken
install) does Pillow's own font step in; it holds ASCII only, so other characters are then
drawn as their closest ASCII (``é`` → ``e``, ``ß`` → ``ss``).
"""

from __future__ import annotations

import logging
import math
import unicodedata
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path, PurePosixPath

from PIL import ImageFont

__all__ = [
    "ELLIPSIS",
    "FONT_FILE",
    "META_SOURCE",
    "Font",
    "Typeface",
    "line_height",
    "path_inside",
    "text_width",
]

# the package folder (either import name): where its data files are
PACKAGE_DIR = Path(__file__).resolve().parent.parent
FONT_FILE = "fonts/DejaVuSans.ttf"  # package data of `pipeline`
META_SOURCE = "synthaug.source"  # every sheet grid.py writes has it; gallery finds sheets by it
ELLIPSIS = "…"
ASCII_ELLIPSIS = "..."

log = logging.getLogger(__name__)

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

# letters with no Unicode decomposition to ASCII (used with Pillow's ASCII-only font)
ASCII_FALLBACK = {
    "ß": "ss", "æ": "ae", "Æ": "AE", "ø": "o", "Ø": "O", "œ": "oe", "Œ": "OE", "ð": "d",
    "Ð": "D", "þ": "th", "Þ": "Th", "ł": "l", "Ł": "L", "đ": "d", "Đ": "D", "ı": "i",
    "×": "x", "÷": "/", "«": '"', "»": '"', "¡": "!", "¿": "?", "·": ".", "°": "o",
    "µ": "u", "¢": "c", "£": "GBP", "€": "EUR", "¥": "JPY", "©": "(c)", "®": "(R)",
    "§": "S", "¶": "P", "¬": "-", "¦": "|", "±": "+/-", "⁄": "/", "‘": "'", "’": "'",
    "“": '"', "”": '"', "–": "-", "—": "-", "…": "...", "→": "->", "\t": " ",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Typeface:
    """The sheets' font at any size, and text fitted to it; one per drawing.

    `data` is the TrueType file (None: Pillow's own font). Which characters the face can
    draw is remembered per instance, since every size of a face has the same glyphs.
    """

    data: bytes | None
    _glyphs: dict[str, bool] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls) -> Typeface:
        """The shipped DejaVu Sans, or Pillow's own font (with a warning) if it is unreadable."""
        try:
            data = (PACKAGE_DIR / FONT_FILE).read_bytes()
            ImageFont.truetype(BytesIO(data), 10)  # fails early without FreeType
        except (OSError, ImportError) as exc:
            log.warning("drawing sheets in Pillow's ASCII-only font: %s: %s", FONT_FILE, exc)
            return cls(None)
        return cls(data)

    def font(self, size: int) -> Font:
        """The face at `size` px, laid out by Pillow's BASIC engine (no system library)."""
        if self.data is not None:
            basic = ImageFont.Layout.BASIC
            return ImageFont.truetype(BytesIO(self.data), size, layout_engine=basic)
        font = ImageFont.load_default(size=size)
        if isinstance(font, ImageFont.FreeTypeFont):
            return font.font_variant(layout_engine=ImageFont.Layout.BASIC)
        return font  # Pillow built without FreeType: the fixed-size bitmap font

    def printable(self, text: str, font: Font) -> str:
        """`text` (NFC) with each character the face lacks replaced by its closest ASCII, or '?'."""
        return "".join(self._glyph(ch, font) for ch in unicodedata.normalize("NFC", text))

    def ellipsis(self, font: Font) -> str:
        """'…' when the face has it, else '...'."""
        return ELLIPSIS if self._has(ELLIPSIS, font) else ASCII_ELLIPSIS

    def wrap(self, text: str, font: Font, width: int, max_lines: int) -> list[str]:
        """Word-wrap `text` into `width` px; the last allowed line ends in an ellipsis if cut.

        A word wider than the line is broken between characters.
        """
        text = self.printable(" ".join(text.split()), font)
        lines: list[str] = []
        words = text.split(" ")
        while words and len(lines) < max_lines:
            line = words.pop(0)
            while text_width(font, line) > width:  # one word wider than the line: break it
                cut = _fit_chars(font, line, width)
                lines.append(line[:cut])
                line = line[cut:]
            while words and text_width(font, f"{line} {words[0]}") <= width:
                line = f"{line} {words.pop(0)}"
            lines.append(line)
        if len(lines) > max_lines or words:
            dots = self.ellipsis(font)
            last = lines[max_lines - 1]
            while last and text_width(font, last + dots) > width:
                last = last[:-1]
            lines = [*lines[: max_lines - 1], last.rstrip() + dots]
        return lines

    def words_fit(self, text: str, font: Font, width: int) -> bool:
        """True when no word of `text` is wider than `width` px (so none must be broken)."""
        return all(text_width(font, self.printable(w, font)) <= width for w in text.split())

    def _glyph(self, ch: str, font: Font) -> str:
        if self._has(ch, font):
            return ch
        folded = ASCII_FALLBACK.get(ch)
        if folded is None:
            base = unicodedata.normalize("NFKD", ch)
            folded = "".join(c for c in base if not unicodedata.combining(c))
            folded = "".join(ASCII_FALLBACK.get(c, c) for c in folded)
        if folded and all(self._has(c, font) for c in folded):
            return folded
        return "?"

    def _has(self, ch: str, font: Font) -> bool:
        """Does the face draw `ch` as something other than its missing-glyph box?"""
        if ch == " ":
            return True
        known = self._glyphs.get(ch)
        if known is None:
            known = self._glyphs[ch] = _mask(font, ch) not in (None, _mask(font, "\uffff"))
        return known


def text_width(font: Font, text: str) -> float:
    """Advance width of `text` in `font`, in px."""
    return font.getlength(text)


def line_height(font: Font) -> int:
    """Height of one line of `font`, with a little leading."""
    return math.ceil(font.getbbox("Ag|")[3] * 1.25)


def _mask(font: Font, ch: str) -> tuple[tuple[int, int], bytes] | None:
    try:
        mask = font.getmask(ch)
    except UnicodeEncodeError:  # the bitmap font only knows Latin-1
        return None
    return mask.size, bytes(mask)


def _fit_chars(font: Font, word: str, width: int) -> int:
    cut = len(word)
    while cut > 1 and text_width(font, word[:cut]) > width:
        cut -= 1
    return cut


# --- what grid.py and gallery.py both read from OUT ------------------------------------------


def path_inside(out_dir: Path, relative: str) -> Path | None:
    """`relative` under OUT, or None when it is absolute or climbs out (a hand-edited line)."""
    pure = PurePosixPath(relative)
    if not relative or pure.is_absolute() or ".." in pure.parts:
        return None
    return out_dir.joinpath(*pure.parts)
