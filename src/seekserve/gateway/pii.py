"""PII detectors for the sensitivity step. Each finds one kind in NFKC-normalised text and validates what
it finds (checksums, dates, ranges, context words), because a bare pattern also flags order numbers.
Detectors return only (start, end) offsets, never the matched text."""

from __future__ import annotations

import ipaddress
import operator
import re
from collections.abc import Callable, Iterable, Iterator
from datetime import date
from functools import cached_property
from unicodedata import combining

Span = tuple[int, int]

DIGITS = frozenset("0123456789")
_ALNUM = DIGITS | frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_HEX_COLON = frozenset("0123456789abcdefABCDEF:")
_EMAIL_LOCAL = _ALNUM | frozenset("._%+-")
# digit character → its value, and → the digit sum of twice its value (Luhn); dict lookups through map()
# cost a fraction of int() per character
_VALUE = {str(d): d for d in range(10)}
_DOUBLED = {str(d): 2 * d - 9 if d > 4 else 2 * d for d in range(10)}
# ASCII only (NFKC has folded full-width digits). A run of 1-4 digits only starts a candidate as the
# first group of several ("+86 138…", "6222 0212 …") or the first octet of "a.b.c.d"; skipping the rest
# (years, counts, prices) halves the runs of a typical prompt. Possessive, so a short run is never
# re-tried shorter; a plain [0-9] first, so the regex engine skips non-digits without entering the matcher.
_DIGIT_RUN = re.compile(r"[0-9][0-9]*+(?:(?<=[0-9]{5})|(?=[ -][0-9]|\.[0-9]{1,3}\.[0-9]))")


class Scan:
    """One normalised text and what several detectors share, computed at most once."""

    def __init__(self, text: str) -> None:
        self.text = text

    @cached_property
    def runs(self) -> dict[int, list[Span]]:
        """Maximal runs of ASCII digits (short ones only before another group), by length. Every digit-based
        candidate starts at a run start, so a detector tries an anchored match at the runs of the lengths
        it can start with, instead of each scanning the whole text."""
        by_length: dict[int, list[Span]] = {}
        for m in _DIGIT_RUN.finditer(self.text):
            span = m.span()
            by_length.setdefault(span[1] - span[0], []).append(span)
        return by_length

    def runs_of(self, lengths: Iterable[int]) -> Iterator[Span]:
        runs = self.runs
        for n in lengths:
            yield from runs.get(n, ())

    @cached_property
    def lower(self) -> str:
        """For cheap `in` gates; its offsets are used only when lower() kept the length ("İ" grows)."""
        return self.text.lower()


def _isolated(text: str, start: int, end: int, sep: str = "") -> bool:
    """[start, end) is not part of a longer digit run, nor (for grouped numbers) of a longer run of digit
    groups joined by the same separator: "1234 5678 9012 3456 7890" holds no 16-digit card."""
    n = len(text)
    if start > 0 and (text[start - 1] in DIGITS
                      or (sep and text[start - 1] == sep and start > 1 and text[start - 2] in DIGITS)):
        return False
    return not (end < n and (text[end] in DIGITS
                             or (sep and text[end] == sep and end + 1 < n and text[end + 1] in DIGITS)))


def _glued(text: str, start: int, end: int) -> bool:
    """Digits glued to a letter belong to an identifier ("SF1234…", a hex hash), not a number of their own."""
    return (start > 0 and (text[start - 1] in _ALNUM or text[start - 1] == "_")) \
        or (end < len(text) and (text[end] in _ALNUM or text[end] == "_"))


# Context words decide the ambiguous digit runs: the nearest word before a candidate (within
# _CONTEXT_WINDOW characters) wins; none at all counts as PII, because a miss leaks data.
_CONTEXT_WINDOW = 32
_NUMBER = re.compile(r"[0-9]{4}")
_CARD_WORDS = ("卡号", "银行卡", "信用卡", "借记卡", "储蓄卡", "银联", "账号", "帐号", "账户", "帐户",
               "card", "cards", "account", "acct", "visa", "mastercard", "unionpay", "amex", "pan")
