"""`optout requests …` against a real database filled by processing real mail."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optout.process import Pipeline, process
from optout.store import Store

from conftest import NOW, make_mail

OPTOUT = Path(sys.executable).parent / "optout"


@pytest.fixture
def database(tmp_path, lexicon):
    path = tmp_path / "optout.db"
    with Store(path) as store:
        pipeline = Pipeline(lexicon)
        process(make_mail("What personal data do you hold about me?", sender="Ann <ann@example.net>",
                          message_id="<a1@example.net>"), "file", store, pipeline, NOW)
        process(make_mail("Please delete my account and all my data.", sender="Bob <bob@example.net>",
                          message_id="<b1@example.net>"), "file", store, pipeline, NOW)
        process(make_mail("I am the mother of Mia (10). Please delete her account and all her data.",
                          sender="Cleo <cleo@example.net>", message_id="<c1@example.net>"), "file", store, pipeline, NOW)
    return path


def run(database, *args, now="2026-11-29T12:00:00+00:00"):
    env = {**os.environ, "OPTOUT_DATABASE": str(database), "OPTOUT_NOW": now}
    return subprocess.run([str(OPTOUT), "requests", *args], capture_output=True, text=True, env=env)


def listed(database, *args, now="2026-11-29T12:00:00+00:00"):
    result = run(database, "list", "--json", *args, now=now)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_childs_request_comes_first_and_has_the_shorter_deadline(database):
    rows = listed(database)
    assert [r["address"] for r in rows] == ["cleo@example.net", "ann@example.net", "bob@example.net"]
    assert rows[0]["flags"] == "child" and rows[0]["due_at"] < rows[1]["due_at"]
    assert all(r["status"] == "awaiting-verification" and r["reference"][:2] in ("A-", "D-") for r in rows)


def test_overdue_lists_only_what_is_past_its_due_date(database):
    assert listed(database, "--overdue") == []
    late = listed(database, "--overdue", now="2027-01-05T00:00:00+00:00")
    assert {r["address"] for r in late} == {"cleo@example.net", "ann@example.net", "bob@example.net"}
    assert [r["address"] for r in listed(database, "--overdue", now="2026-12-20T00:00:00+00:00")] == ["cleo@example.net"]


def test_extend_and_reject_are_audited(database):
    ann = next(r for r in listed(database) if r["address"] == "ann@example.net")
    result = run(database, "extend", ann["reference"], "--days", "30", "--reason", "complex request")
    assert result.returncode == 0 and "now due 2027-01-28" in result.stdout
    result = run(database, "reject", str(ann["id"]), "--reason", "identity not confirmed")
    assert result.returncode == 0
    shown = json.loads(run(database, "show", str(ann["id"]), "--json").stdout)
    assert shown["status"] == "rejected" and shown["due_at"].startswith("2027-01-28")
    again = run(database, "reject", str(ann["id"]), "--reason", "twice")
    assert again.returncode == 8 and "no longer open" in again.stderr and "Traceback" not in again.stderr
    with Store(database) as store:
        events = [row[0] for row in store.db.execute("SELECT event FROM audit ORDER BY id")]
        assert events.count("request.extend") == 1 and events.count("request.reject") == 1
        assert store.verify_audit() is None


def test_an_unknown_request_is_a_clear_error(database):
    result = run(database, "show", "D-NOPE0000")
    assert result.returncode == 4 and "no request" in result.stderr


def test_extensions_stop_at_what_the_jurisdiction_allows(database):
    ann = next(r for r in listed(database) if r["address"] == "ann@example.net")
    assert run(database, "extend", ann["reference"], "--days", "45", "--reason", "complex").returncode == 0
    refused = run(database, "extend", ann["reference"], "--days", "30", "--reason", "more")
    assert refused.returncode == 8 and "GDPR allows 61 days" in refused.stderr
    shown = json.loads(run(database, "show", ann["reference"], "--json").stdout)
    assert shown["extended_days"] == 45


def test_a_rejection_is_told_to_the_requester_unless_asked_not_to(database):
    ann = next(r for r in listed(database) if r["address"] == "ann@example.net")
    bob = next(r for r in listed(database) if r["address"] == "bob@example.net")
    assert run(database, "reject", ann["reference"], "--reason", "We hold no account for this address.").returncode == 0
    assert run(database, "reject", bob["reference"], "--reason", "duplicate", "--no-reply").returncode == 0
    with Store(database) as store:
        queued = store.outbox()
    assert [(r["to_address"], r["kind"]) for r in queued] == [("ann@example.net", "request-rejected")]
    with Store(database) as store:
        raw = store.db.execute("SELECT raw FROM outbox").fetchone()[0]
    assert b"We hold no account for this address." in raw


def test_the_yearly_report_counts_per_kind_with_the_median_days_to_answer(database):
    rows = listed(database)
    ann = next(r for r in rows if r["address"] == "ann@example.net")
    bob = next(r for r in rows if r["address"] == "bob@example.net")
    assert run(database, "reject", ann["reference"], "--reason", "no", "--no-reply",
               now="2026-12-09T12:00:00+00:00").returncode == 0
    unverified = run(database, "fulfil", bob["reference"], now="2026-12-03T12:00:00+00:00")
    assert unverified.returncode == 8 and "only a verified request" in unverified.stderr
    # Bob was verified on the phone; an admin fulfils (the deletion) on 2026-12-03.
    assert run(database, "fulfil", bob["reference"], "--verified-by", "phone call, account number checked",
               now="2026-12-03T12:00:00+00:00").returncode == 0
    with Store(database) as store:
        (detail,) = [row[0] for row in store.db.execute("SELECT detail FROM audit WHERE event = 'request.verified'")]
        assert json.loads(detail)["how"] == "phone call, account number checked"
    result = run(database, "report", "--year", "2026", "--json")
    report = json.loads(result.stdout)["kinds"]
    assert report["access"] == {"received": 1, "complied": 0, "denied": 1, "expired": 0, "pending": 0,
                                "median_days": 10.0}
    assert report["deletion"] == {"received": 2, "complied": 1, "denied": 0, "expired": 0, "pending": 1,
                                  "median_days": 4.0}
    table = run(database, "report", "--year", "2026").stdout
    assert "median days to answer" in table and "deletion" in table
    assert "No requests received in 2025" in run(database, "report", "--year", "2025").stdout


def test_ccpa_requests_are_overdue_when_unacknowledged_after_ten_business_days(tmp_path, lexicon):
    from optout.policy import Rules

    path = tmp_path / "ccpa.db"
    with Store(path) as store:  # no templates: no acknowledgement could be sent
        process(make_mail("Please send me the personal information you collected about me.", sender="dan@example.net",
                          message_id="<ccpa@example.net>"), "file", store, Pipeline(lexicon, rules=Rules(jurisdiction="ccpa")),
                NOW)
    (row,) = listed(path)
    assert row["jurisdiction"] == "ccpa" and row["ack_due_at"].startswith("2026-12-11") and row["due_at"].startswith("2027-01-13")
    assert listed(path, "--overdue", now="2026-12-11T00:00:00+00:00") == []
    assert [r["address"] for r in listed(path, "--overdue", now="2026-12-12T00:00:00+00:00")] == ["dan@example.net"]
