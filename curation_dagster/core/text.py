"""Text cleaning for French product titles and descriptions.

Descriptions are scraped HTML, often double-escaped (``&amp;eacute;``) and sometimes mojibake (UTF-8 read as
Latin-1: ``Ã©``). CLIP's tokenizer sees tags and entities as noise, so they go before embedding. Mojibake repair uses
ftfy (a maintained library with real detection heuristics), not a hand-written table.
"""
from __future__ import annotations

import html
import re
import unicodedata
from html.parser import HTMLParser

import ftfy

_BLOCK_TAGS = {"br", "p", "div", "li", "ul", "ol", "tr", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6", "table", "hr"}
_SKIP_TAGS = {"script", "style"}
_WS = re.compile(r"\s+")
_HAS_WORD = re.compile(r"\w", re.UNICODE)
# Bidirectional controls (LRE/RLE/PDF/LRO/RLO, LRI/RLI/FSI/PDI, LRM/RLM, ALM) and the BOM: invisible, they reorder
# what a curator or a search page shows ("Trojan Source" style spoofing) and mean nothing to a model.
_INVISIBLE_CONTROLS = re.compile("[\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c\ufeff]")
# A "<" that no ">" closes before the next "<" outside quotes cannot open a tag. HTMLParser rescans from such a "<"
# to the end of the text (quadratic: 96 KB of "<a " took 80 s on Python 3.11.7), so it is escaped first; the parser
# then gives it back as text. Quoted attribute values may hold "<" or ">" (alt="<3"). Each scan stops at the next
# unquoted "<" or ">" (or a quote left open): linear overall (tests/test_ingest.py runs the hostile patterns).
_UNCLOSED_LT = re.compile(r"""<(?!(?:[^<>"']|"[^"]*"|'[^']*')*>)""")


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP_TAGS:
            self._skip += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append(" ")

    def handle_endtag(self, tag):
        if tag in _SKIP_TAGS and self._skip:
            self._skip -= 1
        elif tag in _BLOCK_TAGS:
            self.parts.append(" ")

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def strip_html(text: str) -> str:
    """Drop tags and decode entities with the standard library's HTML parser (handles broken markup leniently)."""
    if "<" not in text and "&" not in text:
        return text
    parser = _TextExtractor()
    parser.feed(_UNCLOSED_LT.sub("&lt;", text))
    parser.close()
    return "".join(parser.parts)


def clean_text(value: str | None) -> str:
    if value is None:
        return ""
    text = ftfy.fix_text(str(value), unescape_html=False)
    # Two passes: some rows are escaped twice ("&amp;eacute;") and tags may hide behind an escaped "&lt;".
    for _ in range(2):
        stripped = strip_html(text)
        unescaped = html.unescape(stripped)
        if unescaped == text:
            break
        text = unescaped
    text = ftfy.fix_text(text, unescape_html=False)
    text = _INVISIBLE_CONTROLS.sub("", unicodedata.normalize("NFC", text))
    return _WS.sub(" ", text).strip()


def text_problem(designation: str) -> str | None:
    """Why a cleaned designation cannot be used, or None."""
    if not designation:
        return "empty_designation"
    if not _HAS_WORD.search(designation):
        return "no_word_characters"
    return None


def clip_text(designation: str, description: str, include_description: bool) -> str:
    """The string fed to CLIP: the title, optionally followed by the description (the tokenizer truncates)."""
    if include_description and description:
        return f"{designation}. {description}"
    return designation
