"""Per-language phrase tables (the TOML files beside this module), compiled into token matchers.

The phrase syntax is described in README.md in this folder. Loading is done once; the result is an
immutable `Lexicon` handed to `classify()`.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from optout.errors import LexiconError
from optout.text import COMMA, NEWLINE, STOP, Markers, fold, tokenise

HERE = Path(__file__).parent
WORD_GAP = 4
CJK_GAP = 8
NEGATION_REACH = 4
CJK_NEGATION_REACH = 6

INTENT_CATEGORIES = (
    "opt-out.all", "opt-out.newsletters", "opt-out.partners",
    "access.access", "access.rectification",
    "deletion.erasure", "deletion.child",
    "other.subscribe", "other.question",
)
WHOLE_CATEGORIES = ("opt-out.whole-all", "opt-out.whole-newsletters", "other.whole-subscribe")
_TOP_KEYS = {"language", "name", "script", "stopwords", "filler", "negation", "opt-out", "access", "deletion",
             "other", "machine", "text"}
_SECTION_KEYS = {
    "negation": {"before", "after", "contrast", "bridge", "conditional"},
    "opt-out": {"all", "newsletters", "partners", "whole-all", "whole-newsletters"},
    "access": {"access", "rectification"},
    "deletion": {"erasure", "child"},
    "other": {"subscribe", "whole-subscribe", "question"},
    "machine": {"auto-reply", "bounce"},
    "text": {"attribution", "outlook-from", "outlook-sent", "footer", "signature"},
}
_MAX_EXPANSIONS = 4096

EQ, PREFIX, SUFFIX, INFIX, GAP, ALT, ONE_OF, MAYBE_ONE_OF = range(8)
# (EQ|PREFIX|SUFFIX|INFIX, text) | (GAP, size) | (ALT, (steps, steps, ...)) | (ONE_OF|MAYBE_ONE_OF, frozenset)
# ONE_OF is a group of single words ("(delete|erase)"), MAYBE_ONE_OF the same with an empty alternative:
# both are tested with one set lookup instead of trying each alternative.
Step = tuple


class Alternatives(tuple):
    """A group's alternatives; those that begin with a plain word are indexed by it, so matching tries only them."""

    by_first: dict[str, tuple]
    others: tuple


def _alternatives(alternatives: tuple[tuple[Step, ...], ...]) -> Alternatives:
    group = Alternatives(alternatives)
    by_first: dict[str, list] = {}
    others = []
    for alternative in alternatives:
        if alternative and alternative[0][0] == EQ:
            by_first.setdefault(alternative[0][1], []).append(alternative)
        elif alternative and alternative[0][0] == ONE_OF:
            for word in alternative[0][1]:
                by_first.setdefault(word, []).append(alternative)
        else:
            others.append(alternative)
    group.by_first = {word: tuple(found) for word, found in by_first.items()}
    group.others = tuple(others)
    return group


@dataclass(frozen=True)
class Phrase:
    """One phrase of a table, compiled to steps: its category, language and the text as written."""

    category: str
    language: str
    text: str
    steps: tuple[Step, ...]
    required: frozenset[str] = frozenset()
    one_of: tuple[frozenset[str], ...] = ()
    second: frozenset[str] | None = None
    literals: frozenset[str] = frozenset()

    def may_match(self, present: set[str]) -> bool:
        """Say whether the words of a text leave this phrase any chance (a cheap test before matching)."""
        return self.required.issubset(present) and all(not group.isdisjoint(present) for group in self.one_of)


def _literals(steps: tuple[Step, ...]) -> frozenset[str]:
    """Return every plain word a phrase is written with (in any alternative)."""
    words: set[str] = set()
    for kind, value in steps:
        if kind == EQ:
            words.add(value)
        elif kind in (ONE_OF, MAYBE_ONE_OF):
            words |= value
        elif kind == ALT:
            for alternative in value:
                words |= _literals(alternative)
    return frozenset(words)


