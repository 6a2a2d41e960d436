"""The shared corpora of real mail nobody here wrote: bounces, reports, auto-replies, newsletters, broken MIME, letters."""

import csv
from collections import Counter

import pytest

from optout.classify import classify
from optout.model import History
from optout.parse import parse_message
from optout.policy import Rules, decide

from conftest import NOW


@pytest.fixture(scope="module")
def results(corpora, lexicon):
    with open(corpora / "labels.tsv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    outcomes = []
    for row in rows:
        message = parse_message((corpora / row["path"]).read_bytes())
        classification = classify(message, lexicon)
        # The strictest setting: replies to `other` switched on, so only the never-reply rules stand between.
        decision = decide(message, classification, History(), NOW, Rules(reply_to_other=True))
        outcomes.append((row, classification, decision))
    return outcomes


def wrong(results, folder):
    return [(row["path"], row["expect_kind"], c.kind.value, c.rule, c.evidence[:2])
            for row, c, _ in results
            if row["path"].startswith(folder) and row["expect_kind"] != "any" and c.kind.value != row["expect_kind"]]


def test_never_act_is_never_acted_on(results):
    assert wrong(results, "never-act/") == []


def test_negatives_are_other(results):
    assert wrong(results, "negatives/") == []


def test_malformed_mail_is_processed(results):
    assert sum(1 for row, _, _ in results if row["path"].startswith("malformed/")) > 100


def test_requests_are_at_least_95_percent_right(results):
    rows = [r for r in results if r[0]["path"].startswith("requests/")]
    misses = wrong(results, "requests/")
    assert len(misses) <= 0.05 * len(rows), misses


def test_no_never_reply_row_would_be_answered(results):
    answered = [row["path"] for row, _, decision in results if row["reply"] == "never" and decision.may_reply]
    assert answered == []


def test_no_machine_mail_becomes_a_request(results):
    machine_kinds = Counter(c.kind.value for row, c, _ in results if row["path"].startswith("never-act/"))
    assert machine_kinds["access"] == machine_kinds["deletion"] == 0
