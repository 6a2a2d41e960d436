import sqlite3
from datetime import timedelta

import pytest
import sqlite_utils

from conftest import NOW
from optout.errors import StoreError, TransientError
from optout.model import Classification, Decision, Kind, OpenRequest, Scope, Suppress, drop_hash
from optout.parse import parse_message
from optout.store import MIGRATIONS, Store

OPT_OUT = Classification(Kind.OPT_OUT, "unsubscribe", "words.opt-out", 0.9, (Scope.ALL,), "en", ("unsubscribe",))
DELETION = Classification(Kind.DELETION, "erasure", "words.deletion", 0.9, (Scope.ALL,), "en", ("delete my data",))
OTHER = Classification(Kind.OTHER, "unclear", "text.unclear", 0.5)


def suppress(message, scope=Scope.ALL, reason="unsubscribe"):
    return Decision("suppress", (Suppress(message.sender, message.sender_display, scope, reason),))


def delete(message, due_at=NOW + timedelta(days=30)):
    return Decision("suppress+open-request", (Suppress(message.sender, message.sender_display, Scope.ALL, "deletion"),),
                    (OpenRequest(Kind.DELETION, message.sender, message.sender_display, due_at),))


def count(path, table):
    with sqlite3.connect(path) as connection:
        return connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def counts(path):
    return {table: count(path, table) for table in ("ledger", "suppressions", "requests", "audit")}


def test_a_fresh_file_is_migrated_to_the_latest_version(store):
    assert store.version == len(MIGRATIONS)
    assert {"ledger", "suppressions", "requests", "audit", "outbox"} <= set(store.db.table_names())


def test_reopening_keeps_the_version_and_the_rows(tmp_path, mail):
    path = tmp_path / "optout.db"
    with Store(path) as first:
        message = parse_message(mail("Please unsubscribe me."))
        first.record(message, OPT_OUT, suppress(message), "file", NOW)

    with Store(path) as second:
        assert second.version == len(MIGRATIONS)
        assert second.seen(message.key)
        assert len(second.suppressions()) == 1


def test_opening_an_older_database_applies_only_the_missing_migrations(tmp_path):
    path = tmp_path / "old.db"
    connection = sqlite3.connect(path, isolation_level=None)
    MIGRATIONS[0](sqlite_utils.Database(connection))
    connection.execute("PRAGMA user_version = 1")
    connection.execute("INSERT INTO suppressions (address, address_hash, scope, reason, created_at) "
                       "VALUES ('old@example.net', 'h', 'all', 'manual', '2025-01-01T00:00:00+00:00')")
    connection.close()

    with Store(path) as store:
        assert store.version == len(MIGRATIONS)
        assert [row["address"] for row in store.suppressions()] == ["old@example.net"]


def test_opening_creates_missing_parent_folders(tmp_path):
    with Store(tmp_path / "var" / "deep" / "optout.db") as store:
        assert store.version == len(MIGRATIONS)
    assert (tmp_path / "var" / "deep" / "optout.db").is_file()


def test_record_writes_ledger_suppressions_requests_and_audit_together(store, mail):
    message = parse_message(mail("Please delete my data.", sender="Ann <ann@example.net>"))

    recorded = store.record(message, DELETION, delete(message), "file", NOW)

    assert recorded.duplicate is False
    assert recorded.suppressions == 1
    assert len(recorded.request_ids) == 1
    assert counts(store.path) == {"ledger": 1, "suppressions": 1, "requests": 1, "audit": 3}
    assert store.ledger(message.key)["kind"] == "deletion"


def test_record_writes_nothing_when_an_effect_fails_half_way(store, mail):
    message = parse_message(mail("Please delete my data."))
    broken = delete(message, due_at="not a time")

    with pytest.raises((AttributeError, TypeError, ValueError)):
        store.record(message, DELETION, broken, "file", NOW)

    assert counts(store.path) == {"ledger": 0, "suppressions": 0, "requests": 0, "audit": 0}
    assert not store.seen(message.key)
    assert store.record(message, DELETION, delete(message), "file", NOW).duplicate is False


def test_record_of_the_same_message_twice_is_a_duplicate_that_adds_nothing(store, mail):
    message = parse_message(mail("Please delete my data."))
    store.record(message, DELETION, delete(message), "imap", NOW)
    before = counts(store.path)

    again = store.record(message, DELETION, delete(message), "smtp", NOW + timedelta(minutes=5))

    assert again.duplicate is True
    assert again.suppressions == 0 and again.request_ids == ()
    assert counts(store.path) == before
    assert store.ledger(message.key)["source"] == "imap"


