"""Turn a source row into an API contact: map headers to fields, normalize values, validate, key."""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import unquote

import tldextract

from cleanlist.errors import InputError
from cleanlist.vocab import ContactKeyKind, Reject, RejectCode

FIELDS: tuple[str, ...] = (
    "linkedin_url",
    "first_name",
    "last_name",
    "company_domain",
    "company_name",
    "email",
)
# email is kept locally (it yields company_domain) but never sent: the API documents only these five.
API_FIELDS: tuple[str, ...] = ("linkedin_url", "first_name", "last_name", "company_domain", "company_name")
MAX_FIELD_CHARS = 2048
LINKEDIN_PROFILE_PREFIX = "https://www.linkedin.com/in/"


def _words(text: str) -> list[str]:
    return text.split()


# Header spellings seen in CRM exports (HubSpot, Salesforce, Apollo, Sales Navigator, Pipedrive, Zoho,
# LinkedIn's own export), best first: when several headers of one source map to the same field, the
# one matching the earlier spelling wins. Matching uses canonical_header, so case and punctuation vary.
HEADER_SPELLINGS: Mapping[str, str] = {
    "linkedin_url": (
        "LinkedIn URL, LinkedIn Profile URL, Person Linkedin Url, LinkedIn, LinkedIn Profile,"
        " LinkedIn Profile Link, LinkedIn Link, Contact LinkedIn URL, LinkedIn Public URL,"
        " LinkedIn Public Profile URL, LinkedIn Member URL, Public Profile URL, Profile URL,"
        # LinkedIn's own connections export calls the profile column just "URL".
        " URL"
    ),
    "first_name": (
        "First Name, Given Name, First, Forename, FName, Contact First Name, Person - First Name,"
        " Lead First Name, Vorname, Prénom, Nombre, Voornaam"
    ),
    "last_name": (
        "Last Name, Surname, Family Name, Last, LName, Contact Last Name, Person - Last Name,"
        " Lead Last Name, Nachname, Nom, Nom de famille, Apellido, Apellidos, Achternaam"
    ),
    "company_domain": (
        "Company Domain, Company Domain Name, Domain, Company Website, Website, Website URL,"
        " Company Website URL, Company URL, Account Website, Account Domain, Organization Website,"
        " Organisation Website, Organization Domain, Email Domain, Web, Homepage, Webseite, Site Web,"
        " Sitio Web"
    ),
    "company_name": (
        "Company Name, Company, Account Name, Organization, Organisation, Organization - Name,"
        " Organisation Name, Company Name for Emails, Current Company, Associated Company,"
        " Person - Organization, Lead Company, Contact Company, Employer, Account, Business Name,"
        " Firma, Firmenname, Unternehmen, Entreprise, Société, Empresa"
    ),
    "email": (
        "Email, Work Email, Email Address, Business Email, Work Email Address, Business Email Address,"
        " Primary Email, Contact Email, Person - Email, Lead Email, Email 1, Email Address 1, Mail,"
        " E-Mail-Adresse, Courriel, Correo, Correo electrónico"
    ),
}

FREE_MAIL_DOMAINS: frozenset[str] = frozenset(
    _words("""
    gmail.com googlemail.com yahoo.com ymail.com rocketmail.com hotmail.com outlook.com live.com msn.com
    icloud.com me.com mac.com aol.com aim.com mail.com gmx.de gmx.net gmx.com gmx.at gmx.ch web.de
    t-online.de freenet.de posteo.de mailbox.org proton.me protonmail.com protonmail.ch pm.me
    tutanota.com tuta.io fastmail.com hey.com zohomail.com yandex.ru yandex.com ya.ru mail.ru bk.ru
    list.ru inbox.ru rambler.ru qq.com 163.com 126.com sina.com sohu.com yeah.net naver.com hanmail.net
    daum.net rediffmail.com seznam.cz wp.pl o2.pl onet.pl interia.pl libero.it virgilio.it tiscali.it
    orange.fr wanadoo.fr free.fr laposte.net sfr.fr comcast.net verizon.net att.net sbcglobal.net
    bellsouth.net cox.net charter.net btinternet.com sky.com ntlworld.com virginmedia.com bigpond.com
    shaw.ca rogers.com sympatico.ca uol.com.br bol.com.br terra.com.br
    """)
)
# Free-mail brands that exist under many country suffixes (yahoo.co.uk, hotmail.fr, outlook.com.br).
_FREE_MAIL_BRANDS = frozenset({"yahoo", "hotmail", "outlook", "gmx", "yandex", "ymail", "windowslive"})

