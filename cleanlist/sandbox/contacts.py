"""What the sandbox 'finds' for a contact: a pure function of the contact's identity and the hit rates.

Every answer is drawn from sha256 of the normalized identity (lower-cased linkedin_url, else
first|last|domain-or-company), never from a RNG, so the same contact gets the same email, phone and
email status in every run and every sandbox with the same rates. The seed plays no part here.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

# Sandbox companies for contacts that come without one (LinkedIn-only). `.example` is reserved (RFC 2606),
# so no address the sandbox makes up can belong to anyone.
_COMPANIES: tuple[tuple[str, str], ...] = (
    ("Acme Corporation", "acme.example"),
    ("Globex", "globex.example"),
    ("Initech", "initech.example"),
    ("Umbrella Analytics", "umbrella-analytics.example"),
    ("Hooli", "hooli.example"),
    ("Vandelay Industries", "vandelay.example"),
    ("Stark Logistics", "stark-logistics.example"),
    ("Wayne Ventures", "wayne-ventures.example"),
)
_FIRST_NAMES = ("alex", "sam", "jordan", "taylor", "morgan", "casey", "riley", "jamie")
_LAST_NAMES = ("smith", "garcia", "chen", "novak", "okafor", "silva", "weber", "kowalski")
_EMAIL_STATUSES = ("reliable", "risky", "unknown")
_FIELD_SEP = "\x1f"
_UNIT = float(1 << 32)


class ContactIn(BaseModel):
    """One contact as the bulk endpoint accepts it; unknown fields are ignored, as the API does."""

    model_config = ConfigDict(extra="ignore")

    linkedin_url: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    company_domain: str | None = None
    company_name: str | None = None
    email: str | None = None

    def is_identifiable(self) -> bool:
        """The documented field rule: linkedin_url, or first + last + (domain or company name)."""
        if _filled(self.linkedin_url):
            return True
        return (
            _filled(self.first_name)
            and _filled(self.last_name)
            and (_filled(self.company_domain) or _filled(self.company_name))
        )


def _filled(value: str | None) -> bool:
    return value is not None and value.strip() != ""


@dataclass(frozen=True, slots=True)
class ContactRecord:
    """The stripped identifying fields of an accepted contact ('' when absent)."""

    linkedin_url: str
    first_name: str
    last_name: str
    company_domain: str
    company_name: str

    @classmethod
    def from_input(cls, contact: ContactIn) -> ContactRecord:
        """Keep only what identifies the contact and what the results echo back."""

        def clean(value: str | None) -> str:
            return (value or "").strip().replace(_FIELD_SEP, " ")

        return cls(
            clean(contact.linkedin_url),
            clean(contact.first_name),
            clean(contact.last_name),
            clean(contact.company_domain),
            clean(contact.company_name),
        )

    def pack(self) -> str:
        """One string per stored contact: a million of them must fit in a few hundred MB."""
        return _FIELD_SEP.join(
            (self.linkedin_url, self.first_name, self.last_name, self.company_domain, self.company_name)
        )

    @classmethod
    def unpack(cls, packed: str) -> ContactRecord:
        """Inverse of `pack`."""
        linkedin_url, first, last, domain, company = packed.split(_FIELD_SEP)
        return cls(linkedin_url, first, last, domain, company)

    def identity(self) -> str:
        """Normalized identity: lower-cased linkedin_url, else first|last|domain-or-company."""
        if self.linkedin_url:
            return "li:" + self.linkedin_url.lower()
        organization = self.company_domain or self.company_name
        return f"nm:{self.first_name.lower()}|{self.last_name.lower()}|{organization.lower()}"


@dataclass(frozen=True, slots=True)
class Lookup:
    """What exists to be found for a contact, whatever the enrichment type asks for."""

    digest: bytes
    """sha256 of the identity; the later lanes pick names and companies the input lacks."""
    identity_key: int
    """64 bits of the digest: compact enough to remember every contact ever accepted."""
    email_found: bool
    phone_found: bool
    email_status: str
    has_other_email: bool
    phone_number: str


def lookup(record: ContactRecord, find_rate: float, phone_rate: float) -> Lookup:
    """Derive the contact's findings from its identity digest; each byte lane decides one thing."""
    digest = hashlib.sha256(record.identity().encode()).digest()
    email_draw = int.from_bytes(digest[0:4]) / _UNIT
    phone_draw = int.from_bytes(digest[4:8]) / _UNIT
    status_draw = digest[8] % 100
    email_status = "reliable" if status_draw < 70 else "risky" if status_draw < 90 else "unknown"
    # Area code 555 is not assigned, so a made-up number reaches no one.
    phone_number = f"+1555{int.from_bytes(digest[10:14]) % 10_000_000:07d}"
    return Lookup(
        digest=digest,
        identity_key=int.from_bytes(digest[16:24]),
        email_found=email_draw < find_rate,
        phone_found=phone_draw < phone_rate,
        email_status=email_status,
        has_other_email=digest[9] % 4 == 0,
        phone_number=phone_number,
    )