def _second(steps: tuple[Step, ...]) -> frozenset[str] | None:
    """Return the words that must follow the first word of every match, when that is known."""
    if len(steps) < 2 or steps[0][0] not in (EQ, ONE_OF):
        return None
    kind, value = steps[1]
    if kind == EQ:
        return frozenset((value,))
    if kind == ONE_OF:
        return value
    return None


def _prefilter(steps: tuple[Step, ...]) -> tuple[frozenset[str], tuple[frozenset[str], ...]]:
    """Return the words every match must contain, and groups of which each match contains one."""
    required: set[str] = set()
    one_of: list[frozenset[str]] = []
    for kind, value in steps:
        if kind == EQ:
            required.add(value)
        elif kind == ONE_OF:
            one_of.append(value)
        elif kind == ALT:
            firsts: set[str] = set()
            for alternative in value:
                if not alternative or alternative[0][0] != EQ:
                    break
                firsts.add(alternative[0][1])
            else:
                one_of.append(frozenset(firsts))
    return frozenset(required), tuple(one_of)


@dataclass(frozen=True)
class Match:
    """Where a phrase matched a token list: tokens[start:end]."""

    phrase: Phrase
    start: int
    end: int


def _match_from(steps: tuple, k: int, tokens: list[str], j: int, n: int, then=None) -> int | None:
    """Match steps[k:] at tokens[j:]; `then` is what must follow (a linked list of (steps, k) frames)."""
    while True:
        if k == len(steps):
            if then is None:
                return j
            (steps, k), then = then
            continue
        kind, value = steps[k]
        if kind == ALT:
            frame = ((steps, k + 1), then)
            probe = j
            while probe < n and tokens[probe] == NEWLINE:
                probe += 1
            if probe < n:
                for alternative in value.by_first.get(tokens[probe], ()):
                    end = _match_from(alternative, 0, tokens, j, n, frame)
                    if end is not None:
                        return end
            for alternative in value.others:
                end = _match_from(alternative, 0, tokens, j, n, frame)
                if end is not None:
                    return end
            return None
        if kind == MAYBE_ONE_OF:
            probe = j
            while probe < n and tokens[probe] == NEWLINE:
                probe += 1
            if probe < n and tokens[probe] in value:
                end = _match_from(steps, k + 1, tokens, probe + 1, n, then)
                if end is not None:
                    return end
            k += 1
            continue
        if kind == GAP:
            skipped = 0
            while True:
                end = _match_from(steps, k + 1, tokens, j, n, then)
                if end is not None:
                    return end
                if j >= n or tokens[j] == STOP:
                    return None
                if tokens[j] == NEWLINE or tokens[j] == COMMA:
                    j += 1  # line breaks and commas inside a gap are free
                    continue
                if skipped >= value:
                    return None
                j += 1
                skipped += 1
        while j < n and tokens[j] == NEWLINE:
            j += 1
        if j >= n:
            return None
        token = tokens[j]
        if kind == EQ:
            if token != value:
                return None
        elif kind == ONE_OF:
            if token not in value:
                return None
        elif kind == PREFIX:
            if not token.startswith(value):
                return None
        elif kind == SUFFIX:
            if not token.endswith(value):
                return None
        elif value not in token:
            return None
        k += 1
        j += 1


def _first_steps(steps: tuple, k: int = 0) -> list[Step] | None:
    """Return the steps a match can begin with; None when the phrase can match nothing at all."""
    if k == len(steps):
        return None
    kind, value = steps[k]
    if kind == ONE_OF:
        return [(EQ, word) for word in value]
    if kind == MAYBE_ONE_OF:
        return [(EQ, word) for word in value] + (_first_steps(steps, k + 1) or [])
    if kind != ALT:
        return [steps[k]]
    firsts: list[Step] = []
    for alternative in value:
        found = _first_steps(alternative + steps[k + 1:])
        if found:
            firsts += found
    return firsts


