"""Sensitivity classification: tags a request public / internal / confidential from PII detectors,
keyword and regex lists, the tenant's and the key's policy and the X-Data-Classification header.
Invariant: every source can only raise the level; none can lower what another one found."""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from seekserve.gateway.errors import GatewayError
from seekserve.gateway.pii import DETECTORS, GATES, Scan, Span, trie_regex

HEADER = "X-Data-Classification"
MAX_KEYWORD_LEN = 256   # keeps the keyword trie (built recursively) far from the recursion limit


class Level(IntEnum):
    public = 0         # may go to a cloud backend
    internal = 1       # stays on site
    confidential = 2   # stays on site; PII, tenant policy or an explicit header put it here

    @classmethod
    def parse(cls, value: str) -> Level:
        """A level from its name, case-insensitive; ValueError for anything else."""
        if isinstance(value, Level):
            return value
        try:
            return cls[str(value).strip().lower()]
        except KeyError:
            raise ValueError(f"unknown sensitivity level {value!r}: expected one of "
                             f"{', '.join(m.name for m in cls)}") from None


def _level(value: Level | str | int) -> Level:
    return Level.parse(value) if isinstance(value, str) else Level(value)


@dataclass(frozen=True)
class Finding:
    """Where something sensitive was found; never the text itself, so findings can be logged and audited."""
    kind: str    # cn_id, cn_mobile, bank_card, email, ip, passport, keyword, pattern:<name>
    start: int   # offsets into the original (un-normalised) text texts[part]
    end: int
    part: int = 0   # index of the text in the sequence given to classify()


@dataclass(frozen=True)
class Classification:
    level: Level
    findings: tuple[Finding, ...]
    reasons: tuple[str, ...]   # every source above public: "pii:cn_id", "tenant:finance", "header:internal" …

    @property
    def sensitive(self) -> bool:
        return self.level >= Level.confidential

    @property
    def label(self) -> str:
        return self.level.name


ALL_DETECTORS: frozenset[str] = frozenset(DETECTORS)


@dataclass(frozen=True)
class SensitivityPolicy:
    """What makes a request sensitive. Accepts config-file shapes (lists, level names) and validates them,
    so SensitivityPolicy(**section) fails at start-up, not on the first request."""
    keywords: tuple[str, ...] = ()                                 # case-insensitive literal words/phrases
    patterns: dict[str, str] = field(default_factory=dict)         # name → regex (Python syntax)
    tenant_levels: dict[str, Level] = field(default_factory=dict)  # tenant → minimum level
    pii_level: Level = Level.confidential        # level when a detector fires
    keyword_level: Level = Level.confidential    # level when a keyword or pattern matches
    default_level: Level = Level.public          # level of a request nothing else raised
    detectors: frozenset[str] = ALL_DETECTORS    # enabled PII detectors

    def __post_init__(self) -> None:
        put = functools.partial(object.__setattr__, self)
        put("keywords", tuple(self.keywords))
        for word in self.keywords:
            if not isinstance(word, str) or not word.strip() or len(word) > MAX_KEYWORD_LEN:
                raise ValueError(f"sensitivity keyword {word!r} must be a non-empty string of at most "
                                 f"{MAX_KEYWORD_LEN} characters")
        put("patterns", dict(self.patterns))
        for name, pattern in self.patterns.items():
            if not name:
                raise ValueError(f"sensitivity pattern {pattern!r} needs a name")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"invalid sensitivity pattern {name!r} ({pattern!r}): {e}") from None
        put("tenant_levels", {tenant: _level(v) for tenant, v in self.tenant_levels.items()})
        for name in ("pii_level", "keyword_level", "default_level"):
            put(name, _level(getattr(self, name)))
        put("detectors", frozenset(self.detectors))
        unknown = self.detectors - ALL_DETECTORS
        if unknown:
            raise ValueError(f"unknown sensitivity detector(s) {sorted(unknown)}: expected some of "
                             f"{sorted(ALL_DETECTORS)}")


# --- NFKC with offsets ----------------------------------------------------------------------------
_FULLWIDTH = re.compile("[\uff01-\uff5e\u3000]")   # full-width ASCII forms, ideographic space: NFKC → ASCII


@functools.cache
def _nfkc_tables() -> tuple[dict[int, str], re.Pattern[str]]:
    """(code point → NFKC form for the ~4,900 code points NFKC changes, a regex matching any of them).
    Built once (~0.2 s); only code points with a decomposition can change. The regex is one character
    class of the BMP ones (tested through a bitmap) plus every astral code point (rare; the table decides)."""
    table = {}
    for cp in range(0x110000):
        ch = chr(cp)
        if unicodedata.decomposition(ch):
            norm = unicodedata.normalize("NFKC", ch)
            if norm != ch:
                table[cp] = norm
    ranges: list[list[int]] = []
    for cp in sorted(c for c in table if c < 0x10000):
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    cls = "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)
    return table, re.compile(f"[{cls}\U00010000-\U0010ffff]")