_ID_WORDS = ("身份证", "居民身份", "id card", "id-card", "idcard", "id number", "identity", "resident id")
_ORDER_WORDS = ("订单", "单号", "运单", "快递", "物流", "发票", "流水号", "交易号", "工单", "批次", "序列号",
                "条码", "编号", "order", "orders", "tracking", "invoice", "shipment", "waybill", "parcel",
                "sku", "isbn", "barcode", "ref", "reference", "serial", "txn", "batch", "ticket")
# "<noun> id/no/number" labels an identifier, not a card: "request id", "trace_id", "customer no"
_ID_NOUNS = ("transaction", "request", "trace", "span", "session", "message", "msg", "user", "customer",
             "device", "task", "job", "event")
_ID_LABELS = tuple(f"{noun}{sep}{label}" for noun in _ID_NOUNS for sep in ("", " ", "_", "-")
                   for label in ("id", "no", "number"))
_VERSION_WORDS = ("版本", "固件", "升级", "章节", "§", "version", "release", "build", "firmware", "upgrade",
                  "section", "chapter", "clause", "article")
_HOST_WORDS = ("地址", "服务器", "主机", "网关", "代理", "网段", "ip", "ips", "host", "server", "addr",
               "address", "gateway", "proxy", "dns", "subnet")
_ASCII_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


class _TrieNode:
    __slots__ = ("children", "end")

    def __init__(self) -> None:
        self.children: dict[str, _TrieNode] = {}
        self.end: str | None = None   # a word ends here: the regex that must follow it ("" for nothing)


def _emit(node: _TrieNode) -> str:
    alts = [re.escape(ch) + _emit(child) for ch, child in sorted(node.children.items())]
    if node.end is not None:
        alts.append(node.end)   # last: alternation tries in order, so the longest word wins
    return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"


def trie_regex(words: Iterable[str], end: Callable[[str], str] = lambda word: "") -> str:
    """One regex for many literal words, shaped as a trie: each position costs one first-character test
    instead of one per word, 2-5x faster than a flat alternation. `end(word)` may append a lookahead."""
    root = _TrieNode()
    for word in words:
        node = root
        for ch in word:
            node = node.children.setdefault(ch, _TrieNode())
        node.end = end(word)
    return _emit(root)


class _Context:
    """Words that say a number near them is PII, or is something else (an order, a version)."""

    def __init__(self, pii: tuple[str, ...], other: tuple[str, ...], gate: bool = False) -> None:
        self.is_other = dict.fromkeys(pii, False) | dict.fromkeys(other, True)
        # with few "other" words, testing each as a substring first is cheaper than the regex; without
        # one in the window, PII words cannot change the answer
        self.gate = other if gate else ()
        # Case-sensitive over a lower-cased window and without lookarounds: re.IGNORECASE, or lookarounds
        # around each word, make this 5-20x slower; whole-word checks run on each match instead.
        self.regex = re.compile(trie_regex(self.is_other))

    def says_other(self, text: str, start: int) -> bool:
        """True when the nearest context word before `start` names something that is not PII. A word with
        another number between it and the candidate labels that number ("身份证 … 转至 6222…")."""
        window = text[max(0, start - _CONTEXT_WINDOW):start].lower()
        if self.gate and not any(word in window for word in self.gate):
            return False
        last = None
        for m in self.regex.finditer(window):
            a, b = m.span()
            if m.group().isascii() and ((a > 0 and window[a - 1] in _ASCII_LETTERS)
                                        or (b < len(window) and window[b] in _ASCII_LETTERS)):
                continue   # "pan" in "company"
            last = m
        return last is not None and self.is_other[last.group()] and _NUMBER.search(window, last.end()) is None


_CARD_CONTEXT = _Context(_CARD_WORDS, _ID_WORDS + _ORDER_WORDS + _ID_LABELS)
_LEGACY_ID_CONTEXT = _Context(_ID_WORDS, _ORDER_WORDS + _ID_LABELS)
_IP_CONTEXT = _Context(_HOST_WORDS, _VERSION_WORDS, gate=True)


# --- Chinese resident identity card (GB 11643-1999) -----------------------------------------------
_PROVINCES = frozenset({11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37, 41, 42, 43, 44, 45, 46,
                        50, 51, 52, 53, 54, 61, 62, 63, 64, 65, 71, 81, 82, 83})
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"   # ISO 7064 MOD 11-2: check character for (sum of weighted digits) % 11
_ID_SPACED = re.compile(r"[0-9]{6} [0-9]{8} [0-9]{3}[0-9Xx]")   # 6-8-4, as people sometimes write it


