"""Find and redact personal information and secrets in text.

Every detector is a regular expression that proposes candidates cheaply, followed by a
validator that rejects what only looks like PII: the Luhn checksum for card numbers, the
ISO 13616 mod-97 checksum for IBANs (python-stdnum), libphonenumber for phone numbers,
the `ipaddress` module for IP addresses, the SSA's never-issued ranges for SSNs. Validation
is what keeps version numbers, dates, arithmetic, order numbers and hashes out.

    >>> find_pii("write to ana@example.org")[0].kind
    'email'
    >>> redact_pii("card 4111 1111 1111 1111, thanks")
    'card <CREDIT_CARD>, thanks'
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Iterable

import phonenumbers
from stdnum import iban as stdnum_iban

EMAIL = "email"
PHONE = "phone"
CREDIT_CARD = "credit_card"
US_SSN = "us_ssn"
IBAN = "iban"
IP_ADDRESS = "ip_address"
SECRET = "secret"
URL_CREDENTIALS = "url_credentials"

ALL_KINDS: tuple[str, ...] = (
    EMAIL, PHONE, CREDIT_CARD, US_SSN, IBAN, IP_ADDRESS, SECRET, URL_CREDENTIALS,
)

PLACEHOLDERS: dict[str, str] = {
    EMAIL: "<EMAIL>",
    PHONE: "<PHONE>",
    CREDIT_CARD: "<CREDIT_CARD>",
    US_SSN: "<US_SSN>",
    IBAN: "<IBAN>",
    IP_ADDRESS: "<IP_ADDRESS>",
    SECRET: "<SECRET>",
    URL_CREDENTIALS: "<CREDENTIALS>",
}

# When two candidates overlap, the more specific detector wins: a card number can also
# parse as a phone number, an SSN as a phone number, a secret can contain an e-mail.
_PRIORITY = {SECRET: 0, URL_CREDENTIALS: 1, EMAIL: 2, IBAN: 3, CREDIT_CARD: 4, US_SSN: 5,
             IP_ADDRESS: 6, PHONE: 7}


@dataclass(frozen=True, slots=True)
class PiiSpan:
    """One match: `text[start:end] == span.text`."""

    kind: str
    start: int
    end: int
    text: str


# ---------------------------------------------------------------------------------------
# e-mail

# Kana, CJK ideographs and Hangul are word characters, but Japanese, Chinese and Korean
# write addresses and numbers right against them ("tanaka@example.jpです", "010-1234-5678로").
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
_EMAIL_RE = re.compile(
    r"(?<![^\W" + _CJK + r"])(?<![.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
    r"((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+([A-Za-z]{2,24}))(?![^\W" + _CJK + r"])(?!-)"
)
# "icon@2x.png" and "lib@1.2.js" are file names, not addresses.
_NOT_TLDS = frozenset(
    "png jpg jpeg gif svg webp bmp ico tif tiff js mjs ts tsx jsx css scss html htm txt json "
    "yaml yml toml md rst lock tar gz tgz zip whl pdf csv py rb rs go java kt swift php".split()
)


def _find_emails(text: str) -> Iterable[PiiSpan]:
    for m in _EMAIL_RE.finditer(text):
        if m.group(2).lower() in _NOT_TLDS:
            continue
        yield PiiSpan(EMAIL, m.start(), m.end(), m.group())


# ---------------------------------------------------------------------------------------
# numbers: card, SSN, phone share one digit-run scanner

# A run of digits with the separators people write inside numbers; `(?<![\w.])` keeps
# digits inside hex hashes, identifiers and decimals out.
_NUMBER_RE = re.compile(
    r"(?<![^\W" + _CJK + r"])(?<![.+/:-])(?:\+|00)?\(?\d[\d().\- \u00a0]{4,24}\d(?:\s?(?:x|ext\.?|#)\s?\d{1,5})?"
    r"(?![^\W" + _CJK + r"])"
)
_DATE_RE = re.compile(
    r"(?:19|20)\d\d[-/.](?:0?[1-9]|1[0-2])[-/.](?:0?[1-9]|[12]\d|3[01])"
    r"|(?:0?[1-9]|[12]\d|3[01])[-/.](?:0?[1-9]|1[0-2])[-/.](?:19|20)?\d\d"
    r"|(?:0?[1-9]|1[0-2])[-/.](?:0?[1-9]|[12]\d|3[01])[-/.](?:19|20)?\d\d"
)
# Lookbehinds are placed after the first digit, not before it: a pattern that starts with
# a character class lets the regex engine skip ahead quickly, one that starts with an
# assertion does not (about 1.6x faster on short texts).
_SSN_RE = re.compile(r"(\d)(?<![\w-]\d)(\d\d)([- .])(\d{2})\3(\d{4})(?![\w-])")
_CARD_RE = re.compile(r"\d(?<![\w.+-]\d)(?:[ -]?\d){11,18}(?![\w-])")
_CARD_PREFIX_RE = re.compile(r"4|5[0-9]|6|3[0-9]|2[2-7]|1800|2131")

_VERSION_OR_IP_RE = re.compile(r"\d{1,3}(?:\.\d{1,3}){2,3}")
# Two space-separated groups, or a postal-code shape: phones only when the text says so.
# Also SSN-shaped numbers and thousands groupings ("12 345 678").
_WEAK_FORMAT_RE = re.compile(r"\d+ \d+|\d{5}-\d{3,4}|\d{4}-\d{3}|\d{3}-\d{2}-\d{4}|\d{1,3}(?: \d{3})+")
# Dots separate phone digit groups of 2 to 4 ("03.93.92.16.85", "259.735.7502"); other
# dotted numbers are decimals or versions ("2.718281828", "10.0.19041").
_DOTTED_PHONE_RE = re.compile(r"\(?\+?\d{1,4}\)?(?:\.\d{2,4}){2,5}(?:\s?(?:x|ext\.?|#)\s?\d{1,5})?")
_PHONE_CONTEXT_RE = re.compile(
    r"(?i)(?:phone|tel|telephone|mobile|cell|fax|call|contact|whatsapp|sms|text me|office|"
    r"desk|home|work|dial|ring|number|no\.|nr\.|téléphone|teléfono|telefon|telefono|handy|"
    r"móvil|portable|電話|电话)\W{0,6}(?:(?:me|us|him|her|them)\s+)?(?:(?:at|on)\W{1,3})?$"
)
# The same words in the languages of `LANGUAGE_REGIONS`, with a few short words between
# the word and the number ("Ruf mich an:", "Hubungi saya di", "Gọi cho tôi:"); used when
# the national formats of a language's regions are looked for.
_PHONE_CONTEXT_ML_RE = re.compile(
    r"(?i)(?:телефон|тел\.|звоните|позвоните|звонить|هاتف|اتصل|جوال|موبايل|फोन|फ़ोन|कॉल|電話|携帯|"
    r"전화|휴대폰|연락처|电话|手机|致电|拨打|telefon|arayın|ara|hubungi|telepon|điện thoại|gọi|"
    r"ligue|ligar|telefone|celular|llame|llámame|llamar|móvil|appelez|appeler|téléphone|portable|"
    r"ruf|rufen|anrufen|handy|chiama|chiamami|chiamare|cellulare|ফোন|কল|فون|کال)"
    r"(?:[\s:：]+[^\s\d]{1,7}){0,3}[\s:：]*(?:[:：]|\s)\W{0,3}$"
)
_PHONE_CONTEXT_AFTER_RE = re.compile(r"(?i)^\W{0,3}(?:office|fax|mobile|cell|home|work|phone)")
# Words after which a number joined by dashes is a score, a range, a reference or a version,
# not a phone: "the final score was 102-98-112", "pages 1203-1345", "build 2019-2021-2023".
_NOT_PHONE_CONTEXT_RE = re.compile(
    r"(?i)\b(?:scores?|scored|won|lost|beat|defeated|record|results?|tally|standings?|"
    r"pages?|pp|figures?|figs?|tables?|chapters?|sections?|verses?|lines?|steps?|range|ranging|"
    r"between|versions?|v|release[sd]?|builds?|years?|seasons?|rounds?|sets?|games?|matches|"
    r"votes?|ratio|odds|sequence|series|dates?|dated)\b\W{0,6}(?:\w+\W{1,3}){0,2}$"
)
# The same for other languages: page ranges, scores, versions ("Seiten 1203-1345",
# "el marcador final fue 102-98-112", "第1203-1345页", "1203-1345ページ").
_NOT_PHONE_ML_BEFORE_RE = re.compile(
    r"(?i)(?:página|páginas|pág|seite|seiten|s\.|pagina|pagine|страница|страницы|стр\.|"
    r"sayfa|sayfalar|halaman|trang|الصفحات|الصفحة|पृष्ठ|第|marcador|resultado|puntuación|"
    r"ergebnis|endergebnis|spielstand|punteggio|placar|счёт|счет|比分|スコア|점수|النتيجة|स्कोर|"
    r"skor|tỉ số|versión|versão|versione|версия|sürüm|versi|phiên bản|版本|バージョン|버전|"
    r"capítulo|kapitel|capitolo|глава|bölüm)\W{0,6}(?:[^\W\d]+\W{1,3}){0,2}$")
_NOT_PHONE_ML_AFTER_RE = re.compile(r"^\s*(?:ページ|頁|页|쪽|페이지|sayfa|sayfalar|pp?\.)")
# Regions tried for numbers written without a country code, most common first.
_PHONE_REGIONS = ("US", "GB", "DE", "FR", "IN", "CA", "AU", "BR", "IT", "ES", "NL", "BE",
                  "CH", "AT", "SE", "IL")
# Regions a text's language suggests (ISO 639-1 -> ISO 3166), most populous first, tried
# after `_PHONE_REGIONS` for numbers written without a country code. Hand-written:
# libphonenumber maps regions to calling codes, not to languages.
LANGUAGE_REGIONS: dict[str, tuple[str, ...]] = {
    "en": ("US", "GB", "IN", "CA", "AU", "NZ", "IE", "ZA", "NG", "PH", "SG"),
    "zh": ("CN", "TW", "HK", "SG", "MO"),
    "hi": ("IN",), "bn": ("BD", "IN"), "ur": ("PK", "IN"), "pa": ("IN", "PK"),
    "mr": ("IN",), "te": ("IN",), "ta": ("IN", "LK", "SG"), "gu": ("IN",), "kn": ("IN",),
    "ml": ("IN",), "ne": ("NP",),
    "es": ("MX", "CO", "ES", "AR", "PE", "VE", "CL", "EC", "GT", "CU", "BO", "DO", "HN",
           "PY", "SV", "NI", "CR", "PA", "UY", "PR"),
    "fr": ("FR", "CA", "BE", "CH", "LU", "MA", "SN", "CI", "TN", "DZ"),
    "ar": ("EG", "SA", "DZ", "IQ", "MA", "SD", "YE", "SY", "TN", "JO", "AE", "LB", "LY",
           "KW", "OM", "QA", "BH", "PS"),
    "pt": ("BR", "PT", "AO", "MZ"),
    "ru": ("RU", "KZ", "BY", "KG"), "uk": ("UA",),
    "id": ("ID",), "ms": ("MY", "SG", "BN"),
    "de": ("DE", "AT", "CH", "LU", "LI"),
    "ja": ("JP",), "ko": ("KR",), "vi": ("VN",), "th": ("TH",), "tl": ("PH",),
    "tr": ("TR", "CY"), "fa": ("IR", "AF"), "it": ("IT", "CH", "SM"),
    "pl": ("PL",), "nl": ("NL", "BE"), "ro": ("RO", "MD"), "el": ("GR", "CY"),
    "cs": ("CZ",), "sk": ("SK",), "hu": ("HU",), "sv": ("SE", "FI"), "da": ("DK",),
    "no": ("NO",), "fi": ("FI",), "he": ("IL",), "sw": ("KE", "TZ"), "bg": ("BG",),
    "hr": ("HR",), "sr": ("RS",), "sl": ("SI",), "lt": ("LT",), "lv": ("LV",), "et": ("EE",),
}
# Amounts of money are not phones, however their digits are grouped: "1.234.567 €",
# "R$ 1 234 567", "₹ 12,34,567", "123 456 руб.".
_CURRENCY_BEFORE_RE = re.compile(r"(?:[$€£¥₹₽₺₩₫﷼]|R\$|US\$|USD|EUR|GBP|JPY|CNY|RMB|INR|RUB|TRY|BRL)\s?$")
_CURRENCY_AFTER_RE = re.compile(
    r"(?i)^\s?(?:[$€£¥₹₽₺₩₫元円원]|usd|eur|euros?|dollars?|dólares|reais|руб|рубл|тенге|tl|lira|"
    r"rupees?|रुपये|yuan|yen|won|đồng|dong|dirhams?|riyals?|ريال|درهم|جنيه)")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _find_cards(text: str) -> Iterable[PiiSpan]:
    for m in _CARD_RE.finditer(text):
        raw = m.group()
        digits = raw.replace(" ", "").replace("-", "")
        if not 12 <= len(digits) <= 19 or not _CARD_PREFIX_RE.match(digits):
            continue
        if len(set(digits)) < 2 or not _luhn_ok(digits):
            continue
        # Separators, when present, must be used in the way card numbers are printed
        # (groups of 3 to 6), not scattered as in a list of small numbers.
        groups = re.split(r"[ -]", raw)
        if len(groups) > 1 and any(not 3 <= len(g) <= 6 for g in groups[1:-1]):
            continue
        yield PiiSpan(CREDIT_CARD, m.start(), m.end(), raw)


def _find_ssns(text: str) -> Iterable[PiiSpan]:
    for m in _SSN_RE.finditer(text):
        area, group, serial = m.group(1) + m.group(2), m.group(4), m.group(5)
        # Never issued: area 000, 666, 900-999; group 00; serial 0000; and the famous
        # advertising sample 078-05-1120 / 123-45-6789.
        if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
            continue
        digits = area + group + serial
        if digits in ("123456789", "078051120") or len(set(digits)) == 1:
            continue
        if m.group(3) == "." and _DATE_RE.fullmatch(m.group()):
            continue
        yield PiiSpan(US_SSN, m.start(), m.end(), m.group())


def _groups(text: str) -> list[str]:
    return re.findall(r"\d+", text)


def _grouped_as_dialled(raw: str, num) -> bool:
    """Whether the digit groups of ``raw`` are those the numbering plan prints (national or
    international format): "415-555-2671" is, "102-98-112" (a score) is not."""
    got = _groups(raw)
    for fmt in (phonenumbers.PhoneNumberFormat.NATIONAL, phonenumbers.PhoneNumberFormat.INTERNATIONAL):
        want = _groups(phonenumbers.format_number(num, fmt))
        if got == want or got == want[1:] and fmt == phonenumbers.PhoneNumberFormat.INTERNATIONAL:
            return True
    # Or the national digits split once (area code - rest), as many people write them.
    return len(got) == 2 and "".join(got) == phonenumbers.national_significant_number(num)


def _phone_valid(candidate: str, grouping: bool = False, regions: tuple[str, ...] = _PHONE_REGIONS) -> bool:
    """Valid for some numbering plan; with ``grouping``, also written with its groups.
    ``regions`` are tried for a number without a country code."""
    lead = candidate.lstrip("(")
    if lead.startswith("+") or lead.startswith("00"):
        if regions is not _PHONE_REGIONS:
            return False  # an international number does not depend on regions
        try:
            num = phonenumbers.parse("+" + lead[2:] if lead.startswith("00") else lead, None)
        except phonenumbers.NumberParseException:
            return False
        return phonenumbers.is_valid_number(num) and (not grouping or _grouped_as_dialled(candidate, num))
    for region in regions:
        try:
            num = phonenumbers.parse(candidate, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(num) and (not grouping or _grouped_as_dialled(candidate, num)):
            return True
    return False


def _national_number(candidate: str, regions: tuple[str, ...]) -> bool:
    """Written as dialled inside one of ``regions``: it starts with the region's trunk
    prefix ("0151 23456789" in Germany, "8 912 345-67-89" in Russia) and is valid there.
    A number that starts with a trunk prefix and has a phone's length is rarely anything
    else (house numbers, postal codes and amounts do not start with 0)."""
    digits = "".join(ch for ch in candidate if ch.isdigit())
    for region in regions:
        meta = phonenumbers.PhoneMetadata.metadata_for_region(region)
        prefix = meta.national_prefix if meta is not None else None
        if not prefix or not digits.startswith(prefix):
            continue
        try:
            num = phonenumbers.parse(candidate, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(num) and phonenumbers.number_type(num) != phonenumbers.PhoneNumberType.UNKNOWN:
            return True
    return False


class _LazyRegions:
    """The extra regions of a text, computed on first use (detecting the language costs
    about a millisecond, and most texts hold no number that needs it)."""

    __slots__ = ("text", "configured", "from_language", "_value")

    def __init__(self, text: str, configured: tuple[str, ...], from_language: bool):
        self.text, self.configured, self.from_language, self._value = text, configured, from_language, None

    def get(self) -> tuple[str, ...]:
        if self._value is None:
            regions = list(self.configured)
            if self.from_language:
                from data_filters.language import language_candidates

                for lang in sorted(language_candidates(self.text)):
                    regions += LANGUAGE_REGIONS.get(lang, ())
            self._value = tuple(dict.fromkeys(regions))
        return self._value


def regions_for_language(language: str | None) -> tuple[str, ...]:
    """The regions whose national phone formats text in `language` is likely to use."""
    return LANGUAGE_REGIONS.get(language or "", ())


# Reference numbers and sums: "Bestellnummer 0123 4567890", "0123 4567 = 4690".
_NOT_PHONE_ML_CONTEXT_RE = re.compile(
    r"(?i)(?:bestell|rechnung|kunden|artikel|auftrag|referenz|vorgang|order|invoice|pedido|factura|"
    r"commande|facture|ordine|fattura|заказ|сч[её]т|注文|订单|訂單|주문|sipariş|fatura|pesanan|"
    r"faktur|đơn hàng|hóa đơn|طلب|فاتورة|ऑर्डर)\w*\W{0,6}(?:\w+\W{1,3}){0,2}$")
_ARITHMETIC_BEFORE_RE = re.compile(r"[=+×*/÷<>]\s*$")
_ARITHMETIC_AFTER_RE = re.compile(r"^\s*[=+×*/÷<>]")


def _is_money(text: str, start: int, end: int) -> bool:
    return bool(_CURRENCY_BEFORE_RE.search(text[max(0, start - 4):start])
                or _CURRENCY_AFTER_RE.match(text[end:end + 8]))


def _not_a_national_phone(text: str, start: int, end: int) -> bool:
    """Guards for the numbers found only through a language's regions: amounts,
    arithmetic, order and invoice numbers."""
    before = text[max(0, start - 30):start]
    return (_is_money(text, start, end) or _ARITHMETIC_BEFORE_RE.search(before) is not None
            or _ARITHMETIC_AFTER_RE.match(text[end:end + 4]) is not None
            or _NOT_PHONE_ML_CONTEXT_RE.search(before) is not None)


def _find_phones(text: str, extra: _LazyRegions | None = None) -> Iterable[PiiSpan]:
    for m in _NUMBER_RE.finditer(text):
        raw = m.group().rstrip(" .-(\u00a0")
        start = m.start()
        if raw.count("(") != raw.count(")"):
            if raw.startswith("(") and ")" not in raw:
                raw, start = raw[1:], start + 1
            else:
                continue
        end = start + len(raw)
        digits = sum(ch.isdigit() for ch in raw)
        if not 7 <= digits <= 15:
            continue
        if _DATE_RE.match(raw) or _VERSION_OR_IP_RE.fullmatch(raw) or text[end:end + 1] == ":":
            continue  # a date, a time, a version number or an IPv4 address
        if "." in raw and not _DOTTED_PHONE_RE.fullmatch(raw):
            continue
        has_plus = raw.startswith("+") or raw.startswith("00")
        separated = not raw.isdigit()
        before = text[max(0, start - 24):start]
        context = (_PHONE_CONTEXT_RE.search(before) is not None
                   or _PHONE_CONTEXT_AFTER_RE.match(text[end:end + 12]) is not None
                   or extra is not None and extra.from_language
                   and _PHONE_CONTEXT_ML_RE.search(before) is not None)
        if context:
            if separated or has_plus or digits >= 10:
                yield PiiSpan(PHONE, start, end, raw)
            continue
        if not (has_plus or separated):
            continue
        weak = not has_plus and _WEAK_FORMAT_RE.fullmatch(raw) is not None
        if not weak:
            # Without a word saying it is a phone, the number must be written like one
            # and be valid for a numbering plan: "17151 2450" (a house number and a
            # street number) or "90010-170" (a postal code) are not phones. Numbers joined
            # by dashes are also scores, ranges, dates and versions: after a word saying
            # so they are not phones, and otherwise their groups must be a phone's.
            dashed = "-" in raw and not has_plus
            if dashed and (_NOT_PHONE_CONTEXT_RE.search(before) or _NOT_PHONE_ML_BEFORE_RE.search(before)
                           or _NOT_PHONE_ML_AFTER_RE.match(text[end:end + 6])):
                continue
            if _phone_valid(raw, grouping=dashed):
                yield PiiSpan(PHONE, start, end, raw)
                continue
            if extra is None or has_plus or _not_a_national_phone(text, start, end):
                continue
            regions = extra.get()
            if regions and (_phone_valid(raw, grouping=dashed, regions=regions)
                            or _national_number(raw, regions)):
                yield PiiSpan(PHONE, start, end, raw)
        elif extra is not None and (raw[0] == "0" or raw[0] == "8" and digits == 11):
            # Two groups ("0151 23456789", "8 9123456789"): a phone when written with the
            # trunk prefix of a region the text's language suggests.
            if _DATE_RE.search(raw) or _not_a_national_phone(text, start, end):
                continue
            regions = extra.get()
            if regions and _national_number(raw, regions):
                yield PiiSpan(PHONE, start, end, raw)


# ---------------------------------------------------------------------------------------
# IBAN

_IBAN_RE = re.compile(r"[A-Za-z]{2}\d\d(?<![\w][A-Za-z]{2}\d\d)(?: ?[A-Za-z0-9]){11,30}(?![\w])")


def _find_ibans(text: str) -> Iterable[PiiSpan]:
    for m in _IBAN_RE.finditer(text):
        raw = m.group()
        # The greedy match may have taken following words ("... 32 and"): shorten
        # group by group until the checksum holds.
        parts = raw.split(" ")
        while parts:
            cand = " ".join(parts)
            if len(cand.replace(" ", "")) >= 15 and stdnum_iban.is_valid(cand.upper()):
                yield PiiSpan(IBAN, m.start(), m.start() + len(cand), cand)
                break
            parts.pop()


# ---------------------------------------------------------------------------------------
# IP addresses

_IPV4_RE = re.compile(r"\d(?<![\w.]\d)\d{0,2}\.(?:\d{1,3}\.){2}\d{1,3}(?![\w]|\.\d)")
_IPV6_RE = re.compile(r"(?i)(?<![\w:])(?:[0-9a-f]{0,4}:){2,7}[0-9a-f]{0,4}(?:%\w+)?(?![\w:])")
_VERSION_BEFORE_RE = re.compile(r"(?i)(?:\bv|version|release|build|ver\.?)\s*$")


def _find_ips(text: str) -> Iterable[PiiSpan]:
    if "." in text:
        for m in _IPV4_RE.finditer(text):
            try:
                ip = ipaddress.IPv4Address(m.group())
            except ValueError:
                continue
            if ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_link_local:
                continue
            if _VERSION_BEFORE_RE.search(text[max(0, m.start() - 10):m.start()]):
                continue  # "version 1.2.3.4"
            yield PiiSpan(IP_ADDRESS, m.start(), m.end(), m.group())
    if "::" in text or text.count(":") >= 5:
        for m in _IPV6_RE.finditer(text):
            raw = m.group()
            hexdigits = sum(ch not in ":" for ch in raw)
            if hexdigits < 6 or not any(ch.isdigit() for ch in raw):
                continue  # "std::vector", "a::b" are code, not addresses
            try:
                ip = ipaddress.IPv6Address(raw.split("%")[0])
            except ValueError:
                continue
            if ip.is_loopback or ip.is_unspecified or ip.is_link_local or ip.is_multicast:
                continue
            yield PiiSpan(IP_ADDRESS, m.start(), m.end(), raw)


# ---------------------------------------------------------------------------------------
# secrets

_SECRET_TOKEN_RE = re.compile(
    "|".join((
        r"\b(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\b",  # AWS key id
        r"\bAIza[0-9A-Za-z_\-]{35}\b",  # Google API key
        r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b",  # GitHub tokens
        r"\bgithub_pat_[A-Za-z0-9_]{60,255}\b",
        r"\bglpat-[A-Za-z0-9_\-]{20,}\b",  # GitLab personal access token
        r"\bgl(?:dt|rt|ptt|cbt|imt|ft|oas)-[A-Za-z0-9_\-]{20,}\b",
        r"\bxox[abposr]-[A-Za-z0-9\-]{10,}\b",  # Slack tokens
        r"https://hooks\.slack\.com/services/T[A-Za-z0-9_]+/B[A-Za-z0-9_]+/[A-Za-z0-9_]+",
        r"\b(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,}\b",  # Stripe
        r"\bsk-(?:proj-|ant-(?:api\d\d-)?)?[A-Za-z0-9_\-]{32,}\b",  # OpenAI / Anthropic
        r"\bhf_[A-Za-z0-9]{30,}\b",  # Hugging Face
        r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{16,}",  # JWT
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
        r"(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|[A-Za-z0-9+/=\s]*)",
    ))
)
# Substrings every token above contains: plain `in` tests are much cheaper than running the
# token regex over every text.
_SECRET_HINTS = ("AKIA", "ASIA", "ABIA", "ACCA", "AGPA", "AIDA", "AROA", "ANPA", "ANVA", "AIPA",
                 "AIza", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "glpat-", "gldt-",
                 "glrt-", "glptt-", "glcbt-", "glimt-", "glft-", "gloas-", "xox", "hooks.slack", "_live_",
                 "_test_", "sk-", "hf_", "eyJ", "PRIVATE KEY")
# Fewer scans than 21 substring tests (~10 us per text), same answer as `any(h in text ...)`:
# the AWS prefixes are "A" then an upper-case letter, rare in prose, so one regex scan rules
# them out; every other hint holds a character (a group's first element) whose memchr-fast
# scan rules out its group.
_AWS_HINTS = tuple(h for h in _SECRET_HINTS if h.startswith("A"))
_AWS_HINT_GATE = re.compile(r"A[BCGIKNRS]")
# The GitHub and GitLab prefixes are spelled out: "gh" and "gl" alone are in most English
# texts ("though", "English") and sent each of them through the token regex.
_HINT_GROUPS = (("K", ("PRIVATE KEY",)), ("J", ("eyJ",)), ("x", ("xox",)), ("hooks.slack", ("hooks.slack",)),
                ("_", ("_live_", "_test_", "hf_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")),
                ("-", ("sk-", "glpat-", "gldt-", "glrt-", "glptt-", "glcbt-", "glimt-", "glft-", "gloas-")))
assert all(_AWS_HINT_GATE.match(h) for h in _AWS_HINTS)
assert all(ch in h for ch, group in _HINT_GROUPS for h in group)
assert sorted(_AWS_HINTS + sum((g for _, g in _HINT_GROUPS), ())) == sorted(_SECRET_HINTS)


def _has_secret_hint(text: str) -> bool:
    # Loops, not any() over generators: the generators' frames cost more than the scans.
    if _AWS_HINT_GATE.search(text) is not None:
        for h in _AWS_HINTS:
            if h in text:
                return True
    for ch, group in _HINT_GROUPS:
        if ch in text:
            for h in group:
                if h in text:
                    return True
    return False


_ASSIGNMENT_HINTS = ("pass", "pwd", "secret", "key", "token")
_ASSIGNMENT_RE = re.compile(
    r"(?i)\b(?:password|passwd|passphrase|pwd|secret|secret[_-]?key|client[_-]?secret|"
    r"api[_-]?key|apikey|access[_-]?key|access[_-]?token|auth[_-]?token|private[_-]?key|"
    r"aws_secret_access_key|token)\b[\"']?\s*(?::=|=>|=|:)\s*"
    r"(?:(?P<q>[\"'])(?P<quoted>[^\"'\s]{4,200})(?P=q)|(?P<bare>[^\s\"',;)}\]]{6,200}))"
)
_PLACEHOLDER_VALUE_RE = re.compile(
    r"(?i)^(?:none|null|nil|true|false|undefined|required|optional|string|str|int|bytes|"
    r"password|secret|token|example|changeme|placeholder|redacted|hidden|"
    r"(?:your|my|the|an?)[_\- ]?\w*|x+|\*+|\.+|<[^>]*>?|\{[^}]*\}?|\$\{?\w+\}?|%\(?\w+\)?s?|"
    r"process\.env.*|os\.(?:environ|getenv).*|env\(.*|getpass.*|input\(.*)$"
)
_IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z_.]*(?:\(.*|\[.*)?$")


def _find_secrets(text: str) -> Iterable[PiiSpan]:
    if _has_secret_hint(text):
        for m in _SECRET_TOKEN_RE.finditer(text):
            yield PiiSpan(SECRET, m.start(), m.end(), m.group())
    lowered = text.lower()
    for h in _ASSIGNMENT_HINTS:
        if h in lowered:
            break
    else:
        return
    for m in _ASSIGNMENT_RE.finditer(text):
        group = "quoted" if m.group("quoted") is not None else "bare"
        value = m.group(group)
        if _PLACEHOLDER_VALUE_RE.match(value):
            continue
        # An unquoted identifier or call is code (`password = get_password()`), not a value.
        if group == "bare" and _IDENTIFIER_RE.match(value):
            continue
        yield PiiSpan(SECRET, m.start(group), m.end(group), value)


_URL_CRED_RE = re.compile(r"(?i)\b[a-z][a-z0-9+.\-]{1,15}://([^\s:/@?#\[\]]{1,64}):([^\s/@?#]{1,128})@")


def _find_url_credentials(text: str) -> Iterable[PiiSpan]:
    for m in _URL_CRED_RE.finditer(text):
        password = m.group(2)
        if _PLACEHOLDER_VALUE_RE.match(password):
            continue
        yield PiiSpan(URL_CREDENTIALS, m.start(1), m.end(2), text[m.start(1):m.end(2)])


def _has_ascii_digit(text: str) -> bool:
    # Ten substring scans run at memchr speed; a regex search for \d is several times slower,
    # and so is any() over a generator.
    return ("0" in text or "1" in text or "2" in text or "3" in text or "4" in text or "5" in text
            or "6" in text or "7" in text or "8" in text or "9" in text)


def find_pii(text: str, kinds: Iterable[str] | None = None, phone_regions: Iterable[str] = (),
             regions_from_language: bool = False) -> list[PiiSpan]:
    """All non-overlapping PII spans in `text`, in order of position.

    `kinds` restricts the search to some of `ALL_KINDS` (default: all of them). Phone
    numbers without a country code are checked against a fixed list of common regions,
    then against `phone_regions` (ISO 3166 codes) and, with `regions_from_language`, the
    regions the text's detected language suggests (`LANGUAGE_REGIONS`); in those extra
    regions a number written with the national trunk prefix ("0151 23456789") counts.
    """
    wanted = ALL_KINDS if kinds is None else tuple(kinds)
    found: list[PiiSpan] = []
    if SECRET in wanted:
        found.extend(_find_secrets(text))
    has_at = "@" in text
    if URL_CREDENTIALS in wanted and has_at and "://" in text:
        found.extend(_find_url_credentials(text))
    if EMAIL in wanted and has_at:
        found.extend(_find_emails(text))
    if _has_ascii_digit(text):
        if IBAN in wanted:
            found.extend(_find_ibans(text))
        if CREDIT_CARD in wanted:
            found.extend(_find_cards(text))
        if US_SSN in wanted:
            found.extend(_find_ssns(text))
        if IP_ADDRESS in wanted:
            found.extend(_find_ips(text))
        if PHONE in wanted:
            configured = tuple(r.upper() for r in phone_regions)
            extra = _LazyRegions(text, configured, regions_from_language) if (
                configured or regions_from_language) else None
            found.extend(_find_phones(text, extra))
    if len(found) <= 1:
        return found
    return _resolve_overlaps(found)


def _resolve_overlaps(spans: list[PiiSpan]) -> list[PiiSpan]:
    spans.sort(key=lambda s: (_PRIORITY[s.kind], s.start - s.end))
    chosen: list[PiiSpan] = []
    for span in spans:
        if all(span.end <= c.start or span.start >= c.end for c in chosen):
            chosen.append(span)
    chosen.sort(key=lambda s: s.start)
    return chosen


def redact_spans(text: str, spans: list[PiiSpan]) -> str:
    """Replace each span (sorted, non-overlapping) by its kind's placeholder."""
    out, pos = [], 0
    for span in spans:
        out.append(text[pos:span.start])
        out.append(PLACEHOLDERS[span.kind])
        pos = span.end
    out.append(text[pos:])
    return "".join(out)