_EMPTY_TOKENS = frozenset({"", "none", "null", "n/a", "-", "<na>", "#n/a"})
# "nan" is what str(float("nan")) leaves behind; "Nan" in title case is a given name and stays.
_NAN_SPELLINGS = frozenset({"nan", "NaN", "NAN"})
_NOT_ALNUM = re.compile(r"[^a-z0-9]+")
_PANDAS_DUPLICATE = re.compile(r"(.+)\.(\d+)")
_DOMAIN = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+(?:[a-z]{2,63}|xn--[a-z0-9-]{1,59})")
_WWW = re.compile(r"www\d{0,2}\.")
# scheme or //, userinfo or the local part of an email, then the host; an optional numeric port; then the
# end or a path, query or fragment. Anything else (a non-numeric port, a bare word) does not match.
_URL_HOST = re.compile(
    r"(?:mailto:)?(?:[a-z][a-z0-9+.-]*://|//)?(?:[^/?#]*@)?([^/?#@:]*)(?::\d*)?(?=[/?#]|$)"
)
_SLUG_FORBIDDEN = re.compile(r"[\s/?#@\ufffd]")
# Member-id slugs (/in/ACoAAB…) are case-sensitive, unlike vanity slugs.
_MEMBER_ID_PREFIXES = ("ACoAA", "ACwAA")
# Characters that show nothing but make two spellings of one name differ: zero-width space, non-joiner
# and joiner, word joiner, the byte-order mark (a BOM pasted into a cell, or left by a UTF-8-BOM export
# in its first header), and the bidi controls (LRM/RLM, embeddings and overrides, isolates). A CRM
# export carries them invisibly; the API would be sent (and charge for) each spelling as a new person.
INVISIBLE_CHARACTERS = frozenset(
    "\u200b\u200c\u200d\u2060\ufeff\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
_DROP_INVISIBLE = dict.fromkeys(map(ord, INVISIBLE_CHARACTERS))


def visible(text: str) -> str:
    """`text` without zero-width characters, the BOM and bidi controls (ASCII text is returned as is)."""
    return text if text.isascii() else text.translate(_DROP_INVISIBLE)


def fold_compatible(text: str) -> str:
    """`text` with invisible characters dropped and compatibility forms folded (NFKC: full-width
    letters, ligatures, composed accents), so every spelling a keyboard or an export makes is one."""
    return text if text.isascii() else unicodedata.normalize("NFKC", visible(text))


def canonical_header(header: str) -> str:
    """Header in matching form: accents dropped, lower case, only a-z and 0-9 ("E-Mail" → "email")."""
    text = header if header.isascii() else unicodedata.normalize("NFKD", header)
    return _NOT_ALNUM.sub("", text.lower())


def _rank_spellings() -> dict[str, tuple[str, int]]:
    ranked: dict[str, tuple[str, int]] = {}
    for field, spellings in HEADER_SPELLINGS.items():
        for rank, spelling in enumerate(spellings.split(",")):
            ranked.setdefault(canonical_header(spelling), (field, rank))
    return ranked


# canonical header → (field, rank); a lower rank wins.
_FIELD_BY_FORM: dict[str, tuple[str, int]] = _rank_spellings()


@dataclass(frozen=True)
class HeaderMapping:
    """Which source header feeds each contact field (field → header as spelled in the source)."""

    fields: dict[str, str]

    def describe(self) -> str:
        """One line for the log, e.g. `first_name←"First Name", company_domain←"Website"`."""
        return ", ".join(f'{field}←"{self.fields[field]}"' for field in FIELDS if field in self.fields)

    def row_values(self, row: Mapping[str, object]) -> dict[str, object]:
        """The mapped fields of one source row (header → value) as field → value."""
        return {field: row.get(header) for field, header in self.fields.items()}


def _can_satisfy_rule(fields: Mapping[str, str]) -> bool:
    if "linkedin_url" in fields:
        return True
    return (
        "first_name" in fields
        and "last_name" in fields
        and any(f in fields for f in ("company_domain", "company_name", "email"))
    )


def _quote_list(headers: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(f'"{h}"' for h in headers[:limit])
    more = len(headers) - limit
    return f"{shown}, … (+{more} more)" if more > 0 else shown or "none"


def _override_header(field: str, header: str, headers: Sequence[str]) -> str:
    if header in headers:
        return header
    wanted = canonical_header(header)
    matches = [h for h in headers if canonical_header(h) == wanted]
    if len(matches) == 1:
        return matches[0]
    raise InputError(
        f'--map {field}="{header}": the source has no such column (columns: {_quote_list(headers)})'
    )


# One pass over the field table: overrides, exact names, aliases, ambiguity; splitting it hides the order.
def resolve_mapping(  # noqa: C901
    headers: Sequence[str], overrides: Mapping[str, str] | None = None
) -> HeaderMapping:
    """Map source headers to contact fields; `overrides` (field → header, "" = leave unmapped) win."""
    headers = list(headers)
    fields: dict[str, str] = {}
    excluded: set[str] = set()
    for field, header in (overrides or {}).items():
        if field not in HEADER_SPELLINGS:
            raise InputError(f"--map names unknown field '{field}' (fields: {', '.join(FIELDS)})")
        if not header:
            excluded.add(field)
            continue
        fields[field] = _override_header(field, header, headers)
    taken = set(fields.values())
    present = set(headers)

    # A pandas-style ".1" suffix on a repeated header is the same column name, so it can be ambiguous too.
    by_form: dict[str, list[str]] = {}
    for header in headers:
        if header in taken:
            continue
        duplicate = _PANDAS_DUPLICATE.fullmatch(header)
        base = duplicate.group(1) if duplicate and duplicate.group(1) in present else header
        by_form.setdefault(canonical_header(base), []).append(header)

    best: dict[str, tuple[int, str]] = {}
    for form in by_form:
        hit = _FIELD_BY_FORM.get(form)
        if hit is None:
            continue
        field, rank = hit
        if field in fields or field in excluded:
            continue
        if field not in best or rank < best[field][0]:
            best[field] = (rank, form)
    for field, (_, form) in best.items():
        candidates = by_form[form]
        if len(candidates) > 1:
            raise InputError(
                f"{len(candidates)} columns look like {field} ({_quote_list(candidates)}); "
                f'choose one with --map {field}="{candidates[0]}"'
            )
        fields[field] = candidates[0]

    if not _can_satisfy_rule(fields):
        mapped = HeaderMapping(fields).describe() or "nothing"
        raise InputError(
            "no columns to build contacts from: need a LinkedIn URL column, or first name + last name + "
            'company, website or email columns (accepted: "LinkedIn URL", "First Name", "Last Name", '
            '"Company", "Website", "Email" and common variants); '
            f"mapped: {mapped}; headers seen: {_quote_list(headers)}; "
            'use --map field="Header" to choose'
        )
    return HeaderMapping({field: fields[field] for field in FIELDS if field in fields})


def _text(value: object) -> str:  # noqa: PLR0911 - one return per kind of empty a cell can hold
    """Trimmed text of a cell without invisible characters; "" for null-likes (None, NaN, NaT, pandas NA,
    "n/a", "-", …)."""
    if value.__class__ is str:
        text = visible(value).strip()
        if len(text) > 4:  # the common case: no null token is this long
            return text
    elif value is None:
        return ""
    elif isinstance(value, str):
        text = visible(value).strip()
    else:
        if isinstance(value, float) and math.isnan(value):
            return ""
        try:
            if value != value:  # noqa: PLR0124 - NaT and numpy NaN compare unequal to themselves
                return ""
        except (TypeError, ValueError):  # pandas NA and arrays refuse to be a bool
            return ""
        text = visible(str(value)).strip()
    if len(text) <= 4 and (text in _NAN_SPELLINGS or text.lower() in _EMPTY_TOKENS):
        return ""
    return text


def _collapse(text: str) -> str:
    # NFKC (which composes, as NFC does) so a name typed on macOS (decomposed é) or in full-width letters
    # is sent, and keyed, as the same name typed elsewhere.
    return " ".join(fold_compatible(text).split())


@lru_cache(maxsize=65536)
def bare_domain(host: str) -> str:
    """`host` (already lower-case, no scheme/path/port) as an ASCII domain, or "" if it is not one."""
    host = host.rstrip(".")
    if host.startswith("www"):
        www = _WWW.match(host)
        if www and "." in host[www.end() :]:
            host = host[www.end() :]
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return ""
    if len(host) > 253 or not _DOMAIN.fullmatch(host):
        return ""
    return host


# The bundled Public Suffix List snapshot only: no suffix_list_urls means nothing is fetched, and no
# cache_dir means nothing is written to ~/.cache (tldextract's loader then falls back to the snapshot
# shipped in the wheel). Private suffixes count, so `acme.github.io` stays a company of its own.
def bundled_suffix_extractor() -> tldextract.TLDExtract:
    """A suffix extractor that reads only the Public Suffix List snapshot shipped with tldextract."""
    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, include_psl_private_domains=True)


_SUFFIXES = bundled_suffix_extractor()


@lru_cache(maxsize=65536)
def registrable_domain(domain: str) -> str:
    """`domain` (as `bare_domain` returns it) cut to its registrable part: `blog.acme.co.uk` → `acme.co.uk`.

    A host under no known public suffix (`intranet.acme.internal`) is kept whole.
    """
    if domain.count(".") == 1:  # the common `acme.com`: already registrable, or a bare suffix kept whole
        return domain
    return _SUFFIXES.extract_str(domain).top_domain_under_public_suffix or domain


@lru_cache(maxsize=65536)
def normalize_domain(value: str) -> str:
    """Registrable company domain from a URL, an email address or a bare domain; "" when not a domain."""
    parts = _URL_HOST.match(value.strip().lower())
    domain = bare_domain(parts.group(1)) if parts else ""
    return registrable_domain(domain) if domain else ""


def is_free_mail(domain: str) -> bool:
    """Whether `domain` hosts personal mailboxes (gmail.com, yahoo.co.uk, …), not a company."""
    if domain in FREE_MAIL_DOMAINS:
        return True
    brand, _, suffix = domain.partition(".")
    return brand in _FREE_MAIL_BRANDS and len(suffix) <= 6


def _email_and_domain(value: str) -> tuple[str, str]:
    text = value.strip()
    if "<" in text:
        start, end = text.find("<"), text.find(">")
        if end > start:
            text = text[start + 1 : end].strip()
    text = text.lower()
    if text.startswith("mailto:"):
        text = text[7:]
    local, at, host = text.rpartition("@")
    if not at or not local or "@" in local or len(text.split(None, 1)) != 1:
        return "", ""
    domain = bare_domain(host)
    return (text, domain) if domain else ("", "")


def normalize_email(value: str) -> str:
    """Lower-cased address (`Name <a@b.com>` and `mailto:` accepted), or "" when it is not one."""
    return _email_and_domain(value)[0]


def normalize_linkedin_url(value: str) -> str:
    """`https://www.linkedin.com/in/<slug>` for a person profile URL in any spelling, else ""."""
    text = value.strip()
    scheme = text.find("://")
    if scheme != -1:
        if text[:scheme].lower() not in ("http", "https"):
            return ""
        text = text[scheme + 3 :]
    elif text.startswith("//"):
        text = text[2:]
    slash = text.find("/")
    if slash == -1:
        return ""
    host = text[:slash].lower().rpartition("@")[2].partition(":")[0]
    if host != "linkedin.com" and not host.endswith(".linkedin.com"):
        return ""
    path = text[slash:]
    for separator in "?#":
        cut = path.find(separator)
        if cut != -1:
            path = path[:cut]
    parts = [part for part in path.split("/") if part]
    if parts and parts[0].lower() == "mwlite":  # the mobile site
        parts = parts[1:]
    if len(parts) < 2 or parts[0].lower() != "in":
        return ""
    slug = unquote(parts[1]).strip() if "%" in parts[1] else parts[1]
    if not 2 <= len(slug) <= 100 or _SLUG_FORBIDDEN.search(slug):
        return ""
    if not slug.startswith(_MEMBER_ID_PREFIXES):
        slug = slug.lower()
    return LINKEDIN_PROFILE_PREFIX + slug


def _shown(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:40] + "…")