def _valid_birth(yyyymmdd: str) -> bool:
    try:
        born = date(int(yyyymmdd[:4]), int(yyyymmdd[4:6]), int(yyyymmdd[6:8]))
    except ValueError:
        return False
    return 1900 <= born.year and born <= date.today()


def is_cn_id(value: str) -> bool:
    """A valid 18-digit resident ID (province, birth date, MOD 11-2 check) or 15-digit legacy ID."""
    if not (value.isascii() and value[:2].isdigit() and int(value[:2]) in _PROVINCES):
        return False
    if len(value) == 15:
        return value.isdigit() and _valid_birth("19" + value[6:12])
    if len(value) != 18 or not value[:17].isdigit():
        return False
    total = sum(map(operator.mul, map(_VALUE.__getitem__, value[:17]), _ID_WEIGHTS))
    return _ID_CHECK[total % 11] == value[17].upper() and _valid_birth(value[6:14])


def find_cn_ids(scan: Scan) -> Iterator[Span]:
    text = scan.text
    for start, end in scan.runs_of((6, 15, 17, 18)):
        stop = end
        if end - start == 17:   # 17 digits + X
            if text[end:end + 1] not in ("X", "x") or text[end + 1:end + 2] in DIGITS:
                continue
            stop = end + 1
        elif end - start == 6:
            m = _ID_SPACED.match(text, start)
            if m is None or not _isolated(text, start, m.end()):
                continue
            stop = m.end()
        value = text[start:stop].replace(" ", "")
        # a 15-digit legacy ID has no checksum: an order number can pass, so context may veto it
        if is_cn_id(value) and not (len(value) == 15 and _LEGACY_ID_CONTEXT.says_other(text, start)):
            yield start, stop


# --- Chinese mobile numbers ---------------------------------------------------------------------------
_MOBILE_RE = re.compile(r"(?:(?:00)?86[ -]?)?1[3-9][0-9](?:[0-9]{8}|(?P<sep>[ -])[0-9]{4}(?P=sep)[0-9]{4})")
_MOBILE_RUN_LENGTHS = (2, 3, 4, 11, 13, 15)   # 86 / 0086 prefix, 3-4-4 groups, plain forms


def find_cn_mobiles(scan: Scan) -> Iterator[Span]:
    text = scan.text
    for start, end in scan.runs_of(_MOBILE_RUN_LENGTHS):
        if end - start == 11:   # the common plain form, without the regex
            if text[start] == "1" and text[start + 1] in "3456789":
                yield (start - 1 if text[start - 1:start] == "+" else start), end
            continue
        m = _MOBILE_RE.match(text, start)
        if m is not None and _isolated(text, start, m.end(), m.group("sep") or ""):
            yield (start - 1 if text[start - 1:start] == "+" else start), m.end()


# --- bank cards -------------------------------------------------------------------------------------
_CARD_RUN_LENGTHS = (4, *range(13, 20))
# grouped layouts: 4-4-4-4 (+1..3, for 17-19 digits) and Amex 4-6-5; one separator throughout
_CARD_GROUPED = re.compile(r"[0-9]{4}(?P<sep>[ -])(?:[0-9]{4}(?P=sep)[0-9]{4}(?P=sep)[0-9]{4}"
                           r"(?:(?P=sep)[0-9]{1,3})?|[0-9]{6}(?P=sep)[0-9]{5})")


def luhn_ok(digits: str) -> bool:
    total = sum(map(_VALUE.__getitem__, digits[-1::-2])) + sum(map(_DOUBLED.__getitem__, digits[-2::-2]))
    return total % 10 == 0


def plausible_iin(digits: str) -> bool:
    """Issuer prefix and length agree with a real scheme (Visa, Mastercard, Amex, JCB, Diners, UnionPay
    62, Discover/Maestro, the 8x/95xx domestic ranges). Keeps Luhn-valid barcodes (69…, 13 digits) and
    millisecond timestamps (1…) out."""
    n, p2, p4 = len(digits), int(digits[:2]), int(digits[:4])
    if digits[0] == "4":
        return n in (13, 16, 19)
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        return n == 16
    if p2 in (34, 37):
        return n == 15
    if p2 in (30, 36, 38, 39):
        return 14 <= n <= 19
    return (digits[0] in "568" or p2 in (35, 95)) and 16 <= n <= 19