@dataclass(frozen=True)
class PhraseIndex:
    """Phrases indexed by what they can begin with, so that matching is one pass over the tokens.

    A first step that is a word is looked up exactly; a prefix by its first three letters; a suffix by
    its last three; only the rare infix (`*word*`) is tried on every token.
    """

    exact: dict[str, tuple[Phrase, ...]]
    prefix: dict[str, tuple[Phrase, ...]]
    suffix: dict[str, tuple[Phrase, ...]]
    loose: tuple[Phrase, ...]
    _cache: dict[str, tuple[Phrase, ...]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, phrases: list[Phrase]) -> PhraseIndex:
        """Index every phrase under each of the steps it can begin with."""
        tables: dict[int, dict[str, dict[int, Phrase]]] = {EQ: {}, PREFIX: {}, SUFFIX: {}}
        loose: dict[int, Phrase] = {}
        for number, phrase in enumerate(phrases):
            for kind, value in _first_steps(phrase.steps) or ():
                if kind == EQ:
                    tables[EQ].setdefault(value, {})[number] = phrase
                elif kind == PREFIX:
                    tables[PREFIX].setdefault(value[:3], {})[number] = phrase
                elif kind == SUFFIX and len(value) >= 3:
                    tables[SUFFIX].setdefault(value[-3:], {})[number] = phrase
                else:
                    loose[number] = phrase
        frozen = {kind: {k: tuple(v.values()) for k, v in table.items()} for kind, table in tables.items()}
        return cls(frozen[EQ], frozen[PREFIX], frozen[SUFFIX], tuple(loose.values()))

    def candidates(self, token: str) -> tuple[Phrase, ...]:
        """Return the phrases that may begin at a token (remembered: words repeat from mail to mail)."""
        cache = self._cache
        found = cache.get(token)
        if found is None:
            if len(cache) > 200_000:
                cache.clear()
            found = cache[token] = self._candidates(token)
        return found

    def _candidates(self, token: str) -> tuple[Phrase, ...]:
        found = self.exact.get(token, ())
        if len(token) >= 3:
            more = self.prefix.get(token[:3])
            if more:
                found = found + tuple(p for p in more if p not in found)
            more = self.suffix.get(token[-3:])
            if more:
                found = found + tuple(p for p in more if p not in found)
        if self.loose:
            found = found + self.loose
        return found

    def find(self, tokens: list[str]) -> list[Match]:
        """Return every match of every phrase in tokens, in order of position."""
        found: list[Match] = []
        append = found.append
        n = len(tokens)
        present = set(tokens)
        # Per text, once: the phrases each distinct word may begin, less those whose words are absent.
        starting: dict[str, list[Phrase]] = {}
        verdicts: dict[int, bool] = {}
        for token in present:
            if token == STOP or token == COMMA or token == NEWLINE:
                continue
            possible = []
            for phrase in self.candidates(token):
                key = id(phrase)
                verdict = verdicts.get(key)
                if verdict is None:
                    verdict = verdicts[key] = phrase.may_match(present)
                if verdict:
                    possible.append(phrase)
            if possible:
                starting[token] = possible
        if not starting:
            return found
        for i, token in enumerate(tokens):
            phrases = starting.get(token)
            if phrases is None:
                continue
            following = i + 1
            while following < n and tokens[following] == NEWLINE:
                following += 1
            after = tokens[following] if following < n else None
            for phrase in phrases:
                if phrase.second is not None and after not in phrase.second:
                    continue
                end = _match_from(phrase.steps, 0, tokens, i, n)
                if end is not None:
                    append(Match(phrase, i, end))
        return found


@dataclass(frozen=True)
class Lexicon:
    """All loaded phrase tables, compiled: what `classify()` and the text cleaners need."""

    languages: tuple[str, ...]
    scripts: dict[str, str]
    stopwords: dict[str, tuple[str, ...]]
    phrases: PhraseIndex
    whole: dict[tuple[str, ...], str]
    filler: frozenset[tuple[str, ...]]
    negation_before: dict[str, frozenset[tuple[str, ...]]]
    negation_after: dict[str, frozenset[tuple[str, ...]]]
    contrast: dict[str, frozenset[tuple[str, ...]]]
    bridge: dict[str, frozenset[str]]
    conditional: dict[str, frozenset[tuple[str, ...]]]
    markers: Markers
    phrase_count: int = field(default=0)


