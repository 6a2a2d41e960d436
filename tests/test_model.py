import base64
import hashlib

import pytest

from optout.model import Classification, Kind, Message, Scope, drop_hash, normalise_address
from optout.parse import parse_message


@pytest.mark.parametrize("spelling", [
    "ann@example.net",
    "  ann@example.net  ",
    "<ann@example.net>",
    " < ann@example.net > ",
    "\tann@example.net\r\n",
    "ANN@EXAMPLE.NET",
    "Ann@Example.Net",
    "ann@example.net.",
])
def test_normalise_address_trims_unwraps_and_lower_cases(spelling):
    assert normalise_address(spelling) == "ann@example.net"


def test_normalise_address_lower_cases_the_local_part_too():
    assert normalise_address("Ann.Example+News@example.net") == "ann.example+news@example.net"


def test_normalise_address_encodes_an_international_domain_as_punycode():
    assert normalise_address("ann@bücher.example") == "ann@xn--bcher-kva.example"


def test_normalise_address_gives_one_form_for_any_case_of_an_international_domain():
    assert normalise_address("ANN@BÜCHER.EXAMPLE") == normalise_address("ann@bücher.example")


def test_normalise_address_without_at_sign_is_only_trimmed_and_lower_cased():
    assert normalise_address("  Not An Address ") == "not an address"
    assert normalise_address("") == ""


def test_drop_hash_is_base64_of_sha256_of_the_normalised_address():
    expected = base64.b64encode(hashlib.sha256(b"ann@example.net").digest()).decode("ascii")

    assert drop_hash("ann@example.net") == expected
    assert len(base64.b64decode(drop_hash("ann@example.net"))) == 32


@pytest.mark.parametrize("spelling", ["ANN@Example.NET", "  ann@example.net ", "<Ann@example.net>", "ann@example.net."])
def test_drop_hash_is_the_same_for_every_spelling_of_one_address(spelling):
    assert drop_hash(spelling) == drop_hash("ann@example.net")


def test_drop_hash_differs_between_addresses():
    assert drop_hash("ann@example.net") != drop_hash("bob@example.net")


def test_drop_hash_of_an_international_domain_hashes_the_punycode_form():
    expected = base64.b64encode(hashlib.sha256(b"ann@xn--bcher-kva.example").digest()).decode("ascii")

    assert drop_hash("ann@bücher.example") == expected


def test_message_key_is_message_id_plus_content_hash():
    message = Message(sha256="a" * 64, size=10, content_hash="b" * 64, message_id="<m1@example.net>")

    assert message.key.startswith("<m1@example.net>")
    assert "b" * 16 in message.key
    assert "a" * 16 not in message.key


def test_message_key_differs_for_the_same_message_id_with_different_content():
    first = Message(sha256="a" * 64, size=10, content_hash="b" * 64, message_id="<m1@example.net>")
    second = Message(sha256="a" * 64, size=10, content_hash="c" * 64, message_id="<m1@example.net>")

    assert first.key != second.key


def test_message_key_differs_for_the_same_content_with_different_message_ids():
    first = Message(sha256="a" * 64, size=10, content_hash="b" * 64, message_id="<m1@example.net>")
    second = Message(sha256="a" * 64, size=10, content_hash="b" * 64, message_id="<m2@example.net>")

    assert first.key != second.key


def test_message_key_without_message_id_is_the_content_hash_alone():
    message = Message(sha256="a" * 64, size=10, content_hash="b" * 64)

    assert message.key == "b" * 64


def test_message_key_of_parsed_mail_without_message_id_is_its_content_hash(mail):
    message = parse_message(mail("Please unsubscribe me.", message_id=None))

    assert message.message_id is None
    assert message.key == message.content_hash
    assert len(message.key) == 64


def test_message_key_of_parsed_mail_carries_its_message_id(mail):
    message = parse_message(mail("Please unsubscribe me.", message_id="<abc.123@example.net>"))

    assert message.key.startswith("<abc.123@example.net>")


@pytest.mark.parametrize("scopes, expected", [
    ((Scope.ALL,), "all"),
    ((Scope.NEWSLETTERS,), "newsletters"),
    ((Scope.NEWSLETTERS, Scope.PARTNERS), "newsletters,partners"),
    ((), None),
])
def test_classification_scope_joins_the_scopes_into_one_string(scopes, expected):
    classification = Classification(Kind.OPT_OUT, "unsubscribe", "words.opt-out", 0.8, scopes)

    assert classification.scope == expected


def test_kind_values_are_the_strings_the_cli_prints():
    assert [kind.value for kind in Kind] == ["opt-out", "access", "deletion", "other"]