def is_bank_card(digits: str) -> bool:
    return digits.isascii() and digits.isdigit() and 13 <= len(digits) <= 19 and plausible_iin(digits) \
        and luhn_ok(digits)


def find_bank_cards(scan: Scan) -> Iterator[Span]:
    """Luhn-valid numbers with a plausible issuer. About one random number in ten passes Luhn, so a
    candidate whose nearest context word is an order/tracking/invoice/ID word is not a card; a card word
    ("卡号", "card", "account", …) nearer to it, or no context word at all, keeps it."""
    text = scan.text
    for start, end in scan.runs_of(_CARD_RUN_LENGTHS):
        stop, digits = end, text[start:end]
        if end - start == 4:   # most 4-digit runs are years, not the first group of a card
            if text[end:end + 1] not in (" ", "-") or text[end + 1:end + 2] not in DIGITS:
                continue
            m = _CARD_GROUPED.match(text, start)
            if m is None or not _isolated(text, start, m.end(), m.group("sep")):
                continue
            stop, digits = m.end(), m.group().replace(m.group("sep"), "")
        if _glued(text, start, stop) or not is_bank_card(digits):
            continue
        if not _CARD_CONTEXT.says_other(text, start):   # last: the costliest test
            yield start, stop


# --- passports -----------------------------------------------------------------------------------
# Chinese ordinary passports: E/G + 8 digits, or E + a letter (not I/O) + 7 digits, upper case. Accepted
# without context: a product code of exactly that shape is a false positive we take over a missed passport.
_PASSPORT_SERIES = frozenset("ABCDEFGHJKLMNPQRSTUVWXYZ")
_PASSPORT_AFTER = re.compile(   # what may follow "passport"/"护照" before the number itself
    r"(?:\s*(?:no\.?|number|num\.?|#|id|号码|号|编号))?(?:\s*(?:is|为|是))?\s*[:#]?\s*"
    r"(?P<id>[A-Za-z0-9]{6,9})(?![A-Za-z0-9])", re.IGNORECASE)


def _find_all(haystack: str, needle: str) -> Iterator[int]:
    i = haystack.find(needle)
    while i != -1:
        yield i + len(needle)
        i = haystack.find(needle, i + 1)


def find_passports(scan: Scan) -> Iterator[Span]:
    text, n = scan.text, len(scan.text)
    for start, end in scan.runs_of((7, 8)):
        if end - start == 8 and start >= 1 and text[start - 1] in "EG":
            s = start - 1
        elif end - start == 7 and start >= 2 and text[start - 2] == "E" \
                and text[start - 1] in _PASSPORT_SERIES:
            s = start - 2
        else:
            continue
        if (s == 0 or text[s - 1] not in _ALNUM) and (end == n or text[end] not in _ALNUM):
            yield s, end
    # the lower-cased copy is only searched when it kept the offsets ("İ".lower() is two characters)
    words = list(_find_all(text, "护照"))
    words += _find_all(scan.lower if len(scan.lower) == n else text, "passport")
    for after in words:
        m = _PASSPORT_AFTER.match(text, after)
        # "passport number pending" is no number: real ones carry digits
        if m is not None and sum(ch in DIGITS for ch in m.group("id")) >= 2:
            yield m.span("id")


# --- email addresses ------------------------------------------------------------------------------------
_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![A-Za-z0-9-])")
# Spelled-out addresses a person can still read: "name [at] example [dot] com", "name AT example.com",
# "name at example dot com". A lower-case " at " with real dots ("look at example.com") is prose.
_AT_WORDS = ("[at]", "(at)", "{at}", "<at>", "[ at ]", "( at )", " at ")
_AT_ANY_CASE = re.compile(r"[\[(<{]\s*at\s*[\])>}]|(?<=\s)at(?=\s)", re.IGNORECASE)
_WORD_DOT = r"(?:\s*[\[(<{]\s*dot\s*[\])>}]\s*|\s+dot\s+)"
_WORD_DOT_RE = re.compile(_WORD_DOT, re.IGNORECASE)
_SPELLED_DOMAIN = re.compile(rf"\s*[A-Za-z0-9-]{{1,63}}(?:(?:{_WORD_DOT}|\.)[A-Za-z0-9-]{{1,63}})*"
                             rf"(?:{_WORD_DOT}|\.)[A-Za-z]{{2,24}}(?![A-Za-z0-9-])", re.IGNORECASE)