@dataclass(frozen=True, slots=True)
class Person:
    """The prospect and company the sandbox reports for a found contact."""

    first_name: str
    last_name: str
    company_name: str
    company_domain: str


def _slug_names(linkedin_url: str) -> list[str]:
    slug = linkedin_url.rstrip("/").rsplit("/", 1)[-1]
    return [part for part in re.split(r"[^a-zA-Z]+", slug) if part]


def _domain_from_company(company_name: str) -> str:
    stem = re.sub(r"[^a-z0-9]+", "", company_name.lower())
    return f"{stem or 'company'}.example"


def person_for(record: ContactRecord, digest: bytes) -> Person:
    """Fill in what the input lacks: names from the LinkedIn slug, a company from the digest."""
    first, last = record.first_name, record.last_name
    if not (first and last):
        # Only the names made up here are capitalized: a name that was sent is echoed as sent.
        parts = _slug_names(record.linkedin_url)
        if not first:
            first = (parts[0] if parts else _FIRST_NAMES[digest[24] % len(_FIRST_NAMES)]).capitalize()
        if not last:
            last = (parts[1] if len(parts) > 1 else _LAST_NAMES[digest[25] % len(_LAST_NAMES)]).capitalize()
    company_name, company_domain = record.company_name, record.company_domain
    if not company_domain:
        if company_name:
            company_domain = _domain_from_company(company_name)
        else:
            company_name, company_domain = _COMPANIES[digest[26] % len(_COMPANIES)]
    if not company_name:
        company_name = company_domain.split(".")[0].replace("-", " ").title()
    return Person(first, last, company_name, company_domain.lower())


def _local_part(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", name.lower()) or "contact"


def emails_for(person: Person, with_other: bool) -> tuple[str, list[str]]:
    """first.last@domain, plus flast@domain as the occasional second address."""
    first, last = _local_part(person.first_name), _local_part(person.last_name)
    primary = f"{first}.{last}@{person.company_domain}"
    others = [f"{first[0]}{last}@{person.company_domain}"] if with_other else []
    return primary, others


def prospect_dict(record: ContactRecord, person: Person | None) -> dict[str, Any]:
    """The `prospect` object: what was found, else what was sent (None for absent fields)."""
    first = person.first_name if person else record.first_name or None
    last = person.last_name if person else record.last_name or None
    full_name = " ".join(name for name in (first, last) if name) or None
    return {
        "first_name": first,
        "last_name": last,
        "full_name": full_name,
        "linkedin_url": record.linkedin_url or None,
    }


def company_dict(record: ContactRecord, person: Person | None) -> dict[str, Any]:
    """The `company` object: what was found, else what was sent."""
    if person:
        return {"name": person.company_name, "domain": person.company_domain}
    return {"name": record.company_name or None, "domain": record.company_domain or None}