# One branch per field of the contact, in the API's field order.
def _normalize(values: Mapping[str, object]) -> tuple[dict[str, str], list[str]]:  # noqa: C901, PLR0912
    """Normalized contact, plus notes on values that were present but unusable (for reject reasons)."""
    contact: dict[str, str] = {}
    notes: list[str] = []
    get = values.get

    raw = _text(get("linkedin_url"))
    if raw:
        url = normalize_linkedin_url(raw)
        if url:
            contact["linkedin_url"] = url
        else:
            notes.append(f"linkedin_url {_shown(raw)} is not a LinkedIn profile URL")
    for field in ("first_name", "last_name"):
        raw = _text(get(field))
        if raw and any(char.isalpha() for char in raw):
            contact[field] = _collapse(raw)
        elif raw:  # a number (a Parquet int column mapped as a name) would be sent, and paid for
            notes.append(f"{field} {_shown(raw)} is not a name")
    raw = _text(get("company_domain"))
    if raw:
        domain = normalize_domain(raw)
        if domain:
            contact["company_domain"] = domain
        else:
            notes.append(f"company_domain {_shown(raw)} is not a domain")
    raw = _text(get("company_name"))
    if raw:
        contact["company_name"] = _collapse(raw)
    raw = _text(get("email"))
    if raw:
        email, domain = _email_and_domain(raw)
        if email:
            contact["email"] = email
            if "company_domain" not in contact:
                domain = registrable_domain(domain)
                if is_free_mail(domain):
                    notes.append(f"email domain {domain} is free mail, not a company")
                else:
                    contact["company_domain"] = domain
        else:
            notes.append(f"email {_shown(raw)} is not an email address")
    return contact, notes