_SPELLED_HINTS = ("[at]", "(at)", "{at}", "<at>", "[ at ]", "( at )", " dot ", "[dot]", "(dot)")


def _local_start(text: str, end: int) -> int:
    """Start of the e-mail local part ending at `end` (== end when there is none). ASCII first, so
    "邮箱zhangsan@…" starts at "z"; else any letters and marks, for "张三@…" and a decomposed "á@…"."""
    start = end
    while start > 0 and end - start < 64 and text[start - 1] in _EMAIL_LOCAL:
        start -= 1
    while start < end and text[start] in ".-":   # a local part starts with a letter or digit
        start += 1
    if start == end:
        while start > 0 and end - start < 64 and (text[start - 1].isalnum() or combining(text[start - 1])):
            start -= 1
    return start


def find_emails(scan: Scan) -> Iterator[Span]:
    text = scan.text
    for after in _find_all(text, "@"):
        start, m = _local_start(text, after - 1), _DOMAIN.match(text, after)
        if start < after - 1 and m is not None:
            yield start, m.end()
    if " AT " not in text and not any(h in scan.lower for h in _SPELLED_HINTS):
        return
    for a, b in _spelled_ats(scan):
        local_end = a
        while local_end > 0 and text[local_end - 1].isspace():
            local_end -= 1
        start, m = _local_start(text, local_end), _SPELLED_DOMAIN.match(text, b)
        if start == local_end or m is None:
            continue
        word = text[a:b]
        if not word.isalpha() or word == "AT" or _WORD_DOT_RE.search(text, b, m.end()):
            yield start, m.end()


def _spelled_ats(scan: Scan) -> list[Span]:
    """Spans of "[at]", "(at)", " at " … found with str.find over the lower-cased text, ten times cheaper
    than a regex scan; a regex over the original when lower() moved offsets."""
    if len(scan.lower) != len(scan.text):
        return [m.span() for m in _AT_ANY_CASE.finditer(scan.text)]
    spans = []
    for token in _AT_WORDS:
        i = scan.lower.find(token)
        while i != -1:
            spans.append((i + 1, i + 3) if token == " at " else (i, i + len(token)))
            i = scan.lower.find(token, i + 1)
    return spans


# --- IP addresses ---------------------------------------------------------------------------------------
# Private ranges count: internal topology (10.x, 192.168.x) is exactly what must not leave the site.
# Addresses that name no host do not: unspecified, loopback, link-local, multicast, reserved/broadcast
# (which also covers netmasks such as 255.255.255.0).
_IPV4 = re.compile(r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}")


def _ipv4_names_host(a: int, b: int) -> bool:
    """By the first two octets: not 0/8 ("this network"), 127/8 (loopback), 169.254/16 (link-local),
    224/4 (multicast) or 240/4 (reserved, broadcast, netmasks such as 255.255.255.0)."""
    return a not in (0, 127) and a < 224 and (a, b) != (169, 254)


def _ipv6_names_host(addr: ipaddress.IPv6Address) -> bool:
    if addr.ipv4_mapped is not None:
        return _ipv4_names_host(*addr.ipv4_mapped.packed[:2])
    return not (addr.is_unspecified or addr.is_loopback or addr.is_link_local or addr.is_multicast)


def _ipv4_at(text: str, start: int) -> int:
    """End of a host IPv4 address starting at `start`, or -1. Rejects dotted runs ("1.2.3.4.5"), tokens
    glued to a word ("v1.2.3.4", "nginx/1.2.3.4") and numbers after a version/section word."""
    m = _IPV4.match(text, start)
    if m is None:
        return -1
    end, n = m.end(), len(text)
    if start > 0 and (text[start - 1] in _ALNUM or text[start - 1] in "._"):
        return -1
    if start > 1 and text[start - 1] == "/" and text[start - 2] in _ALNUM:
        return -1
    if end < n and (text[end] in DIGITS or (text[end] == "." and end + 1 < n and text[end + 1] in DIGITS)):
        return -1
    a, b, c, d = map(int, m.group().split("."))
    if max(a, b, c, d) > 255 or not _ipv4_names_host(a, b):
        return -1
    if text[max(0, start - 3):start].rstrip().endswith("第") or _IP_CONTEXT.says_other(text, start):
        return -1   # "第 3.2.1.4 条": a clause number
    return end


