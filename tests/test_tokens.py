import os
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import pytest

from optout.process import Pipeline, process
from optout.tokens import make_token, token_day, verify_token

from conftest import NOW, make_mail

KEY = b"a test key, not a secret"
OPTOUT = Path(sys.executable).parent / "optout"
TODAY = NOW.date()


def test_a_token_fits_a_local_part_and_verifies():
    token = make_token(KEY, "Ann@Example.NET", "weekly", TODAY)
    assert len(f"unsubscribe+{token}") <= 64  # RFC 5321: a local part is at most 64 octets
    assert token == token.lower() and token.isalnum()
    assert token_day(token) == TODAY
    assert verify_token(KEY, token, "ann@example.net", "weekly", TODAY, 365).valid


@pytest.mark.parametrize("address, list_name, key, status", [
    ("bob@example.net", "weekly", KEY, "forged"),
    ("ann@example.net", "monthly", KEY, "forged"),
    ("ann@example.net", "weekly", b"another key", "forged"),
])
def test_a_token_for_something_else_is_forged(address, list_name, key, status):
    token = make_token(KEY, "ann@example.net", "weekly", TODAY)
    assert verify_token(key, token, address, list_name, TODAY, 365).status == status


def test_tampered_expired_and_malformed_tokens():
    token = make_token(KEY, "ann@example.net", "weekly", TODAY)
    flipped = token[:-1] + ("a" if token[-1] != "a" else "b")
    assert not verify_token(KEY, flipped, "ann@example.net", "weekly", TODAY, 365).valid
    old = make_token(KEY, "ann@example.net", "weekly", TODAY - timedelta(days=400))
    assert verify_token(KEY, old, "ann@example.net", "weekly", TODAY, 365).status == "expired"
    future = make_token(KEY, "ann@example.net", "weekly", TODAY + timedelta(days=3))
    assert verify_token(KEY, future, "ann@example.net", "weekly", TODAY, 365).status == "expired"
    assert verify_token(KEY, "not-a-token", "ann@example.net", "weekly", TODAY, 365).status == "malformed"
    with pytest.raises(ValueError):
        make_token(b"", "ann@example.net", "weekly", TODAY)


@pytest.fixture
def pipeline(lexicon):
    return Pipeline(lexicon, token_key=KEY)


def audit_events(store):
    return [row[0] for row in store.db.execute("SELECT event FROM audit ORDER BY id")]


def test_mail_to_a_valid_token_unsubscribes_the_tokens_address_whoever_sends_it(store, pipeline):
    token = make_token(KEY, "ann@example.net", "weekly", TODAY)
    store.remember_token(token, "ann@example.net", "weekly", NOW)
    # Forwarded: it arrives from another address of Ann's.
    raw = make_mail("", "unsubscribe", sender="Ann at home <ann.home@example.org>", to=f"unsubscribe+{token}@example.com")
    outcome = process(raw, "smtp", store, pipeline, NOW)
    assert [(s.address, s.scope) for s in outcome.decision.suppressions] == [("ann@example.net", "weekly")]
    assert [(r["address"], r["scope"]) for r in store.suppressions()] == [("ann@example.net", "weekly")]
    assert not outcome.decision.may_reply


@pytest.mark.parametrize("make", [
    lambda: make_token(b"somebody else's key", "ann@example.net", "weekly", TODAY),  # forged
    lambda: make_token(KEY, "ann@example.net", "weekly", TODAY - timedelta(days=500)),  # expired
    lambda: "abcdefghijklmnopqrstuvw",  # never issued
])
def test_a_bad_token_acts_for_nobody_and_the_words_decide(store, pipeline, make):
    token = make()
    store.remember_token(token, "ann@example.net", "weekly", NOW - timedelta(days=500))
    raw = make_mail("Please unsubscribe me.", "unsubscribe", sender="Eve <eve@example.org>",
                    to=f"unsubscribe+{token}@example.com")
    outcome = process(raw, "smtp", store, pipeline, NOW)
    assert "token.invalid" in audit_events(store)
    # Eve's own plain "unsubscribe" still opts Eve out; Ann is untouched.
    assert [r["address"] for r in store.suppressions()] == ["eve@example.org"]
    assert outcome.classification.kind.value == "opt-out"


def test_a_valid_token_does_not_override_words_that_ask_for_something_else(store, pipeline):
    token = make_token(KEY, "ann@example.net", "weekly", TODAY)
    store.remember_token(token, "ann@example.net", "weekly", NOW)
    raw = make_mail("Please delete my account and all my data.", "hello", sender="Ann <ann@example.net>",
                    to=f"unsubscribe+{token}@example.com")
    outcome = process(raw, "smtp", store, pipeline, NOW)
    assert outcome.classification.kind.value == "deletion"
    assert [r["scope"] for r in store.suppressions()] == ["all"]


def run(tmp_path, *args, key="s3cret"):
    env = {**os.environ, "OPTOUT_DATABASE": str(tmp_path / "optout.db")}
    env.pop("OPTOUT_TOKEN_KEY", None)
    if key:
        env["OPTOUT_TOKEN_KEY"] = key
    return subprocess.run([str(OPTOUT), *args], capture_output=True, text=True, env=env, cwd=tmp_path)


def test_headers_prints_rfc_2369_and_8058_headers(tmp_path):
    result = run(tmp_path, "headers", "Ann@Example.NET", "--list", "weekly")
    assert result.returncode == 0, result.stderr
    unsubscribe, post = result.stdout.splitlines()
    assert unsubscribe.startswith("List-Unsubscribe: <mailto:unsubscribe+") and "?subject=unsubscribe>" in unsubscribe
    assert "<https://" in unsubscribe
    assert post == "List-Unsubscribe-Post: List-Unsubscribe=One-Click"
    token = unsubscribe.split("unsubscribe+")[1].split("@")[0]
    assert verify_token(b"s3cret", token, "ann@example.net", "weekly", date.today(), 365).valid


def test_headers_without_a_key_is_a_clear_error(tmp_path):
    result = run(tmp_path, "headers", "ann@example.net", "--list", "weekly", key=None)
    assert result.returncode == 3
    assert "OPTOUT_TOKEN_KEY" in result.stderr and "Traceback" not in result.stderr