def normalize_contact(values: Mapping[str, object | None]) -> dict[str, str]:
    """Field → normalized value, only for fields that end up non-empty.

    Names are trimmed with inner whitespace collapsed; company_domain comes from a URL, email or bare
    domain (or, when absent, from the email unless it is free mail); linkedin_url is canonical or dropped.
    """
    return _normalize(values)[0]


def validate_contact(contact: Mapping[str, str]) -> Reject | None:
    """None when the API will accept the contact, else why not (a code and a one-line detail)."""
    for field, value in contact.items():
        if len(value) > MAX_FIELD_CHARS:
            return Reject(
                RejectCode.FIELD_TOO_LONG, f"field {field} is longer than {MAX_FIELD_CHARS} characters"
            )
    if "linkedin_url" in contact:
        return None
    if (
        "first_name" in contact
        and "last_name" in contact
        and ("company_domain" in contact or "company_name" in contact)
    ):
        return None
    has = ", ".join(field for field in FIELDS if field in contact) or "nothing"
    return Reject(
        RejectCode.MISSING_FIELDS,
        "missing fields: needs linkedin_url, or first_name + last_name + company_domain/company_name "
        f"(has: {has})",
    )


def key_part(text: str) -> str:
    part = " ".join(fold_compatible(text).split()).casefold()
    if not part.isascii():
        part = unicodedata.normalize("NFKC", part)  # casefold can decompose (ǰ): composed again
    return part.replace("\\", "\\\\").replace("|", "\\|") if "|" in part or "\\" in part else part


