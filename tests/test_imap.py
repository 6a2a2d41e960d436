"""`optout run --once` against a real Dovecot: the backlog, a folder per kind, flags, reruns, dry runs, UIDVALIDITY, the lock."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from types import SimpleNamespace

import pytest

from conftest import FIXTURES, query, run_cli
from dovecot import ALL_FOLDERS, folder_of
from optout.daemon import run_lock
from optout.parse import parse_message
from optout.store import Store

SEEN, FLAGGED, ANSWERED = b"\\Seen", b"\\Flagged", b"\\Answered"
# A person's flags, keywords included: the run must leave every one of them as it was.
FLAG_SETS = ((), (SEEN,), (FLAGGED,), (SEEN, ANSWERED, b"$Label1"))
EFFECTS = ("ledger", "suppressions", "requests", "audit", "outbox")
TABLES = EFFECTS + ("checkpoints",)


def fixture_files():
    return sorted(FIXTURES.rglob("*.eml"))


def key_of(raw: bytes) -> str:
    return parse_message(raw).key


def stored_flags(flags) -> frozenset:
    # \Recent belongs to the IMAP session, not the message (RFC 3501 §2.3.2): a server sets it on arrival.
    return frozenset(flag for flag in flags if flag != b"\\Recent")


def summary(result) -> dict:
    assert result.returncode == 0, f"optout exited {result.returncode}: {result.stderr[-2000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def snapshot(database, tables=TABLES) -> dict[str, list[tuple]]:
    return {table: sorted(query(database, f"SELECT * FROM {table}"), key=repr) for table in tables}


def effect_keys(database) -> dict[str, Counter]:
    """Count the message keys the ledger, the suppressions and the requests refer to."""
    return {table: Counter(row[0] for row in query(database, f"SELECT {column} FROM {table}"))
            for table, column in (("ledger", "key"), ("suppressions", "source_key"), ("requests", "message_key"))}


def labels() -> dict[str, dict]:
    with open(FIXTURES / "labels.tsv", encoding="utf-8", newline="") as table:
        return {row["path"]: row for row in csv.DictReader(table, delimiter="\t")}


@pytest.fixture(scope="module")
def backlog(dovecot, tmp_path_factory):
    """Every fixture appended to a fresh INBOX with a mix of flags, then one `optout run --once --json`."""
    cwd = tmp_path_factory.mktemp("backlog")
    box = dovecot.mailbox()
    files = fixture_files()
    raws = [path.read_bytes() for path in files]
    box.append(raws, flags=[FLAG_SETS[index % len(FLAG_SETS)] for index in range(len(raws))])
    flags_before = {key_of(raw): stored_flags(flags) for raw, flags in box.messages("INBOX")}
    database = cwd / "optout.db"
    result = run_cli(cwd, "run", "--once", "--json", env={**box.env(), "OPTOUT_DATABASE": str(database)})
    after: dict[str, list[tuple[bytes, frozenset]]] = {}
    with box.client() as client:
        for folder in box.counts(client):
            after[folder] = [(raw, stored_flags(flags)) for raw, flags in box.messages(folder, client)]
    return SimpleNamespace(box=box, files=files, raws=raws, flags_before=flags_before, database=database,
                           result=result, after=after)


def test_run_once_reports_every_message_of_the_backlog_as_new_and_moved(backlog):
    reported = summary(backlog.result)["imap"]

    total = len(backlog.files)
    counted = (reported["seen"], reported["processed"], reported["duplicates"], reported["moved"])
    assert counted == (total, total, 0, total)
    assert sum(reported["kinds"].values()) == total


def test_run_once_empties_the_inbox_and_every_message_is_in_exactly_one_folder(backlog):
    keys_appended = Counter(key_of(raw) for raw in backlog.raws)
    keys_filed = Counter(key_of(raw) for folder, messages in backlog.after.items() for raw, _ in messages)
    left_in_inbox = len(backlog.after.get("INBOX", []))
    folders = set(backlog.after)

    assert left_in_inbox == 0
    assert keys_filed == keys_appended
    assert folders <= set(ALL_FOLDERS)


def test_each_message_is_filed_in_the_folder_its_ledger_row_names(backlog):
    rows = {key: (kind, reason)
            for key, kind, reason in query(backlog.database, "SELECT key, kind, reason FROM ledger")}
    misfiled = []
    for folder, messages in backlog.after.items():
        for raw, _ in messages:
            kind, reason = rows.get(key_of(raw), ("no ledger row", None))
            if folder_of(kind, reason) != folder:
                misfiled.append((parse_message(raw).subject, kind, reason, folder))

    appended = len(backlog.raws)
    assert len(rows) == appended
    assert misfiled == []


def test_each_fixture_is_filed_in_the_folder_labels_tsv_expects(backlog):
    expected = {}
    table = labels()
    for path in backlog.files:
        row = table.get(str(path.relative_to(FIXTURES)), {"kind": "(not in labels.tsv)", "reason": ""})
        # An `other` fixture labelled without a reason may be filed either way (Review or Processed.other).
        folders = {"Review", "Processed.other"} if row["kind"] == "other" and not row["reason"] else {
            folder_of(row["kind"], row["reason"])}
        expected[key_of(path.read_bytes())] = (str(path.relative_to(FIXTURES)), folders)
    actual = {key_of(raw): folder for folder, messages in backlog.after.items() for raw, _ in messages}

    wrong = sorted(f"{name}: expected {' or '.join(sorted(folders))}, filed in {actual.get(key)}"
                   for key, (name, folders) in expected.items() if actual.get(key) not in folders)

    assert wrong == [], f"{len(wrong)} of {len(expected)} fixtures filed elsewhere than labels.tsv says"


def test_run_once_leaves_every_flag_as_it_was_seen_or_not(backlog):
    flags_after = {key_of(raw): flags for messages in backlog.after.values() for raw, flags in messages}

    flags_before = backlog.flags_before
    changed = sorted((key[:60], sorted(flags_before.get(key, ())), sorted(flags))
                     for key, flags in flags_after.items() if flags_before.get(key) != flags)
    assert Counter(flags_before.values())[frozenset()] > 0
    assert Counter(flag for flags in flags_before.values() for flag in flags)[SEEN] > 0
    assert changed == []
    assert flags_after.keys() == flags_before.keys()


def test_the_ledger_holds_one_imap_row_per_message_and_the_audit_chain_holds(backlog):
    sources = query(backlog.database, "SELECT source, count(*) FROM ledger GROUP BY source")
    events = query(backlog.database, "SELECT count(*), count(DISTINCT message_key) FROM audit WHERE event = 'message'")

    appended = len(backlog.raws)
    assert sources == [("imap", appended)]
    assert events == [(appended, appended)]
    with Store(backlog.database) as store:
        assert store.verify_audit() is None


@pytest.fixture
def some_fixtures():
    """Every fifth fixture: all kinds, fewer messages."""
    return [path.read_bytes() for path in fixture_files()[::5]]


def test_a_second_run_changes_nothing(mailbox, tmp_path, some_fixtures, run_optout):
    env = {**mailbox.env(), "OPTOUT_DATABASE": str(tmp_path / "optout.db")}
    mailbox.append(some_fixtures)
    first = summary(run_optout("run", "--once", "--json", env=env))
    database, folders = snapshot(tmp_path / "optout.db"), mailbox.counts()

    second = summary(run_optout("run", "--once", "--json", env=env))

    assert first["imap"]["processed"] == len(some_fixtures)
    assert (second["imap"]["seen"], second["imap"]["moved"]) == (0, 0)
    assert snapshot(tmp_path / "optout.db") == database
    assert mailbox.counts() == folders


def test_mail_put_back_into_the_inbox_is_filed_again_with_no_new_effects(mailbox, tmp_path, some_fixtures, run_optout):
    # As after a crash between the commit and the move: the ledger knows them, the INBOX still holds them.
    env = {**mailbox.env(), "OPTOUT_DATABASE": str(tmp_path / "optout.db")}
    mailbox.append(some_fixtures)
    summary(run_optout("run", "--once", "--json", env=env))
    effects, folders = snapshot(tmp_path / "optout.db", EFFECTS), mailbox.counts()

    mailbox.append(some_fixtures)
    again = summary(run_optout("run", "--once", "--json", env=env))

    assert again["imap"]["duplicates"] == len(some_fixtures)
    assert again["imap"]["processed"] == 0
    assert snapshot(tmp_path / "optout.db", EFFECTS) == effects
    assert mailbox.counts() == {folder: 2 * count for folder, count in folders.items()}


def test_a_dry_run_writes_nothing_and_moves_nothing(mailbox, tmp_path, some_fixtures, run_optout):
    env = {**mailbox.env(), "OPTOUT_DATABASE": str(tmp_path / "optout.db")}
    mailbox.append(some_fixtures[:10])
    summary(run_optout("run", "--once", "--json", env=env))
    waiting = some_fixtures[10:]
    mailbox.append(waiting, flags=[FLAG_SETS[index % len(FLAG_SETS)] for index in range(len(waiting))])
    database, folders = snapshot(tmp_path / "optout.db"), mailbox.counts()
    flags = {key_of(raw): stored_flags(f) for raw, f in mailbox.messages("INBOX")}

    text = run_optout("run", "--once", "--dry-run", env=env)
    dry = summary(run_optout("run", "--once", "--dry-run", "--json", env=env))

    assert text.returncode == 0, text.stderr
    assert "Dry run: nothing written, nothing moved." in text.stdout
    assert dry["dry_run"] is True
    assert (dry["imap"]["seen"], dry["imap"]["processed"], dry["imap"]["moved"]) == (len(waiting), len(waiting), 0)
    assert snapshot(tmp_path / "optout.db") == database
    assert mailbox.counts() == folders
    assert {key_of(raw): stored_flags(f) for raw, f in mailbox.messages("INBOX")} == flags


def test_a_changed_uidvalidity_rescans_without_double_effects(mailbox, tmp_path, some_fixtures, run_optout):
    env = {**mailbox.env("Intake"), "OPTOUT_DATABASE": str(tmp_path / "optout.db")}
    old, new = some_fixtures[:20], some_fixtures[20:]
    mailbox.append(old, folder="Intake")
    summary(run_optout("run", "--once", "--json", env=env))
    effects, keys = snapshot(tmp_path / "optout.db", EFFECTS[:3]), effect_keys(tmp_path / "optout.db")
    (checkpoint_before,) = query(tmp_path / "optout.db", "SELECT uidvalidity, last_uid FROM checkpoints")
    with mailbox.client() as client:
        client.delete_folder("Intake")
        client.create_folder("Intake")
    # The new mail first: its UIDs restart at 1, below the old checkpoint; a run that trusted it would skip them.
    mailbox.append(new + old, folder="Intake")
    with mailbox.client() as client:
        uidvalidity = int(client.folder_status("Intake", ["UIDVALIDITY"])[b"UIDVALIDITY"])
    assert uidvalidity != checkpoint_before[0], "precondition: Dovecot gave the recreated folder a new UIDVALIDITY"

    result = run_optout("run", "--once", "--json", env=env)
    rescan = summary(result)

    assert (rescan["imap"]["processed"], rescan["imap"]["duplicates"]) == (len(new), len(old))
    assert "UIDVALIDITY" in result.stderr
    events = "SELECT count(*), count(DISTINCT message_key) FROM audit WHERE event = 'message'"
    assert query(tmp_path / "optout.db", events) == [(len(old) + len(new), len(old) + len(new))]
    after, after_keys = snapshot(tmp_path / "optout.db", EFFECTS[:3]), effect_keys(tmp_path / "optout.db")
    for table in effects:
        assert set(effects[table]) <= set(after[table]), f"{table}: rows changed or lost"
        assert set(after_keys[table] - keys[table]) <= {key_of(raw) for raw in new}, f"{table}: new rows for old mail"
    assert query(tmp_path / "optout.db", "SELECT uidvalidity FROM checkpoints") == [(uidvalidity,)]
    counts = mailbox.counts()
    assert counts["Intake"] == 0
    assert sum(counts.values()) == len(old) * 2 + len(new)


def test_a_second_run_while_the_lock_is_held_exits_7_and_touches_nothing(mailbox, tmp_path, some_fixtures, run_optout):
    env = {**mailbox.env(), "OPTOUT_DATABASE": str(tmp_path / "optout.db")}
    mailbox.append(some_fixtures)

    with run_lock(str(tmp_path / "var" / "optout.lock")):
        locked = run_optout("run", "--once", env=env)
        untouched = mailbox.counts()
    after = run_optout("run", "--once", env=env)

    assert locked.returncode == 7
    assert untouched == {"INBOX": len(some_fixtures)}
    assert "another optout run is in progress" in locked.stderr
    assert f"pid {os.getpid()}" in locked.stderr
    assert len(locked.stderr.strip().splitlines()) == 1, locked.stderr
    assert after.returncode == 0, after.stderr
    assert mailbox.counts()["INBOX"] == 0


def test_a_wrong_password_exits_6_with_a_clear_message_that_does_not_repeat_it(mailbox, tmp_path, run_optout):
    env = {**mailbox.env(), "OPTOUT_IMAP_PASSWORD": "wrong-horse-battery", "OPTOUT_DATABASE": str(tmp_path / "o.db")}

    result = run_optout("run", "--once", env=env)

    assert result.returncode == 6
    assert "IMAP login" in result.stderr and "refused" in result.stderr
    assert "wrong-horse-battery" not in result.stderr + result.stdout


def test_an_unreachable_server_exits_6(mailbox, tmp_path, run_optout):
    from dovecot import free_port

    url = f"imap://{mailbox.user}@127.0.0.1:{free_port()}/INBOX"
    env = {**mailbox.env(), "OPTOUT_IMAP_URL": url, "OPTOUT_DATABASE": str(tmp_path / "o.db")}

    result = run_optout("run", "--once", env=env)

    assert result.returncode == 6
    assert "cannot reach IMAP server" in result.stderr