class _Offsets:
    """Maps spans of the normalised text back to the original where NFKC made characters longer
    ("℃" → "°C", "…" → "..."); NFKC never makes a character shorter or empty."""

    def __init__(self, growth: list[tuple[int, int]]) -> None:
        self.origin: list[int] = []   # original index of each growing character
        self.starts: list[int] = []   # its first normalised offset
        self.ends: list[int] = []     # one past its last normalised offset
        self.shift: list[int] = []    # characters added up to and including it
        total = 0
        for pos, extra in growth:
            self.origin.append(pos)
            self.starts.append(pos + total)
            total += extra
            self.ends.append(pos + total + 1)
            self.shift.append(total)

    def _char(self, offset: int) -> int:
        k = bisect_right(self.starts, offset) - 1
        if k < 0:
            return offset
        return self.origin[k] if offset < self.ends[k] else offset - self.shift[k]

    def span(self, start: int, end: int) -> Span:
        return self._char(start), self._char(end - 1) + 1


def normalize(text: str) -> tuple[str, _Offsets | None]:
    """NFKC applied character by character (so offsets map back; it differs from whole-string NFKC only
    in composing combining marks, which no detector looks at): full-width "１３８" becomes "138".
    Returns the text and an offset map, or None when no character changed length."""
    if text.isascii() or unicodedata.is_normalized("NFKC", text):
        return text, None
    # Chinese text is mostly un-normalised only by full-width forms ("，", "１３８"): replace those found
    # (1:1, so offsets hold) with str.replace, and skip the per-character pass if nothing else is left
    # (it costs a Python step per character it changes)
    for wide in set(_FULLWIDTH.findall(text)):
        text = text.replace(wide, unicodedata.normalize("NFKC", wide))
    if unicodedata.is_normalized("NFKC", text):
        return text, None
    table, unstable = _nfkc_tables()
    pieces: list[str] = []
    growth: list[tuple[int, int]] = []   # (original index, characters added)
    done = 0
    for m in unstable.finditer(text):
        i = m.start()
        folded = table.get(ord(text[i]))
        if folded is not None:   # None: an astral character NFKC keeps (most emoji)
            pieces += (text[done:i], folded)
            done = i + 1
            if len(folded) > 1:
                growth.append((i, len(folded) - 1))
    pieces.append(text[done:])
    return "".join(pieces), (_Offsets(growth) if growth else None)


# --- keywords: one trie-shaped regex -------------------------------------------------------------------
_ASCII_ALNUM = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _ascii_word_end(word: str) -> str:
    return "(?![a-z0-9])" if word[-1] in _ASCII_ALNUM else ""


def keyword_regex(keywords: Iterable[str], flags: int = 0) -> re.Pattern[str] | None:
    """One regex for all keywords, lower-cased, to run over lower-cased text (re.IGNORECASE makes the
    scan ~4x slower; pass it only for text whose lower-casing changes length). A trie, so a scan costs
    about the same for 5 or 500 words. English words match whole words only ("pan" not in "company");
    CJK has no word boundaries, so a CJK edge matches anywhere ("机密" in "绝密机密文件")."""
    words = {unicodedata.normalize("NFKC", w).strip().lower() for w in keywords} - {""}
    if not words:
        return None
    bounded = [w for w in words if w[0] in _ASCII_ALNUM]
    free = [w for w in words if w[0] not in _ASCII_ALNUM]
    alts = ([r"(?<![a-z0-9])" + trie_regex(bounded, _ascii_word_end)] if bounded else []) \
        + ([trie_regex(free, _ascii_word_end)] if free else [])
    return re.compile("|".join(alts), flags)


def _outermost(found: Iterable[Span]) -> list[Span]:
    """Drops spans inside another of the same kind: "+86 138…" and "138…", an IPv4 inside an IPv6."""
    kept: list[Span] = []
    for start, end in sorted(set(found), key=lambda s: (s[0], -s[1])):
        if not kept or end > kept[-1][1]:   # kept ends only grow, so the last one reaches furthest
            kept.append((start, end))
    return kept


# --- the classifier -----------------------------------------------------------------------------------
# "default:internal", "key:confidential", "header:public" …: the reasons' spellings, made once
_REASONS: dict[tuple[str, Level], str] = {(source, lvl): f"{source}:{lvl.name}"
                                           for source in ("default", "key", "header") for lvl in Level}


def parse_header(value: str | None) -> Level | None:
    """The X-Data-Classification header's level (None when absent); a bad value is the client's error."""
    if value is None:
        return None
    try:
        return Level.parse(value)
    except ValueError:
        raise GatewayError(400, f"{HEADER} must be one of public, internal, confidential", param=HEADER,
                           code="invalid_classification") from None