_CJK_CHAR = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f]")
_PIECE = re.compile(r"\.\.\.\d*|[()|]|(?:(?!\.\.\.)[^\s()|])+")


def _parse(text: str, where: str) -> tuple[Step, ...]:
    pieces = _PIECE.findall(fold(text))
    position = 0
    cjk = _CJK_CHAR.search(text) is not None

    def sequence(depth: int) -> list[Step]:
        nonlocal position
        steps: list[Step] = []
        while position < len(pieces):
            piece = pieces[position]
            if piece == "(":
                position += 1
                alternatives = [tuple(sequence(depth + 1))]
                while position < len(pieces) and pieces[position] == "|":
                    position += 1
                    alternatives.append(tuple(sequence(depth + 1)))
                if position >= len(pieces) or pieces[position] != ")":
                    raise LexiconError(f"{where}: unclosed (")
                position += 1
                steps.append(_group(tuple(alternatives)))
            elif piece in ("|", ")"):
                if depth == 0:
                    raise LexiconError(f"{where}: {piece!r} outside a group")
                return steps
            else:
                position += 1
                steps.extend(_piece_steps(piece, cjk, where))
        return steps

    steps = tuple(sequence(0))
    if not steps or steps[0][0] == GAP or steps[-1][0] == GAP:
        raise LexiconError(f"{where}: phrase is empty or starts or ends with a gap")
    if _first_steps(steps) is None or any(kind == GAP for kind, _ in (_first_steps(steps) or ())):
        raise LexiconError(f"{where}: phrase may begin with nothing or with a gap")
    return steps


def _group(alternatives: tuple[tuple[Step, ...], ...]) -> Step:
    """Return a group as one step: a set lookup when every alternative is a single word (or empty)."""
    words = [a[0][1] for a in alternatives if len(a) == 1 and a[0][0] == EQ]
    empty = any(len(a) == 0 for a in alternatives)
    if len(words) + empty == len(alternatives) and words:
        return (MAYBE_ONE_OF if empty else ONE_OF, frozenset(words))
    return (ALT, _alternatives(alternatives))


def _piece_steps(piece: str, cjk: bool, where: str) -> list[Step]:
    if piece.startswith("..."):
        size = piece[3:]
        if size and not size.isdigit():
            raise LexiconError(f"{where}: bad gap {piece!r} (use ... or ...N)")
        return [(GAP, int(size) if size else (CJK_GAP if cjk else WORD_GAP))]
    if re.search(r"[?+\[\]{}\\^$]", piece):
        raise LexiconError(f"{where}: {piece!r} looks like a regular expression; phrases use (a|b|) and ...")
    if "*" in piece:
        core = piece.strip("*")
        if not core or "*" in core or not re.fullmatch(r"[^\W_]+", core):
            raise LexiconError(f"{where}: bad wildcard {piece!r} (one word with * at its start or end)")
        kind = INFIX if piece.startswith("*") and piece.endswith("*") else SUFFIX if piece.startswith("*") else PREFIX
        if kind == PREFIX and len(core) < 3:
            raise LexiconError(f"{where}: prefix {piece!r} is too short (at least three letters)")
        return [(kind, core)]
    if piece.isascii() and piece.isalnum():
        return [(EQ, piece)]  # already folded: one plain word
    return [(EQ, token) for token in tokenise(piece) if token not in (STOP, COMMA, NEWLINE)]


def _expand(steps: tuple[Step, ...], where: str) -> list[tuple[str, ...]]:
    """Enumerate the plain token sequences of a phrase without gaps or wildcards."""
    results: list[tuple[str, ...]] = [()]
    for kind, value in steps:
        if kind == ALT:
            options = [option for alternative in value for option in _expand(alternative, where)]
            results = [r + o for r in results for o in options]
        elif kind in (ONE_OF, MAYBE_ONE_OF):
            options = [(word,) for word in sorted(value)] + ([()] if kind == MAYBE_ONE_OF else [])
            results = [r + o for r in results for o in options]
        elif kind == EQ:
            results = [r + (value,) for r in results]
        else:
            raise LexiconError(f"{where}: only plain words and groups are allowed here")
        if len(results) > _MAX_EXPANSIONS:
            raise LexiconError(f"{where}: more than {_MAX_EXPANSIONS} variants")
    return results