def redact_pii(text: str, kinds: Iterable[str] | None = None) -> str:
    """`text` with every PII span replaced by a typed placeholder such as `<EMAIL>`."""
    spans = find_pii(text, kinds)
    return redact_spans(text, spans) if spans else text


class PiiFilter:
    """Redacts PII in place (mode "redact") or rejects the row (mode "drop")."""

    name = "pii"

    def __init__(self, config):  # config: data_filters.config.PiiConfig
        self.config = config
        self.kinds = tuple(config.kinds)
        self.phone_regions = tuple(getattr(config, "phone_regions", ()) or ())
        self.regions_from_language = bool(getattr(config, "phone_regions_from_language", False))

    def __call__(self, row: dict, turns: list):
        from data_filters.rows import Rejection, Rewrite, rewrite_texts

        found: dict[int, list[PiiSpan]] = {}
        for i, t in enumerate(turns):
            if t.role == "system" and not self.config.apply_to_system_turns:
                continue
            spans = find_pii(t.text, self.kinds, self.phone_regions, self.regions_from_language)
            if spans:
                found[i] = spans
        if not found:
            return None
        if self.config.mode == "drop":
            evidence = [{"turn": i, "kind": s.kind, "text": s.text, "start": s.start, "end": s.end}
                        for i, spans in found.items() for s in spans][:10]
            return Rejection(self.name, evidence[0]["kind"], evidence)
        changes: dict[str, int] = {}
        for spans in found.values():
            for s in spans:
                changes[s.kind] = changes.get(s.kind, 0) + 1
        by_path = {turns[i].path: redact_spans(turns[i].text, spans) for i, spans in found.items()}
        new_row = rewrite_texts(row, turns, lambda t: by_path.get(t.path, t.text))
        return Rewrite(new_row, changes)