class SensitivityClassifier:
    """Fixed after construction (compiled detectors, keywords, patterns): one serves all requests.

    What a text holds depends on the text alone, so the findings of recently seen texts are kept (up to
    `remember` texts, least recently used dropped first), keyed by a BLAKE2b digest of the text: never the
    text itself, nor anything of it but offsets and kinds. A chat client sends its system prompt and the
    whole conversation so far with every turn; only the new message is scanned."""

    def __init__(self, policy: SensitivityPolicy | None = None, remember: int = 4096) -> None:
        self.policy = policy or SensitivityPolicy()
        self._remember = remember
        self._seen: dict[bytes, list[tuple[int, int, str]]] = {}   # digest -> rows, least recently used first
        self._detectors = [(kind, find, GATES.get(kind)) for kind, find in DETECTORS.items()
                           if kind in self.policy.detectors]
        self._keywords = keyword_regex(self.policy.keywords)
        self._keywords_any_case = keyword_regex(self.policy.keywords, re.IGNORECASE)
        self._patterns = [(f"pattern:{name}", re.compile(p)) for name, p in self.policy.patterns.items()]
        _nfkc_tables()   # pay the one-off table build at start-up, not on the first request

    def classify(self, texts: Sequence[str], tenant: str, header: str | None = None,
                 minimum: Level = Level.public) -> Classification:
        """Level = the highest of: default, tenant minimum, `minimum` (the key's policy), the header, and
        pii_level / keyword_level when something was found. Each text is scanned on its own, so adding
        a text never removes a finding."""
        header_level = parse_header(header)
        if isinstance(texts, str):   # a bare string is a Sequence[str] of characters: never meant
            texts = (texts,)
        findings = tuple(f for part, text in enumerate(texts) for f in self.scan(text, part))
        return self._decide(findings, tenant, header_level, minimum if type(minimum) is Level else Level(minimum))

    def scan(self, text: str, part: int = 0) -> list[Finding]:
        """Findings in one text, ordered by position; offsets refer to `text` as given."""
        if self._remember <= 0:
            rows = self._rows(text)
        else:
            digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            seen = self._seen
            rows = seen.pop(digest, None)
            if rows is None:
                rows = self._rows(text)
                if len(seen) >= self._remember:
                    seen.pop(next(iter(seen), b""), None)
            seen[digest] = rows     # (re-)inserted last: the most recently used
        return [Finding(kind, start, end, part) for start, end, kind in rows]

    def _rows(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, kind) of every finding in `text`, ordered by position."""
        normalized, offsets = normalize(text)
        scan = Scan(normalized)
        rows: list[tuple[int, int, str]] = []
        pii_spans: set[Span] = set()   # PII kinds share spans: the first detector listed keeps one
        for kind, find, gate in self._detectors:
            if gate is not None and not gate(scan):
                continue    # nothing it needs is in the text
            found = list(find(scan))
            if not found:       # the usual case: no sorting, no set
                continue
            for span in _outermost(found):
                if span not in pii_spans:
                    pii_spans.add(span)
                    rows.append((*span, kind))
        rows += ((*m.span(), "keyword") for m in self._keyword_matches(normalized))
        for kind, pattern in self._patterns:
            rows += ((*m.span(), kind) for m in pattern.finditer(normalized) if m.end() > m.start())
        if offsets is not None:
            rows = [(*offsets.span(start, end), kind) for start, end, kind in rows]
        rows.sort()
        return rows

    def _keyword_matches(self, normalized: str) -> Iterator[re.Match[str]]:
        if self._keywords is None or self._keywords_any_case is None:
            return iter(())
        lower = normalized.lower()
        if len(lower) == len(normalized):
            return self._keywords.finditer(lower)
        # lower() moved offsets ("İ" → "i̇"): match any case in the text itself
        return self._keywords_any_case.finditer(normalized)

    def _decide(self, findings: tuple[Finding, ...], tenant: str, header: Level | None,
                minimum: Level) -> Classification:
        """The highest level of the sources, and the reasons: each source above public, in the order default,
        tenant, key, header, then each kind found once, in order of appearance."""
        p = self.policy
        level = p.default_level
        reasons = [_REASONS["default", level]] if level else []
        tenant_level = p.tenant_levels.get(tenant)
        if tenant_level:    # (Level.public is 0: a tenant listed at public adds nothing)
            level = max(level, tenant_level)
            reasons.append(f"tenant:{tenant}")
        if minimum:
            level = max(level, minimum)
            reasons.append(_REASONS["key", minimum])
        if header:
            level = max(level, header)
            reasons.append(_REASONS["header", header])
        if findings:
            for kind in dict.fromkeys(f.kind for f in findings):   # each kind once, in order of appearance
                is_pii = kind in DETECTORS
                found = p.pii_level if is_pii else p.keyword_level
                if found:
                    level = max(level, found)
                    reasons.append(f"pii:{kind}" if is_pii else kind)
        return Classification(level, findings, tuple(reasons))
