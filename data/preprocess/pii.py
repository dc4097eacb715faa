"""Desensitization: typed placeholders for personal data, and removal of reposting boilerplate.

Numbers are only masked when they validate: PRC resident ID numbers by their ISO 7064 MOD 11-2
check character, bank cards by the Luhn sum, IP addresses by `ipaddress`. That keeps years, prices
and order numbers intact while every real identifier goes. Four dotted numbers are an IPv4 address
unless they continue a dotted chain or follow a version marker ("v1.0.0.1", "version 1.0.0.1").
Phone formats: mainland China, +country and 00country, and North American (415) 555-2671 /
415-555-2671; bare digit runs separated by spaces only are never phones. Matching order matters:
ID numbers and cards are taken before phone numbers so a card's digits are never half-masked as a
phone.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Sequence

from megatron_patches.errors import ConfigError

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "id_number": "<ID_NUMBER>",
    "bank_card": "<BANK_CARD>",
    "phone": "<PHONE>",
    "ipv4": "<IP>",
    "ipv6": "<IP>",
}

_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
)
_ID_NUMBER = re.compile(
    r"(?<![0-9A-Za-z])[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?![0-9A-Za-z])"
)
_CARD = re.compile(r"(?<![0-9A-Za-z-])[3-6]\d{3}(?:[ -]?\d){9,15}(?![0-9A-Za-z-])")
_PHONE = re.compile(
    r"(?<![0-9A-Za-z+])(?:"
    r"(?:\+?86[ -]?)?1[3-9]\d[ -]?\d{4}[ -]?\d{4}"  # mainland mobile, optional +86
    r"|(?:\(0\d{2,3}\)|0\d{2,3})[ -]?\d{3,4}[ -]?\d{4}"  # mainland landline with area code
    r"|\+(?:[1-9]\d{0,2})(?:[ -]?\(?\d{1,4}\)?){2,5}"  # international E.164-style
    # international with the 00 prefix; separators required, so a bare run of digits is not taken
    r"|00[1-9]\d{0,2}(?:[ -]\(?\d{1,4}\)?){2,5}"
    # North American: (415) 555-2671, 415-555-2671, 415.555.2671 (one separator throughout)
    r"|(?:1[ .-]?)?(?:\([2-9]\d{2}\) ?[2-9]\d{2}[-. ]|[2-9]\d{2}(?P<sep>[-.])[2-9]\d{2}(?P=sep))\d{4}"
    r")(?![0-9A-Za-z])"
)
# An IPv4 address is four dotted numbers that are not part of a longer dotted chain (1.2.3.4.5)
# or a word (v1.0.0.1); a trailing sentence period is allowed.
_IPV4 = re.compile(
    r"(?<![0-9A-Za-z.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
    r"(?![0-9A-Za-z]|\.\d)"
)
# Words after which four dotted numbers are a version, not an address: "version 1.0.0.1", "==1.2.3.4".
_VERSION_BEFORE = re.compile(
    r"(?:\b(?:version|ver|release|build|rev|v)\.?|版本号?|[=<>~]=)[\s:：=]*$", re.IGNORECASE
)
_IPV6 = re.compile(r"(?<![0-9A-Za-z:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Za-z:])")
_REPOST = re.compile(
    r"^[ \t]*(?:转载自|本文转自|转自|本文来源|文章来源|来源[:：]|原文链接|原文地址|本文首发于|版权声明[:：])"
    r".*(?:\n|$)",
    re.MULTILINE,
)

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def valid_id_number(value: str) -> bool:
    total = sum(int(d) * w for d, w in zip(value[:17], _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == value[17].upper()


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _valid_id_number(match: re.Match) -> bool:
    return valid_id_number(match.group(0))


def _valid_card(match: re.Match) -> bool:
    digits = re.sub(r"[ -]", "", match.group(0))
    if _ID_NUMBER.fullmatch(digits):  # an ID number whose check digit failed is not a card either
        return False
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def _valid_phone(match: re.Match) -> bool:
    text = match.group(0)
    digits = re.sub(r"\D", "", text)
    if text.startswith("+"):
        return 7 <= len(digits) <= 15
    if text.startswith("00"):  # 00 is the international call prefix, not part of the number
        return 7 <= len(digits) - 2 <= 15
    return len(digits) >= 10


def _not_a_version(match: re.Match) -> bool:
    before = match.string[max(0, match.start() - 12) : match.start()]
    return _VERSION_BEFORE.search(before) is None


def _valid_ipv6(match: re.Match) -> bool:
    text = match.group(0)
    groups = [g for g in text.split(":") if g]
    if len(groups) < 3 or not any(ch.isdigit() for ch in text):  # not `a::b` in C++ code
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


# Seven digits with gaps of at most three of " ().-": every ID number, card and phone number that
# validates has them (17, 13 and 7 digits at least, apart by no more than ") (" or a separator), so a
# text without them has nothing those three types mask, though their regexes may match (digits of
# dates, prices) only for the validators to refuse.
_DIGIT_RUN = re.compile(r"\d(?:[ ().-]{0,3}\d){6}")
_IPV4_HINT = re.compile(r"\d\.\d")
_IPV6_HINT = re.compile(r":[0-9A-Fa-f]{0,4}:")  # a literal first: the regex engine skips to each colon
_REPOST_HINT = re.compile(r"转载|转自|来源|原文|首发|版权声明")


_DIGIT = re.compile(r"\d")


class _Hints:
    """Cheap necessary conditions of a masking, for one version of a text: each skips a regex scan
    for the many documents that cannot contain a match (or none that validates). Several types share
    one, so each is evaluated once, and the digit scans start at the first digit."""

    def __init__(self, text: str):
        self.text = text
        self.known: dict[str, bool] = {}
        self._first_digit: int | None = None

    def __call__(self, name: str) -> bool:
        if name not in self.known:
            self.known[name] = getattr(self, name)()
        return self.known[name]

    def first_digit(self) -> int:
        if self._first_digit is None:
            if self.text.isascii():  # \d is 0-9 there, which str.find locates without the regex engine
                found = [i for i in map(self.text.find, "0123456789") if i >= 0]
                self._first_digit = min(found, default=-1)
            else:
                match = _DIGIT.search(self.text)
                self._first_digit = match.start() if match else -1
        return self._first_digit

    def any(self) -> bool:
        """Whether some hint may hold: each needs an "@", a ":" or a digit (most documents have none)."""
        return "@" in self.text or ":" in self.text or self.first_digit() >= 0

    def at(self) -> bool:
        return "@" in self.text

    def digit_run(self) -> bool:
        start = self.first_digit()
        return start >= 0 and _DIGIT_RUN.search(self.text, start) is not None

    def dotted(self) -> bool:
        start = self.first_digit()
        return start >= 0 and _IPV4_HINT.search(self.text, start) is not None

    def colons(self) -> bool:
        return _IPV6_HINT.search(self.text) is not None


# (type, hint, pattern, validator) in matching order.
_RULES: tuple[tuple[str, str, re.Pattern, Callable[[re.Match], bool] | None], ...] = (
    ("email", "at", _EMAIL, None),
    ("id_number", "digit_run", _ID_NUMBER, _valid_id_number),
    ("bank_card", "digit_run", _CARD, _valid_card),
    ("phone", "digit_run", _PHONE, _valid_phone),
    ("ipv4", "dotted", _IPV4, _not_a_version),
    ("ipv6", "colons", _IPV6, _valid_ipv6),
)
TYPES = tuple(rule[0] for rule in _RULES) + ("repost_line",)


def selected_types(chosen: Sequence[str] | None) -> tuple[str, ...]:
    """The configured `clean.pii_types` (None: all of them), checked against TYPES."""
    types = tuple(chosen) if chosen is not None else TYPES
    unknown = sorted(set(types) - set(TYPES))
    if unknown:
        raise ConfigError(f"clean.pii_types: unknown type(s) {unknown}; known: {list(TYPES)}")
    return types


def desensitize(text: str, types: tuple[str, ...] = TYPES) -> tuple[str, Counter]:
    """(masked text, count per type); `types` selects which kinds are masked or stripped."""
    counts: Counter = Counter()
    if "repost_line" in types and not text.isascii() and _REPOST_HINT.search(text):
        text, n = _REPOST.subn("", text)
        counts["repost_line"] += n
    hints = _Hints(text)
    if not hints.any():  # no hint holds: no scan would run
        return text, counts
    for name, hint, pattern, validator in _RULES:
        if name not in types or not hints(hint):
            continue
        placeholder = PLACEHOLDERS[name]

        def replace(match: re.Match, name: str = name, validator=validator, placeholder=placeholder) -> str:
            if validator is not None and not validator(match):
                return match.group(0)
            counts[name] += 1
            return placeholder

        masked = pattern.sub(replace, text)
        if masked != text:
            text = masked
            hints = _Hints(text)
    return text, counts
