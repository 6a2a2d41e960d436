"""What a person wrote: HTML to text, normalised tokens, and the quoted text, signatures and footers cut away."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# Every CJK ideograph and kana is a token of its own: Japanese and Chinese put no spaces between words.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"
_TOKEN = re.compile(
    rf"(?P<cjk>[{_CJK}])"
    rf"|(?P<word>[^\W_{_CJK}]+)"
    # A run of dots or of !?; is tried from its first character only, and never given back: retrying from
    # every dot of "a.....a" made a line of 30,000 dots cost 12 seconds.
    r"|(?P<stop>(?:(?<![\d.])|(?<=\d\.))\.++(?=\s|$)(?![ \t]*\d)|(?<![!?;])[!?;]++(?=\s|$)|[。！？；]+|\n[ \t]*\n)"
    r"|(?P<comma>[,:、，：()\u2013\u2014\u2022|]|\s-\s)"
    r"|(?P<newline>\n)"
)
# Links and addresses are not words: "http://example.com/unsubscribe" asks nothing of anyone. A link
# leaves the token LINK behind (footers say "Unsubscribe: <link>"); an address or a tag leaves nothing.
_LINK = re.compile(r"(?:https?://|ftp://|www\.)[^\s<>\"')\]]*")
# An address starts where a run of address characters starts: retrying from each character of a 30,000-letter
# word cost 3 seconds.
_ADDRESS = re.compile(r"mailto:[^\s<>\"')\]]*|(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)+|<[^<>\n]{0,300}>")
LINK = "xlinkx"
MAX_HTML = 1_000_000
STOP = "."
COMMA = ","
NEWLINE = "\n"
SENTINELS = frozenset((STOP, COMMA, NEWLINE))

_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'", "\u00b4": "'", "\u00a0": " "})
_REPLY_PREFIX = re.compile(
    r"^\s*(?:(?:re|aw|wg|fw|fwd|tr|rv|r|sv|vs|antw|odp|rif|res|enc|ynt|回复|答复|转发|返信|転送)\s*(?:\[\d+\])?\s*[:：]\s*)+",
    re.I,
)


# The combining marks that folding removes; the dakuten of kana (\u3099, \u309a) stay, or Japanese words change.
_MARKS = {code: None for code in (*range(0x0300, 0x0370), *range(0x0483, 0x048A), *range(0x1AB0, 0x1B00),
                                  *range(0x1DC0, 0x1E00), *range(0x20D0, 0x2100), *range(0xFE20, 0xFE30))
          if unicodedata.combining(chr(code))}


def is_cjk(char: str) -> bool:
    """Say whether a character is a kana or a CJK ideograph."""
    return bool(char) and ("\u3040" <= char <= "\u30ff" or "\u3400" <= char <= "\u9fff"
                           or "\uf900" <= char <= "\ufaff" or "\uff66" <= char <= "\uff9f")


def fold(text: str) -> str:
    """Return text case-folded, with accents and typographic apostrophes removed, for matching."""
    if text.isascii():
        return text.replace("`", "'").lower()
    text = unicodedata.normalize("NFKC", text.translate(_QUOTES)).casefold()
    if text.isascii():
        return text
    return unicodedata.normalize("NFC", unicodedata.normalize("NFKD", text).translate(_MARKS))


def tokenise(text: str) -> list[str]:
    """Split folded text into word tokens, one token per CJK character, and sentinels.

    Sentinels: "." ends a sentence (., !, ?, ; before a space, or a blank line), "," a clause,
    "\\n" a line. A full stop before a digit ("Art. 15") or after one ("15. GDPR", "am 3. November") ends nothing.
    """
    return tokenise_lines(text)[0]


def tokenise_lines(text: str, questions: set[int] | None = None) -> tuple[list[str], list[int]]:
    """Tokenise like `tokenise`, and return beside each token the number of the line it is on.

    With `questions`, the positions of the sentence ends that were question marks are added to it.
    """
    tokens: list[str] = []
    lines: list[int] = []
    append, mark = tokens.append, lines.append
    line = 0
    folded = fold(text)
    if "@" in folded or "<" in folded or "mailto:" in folded:
        folded = _ADDRESS.sub(_blank_link, folded)
    if "http" in folded or "www." in folded or "ftp:" in folded:
        folded = _LINK.sub(_mark_link, folded)
    for match in _TOKEN.finditer(folded):
        group = match.lastgroup
        if group == "word" or group == "cjk":
            append(match.group())
            mark(line)
        elif group == "stop":
            if tokens and tokens[-1] != STOP:
                append(STOP)
                mark(line)
            if questions is not None and tokens and ("?" in match.group() or "？" in match.group()):
                questions.add(len(tokens) - 1)
            line += match.group().count("\n")
        elif group == "comma":
            append(COMMA)
            mark(line)
        else:
            if tokens and tokens[-1] not in SENTINELS:
                append(NEWLINE)
                mark(line)
            line += 1
    return tokens, lines


def _blank_link(match: re.Match) -> str:
    # Keep the line breaks of what spans lines, so that line numbers stay right.
    return "\n" * match.group().count("\n") or " "


def _mark_link(match: re.Match) -> str:
    return f" {LINK} "


def words(tokens: list[str]) -> list[str]:
    """Return the tokens without sentinels."""
    return [t for t in tokens if t not in SENTINELS]


def strip_reply_prefix(subject: str) -> tuple[str, bool]:
    """Return the subject without "Re:", "AW:", "Fwd:" … prefixes, and whether it had one."""
    stripped = _REPLY_PREFIX.sub("", subject or "")
    return stripped.strip(), stripped != (subject or "")


def html_to_text(html: str) -> str:
    """Turn HTML into the text a reader sees (inscriptis keeps the layout of blocks and tables)."""
    from inscriptis import get_text
    from inscriptis.model.config import ParserConfig

    if not html.strip():
        return ""
    # inscriptis takes about a second a megabyte (more for tables): what a person wrote comes first.
    html = html[:MAX_HTML]
    try:
        return get_text(html, ParserConfig(display_links=False, display_images=False))
    except Exception:  # lxml rejects some broken documents outright; fall back to bare tag removal
        return re.sub(r"<[^>]*>", " ", html)


@dataclass(frozen=True)
class Markers:
    """The language-dependent lines that start quoted text, from every lexicon."""

    attribution: re.Pattern[str]
    outlook_from: frozenset[str]
    outlook_sent: frozenset[str]


_BANNER_MARKS = ("---", "___", "===", "***")
# Possessive: whitespace around the stars is never given back, or a line of 10,000 tabs costs 16 seconds.
_LABEL = re.compile(r"^\s*+\**+\s*+([^\W\d_][^:：*]{0,24}?)\s*+\**+\s*+[:：]")


def strip_quoted(text: str, markers: Markers) -> str:
    """Cut the text at the first quoted original and drop "> " lines.

    Quoted originals start at an attribution ("On … wrote:", "Am … schrieb …:"), a banner line
    ("-----Original Message-----", "____…"), or an Outlook header block ("From: …" followed within
    four lines by "Sent: …"/"Date: …", in the lexicon's languages).
    """
    lines = text.splitlines()
    kept: list[str] = []
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith((">", "|>")):
            continue
        if stripped and _is_quote_start(lines, index, stripped, markers):
            break
        kept.append(line)
    return "\n".join(kept)


def _is_quote_start(lines: list[str], index: int, stripped: str, markers: Markers) -> bool:
    if stripped[0] in "-_=*" and is_banner(stripped):
        return True
    if stripped.endswith((":", "：")) or (index + 1 < len(lines) and lines[index + 1].strip().endswith((":", "："))):
        # Attributions wrap: "On Mon, 3 Nov 2026 at 10:02, Example News <news@…>\nwrote:".
        joined = stripped if stripped.endswith((":", "：")) else f"{stripped} {lines[index + 1].strip()}"
        if markers.attribution.search(fold(joined)):
            return True
    label = _LABEL.match(stripped)
    if label and fold(label.group(1)).strip() in markers.outlook_from:
        for following in lines[index + 1:index + 5]:
            next_label = _LABEL.match(following.strip())
            if next_label and fold(next_label.group(1)).strip() in markers.outlook_sent:
                return True
    return False


def is_banner(line: str) -> bool:
    """Say whether a line is a banner: "-----Original Message-----", "*** text ***", "__________".

    Three marks at each end with something between them; checked by slicing, not a regular expression,
    whose backtracking made one line of 100,000 dashes cost a hundred seconds.
    """
    line = line.strip()
    return (len(line) >= 7 and line[:3] in _BANNER_MARKS and line[-3:] in _BANNER_MARKS
            and not line[3:-3].isspace())


_SIGNATURE = re.compile(r"^(?:--|-- |—|__)\s*$")


def strip_signature(text: str) -> str:
    """Cut the text at a signature delimiter line ("-- ")."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if _SIGNATURE.match(line) and index > 0:
            return "\n".join(lines[:index])
    return text


def guess_language(tokens: list[str], owners: dict[str, tuple[str, ...]], scripts: dict[str, str]) -> str | None:
    """Guess the language of tokens from stopword hits; the script alone decides Greek, Japanese and Chinese.

    `owners` maps each stopword to the languages it belongs to. Japanese is told from Chinese by kana:
    Chinese text has none.
    """
    kana = han = greek = 0
    counts: dict[str, int] = {}
    for token in tokens:
        first = token[0]
        if "\u3040" <= first <= "\u30ff" or "\uff66" <= first <= "\uff9f":
            kana += 1
        elif "\u3400" <= first <= "\u9fff" or "\uf900" <= first <= "\ufaff":
            han += 1
        elif "\u0370" <= first <= "\u03ff":
            greek += 1
        else:
            for language in owners.get(token, ()):
                counts[language] = counts.get(language, 0) + 1
    if kana and "ja" in scripts:
        return "ja"
    if han and "zh" in scripts:
        return "zh"
    latin_best = max(counts.items(), key=lambda item: item[1], default=(None, 0))
    if greek and greek >= latin_best[1] and "el" in scripts:
        return "el"
    return latin_best[0] if latin_best[1] > 0 else None