def test_two_messages_from_one_address_in_one_scope_make_one_suppression(store, mail):
    first = parse_message(mail("Please unsubscribe me.", message_id="<one@example.net>"))
    second = parse_message(mail("Unsubscribe me now!", message_id="<two@example.net>"))

    store.record(first, OPT_OUT, suppress(first), "file", NOW)
    recorded = store.record(second, OPT_OUT, suppress(second), "file", NOW + timedelta(hours=1))

    assert recorded.duplicate is False
    assert recorded.suppressions == 0
    assert count(store.path, "suppressions") == 1
    assert count(store.path, "ledger") == 2


def test_a_suppression_already_present_writes_no_suppression_add_event(store, mail):
    first = parse_message(mail("Please unsubscribe me.", message_id="<one@example.net>"))
    second = parse_message(mail("Unsubscribe me now!", message_id="<two@example.net>"))
    store.record(first, OPT_OUT, suppress(first), "file", NOW)

    store.record(second, OPT_OUT, suppress(second), "file", NOW)

    with sqlite3.connect(store.path) as connection:
        events = [row[0] for row in connection.execute("SELECT event FROM audit ORDER BY id")]
    assert events.count("suppression.add") == count(store.path, "suppressions") == 1
    assert events.count("message") == 2


def test_suppressions_of_one_address_in_two_scopes_are_two_rows(store, mail):
    first = parse_message(mail("No newsletters.", message_id="<one@example.net>"))
    second = parse_message(mail("Do not sell my data.", message_id="<two@example.net>"))

    store.record(first, OPT_OUT, suppress(first, Scope.NEWSLETTERS), "file", NOW)
    store.record(second, OPT_OUT, suppress(second, Scope.PARTNERS), "file", NOW)

    assert sorted(row["scope"] for row in store.suppressions()) == ["newsletters", "partners"]
    assert [row["scope"] for row in store.suppressions("partners")] == ["partners"]


def test_history_gives_suppressed_scopes_and_open_requests(store, mail):
    first = parse_message(mail("No newsletters.", message_id="<one@example.net>"))
    second = parse_message(mail("Delete my data.", message_id="<two@example.net>"))
    store.record(first, OPT_OUT, suppress(first, Scope.NEWSLETTERS), "file", NOW)
    store.record(second, DELETION, delete(second), "file", NOW)

    history = store.history("  ANN@Example.NET ", NOW)

    assert history.suppressed_scopes == {"newsletters", "all"}
    assert history.open_requests == {"deletion"}
    assert history.replies_today == 0


def test_history_of_an_unknown_or_missing_address_is_empty(store):
    assert store.history("nobody@example.net", NOW).suppressed_scopes == frozenset()
    assert store.history(None, NOW).open_requests == frozenset()


def test_suppressed_matches_normalised_spellings(store, mail):
    message = parse_message(mail("Unsubscribe.", sender="Ann <Ann@Example.NET>"))
    store.record(message, OPT_OUT, suppress(message), "file", NOW)

    for spelling in ("ann@example.net", "  ANN@EXAMPLE.NET ", "<Ann@example.net>", "ann@example.net."):
        assert [row["scope"] for row in store.suppressed(spelling)] == ["all"], spelling
    assert store.suppressed("bob@example.net") == []


def test_suppressions_store_the_drop_hash(store, mail):
    message = parse_message(mail("Unsubscribe."))
    store.record(message, OPT_OUT, suppress(message), "file", NOW)

    with sqlite3.connect(store.path) as connection:
        (address_hash,) = connection.execute("SELECT address_hash FROM suppressions").fetchone()
    assert address_hash == drop_hash("ann@example.net")


def record_three(store, mail):
    for number in range(3):
        message = parse_message(mail("Unsubscribe.", sender=f"p{number}@example.net",
                                     message_id=f"<m{number}@example.net>"))
        store.record(message, OPT_OUT, suppress(message), "file", NOW)


@pytest.mark.parametrize("statement", ["UPDATE audit SET event = 'forged' WHERE id = 1",
                                       "DELETE FROM audit WHERE id = 1"])
def test_the_audit_log_refuses_update_and_delete(store, mail, statement):
    record_three(store, mail)
    connection = sqlite3.connect(store.path, isolation_level=None)

    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        connection.execute(statement)
    connection.close()

    assert count(store.path, "audit") == 6


def test_the_audit_chain_verifies(store, mail):
    record_three(store, mail)

    assert store.verify_audit() is None