def _phrases(entries: list, category: str, language: str, where: str) -> list[Phrase]:
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise LexiconError(f"{where}: expected a list of strings")
    phrases = []
    for entry in entries:
        steps = _parse(entry, f"{where}: {entry!r}")
        phrases.append(Phrase(category, language, entry, steps, *_prefilter(steps), _second(steps), _literals(steps)))
    return phrases


def _token_tuples(entries: list, where: str) -> set[tuple[str, ...]]:
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise LexiconError(f"{where}: expected a list of strings")
    result = set()
    for entry in entries:
        for tokens in _expand(_parse(entry, f"{where}: {entry!r}"), f"{where}: {entry!r}"):
            if not tokens:
                raise LexiconError(f"{where}: {entry!r} has no words")
            result.add(tokens)
    return result


def _read(path: Path) -> dict:
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise LexiconError(f"{path.name}: {error}") from error
    unknown = set(table) - _TOP_KEYS
    if unknown:
        raise LexiconError(f"{path.name}: unknown keys {sorted(unknown)}")
    for section, allowed in _SECTION_KEYS.items():
        extra = set(table.get(section, {})) - allowed
        if extra:
            raise LexiconError(f"{path.name}: unknown keys in [{section}]: {sorted(extra)}")
    if table.get("language") != path.stem:
        raise LexiconError(f"{path.name}: language must be {path.stem!r}")
    if table.get("script", "latin") not in ("latin", "greek", "cyrillic", "cjk"):
        raise LexiconError(f"{path.name}: script must be latin, greek, cyrillic or cjk")
    return table


def load_lexicon(directory: Path | None = None, languages: tuple[str, ...] | None = None) -> Lexicon:
    """Load and compile the phrase tables of a folder (default: the ones shipped with optout)."""
    if directory is None and languages is None:
        return _default_lexicon()
    return _load(directory or HERE, languages)


@lru_cache(maxsize=1)
def _default_lexicon() -> Lexicon:
    return _cached(HERE)




def _cached(directory: Path) -> Lexicon:
    """Load the tables compiled, from a cache keyed by their contents (compiling takes a third of a second).

    The cache lives in $XDG_CACHE_HOME/optout (or ~/.cache/optout); when it cannot be read or written,
    the tables are simply compiled.
    """
    import hashlib
    import os
    import pickle
    import tempfile

    # Keyed by the tables and by the code that compiles them (this module and the tokeniser), so that a
    # cache written by another version is never read.
    from optout import text

    digest = hashlib.sha256(Path(__file__).read_bytes() + Path(text.__file__).read_bytes())
    for path in sorted(directory.glob("*.toml")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    try:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "optout"
    except RuntimeError:  # no home directory at all: compile every time
        return _load(directory, None)
    cache = root / f"lexicon-{digest.hexdigest()[:24]}.pickle"
    try:
        return pickle.loads(cache.read_bytes())
    except Exception:  # absent, unreadable or from another version: compile instead
        pass
    lexicon = _load(directory, None)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, delete=False) as handle:
            handle.write(pickle.dumps(lexicon, protocol=pickle.HIGHEST_PROTOCOL))
        os.replace(handle.name, cache)
        for stale in root.glob("lexicon-*.pickle"):
            if stale != cache:
                stale.unlink(missing_ok=True)
    except OSError:
        pass
    return lexicon