def contact_key(contact: Mapping[str, str]) -> str:
    """Identity used for dedup, the store and the join: `li:<slug>` or `nm:<first>|<last>|<org>`."""
    url = contact.get("linkedin_url", "")
    if url and not url.startswith(LINKEDIN_PROFILE_PREFIX):
        url = normalize_linkedin_url(url)
    if url:
        return ContactKeyKind.LINKEDIN.key(url[len(LINKEDIN_PROFILE_PREFIX) :])
    first, last = contact.get("first_name", ""), contact.get("last_name", "")
    organization = contact.get("company_domain") or contact.get("company_name", "")
    if not (first and last and organization):
        raise ValueError("contact has neither linkedin_url nor first_name + last_name + company")
    return ContactKeyKind.NAME.key(f"{key_part(first)}|{key_part(last)}|{key_part(organization)}")


def api_payload(contact: Mapping[str, str]) -> dict[str, str]:
    """The contact as the API takes it: the five documented fields that are non-empty (no email)."""
    return {field: contact[field] for field in API_FIELDS if contact.get(field)}


@dataclass(frozen=True, slots=True)
class PreparedRow:
    """One source row after preparation: a valid contact has a key, an invalid one a reject."""

    contact: dict[str, str]
    key: str | None
    reject: Reject | None

    @property
    def ok(self) -> bool:
        return self.reject is None

    @property
    def reason(self) -> str | None:
        """The reject's one-line detail, for the rejects file."""
        return self.reject.detail if self.reject is not None else None


def prepare_row(values_by_field: Mapping[str, object | None]) -> PreparedRow:
    """Normalize, validate and key one row given as field → raw value (see HeaderMapping.row_values)."""
    contact, notes = _normalize(values_by_field)
    reject = validate_contact(contact)
    if reject is not None:
        if notes and reject.code is RejectCode.MISSING_FIELDS:
            reject = Reject(reject.code, f"{reject.detail}; ignored: {'; '.join(notes)}")
        return PreparedRow(contact, None, reject)
    return PreparedRow(contact, contact_key(contact), None)