def test_the_audit_chain_of_an_empty_log_verifies(store):
    assert store.verify_audit() is None


def tamper(path, *statements):
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("DROP TRIGGER audit_no_update")
    connection.execute("DROP TRIGGER audit_no_delete")
    for statement in statements:
        connection.execute(statement)
    connection.close()


def test_the_audit_chain_names_the_first_rewritten_event(store, mail):
    record_three(store, mail)

    tamper(store.path, "UPDATE audit SET detail = '{\"scope\": \"newsletters\"}' WHERE id = 4",
           "UPDATE audit SET detail = '{}' WHERE id = 6")

    assert store.verify_audit() == 4


def test_the_audit_chain_names_the_event_after_a_deleted_one(store, mail):
    record_three(store, mail)

    tamper(store.path, "DELETE FROM audit WHERE id = 3")

    assert store.verify_audit() == 4


def test_the_audit_chain_notices_a_rehashed_event(store, mail):
    record_three(store, mail)

    tamper(store.path, "UPDATE audit SET hash = '" + "0" * 64 + "' WHERE id = 2")

    assert store.verify_audit() == 2


def test_the_database_never_holds_the_message_body(tmp_path, mail):
    marker = "Quokka marmalade sonnet 7431 under the violet bridge"
    path = tmp_path / "optout.db"
    message = parse_message(mail(f"Please delete my data.\n{marker}\n", subject="Delete my data"))
    assert marker in message.text

    with Store(path) as store:
        store.record(message, DELETION, delete(message), "file", NOW)
        files = [path, path.with_name(path.name + "-wal")]
        while_open = b"".join(f.read_bytes() for f in files if f.exists())
        assert b"Quokka" not in while_open
    after_close = b"".join(f.read_bytes() for f in tmp_path.iterdir() if f.is_file())
    assert b"Quokka" not in after_close
    assert b"ann@example.net" in after_close


def test_a_locked_database_raises_transient_error_and_writes_nothing(tmp_path, mail):
    path = tmp_path / "optout.db"
    message = parse_message(mail("Please delete my data."))
    with Store(path, timeout=0.1) as store:
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(TransientError):
                store.record(message, DELETION, delete(message), "file", NOW)
        finally:
            holder.execute("ROLLBACK")
            holder.close()

        assert counts(path) == {"ledger": 0, "suppressions": 0, "requests": 0, "audit": 0}
        assert store.record(message, DELETION, delete(message), "file", NOW).duplicate is False
        assert counts(path) == {"ledger": 1, "suppressions": 1, "requests": 1, "audit": 3}


def test_transient_error_is_a_store_error():
    assert issubclass(TransientError, StoreError)


def test_a_file_that_is_not_a_database_gives_store_error(tmp_path):
    path = tmp_path / "notes.db"
    path.write_bytes(b"These are my notes, not a database.\n" * 200)

    with pytest.raises(StoreError) as raised:
        Store(path)

    assert not isinstance(raised.value, TransientError)
    assert str(path) in str(raised.value)
    assert path.read_bytes() == b"These are my notes, not a database.\n" * 200


def test_a_folder_in_place_of_the_database_gives_store_error(tmp_path):
    (tmp_path / "optout.db").mkdir()

    with pytest.raises(StoreError):
        Store(tmp_path / "optout.db")


def test_a_file_in_place_of_the_parent_folder_gives_store_error(tmp_path):
    (tmp_path / "var").write_text("not a folder")

    with pytest.raises(StoreError):
        Store(tmp_path / "var" / "optout.db")


def test_stats_counts_messages_kinds_suppressions_and_requests(store, mail):
    first = parse_message(mail("Unsubscribe.", message_id="<one@example.net>"))
    second = parse_message(mail("Delete my data.", sender="bob@example.net", message_id="<two@example.net>"))
    third = parse_message(mail("Hello there.", sender="cy@example.net", message_id="<three@example.net>"))
    store.record(first, OPT_OUT, suppress(first, Scope.NEWSLETTERS), "file", NOW)
    store.record(second, DELETION, delete(second), "file", NOW)
    store.record(third, OTHER, Decision("nothing"), "file", NOW)

    stats = store.stats()

    assert stats["messages"] == 3
    assert stats["kinds"] == {"opt-out": 1, "access": 0, "deletion": 1, "other": 1}
    assert stats["suppressions"]["total"] == 2
    assert stats["suppressions"]["addresses"] == 2
    assert stats["requests"]["total"] == 1