def _load(directory: Path, languages: tuple[str, ...] | None) -> Lexicon:
    paths = sorted(directory.glob("*.toml"))
    if languages is not None:
        missing = set(languages) - {p.stem for p in paths}
        if missing:
            raise LexiconError(f"no phrase table for {sorted(missing)} in {directory}")
        paths = [p for p in paths if p.stem in languages]
    if not paths:
        raise LexiconError(f"no phrase tables (*.toml) in {directory}")
    intents: list[Phrase] = []
    auto_replies: list[Phrase] = []
    bounces: list[Phrase] = []
    footers: list[Phrase] = []
    signatures: list[Phrase] = []
    whole: dict[tuple[str, ...], str] = {}
    filler: set[tuple[str, ...]] = set()
    negation_before: dict[str, frozenset[tuple[str, ...]]] = {}
    negation_after: dict[str, frozenset[tuple[str, ...]]] = {}
    contrast: dict[str, frozenset[tuple[str, ...]]] = {}
    bridge: dict[str, frozenset[str]] = {}
    conditional: dict[str, frozenset[tuple[str, ...]]] = {}
    attributions: list[str] = []
    outlook_from: set[str] = set()
    outlook_sent: set[str] = set()
    scripts: dict[str, str] = {}
    stopwords: dict[str, list[str]] = {}
    for path in paths:
        table = _read(path)
        language = table["language"]
        scripts[language] = table.get("script", "latin")
        for word in {fold(word) for word in table.get("stopwords", [])}:
            stopwords.setdefault(word, []).append(language)
        filler |= _token_tuples(table.get("filler", []), f"{path.name} filler")
        negation = table.get("negation", {})
        # Negation is per language: Swedish "ni" is "you", not French "ni"; Danish "sin" is not Spanish "sin".
        negation_before[language] = frozenset(_token_tuples(negation.get("before", []), f"{path.name} [negation] before"))
        negation_after[language] = frozenset(_token_tuples(negation.get("after", []), f"{path.name} [negation] after"))
        contrast[language] = frozenset(_token_tuples(negation.get("contrast", []), f"{path.name} [negation] contrast"))
        bridge[language] = frozenset(fold(word) for word in negation.get("bridge", []))
        conditional[language] = frozenset(_token_tuples(negation.get("conditional", []),
                                                        f"{path.name} [negation] conditional"))
        for category in INTENT_CATEGORIES:
            section, key = category.split(".")
            entries = table.get(section, {}).get(key, [])
            intents += _phrases(entries, category, language, f"{path.name} [{section}] {key}")
        for category in WHOLE_CATEGORIES:
            section, key = category.split(".")
            for tokens in _token_tuples(table.get(section, {}).get(key, []), f"{path.name} [{section}] {key}"):
                whole[tokens] = category.replace("whole-", "")
        machine = table.get("machine", {})
        auto_replies += _phrases(machine.get("auto-reply", []), "auto-reply", language, f"{path.name} [machine]")
        bounces += _phrases(machine.get("bounce", []), "bounce", language, f"{path.name} [machine]")
        text = table.get("text", {})
        footers += _phrases(text.get("footer", []), "footer", language, f"{path.name} [text] footer")
        signatures += _phrases(text.get("signature", []), "signature", language, f"{path.name} [text] signature")
        for pattern in text.get("attribution", []):
            try:
                re.compile(pattern)
            except re.error as error:
                raise LexiconError(f"{path.name} [text] attribution {pattern!r}: {error}") from error
            attributions.append(f"(?:{pattern})")
        outlook_from |= {fold(label) for label in text.get("outlook-from", [])}
        outlook_sent |= {fold(label) for label in text.get("outlook-sent", [])}
    markers = Markers(
        attribution=re.compile("|".join(attributions) or r"(?!x)x"),
        outlook_from=frozenset(outlook_from),
        outlook_sent=frozenset(outlook_sent),
    )
    count = len(intents) + len(auto_replies) + len(bounces) + len(footers) + len(signatures)
    return Lexicon(
        languages=tuple(p.stem for p in paths),
        scripts=scripts,
        stopwords={word: tuple(sorted(languages)) for word, languages in stopwords.items()},
        phrases=PhraseIndex.build(intents + auto_replies + bounces + footers + signatures),
        whole=whole,
        filler=frozenset(f for f in filler if len(f) <= 3),  # trimmed from a whole subject, 1 to 3 words
        negation_before=negation_before,
        negation_after=negation_after,
        contrast=contrast,
        bridge=bridge,
        conditional=conditional,
        markers=markers,
        phrase_count=count,
    )