_V6_CHARS = _HEX_COLON | {"."}
_V6_TOKEN = re.compile(r"[0-9A-Fa-f:.]*")
_V6_MAX_LEN = 45   # "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"


def _ipv6_in(text: str, start: int, end: int) -> Span | None:
    """The IPv6 address in the hex/colon/dot token text[start:end], validated by `ipaddress`, or None."""
    while end > start and text[end - 1] in ".:" and not text.startswith("::", end - 2):
        end -= 1   # sentence punctuation after the address
    candidate = text[start:end]
    groups = [g for g in candidate.split(":") if g]
    # "a::b" and "x[::2]" parse as IPv6 but are code; real addresses carry more than two short groups
    colons = candidate.count(":")
    if len(candidate) > _V6_MAX_LEN or colons < 2 \
            or (len(groups) < 3 and max(map(len, groups), default=0) < 3):
        return None
    if "::" not in candidate and colons != (6 if "." in candidate else 7):
        return None   # "14:22:09": without "::" an address spells out all eight groups
    if (start > 0 and (text[start - 1] in _ALNUM or text[start - 1] == "_")) \
            or (end < len(text) and (text[end] in _ALNUM or text[end] == "_")):
        return None
    try:
        addr = ipaddress.IPv6Address(candidate)
    except ValueError:
        return None
    return (start, end) if _ipv6_names_host(addr) else None


def find_ips(scan: Scan) -> Iterator[Span]:
    text = scan.text
    for start, end in scan.runs_of((1, 2, 3)):
        # not the first group of "138 1234 5678", nor the inner octet of an address or a dotted run
        if text.startswith(".", end) and text[start - 1:start] != ".":
            stop = _ipv4_at(text, start)
            if stop != -1:
                yield start, stop
    colon = text.find(":")
    while colon != -1:
        token_end = colon + 1
        # every colon of an address but the last has another within 5 characters: "2001:db8::1"
        if text[colon + 1:colon + 2] in _HEX_COLON and text.find(":", colon + 1, colon + 6) != -1:
            start = colon
            while start > 0 and colon - start <= _V6_MAX_LEN and text[start - 1] in _V6_CHARS:
                start -= 1
            token = _V6_TOKEN.match(text, colon)   # always matches: "*"
            token_end = token.end() if token else colon + 1
            span = _ipv6_in(text, start, token_end)
            if span is not None:
                yield span
        colon = text.find(":", token_end)   # each token is tried once, from its first colon


def _has_runs(scan: Scan) -> bool:
    return bool(scan.runs)


def _may_hold_passport(scan: Scan) -> bool:
    runs = scan.runs
    return 7 in runs or 8 in runs or "护照" in scan.text or "passport" in scan.lower


# What a text must hold for a detector to find anything, tested first (most prompts hold no number): the
# digit detectors draw every candidate from Scan.runs; a passport number is a run of 7 or 8 digits after its
# letters, or follows "护照"/"passport" (found in the lower-cased text: "passport" is ASCII, so lower() never
# moves it); an IP address is a digit run or has a colon. Email addresses have spelled-out forms: no gate.
GATES: dict[str, Callable[[Scan], bool]] = {
    "cn_id": _has_runs,
    "bank_card": _has_runs,
    "cn_mobile": _has_runs,
    "passport": _may_hold_passport,
    "ip": lambda scan: _has_runs(scan) or ":" in scan.text,
}

DETECTORS: dict[str, Callable[[Scan], Iterator[Span]]] = {
    # order matters: when two kinds claim the same span, the first one listed keeps it
    "cn_id": find_cn_ids,
    "bank_card": find_bank_cards,
    "cn_mobile": find_cn_mobiles,
    "passport": find_passports,
    "email": find_emails,
    "ip": find_ips,
}
