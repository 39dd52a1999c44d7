import pytest

from data_filters.pii import find_pii, redact_pii


def kinds(text):
    return [(s.kind, s.text) for s in find_pii(text)]


@pytest.mark.parametrize("text, kind, value", [
    ("mail me at jane.doe+news@mail.example.co.uk today", "email", "jane.doe+news@mail.example.co.uk"),
    ("call +44 20 7946 0958 now", "phone", "+44 20 7946 0958"),
    ("US office: (415) 555-2671", "phone", "(415) 555-2671"),
    ("Appelez le 01 42 68 53 00 demain", "phone", "01 42 68 53 00"),
    ("phone: 4155552671", "phone", "4155552671"),
    ("card 4111 1111 1111 1111 exp 12/27", "credit_card", "4111 1111 1111 1111"),
    ("amex 3782-822463-10005", "credit_card", "3782-822463-10005"),
    ("SSN 536-22-8726 on file", "us_ssn", "536-22-8726"),
    ("IBAN GB82 WEST 1234 5698 7654 32 and more", "iban", "GB82 WEST 1234 5698 7654 32"),
    ("pay DE89370400440532013000", "iban", "DE89370400440532013000"),
    ("server at 203.0.113.77 is down", "ip_address", "203.0.113.77"),
    ("ssh to 2001:db8:85a3::8a2e:370:7334 please", "ip_address", "2001:db8:85a3::8a2e:370:7334"),
    ("key AKIAIOSFODNN7EXAMPLE", "secret", "AKIAIOSFODNN7EXAMPLE"),
    ("token ghp_" + "a1B2" * 9, "secret", "ghp_" + "a1B2" * 9),
    ("gitlab glpat-xxxxxxxxxxxxxxxxxxxxxxxx1", "secret", "glpat-xxxxxxxxxxxxxxxxxxxxxxxx1"),
    ("gitlab deploy gldt-" + "Ab1_" * 6, "secret", "gldt-" + "Ab1_" * 6),
    # A fine-grained GitHub token holds neither "gh" nor "gl": its own prefix lets it through.
    ("export GH=github_pat_" + "Ab1" * 24, "secret", "github_pat_" + "Ab1" * 24),
    ("slack xoxb-123456789012-abcdefghijkl", "secret", "xoxb-123456789012-abcdefghijkl"),
    ('password = "hunter2pass"', "secret", "hunter2pass"),
    ("api_key: 9f8e7d6c5b4a39281706", "secret", "9f8e7d6c5b4a39281706"),
    ("db postgres://admin:s3cr3tP4ss@db.internal:5432/app", "url_credentials", "admin:s3cr3tP4ss"),
])
def test_finds_each_kind(text, kind, value):
    assert (kind, value) in kinds(text)


def test_finds_jwt_and_private_key_block():
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
    key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----"
    found = kinds(f"Authorization: Bearer {jwt}\n{key}\n")
    assert ("secret", jwt) in found
    assert ("secret", key) in found


@pytest.mark.parametrize("text", [
    "Upgrade to version 1.2.3.4 or 10.0.19041",
    "The meeting is on 2023-10-05 at 14:30, or 05/10/2023.",
    "123 + 456 = 579 and 1234 * 5678 = 7006652",
    "Order number 48213957 shipped; tracking 1234567890123.",
    "commit 3f786850e387550fdab836ed7e6dc881de23001b fixed it",
    "sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "The population grew from 1 000 000 to 12 345 678.",
    "Use std::vector<int> and a::b in C++.",
    "The MAC is 00:1A:2B:3C:4D:5E.",
    "Pi is 3.14159265358979 and e is 2.718281828.",
    "retina icon@2x.png and logo@3x.jpg",
    "password = os.environ['DB_PASSWORD']",
    "api_key = get_api_key()",
    'password: "<YOUR_PASSWORD>"',
    "localhost is 127.0.0.1 and the LAN router is 0.0.0.0",
    "It costs $1,299.99 and weighs 12.5 kg.",
    "ISBN 978-3-16-148410-0",
    "Call me at 5 pm, my room is 1204.",
])
def test_no_false_positives(text):
    assert find_pii(text) == []


def test_luhn_invalid_card_is_not_a_card():
    assert not [s for s in find_pii("card 4111 1111 1111 1112") if s.kind == "credit_card"]


def test_iban_with_bad_checksum_is_not_an_iban():
    assert not [s for s in find_pii("IBAN GB83 WEST 1234 5698 7654 32") if s.kind == "iban"]


def test_never_issued_ssn_is_not_an_ssn():
    assert find_pii("id 000-12-3456 and 666-12-3456 and 123-45-6789") == []


def test_spans_index_the_text():
    text = "write to a@b.org or +1 415 555 2671"
    for s in find_pii(text):
        assert text[s.start:s.end] == s.text


def test_redaction_is_exact():
    text = ("Email ana@example.org, phone +1 415 555 2671, card 4111-1111-1111-1111, "
            "ssn 536-22-8726, ip 203.0.113.77, db mysql://root:pa55word@host/db, "
            "key AKIAIOSFODNN7EXAMPLE.")
    assert redact_pii(text) == (
        "Email <EMAIL>, phone <PHONE>, card <CREDIT_CARD>, ssn <US_SSN>, ip <IP_ADDRESS>, "
        "db mysql://<CREDENTIALS>@host/db, key <SECRET>.")


def test_redaction_keeps_text_without_pii_unchanged():
    text = "Nothing here: version 2.0.1, 3 + 4 = 7."
    assert redact_pii(text) == text


def test_kinds_restrict_the_search():
    text = "a@b.org +1 415 555 2671"
    assert [s.kind for s in find_pii(text, kinds=["email"])] == ["email"]


@pytest.mark.parametrize("text", [
    "The final score was 102-98-112 after overtime.",
    "Read pages 120-345-678 of the book.",
    "Pages 1203-1345 cover the topic.",
    "Results: 21-19-25-23-15",
    "Released in 2019-2021-2023, then retired.",
    "We won 110-102 and lost 98-101-103.",
    "Season record 212-555-1234 wins",
    "See figures 212-344-5678 for details",
    "my driver's license number is 2270-66-1551",
])
def test_numbers_joined_by_dashes_outside_phone_contexts_are_not_phones(text):
    assert "phone" not in [k for k, _ in kinds(text)], text


@pytest.mark.parametrize("text", [
    "Call me at 555-123-4567.",
    "my number is 415-555-2671",
    "reach the desk on 020 7946 0958",
    "Office: +1-202-555-0143",
    "dial 415-555-2671 tomorrow",
])
def test_phones_written_with_dashes_are_still_found(text):
    assert "phone" in [k for k, _ in kinds(text)], text


def test_redaction_writes_back_into_the_text_part_it_found_pii_in():
    import copy

    from data_filters.config import PiiConfig
    from data_filters.pii import PiiFilter
    from data_filters.rows import row_turns

    row = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Mail me at "}, {"type": "text", "text": "ana@example.org"},
                                     {"type": "text", "text": " or call +1 415 555 2671"}]},
        {"role": "assistant", "content": "Done."}]}
    original = copy.deepcopy(row)
    rewrite = PiiFilter(PiiConfig())(row, row_turns(row))
    assert rewrite.row["messages"][0]["content"] == [
        {"type": "text", "text": "Mail me at "}, {"type": "text", "text": "<EMAIL>"}, {"type": "text", "text": " or call <PHONE>"}]
    assert rewrite.row["messages"][1] == {"role": "assistant", "content": "Done."}
    assert row == original  # the input row is not changed in place
    assert rewrite.changes == {"email": 1, "phone": 1}
