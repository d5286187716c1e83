"""Header mapping, normalization, validation and contact keys of cleanlist.prepare."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest

from cleanlist.errors import InputError
from cleanlist.prepare import (
    FIELDS,
    HeaderMapping,
    api_payload,
    bundled_suffix_extractor,
    contact_key,
    normalize_contact,
    normalize_domain,
    normalize_email,
    normalize_linkedin_url,
    prepare_row,
    resolve_mapping,
    validate_contact,
)
from cleanlist.vocab import Reject, RejectCode

# ------------------------------------------------------------------------------------------ mapping

REAL_WORLD_HEADERS = [
    # HubSpot contacts export
    (
        ["Record ID", "First Name", "Last Name", "Email", "Company Name", "Website URL", "Phone Number"],
        {
            "first_name": "First Name",
            "last_name": "Last Name",
            "email": "Email",
            "company_name": "Company Name",
            "company_domain": "Website URL",
        },
    ),
    # Salesforce report
    (
        ["First Name", "Last Name", "Account Name", "Website", "Email", "Title"],
        {
            "first_name": "First Name",
            "last_name": "Last Name",
            "company_name": "Account Name",
            "company_domain": "Website",
            "email": "Email",
        },
    ),
    # Apollo export: "Company" beats "Company Name for Emails", "Website" maps to the domain
    (
        [
            "First Name",
            "Last Name",
            "Title",
            "Company",
            "Company Name for Emails",
            "Email",
            "Person Linkedin Url",
            "Website",
        ],
        {
            "first_name": "First Name",
            "last_name": "Last Name",
            "company_name": "Company",
            "email": "Email",
            "linkedin_url": "Person Linkedin Url",
            "company_domain": "Website",
        },
    ),
    # LinkedIn's own connections export
    (
        ["First Name", "Last Name", "URL", "Email Address", "Company", "Position", "Connected On"],
        {
            "first_name": "First Name",
            "last_name": "Last Name",
            "linkedin_url": "URL",
            "email": "Email Address",
            "company_name": "Company",
        },
    ),
    # Pipedrive people export
    (
        [
            "Person - Name",
            "Person - First name",
            "Person - Last name",
            "Person - Organization",
            "Person - Email",
        ],
        {
            "first_name": "Person - First name",
            "last_name": "Person - Last name",
            "company_name": "Person - Organization",
            "email": "Person - Email",
        },
    ),
    # snake_case warehouse table
    (
        ["id", "first_name", "last_name", "company_domain", "linkedin_url"],
        {
            "first_name": "first_name",
            "last_name": "last_name",
            "company_domain": "company_domain",
            "linkedin_url": "linkedin_url",
        },
    ),
    # German CRM with odd spacing and punctuation
    (
        [" Vorname ", "NACHNAME", "Firma", "E-Mail-Adresse", "Webseite"],
        {
            "first_name": " Vorname ",
            "last_name": "NACHNAME",
            "company_name": "Firma",
            "email": "E-Mail-Adresse",
            "company_domain": "Webseite",
        },
    ),
    # French headers with accents; Given name / Surname / Organization spellings
    (["Prénom", "Nom", "Société"], {"first_name": "Prénom", "last_name": "Nom", "company_name": "Société"}),
    (
        ["Given name", "Family name", "Organization", "Work Email"],
        {
            "first_name": "Given name",
            "last_name": "Family name",
            "company_name": "Organization",
            "email": "Work Email",
        },
    ),
    # LinkedIn column alone is enough
    (["LinkedIn Profile", "Notes"], {"linkedin_url": "LinkedIn Profile"}),
    # "Company Domain" beats "Website" (earlier spelling wins)
    (
        ["firstname", "lastname", "Website", "Company Domain"],
        {"first_name": "firstname", "last_name": "lastname", "company_domain": "Company Domain"},
    ),
]


@pytest.mark.parametrize(("headers", "expected"), REAL_WORLD_HEADERS)
def test_real_world_headers_map_to_fields(headers: list[str], expected: dict[str, str]) -> None:
    assert resolve_mapping(headers).fields == expected


def test_describe_is_one_line_in_field_order() -> None:
    mapping = resolve_mapping(["Website", "First Name", "Last Name"])
    assert mapping.describe() == 'first_name←"First Name", last_name←"Last Name", company_domain←"Website"'


def test_row_values_picks_mapped_columns() -> None:
    mapping = resolve_mapping(["First Name", "Last Name", "Company", "Phone"])
    row = {"First Name": "Ada", "Last Name": "Lovelace", "Company": "Analytical", "Phone": "1"}
    assert mapping.row_values(row) == {
        "first_name": "Ada",
        "last_name": "Lovelace",
        "company_name": "Analytical",
    }


def test_override_wins_and_frees_its_header() -> None:
    mapping = resolve_mapping(
        ["Given", "Family", "Website", "Employer"], {"first_name": "Given", "last_name": "Family"}
    )
    assert mapping.fields["first_name"] == "Given"
    assert mapping.fields["last_name"] == "Family"
    assert mapping.fields["company_domain"] == "Website"


def test_override_matches_header_loosely_when_unique() -> None:
    mapping = resolve_mapping(["Vorname X", "Nachname", "Firma"], {"first_name": "vorname x"})
    assert mapping.fields["first_name"] == "Vorname X"


def test_override_of_a_header_used_elsewhere_moves_it() -> None:
    mapping = resolve_mapping(["First Name", "Last Name", "Company", "Website"], {"company_name": "Website"})
    assert mapping.fields["company_name"] == "Website"
    assert "company_domain" not in mapping.fields


def test_empty_override_leaves_field_unmapped() -> None:
    mapping = resolve_mapping(["First Name", "Last Name", "Company", "URL"], {"linkedin_url": ""})
    assert "linkedin_url" not in mapping.fields


def test_override_of_unknown_field_is_an_input_error() -> None:
    with pytest.raises(InputError, match="unknown field 'phone'"):
        resolve_mapping(["First Name", "Last Name", "Company"], {"phone": "Phone"})


def test_override_of_missing_header_is_an_input_error() -> None:
    with pytest.raises(InputError, match='--map first_name="Vorname": the source has no such column'):
        resolve_mapping(["First Name", "Last Name", "Company"], {"first_name": "Vorname"})


@pytest.mark.parametrize(
    "headers",
    [
        ["First Name", "Last Name", "Email", "email"],
        ["First Name", "Last Name", "Company", "Email", "Email.1"],
        ["First Name", "Last Name", "Company", "Email", "Email"],
    ],
)
def test_two_headers_of_one_spelling_are_ambiguous(headers: list[str]) -> None:
    with pytest.raises(InputError, match=r'look like email .*--map email="Email"') as error:
        resolve_mapping(headers)
    assert "\n" not in str(error.value)


def test_ambiguity_resolved_by_override() -> None:
    mapping = resolve_mapping(["First Name", "Last Name", "Email", "email"], {"email": "email"})
    assert mapping.fields["email"] == "email"


def test_suffixed_header_without_its_base_is_not_a_duplicate() -> None:
    mapping = resolve_mapping(["First Name", "Last Name", "Company", "Email 1"])
    assert mapping.fields["email"] == "Email 1"


@pytest.mark.parametrize(
    "headers",
    [
        ["id", "phone", "notes"],
        ["First Name", "Company"],  # no last name, no LinkedIn: no row could ever be valid
        ["First Name", "Last Name"],
        [],
    ],
)
def test_nothing_usable_is_an_input_error_naming_headers(headers: list[str]) -> None:
    with pytest.raises(InputError, match="no columns to build contacts from") as error:
        resolve_mapping(headers)
    message = str(error.value)
    assert "\n" not in message
    assert '"LinkedIn URL"' in message
    for header in headers:
        assert f'"{header}"' in message


def test_headers_seen_are_truncated_in_the_message() -> None:
    headers = [f"col{i}" for i in range(40)]
    with pytest.raises(InputError, match=r"\(\+28 more\)"):
        resolve_mapping(headers)


# ------------------------------------------------------------------------------------ normalization


@pytest.mark.parametrize(
    ("raw", "domain"),
    [
        ("acme.com", "acme.com"),
        ("ACME.COM", "acme.com"),
        ("  www.acme.com  ", "acme.com"),
        ("https://www.acme.com/", "acme.com"),
        ("http://acme.com/about/team?ref=x#top", "acme.com"),
        ("https://shop.acme.co.uk:8443/path", "acme.co.uk"),
        ("acme.com:80", "acme.com"),
        ("https://user:secret@acme.io/", "acme.io"),
        ("jane.doe@Acme.com", "acme.com"),
        ("mailto:jane@acme.com", "acme.com"),
        ("acme.com.", "acme.com"),
        ("//acme.com/x", "acme.com"),
        ("www2.acme.com", "acme.com"),
        ("www.com", "www.com"),
        ("müller-bau.de", "xn--mller-bau-q9a.de"),
        ("https://BÜCHER.example/", "xn--bcher-kva.example"),
        ("acme", ""),
        ("acme .com", ""),
        ("Acme Inc.", ""),
        ("192.168.0.1", ""),
        ("http://", ""),
        ("acme.com:abc", ""),
        ("-acme.com", ""),
        ("acme..com", ""),
        ("", ""),
    ],
)
def test_domain_normalization(raw: str, domain: str) -> None:
    assert normalize_domain(raw) == domain


@pytest.mark.parametrize(
    ("raw", "url"),
    [
        ("https://www.linkedin.com/in/jane-doe", "https://www.linkedin.com/in/jane-doe"),
        ("http://linkedin.com/in/Jane-Doe/", "https://www.linkedin.com/in/jane-doe"),
        ("linkedin.com/in/jane-doe", "https://www.linkedin.com/in/jane-doe"),
        ("www.linkedin.com/in/jane-doe/?originalSubdomain=de", "https://www.linkedin.com/in/jane-doe"),
        ("https://de.linkedin.com/in/jane-doe-12345678/", "https://www.linkedin.com/in/jane-doe-12345678"),
        ("https://www.linkedin.com/mwlite/in/jane-doe", "https://www.linkedin.com/in/jane-doe"),
        ("https://www.linkedin.com/in/jane-doe/details/experience/", "https://www.linkedin.com/in/jane-doe"),
        ("HTTPS://WWW.LINKEDIN.COM/IN/JANE-DOE", "https://www.linkedin.com/in/jane-doe"),
        ("https://www.linkedin.com/in/j%C3%BCrgen-m%C3%BCller", "https://www.linkedin.com/in/jürgen-müller"),
        ("https://www.linkedin.com/in/jane-doe#about", "https://www.linkedin.com/in/jane-doe"),
        # member-id slugs are case-sensitive and keep their case
        ("https://www.linkedin.com/in/ACoAABcdEfG", "https://www.linkedin.com/in/ACoAABcdEfG"),
        ("https://www.linkedin.com/company/acme", ""),
        ("https://www.linkedin.com/sales/lead/ACwAAA123,NAME_SEARCH,x", ""),
        ("https://www.linkedin.com/in/", ""),
        ("https://example.com/in/jane-doe", ""),
        ("https://notlinkedin.com/in/jane-doe", ""),
        ("ftp://linkedin.com/in/jane-doe", ""),
        ("jane-doe", ""),
        ("https://www.linkedin.com/in/jane doe", ""),
    ],
)
def test_linkedin_canonicalization(raw: str, url: str) -> None:
    assert normalize_linkedin_url(raw) == url


@pytest.mark.parametrize(
    ("raw", "email"),
    [
        ("Jane.Doe@Acme.COM", "jane.doe@acme.com"),
        ("  jane@acme.com ", "jane@acme.com"),
        ("Jane Doe <jane@acme.com>", "jane@acme.com"),
        ("mailto:jane@acme.com", "jane@acme.com"),
        ("jane.acme.com", ""),
        ("@acme.com", ""),
        ("jane@", ""),
        ("jane@acme", ""),
        ("ja ne@acme.com", ""),
    ],
)
def test_email_normalization(raw: str, email: str) -> None:
    assert normalize_email(raw) == email


@pytest.mark.parametrize(
    "empty", [None, "", "  ", "nan", "NaN", "None", "null", "NULL", "n/a", "N/A", "-", math.nan]
)
def test_null_likes_are_empty(empty: object) -> None:
    assert normalize_contact({"first_name": empty, "company_name": empty}) == {}


def test_pandas_missing_markers_are_empty() -> None:
    pd = pytest.importorskip("pandas")
    assert normalize_contact({"first_name": pd.NA, "last_name": pd.NaT, "company_name": pd.NA}) == {}


def test_nan_as_a_given_name_stays() -> None:
    assert normalize_contact({"first_name": "Nan"}) == {"first_name": "Nan"}


def test_names_are_trimmed_and_whitespace_collapsed() -> None:
    contact = normalize_contact(
        {"first_name": "  Mary\t Ann ", "last_name": "van  der\nBerg", "company_name": " Acme   AG "}
    )
    assert contact == {"first_name": "Mary Ann", "last_name": "van der Berg", "company_name": "Acme AG"}


def test_non_string_values_become_text() -> None:
    # A number is no name (it is dropped with a note); as a company it is kept as text.
    assert normalize_contact({"first_name": 42, "last_name": 7.0, "company_name": 3.5}) == {
        "company_name": "3.5"
    }


def test_company_domain_derived_from_work_email() -> None:
    contact = normalize_contact({"first_name": "Jane", "last_name": "Doe", "email": "Jane@Sub.Acme.com"})
    assert contact["company_domain"] == "acme.com"
    assert contact["email"] == "jane@sub.acme.com"


@pytest.mark.parametrize(
    "email",
    ["jane@gmail.com", "jane@GMX.de", "jane@yahoo.co.uk", "jane@hotmail.fr", "jane@proton.me", "j@163.com"],
)
def test_free_mail_gives_no_company_domain(email: str) -> None:
    assert "company_domain" not in normalize_contact({"email": email})


def test_explicit_domain_beats_email_domain() -> None:
    contact = normalize_contact({"company_domain": "https://acme.com", "email": "jane@acme-mail.com"})
    assert contact["company_domain"] == "acme.com"


def test_invalid_domain_falls_back_to_email() -> None:
    contact = normalize_contact({"company_domain": "n.a. (see notes)", "email": "jane@acme.com"})
    assert contact["company_domain"] == "acme.com"


def test_invalid_email_is_dropped() -> None:
    assert normalize_contact({"email": "not an email"}) == {}


def test_non_profile_linkedin_is_dropped_and_row_judged_on_the_rest() -> None:
    row = prepare_row(
        {
            "linkedin_url": "https://www.linkedin.com/company/acme",
            "first_name": "Jane",
            "last_name": "Doe",
            "company_name": "Acme",
        }
    )
    assert row.ok
    assert "linkedin_url" not in row.contact
    assert row.key == "nm:jane|doe|acme"


# -------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "contact",
    [
        {"linkedin_url": "https://www.linkedin.com/in/jane"},
        {"first_name": "Jane", "last_name": "Doe", "company_domain": "acme.com"},
        {"first_name": "Jane", "last_name": "Doe", "company_name": "Acme"},
    ],
)
def test_documented_rule_accepts(contact: dict[str, str]) -> None:
    assert validate_contact(contact) is None


@pytest.mark.parametrize(
    ("contact", "has"),
    [
        ({}, "nothing"),
        ({"first_name": "Jane"}, "first_name"),
        ({"first_name": "Jane", "last_name": "Doe"}, "first_name, last_name"),
        ({"first_name": "Jane", "company_name": "Acme"}, "first_name, company_name"),
        (
            {"last_name": "Doe", "company_domain": "acme.com", "email": "x@acme.com"},
            "last_name, company_domain, email",
        ),
    ],
)
def test_documented_rule_rejects_with_reason(contact: dict[str, str], has: str) -> None:
    assert validate_contact(contact) == Reject(
        RejectCode.MISSING_FIELDS,
        "missing fields: needs linkedin_url, or first_name + last_name + company_domain/company_name "
        f"(has: {has})",
    )


def test_over_long_field_is_rejected() -> None:
    contact = {"first_name": "Jane", "last_name": "Doe", "company_name": "A" * 2049}
    assert validate_contact(contact) == Reject(
        RejectCode.FIELD_TOO_LONG, "field company_name is longer than 2048 characters"
    )
    assert validate_contact({**contact, "company_name": "A" * 2048}) is None


def test_reject_reason_explains_dropped_values_on_one_line() -> None:
    row = prepare_row(
        {"first_name": "Jane", "last_name": "Doe", "company_domain": "acme\nrocks", "email": "jane@gmail.com"}
    )
    assert row.key is None
    assert row.reason is not None
    assert row.reason.startswith("missing fields:")
    assert "company_domain 'acme\\nrocks' is not a domain" in row.reason
    assert "email domain gmail.com is free mail" in row.reason
    assert "\n" not in row.reason


# --------------------------------------------------------------------------------------------- keys


def test_same_person_in_two_spellings_has_one_key() -> None:
    a = prepare_row(
        {"first_name": "  Jürgen ", "last_name": "MÜLLER", "company_domain": "https://www.Acme.de/"}
    )
    b = prepare_row({"first_name": "jürgen", "last_name": "Müller", "email": "j.mueller@acme.de"})
    assert a.key == b.key == "nm:jürgen|müller|acme.de"


def test_decomposed_accents_key_like_composed() -> None:
    composed = prepare_row({"first_name": "Zoë", "last_name": "Doe", "company_name": "Acme"})
    decomposed = prepare_row({"first_name": "Zoe\u0308", "last_name": "Doe", "company_name": "Acme"})
    assert composed.key == decomposed.key


# One José García as CRM exports and keyboards spell him: full-width letters, a zero-width space, a BOM,
# a zero-width joiner, a right-to-left override, a word joiner, bidi isolates and marks.
JOSE_SPELLINGS = [
    {"first_name": "José", "last_name": "García", "company_name": "Acme"},
    {"first_name": "Ｊｏｓé", "last_name": "Ｇａｒｃíａ", "company_name": "Ａｃｍｅ"},
    {"first_name": "Jo\u200bsé", "last_name": "García", "company_name": "Acme"},
    {"first_name": "\ufeffJosé", "last_name": "Garc\u200día", "company_name": "Acme\u2060"},
    {"first_name": "\u202eJosé\u202c", "last_name": "\u2066García\u2069", "company_name": "\u200eAcme\u200f"},
    {"first_name": "Jose\u0301", "last_name": "\u202aGARCÍA\u202c", "company_name": "\u200cAcme"},
]


def test_invisible_characters_and_full_width_letters_key_one_person() -> None:
    rows = [prepare_row(values) for values in JOSE_SPELLINGS]
    assert {row.key for row in rows} == {"nm:josé|garcía|acme"}
    # What is sent is the visible name too: the API is not asked about "Jo\u200bsé".
    assert {row.contact["first_name"] for row in rows} == {"José"}
    assert {row.contact["company_name"] for row in rows} == {"Acme"}


def test_full_width_and_invisible_characters_in_a_domain_key_one_company() -> None:
    plain = prepare_row({"first_name": "Jane", "last_name": "Doe", "company_domain": "acme.com"})
    wide = prepare_row({"first_name": "Jane", "last_name": "Doe", "company_domain": "ａｃｍｅ．ｃｏｍ"})
    hidden = prepare_row({"first_name": "Jane", "last_name": "Doe", "company_domain": "\ufeffac\u200bme.com"})
    assert plain.key == wide.key == hidden.key == "nm:jane|doe|acme.com"


def test_a_name_of_invisible_characters_only_is_empty() -> None:
    row = prepare_row({"first_name": "\u200b\ufeff", "last_name": "Doe", "company_name": "Acme"})
    assert row.reject is not None and row.reject.code is RejectCode.MISSING_FIELDS


def test_linkedin_key_ignores_url_spelling_and_other_fields() -> None:
    a = prepare_row({"linkedin_url": "de.linkedin.com/in/Jane-Doe/?trk=x", "first_name": "Jane"})
    b = prepare_row({"linkedin_url": "https://www.linkedin.com/in/jane-doe", "company_name": "Other"})
    assert a.key == b.key == "li:jane-doe"


def test_key_prefers_domain_over_company_name() -> None:
    contact = {"first_name": "Jane", "last_name": "Doe", "company_domain": "acme.com", "company_name": "Acme"}
    assert contact_key(contact) == "nm:jane|doe|acme.com"


def test_key_escapes_the_separator() -> None:
    a = contact_key({"first_name": "a|b", "last_name": "c", "company_name": "d"})
    b = contact_key({"first_name": "a", "last_name": "b|c", "company_name": "d"})
    assert a != b


def test_key_of_contact_without_identity_is_a_bug() -> None:
    with pytest.raises(ValueError):
        contact_key({"first_name": "Jane"})


def test_keys_are_deterministic() -> None:
    values = {"first_name": "Ana", "last_name": "Lima", "company_name": "Ácme  Ltda"}
    assert {prepare_row(values).key for _ in range(3)} == {"nm:ana|lima|ácme ltda"}


# ---------------------------------------------------------------------------------------- payload


def test_payload_has_only_api_fields_and_never_email() -> None:
    row = prepare_row(
        {
            "linkedin_url": "linkedin.com/in/jane",
            "first_name": "Jane",
            "last_name": "",
            "email": "jane@acme.com",
        }
    )
    assert api_payload(row.contact) == {
        "linkedin_url": "https://www.linkedin.com/in/jane",
        "first_name": "Jane",
        "company_domain": "acme.com",
    }


def test_fields_constant_lists_api_fields_and_email() -> None:
    assert FIELDS == ("linkedin_url", "first_name", "last_name", "company_domain", "company_name", "email")
    assert isinstance(resolve_mapping(["LinkedIn"]), HeaderMapping)


@pytest.mark.parametrize("value", [110, 1.1, "42", " 007 ", "1.10"])
def test_a_name_without_a_letter_is_not_sent(value: object) -> None:
    row = prepare_row({"first_name": value, "last_name": "Doe", "company_domain": "acme.com"})
    assert row.key is None and row.reject is not None
    assert row.reject.code is RejectCode.MISSING_FIELDS and "is not a name" in row.reject.detail


def test_names_in_any_script_are_names() -> None:
    row = prepare_row({"first_name": "Иван", "last_name": "李", "company_name": "3M"})
    assert row.key is not None and row.contact["first_name"] == "Иван"


# ------------------------------------------------------------------------------ registrable domains


@pytest.mark.parametrize(
    ("raw", "domain"),
    [
        ("https://blog.acme.co.uk/about", "acme.co.uk"),
        ("jane@mail.acme.com", "acme.com"),
        ("eu.shop.acme.com.au", "acme.com.au"),
        ("www.blog.acme.de", "acme.de"),
        ("acme.github.io", "acme.github.io"),  # a private suffix: each tenant is a company of its own
        ("docs.acme.github.io", "acme.github.io"),
        ("intranet.acme.internal", "intranet.acme.internal"),  # no known suffix: kept whole
        ("co.uk", "co.uk"),  # a bare suffix has no registrable part: kept as given
    ],
)
def test_company_domain_is_cut_to_its_registrable_part(raw: str, domain: str) -> None:
    assert normalize_domain(raw) == domain


def test_email_domain_is_cut_before_the_free_mail_check() -> None:
    contact = normalize_contact({"first_name": "Jane", "last_name": "Doe", "email": "jane@mail.yahoo.co.uk"})
    assert "company_domain" not in contact
    contact = normalize_contact({"first_name": "Jane", "last_name": "Doe", "email": "jane@eu.mail.acme.com"})
    assert contact["company_domain"] == "acme.com"
    assert contact["email"] == "jane@eu.mail.acme.com"  # the address itself is kept whole


def test_subdomains_of_one_company_share_a_contact_key() -> None:
    keys = {
        contact_key(normalize_contact({"first_name": "Jane", "last_name": "Doe", "company_domain": raw}))
        for raw in ("https://blog.acme.co.uk/about", "acme.co.uk", "www.shop.acme.co.uk")
    }
    assert keys == {"nm:jane|doe|acme.co.uk"}


def test_suffix_list_is_read_without_network_or_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The extractor prepare.py builds loads the bundled list: no socket is opened, no cache written."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the suffix list tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("TLDEXTRACT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path))
    fresh = bundled_suffix_extractor()
    assert fresh.extract_str("blog.acme.co.uk").top_domain_under_public_suffix == "acme.co.uk"
    assert list(tmp_path.iterdir()) == []
