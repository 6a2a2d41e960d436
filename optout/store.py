"""The SQLite store (sqlite-utils): migrations, the ledger, suppressions, requests, the audit log and the outbox.

One message is recorded in one transaction: its ledger row, its effects and their audit events, or
nothing at all. The ledger key makes recording idempotent: a message already there changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import statistics
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlite_utils

from optout.errors import RefusedError, StoreError, TransientError
from optout.model import Classification, Decision, History, Message, drop_hash, normalise_address

GENESIS = "0" * 64


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds")


def _migration_1(db: sqlite_utils.Database) -> None:
    db.execute("""
        CREATE TABLE ledger (
            key TEXT PRIMARY KEY,
            message_id TEXT,
            sha256 TEXT NOT NULL,
            source TEXT NOT NULL,
            received_at TEXT NOT NULL,
            sender TEXT,
            kind TEXT NOT NULL,
            reason TEXT NOT NULL,
            scope TEXT,
            language TEXT,
            rule TEXT NOT NULL,
            evidence TEXT NOT NULL,
            confidence REAL NOT NULL,
            flags TEXT NOT NULL DEFAULT '',
            action TEXT NOT NULL,
            may_reply INTEGER NOT NULL,
            no_reply_reason TEXT,
            malformed INTEGER NOT NULL,
            size INTEGER NOT NULL
        )""")
    db.execute("CREATE INDEX ledger_sender ON ledger(sender)")
    db.execute("CREATE INDEX ledger_received_at ON ledger(received_at)")
    db.execute("""
        CREATE TABLE suppressions (
            id INTEGER PRIMARY KEY,
            address TEXT NOT NULL,
            address_hash TEXT NOT NULL,
            display TEXT,
            scope TEXT NOT NULL,
            reason TEXT NOT NULL,
            source_key TEXT,
            created_at TEXT NOT NULL,
            UNIQUE (address, scope)
        )""")
    db.execute("CREATE INDEX suppressions_hash ON suppressions(address_hash)")
    db.execute("""
        CREATE TABLE requests (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            address TEXT NOT NULL,
            display TEXT,
            status TEXT NOT NULL,
            flags TEXT NOT NULL DEFAULT '',
            language TEXT,
            message_key TEXT,
            received_at TEXT NOT NULL,
            due_at TEXT NOT NULL
        )""")
    db.execute("CREATE INDEX requests_address ON requests(address)")
    db.execute("""
        CREATE TABLE audit (
            id INTEGER PRIMARY KEY,
            at TEXT NOT NULL,
            event TEXT NOT NULL,
            address_hash TEXT,
            message_key TEXT,
            detail TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        )""")
    db.execute("CREATE INDEX audit_address_hash ON audit(address_hash)")
    # The audit log is append-only: history is never rewritten.
    db.execute("CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END")
    db.execute("CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END")
    db.execute("""
        CREATE TABLE outbox (
            id INTEGER PRIMARY KEY,
            message_key TEXT,
            to_address TEXT NOT NULL,
            kind TEXT NOT NULL,
            language TEXT,
            subject TEXT NOT NULL,
            body TEXT NOT NULL,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            next_attempt_at TEXT,
            sent_at TEXT,
            last_error TEXT
        )""")
    db.execute("CREATE INDEX outbox_to ON outbox(to_address, created_at)")


def _migration_2(db: sqlite_utils.Database) -> None:
    db.execute("""
        CREATE TABLE checkpoints (
            source TEXT PRIMARY KEY,
            uidvalidity INTEGER NOT NULL,
            last_uid INTEGER NOT NULL,
            updated_at TEXT NOT NULL
        )""")


def _migration_3(db: sqlite_utils.Database) -> None:
    db.execute("ALTER TABLE requests ADD COLUMN reference TEXT")
    db.execute("CREATE UNIQUE INDEX requests_reference ON requests(reference)")
    db.execute("ALTER TABLE outbox ADD COLUMN message_id TEXT")
    db.execute("ALTER TABLE outbox ADD COLUMN raw BLOB")
    db.execute("CREATE UNIQUE INDEX outbox_message_id ON outbox(message_id)")
    db.execute("CREATE INDEX outbox_due ON outbox(status, next_attempt_at)")
    db.execute("""
        CREATE TABLE outbox_attempts (
            id INTEGER PRIMARY KEY,
            outbox_id INTEGER NOT NULL REFERENCES outbox(id) ON DELETE CASCADE,
            at TEXT NOT NULL,
            result TEXT NOT NULL,
            detail TEXT
        )""")
    db.execute("CREATE INDEX outbox_attempts_outbox ON outbox_attempts(outbox_id)")


def _migration_4(db: sqlite_utils.Database) -> None:
    # A deletion tombstone may keep only the DROP hash of an address (address NULL): rebuild the table
    # with a nullable address; UNIQUE (address, scope) still holds for every row that has one.
    db.execute("""
        CREATE TABLE suppressions_new (
            id INTEGER PRIMARY KEY,
            address TEXT,
            address_hash TEXT NOT NULL,
            display TEXT,
            scope TEXT NOT NULL,
            reason TEXT NOT NULL,
            source_key TEXT,
            created_at TEXT NOT NULL,
            UNIQUE (address, scope)
        )""")
    db.execute("INSERT INTO suppressions_new SELECT id, address, address_hash, display, scope, reason, source_key, "
               "created_at FROM suppressions")
    db.execute("DROP TABLE suppressions")
    db.execute("ALTER TABLE suppressions_new RENAME TO suppressions")
    db.execute("CREATE INDEX suppressions_hash ON suppressions(address_hash)")
    db.execute("CREATE INDEX suppressions_created_at ON suppressions(created_at)")


def _migration_5(db: sqlite_utils.Database) -> None:
    # The addresses behind the unsubscribe tokens we issued (a token carries only a day and a MAC).
    db.execute("""
        CREATE TABLE tokens (
            token TEXT PRIMARY KEY,
            address TEXT NOT NULL,
            list TEXT NOT NULL,
            issued_at TEXT NOT NULL
        )""")


def _migration_6(db: sqlite_utils.Database) -> None:
    # Requests are verified before they are fulfilled (issue 6): a lifecycle, a confirmation token (its hash
    # only), an acknowledgement deadline (CCPA) and what closed them. Requests opened before are awaiting it.
    db.execute("ALTER TABLE requests ADD COLUMN jurisdiction TEXT NOT NULL DEFAULT 'gdpr'")
    db.execute("ALTER TABLE requests ADD COLUMN ack_due_at TEXT")
    db.execute("ALTER TABLE requests ADD COLUMN acknowledged_at TEXT")
    db.execute("ALTER TABLE requests ADD COLUMN token_hash TEXT")
    db.execute("ALTER TABLE requests ADD COLUMN token_expires_at TEXT")
    db.execute("ALTER TABLE requests ADD COLUMN verified_at TEXT")
    db.execute("ALTER TABLE requests ADD COLUMN closed_at TEXT")
    db.execute("ALTER TABLE requests ADD COLUMN resolution TEXT")
    db.execute("ALTER TABLE requests ADD COLUMN extended_days INTEGER NOT NULL DEFAULT 0")
    db.execute("UPDATE requests SET status = 'awaiting-verification' WHERE status = 'open'")
    db.execute("CREATE UNIQUE INDEX requests_token ON requests(token_hash)")
    db.execute("CREATE INDEX requests_status ON requests(status, due_at)")
    # A reply that tells a person what was erased holds their address until it is sent, then loses it.
    db.execute("ALTER TABLE outbox ADD COLUMN erase_after_send INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE outbox ADD COLUMN request_id INTEGER")


MIGRATIONS = (_migration_1, _migration_2, _migration_3, _migration_4, _migration_5, _migration_6)
OPEN = ("awaiting-verification", "verified")
CLOSED = ("fulfilled", "rejected", "expired")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def token_hash(token: str) -> str:
    """Return what the store keeps of a confirmation token: its SHA-256 (a copy of the file confirms nothing)."""
    return hashlib.sha256(token.strip().lower().encode()).hexdigest()


def quote_identifier(name: str) -> str:
    """Return a table, column or schema name quoted for SQL; anything but a plain name is refused.

    The one way a name from the config (the contact tables) reaches SQL: values always go as parameters.
    """
    if not _IDENTIFIER.fullmatch(name):
        raise StoreError(f"{name!r} is not a plain table or column name")
    return f'"{name}"'


def contact_column(spec: str) -> tuple[str, str]:
    """Split "TABLE.COLUMN" into its two names, refusing anything that is not plain names."""
    table, dot, column = spec.partition(".")
    if not dot or not _IDENTIFIER.fullmatch(table) or not _IDENTIFIER.fullmatch(column):
        raise StoreError(f"contact table {spec!r}: give TABLE.COLUMN, plain names only")
    return table, column


@dataclass(frozen=True)
class Recorded:
    """The result of recording one message: whether it was new, and the ids it created."""

    duplicate: bool
    suppressions: int = 0
    request_ids: tuple[int, ...] = ()


class Store:
    """The optout database: one SQLite file, used by one writer thread."""

    def __init__(self, path: str | Path, timeout: float = 5.0) -> None:
        self.path = Path(path)
        self._head: str | None = None  # the last audit hash, while a write transaction of ours is open
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a folder, not a database file")
        try:
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(path), timeout=timeout, isolation_level=None)
            self.db = sqlite_utils.Database(conn)
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")
            self.db.execute("PRAGMA foreign_keys = ON")
            # Deleted content is overwritten with zeros: erased personal data does not linger in free pages.
            self.db.execute("PRAGMA secure_delete = ON")
            self.migrate()
        except sqlite3.OperationalError as error:
            raise _store_error(error, self.path) from error
        except sqlite3.DatabaseError as error:
            raise StoreError(f"{self.path}: not an optout database ({error})") from error
        except OSError as error:
            raise StoreError(f"{self.path}: {error.strerror or error}") from error

    def close(self) -> None:
        """Close the connection."""
        self.db.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def version(self) -> int:
        """Return the schema version (the number of migrations applied)."""
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        """Apply the migrations this database has not had yet, each in its own transaction."""
        for number, migration in enumerate(MIGRATIONS, start=1):
            if self.version >= number:
                continue
            self.db.execute("BEGIN IMMEDIATE")
            try:
                if self.version < number:
                    migration(self.db)
                    self.db.execute(f"PRAGMA user_version = {number}")
                self.db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def seen(self, key: str) -> bool:
        """Say whether a message key is in the ledger."""
        return self.recorded_action(key) is not None

    def recorded_action(self, key: str) -> str | None:
        """Return what was done when a message was recorded (its ledger action), or None when it is new."""
        row = self.db.execute("SELECT action FROM ledger WHERE key = ?", [key]).fetchone()
        return row[0] if row else None

    def history(self, address: str | None, now: datetime) -> History:
        """Return what is known about an address: suppressed scopes, open requests, replies in the last day."""
        if not address:
            return History()
        address = normalise_address(address)
        # A deletion tombstone keeps only the hash: the address is still suppressed everywhere.
        scopes = {row[0] for row in self.db.execute(
            "SELECT scope FROM suppressions WHERE address = ? OR (address IS NULL AND address_hash = ?)",
            [address, drop_hash(address)])}
        open_requests = self.db.execute(
            "SELECT kind, status, reference, due_at FROM requests WHERE address = ? AND status IN (?, ?) ORDER BY id",
            [address, *OPEN]).fetchall()
        open_kinds = {row[0] for row in open_requests}
        since = _iso(now - timedelta(days=1))
        replied = [row[0] for row in self.db.execute(
            "SELECT kind FROM outbox WHERE to_address = ? AND created_at >= ?", [address, since])]
        awaiting = tuple((kind, reference, datetime.fromisoformat(due)) for kind, status, reference, due
                         in open_requests if status == "awaiting-verification" and reference)
        return History(frozenset(scopes), frozenset(open_kinds), len(replied), frozenset(replied), awaiting)

    def record(self, message: Message, classification: Classification, decision: Decision, source: str,
               now: datetime, reply=None) -> Recorded:
        """Record a message, its effects and its rendered reply in one transaction; a known key changes nothing."""
        at = _iso(now)
        key = message.key
        try:
            self._begin()
        except sqlite3.OperationalError as error:
            raise _store_error(error, self.path) from error
        try:
            inserted = self.db.execute(
                """INSERT INTO ledger (key, message_id, sha256, source, received_at, sender, kind, reason, scope,
                       language, rule, evidence, confidence, flags, action, may_reply, no_reply_reason, malformed, size)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (key) DO NOTHING""",
                [key, message.message_id, message.sha256, source, at, message.sender, classification.kind.value,
                 classification.reason, classification.scope, classification.language, classification.rule,
                 json.dumps(list(classification.evidence), ensure_ascii=False), classification.confidence,
                 ",".join(classification.flags), decision.action, int(decision.may_reply), decision.no_reply_reason,
                 int(message.malformed), message.size]).rowcount
            if not inserted:
                self._rollback()
                return Recorded(duplicate=True)
            self._audit(at, "message", message.sender, key, {
                "source": source, "kind": classification.kind.value, "reason": classification.reason,
                "rule": classification.rule, "action": decision.action})
            added = 0
            for effect in decision.suppressions:
                inserted = self.db.execute(
                    """INSERT INTO suppressions (address, address_hash, display, scope, reason, source_key, created_at)
                       VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (address, scope) DO NOTHING""",
                    [effect.address, drop_hash(effect.address), effect.display, str(effect.scope), effect.reason,
                     key, at]).rowcount
                if inserted:
                    added += 1
                    self._audit(at, "suppression.add", effect.address, key,
                                {"scope": str(effect.scope), "reason": effect.reason})
            request_ids = []
            for effect in decision.requests:
                cursor = self.db.execute(
                    """INSERT INTO requests (kind, address, display, status, flags, language, message_key,
                           received_at, due_at, reference, jurisdiction, ack_due_at, acknowledged_at, token_hash,
                           token_expires_at) VALUES (?, ?, ?, 'awaiting-verification', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    [effect.kind.value, effect.address, effect.display, ",".join(effect.flags), effect.language, key,
                     at, _iso(effect.due_at), effect.reference or None, effect.jurisdiction,
                     _iso(effect.ack_due_at) if effect.ack_due_at else None, at if reply is not None else None,
                     token_hash(effect.token) if effect.token else None,
                     _iso(effect.token_expires_at) if effect.token_expires_at else None])
                request_ids.append(int(cursor.lastrowid))
                self._audit(at, "request.open", effect.address, key,
                            {"id": cursor.lastrowid, "reference": effect.reference, "kind": effect.kind.value,
                             "due_at": _iso(effect.due_at), "flags": list(effect.flags),
                             "jurisdiction": effect.jurisdiction})
            for effect in decision.reissue:
                reissued = self.db.execute(
                    "UPDATE requests SET token_hash = ?, token_expires_at = ? WHERE reference = ? "
                    "AND status = 'awaiting-verification'",
                    [token_hash(effect.token), _iso(effect.token_expires_at), effect.reference]).rowcount
                if reissued:
                    self._audit(at, "request.reissue", effect.address, key, {"reference": effect.reference})
            for request_id in decision.verify:
                verified = self.db.execute(
                    "UPDATE requests SET status = 'verified', verified_at = ? "
                    "WHERE id = ? AND status = 'awaiting-verification'", [at, request_id]).rowcount
                if verified:
                    self._audit(at, "request.verified", message.sender, key, {"id": request_id})
            if reply is not None:
                self._queue(reply, key, at, request_ids[0] if request_ids else None)
            self.db.execute("COMMIT")
        except sqlite3.OperationalError as error:
            self._rollback()
            raise _store_error(error, self.path) from error
        except BaseException:
            self._rollback()
            raise
        return Recorded(False, added, tuple(request_ids))

    def _audit(self, at: str, event: str, address: str | None, key: str | None, detail: dict) -> None:
        # Each event carries the hash of the one before it, so a rewritten history shows. Inside one write
        # transaction nobody else can append, so the last hash is read once per transaction, not per event.
        prev = self._head if self._head is not None and self.db.conn.in_transaction else None
        if prev is None:
            row = self.db.execute("SELECT hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
            prev = row[0] if row else GENESIS
        address_hash = drop_hash(address) if address else None
        body = json.dumps(detail, sort_keys=True, ensure_ascii=False)
        digest = _link(prev, at, event, address_hash, key, body)
        self.db.execute("INSERT INTO audit (at, event, address_hash, message_key, detail, prev_hash, hash) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)", [at, event, address_hash, key, body, prev, digest])
        self._head = digest

    # ------------------------------------------------------------ outbox

    def outbox_due(self, now: datetime, limit: int = 100) -> list[dict]:
        """Return queued replies whose next attempt is due, oldest first."""
        cursor = self.db.execute(
            "SELECT id, to_address, kind, message_id, raw, attempts FROM outbox "
            "WHERE status = 'queued' AND (next_attempt_at IS NULL OR next_attempt_at <= ?) ORDER BY id LIMIT ?",
            [_iso(now), limit])
        return _dicts(cursor)

    def outbox_waiting(self, now: datetime) -> int:
        """Count the queued replies that are due."""
        return int(self.db.execute(
            "SELECT count(*) FROM outbox WHERE status = 'queued' AND (next_attempt_at IS NULL OR next_attempt_at <= ?)",
            [_iso(now)]).fetchone()[0])

    def outbox_count(self, status: str) -> int:
        """Count the replies in one status."""
        return int(self.db.execute("SELECT count(*) FROM outbox WHERE status = ?", [status]).fetchone()[0])

    def outbox_in_doubt(self, outbox_id: int) -> None:
        """Mark a reply whose bytes are going to the relay: until its answer, nobody knows whether it went."""
        try:
            self.db.execute("UPDATE outbox SET status = 'in-doubt' WHERE id = ? AND status = 'queued'", [outbox_id])
        except sqlite3.OperationalError as error:
            raise _store_error(error, self.path) from error

    def sent_since(self, since: datetime) -> int:
        """Count the replies sent since a moment (for the hourly circuit breaker)."""
        return int(self.db.execute("SELECT count(*) FROM outbox WHERE status = 'sent' AND sent_at >= ?",
                                   [_iso(since)]).fetchone()[0])

    def outbox_result(self, outbox_id: int, now: datetime, result: str, detail: str = "",
                      next_attempt_at: datetime | None = None) -> None:
        """Record one delivery attempt: sent, retry (with the next attempt's time) or failed."""
        at = _iso(now)
        status = {"sent": "sent", "retry": "queued", "failed": "failed"}[result]
        self._begin()
        try:
            self.db.execute(
                "UPDATE outbox SET status = ?, attempts = attempts + 1, last_error = ?, next_attempt_at = ?, "
                "sent_at = CASE WHEN ? = 'sent' THEN ? ELSE sent_at END WHERE id = ? AND status IN ('queued', 'in-doubt')",
                [status, None if result == "sent" else detail[:500],
                 _iso(next_attempt_at) if next_attempt_at else None, result, at, outbox_id])
            self.db.execute("INSERT INTO outbox_attempts (outbox_id, at, result, detail) VALUES (?, ?, ?, ?)",
                            [outbox_id, at, result, detail[:500]])
            scrub = False
            if result != "retry":
                row = self.db.execute("SELECT to_address, message_key, message_id, erase_after_send FROM outbox "
                                      "WHERE id = ?", [outbox_id]).fetchone()
                if row:
                    # A relay's answer often names the recipient: the audit log keeps only the hash.
                    said = detail[:200].replace(row[0], "<recipient>") if row[0] else detail[:200]
                    self._audit(at, f"reply.{result}", row[0], row[1], {"message_id": row[2], "detail": said})
                    scrub = bool(row[3])
            if scrub:
                # The last mail to an erased address is gone: so is the address, from it and its attempts.
                self.db.execute("UPDATE outbox SET to_address = ?, raw = NULL, subject = '', last_error = NULL "
                                "WHERE id = ?", [drop_hash(row[0]), outbox_id])
                self.db.execute("UPDATE outbox_attempts SET detail = NULL WHERE outbox_id = ?", [outbox_id])
            self.db.execute("COMMIT")
        except BaseException as error:
            self._rollback()
            if isinstance(error, sqlite3.OperationalError):
                raise _store_error(error, self.path) from error
            raise
        if scrub:
            self.compact()

    def outbox(self, status: str | None = None, limit: int = 1000) -> list[dict]:
        """Return outbox rows (without their bytes), newest first."""
        sql = ("SELECT id, to_address, kind, language, subject, status, attempts, created_at, next_attempt_at, "
               "sent_at, last_error, message_id FROM outbox")
        params: list = []
        if status:
            sql += " WHERE status = ?"
            params.append(status)
        cursor = self.db.execute(sql + " ORDER BY id DESC LIMIT ?", params + [limit])
        return _dicts(cursor)

    def outbox_retry(self, outbox_id: int, now: datetime) -> bool:
        """Queue a failed or waiting reply again, due now; False when there is no such unsent reply."""
        changed = self.db.execute(
            "UPDATE outbox SET status = 'queued', next_attempt_at = ? WHERE id = ? AND status != 'sent'",
            [_iso(now), outbox_id]).rowcount
        return bool(changed)

    def outbox_purge(self, before: datetime, statuses: tuple[str, ...] = ("sent",)) -> int:
        """Delete replies in these statuses created before a moment; return how many."""
        marks = ",".join("?" for _ in statuses)
        return self.db.execute(f"DELETE FROM outbox WHERE status IN ({marks}) AND created_at < ?",
                               [*statuses, _iso(before)]).rowcount

    # ------------------------------------------------------------ requests

    def requests(self, status: str | None = None, overdue_at: datetime | None = None) -> list[dict]:
        """Return access and deletion requests: those about a child first, then by due date."""
        sql = _REQUEST_COLUMNS + " WHERE 1 = 1"
        params: list[str] = []
        if status:
            sql += " AND status = ?"
            params.append(status)
        if overdue_at is not None:
            # Past the answer's due date, or (CCPA) past the acknowledgement's with none sent.
            sql += (" AND status IN (?, ?) AND (due_at < ? OR (ack_due_at IS NOT NULL AND ack_due_at < ? "
                    "AND acknowledged_at IS NULL))")
            params += [*OPEN, _iso(overdue_at), _iso(overdue_at)]
        cursor = self.db.execute(sql + " ORDER BY (',' || flags || ',') LIKE '%,child,%' DESC, due_at, id", params)
        return _dicts(cursor)

    def request(self, which: str) -> dict | None:
        """Return one request by its id or its reference (A-…, D-…), or None."""
        condition = "id = ?" if which.isdigit() else "reference = ? COLLATE NOCASE"
        found = _dicts(self.db.execute(f"{_REQUEST_COLUMNS} WHERE {condition}",
                                       [int(which) if which.isdigit() else which]))
        return found[0] if found else None

    def change_request(self, request_id: int, now: datetime, event: str, detail: dict,
                       status: str | None = None, due_at: datetime | None = None, extended_days: int = 0,
                       resolution: str | None = None, reply=None, erase: tuple | None = None) -> dict:
        """Change an open request, audited, in one transaction: its status, due date, and the reply that says so.

        - a closing status (fulfilled, rejected, expired) sets `closed_at` and `resolution`;
        - `erase` = (contact tables, attached database) erases the request's address first (see `erase_address`),
          and the reply is queued to be stripped of the address once sent; what was erased is returned.
        """
        at = _iso(now)
        if erase is not None and erase[1]:
            self.attach_contacts(erase[1])  # ATTACH cannot happen inside a transaction
        self._begin()
        try:
            row = self.db.execute("SELECT address, message_key, status FROM requests WHERE id = ?",
                                  [request_id]).fetchone()
            if row is None:
                raise StoreError(f"no request {request_id}")
            address, key, current = row
            if current not in OPEN:
                raise RefusedError(f"request {request_id} is {current}, no longer open")
            erased: dict = {}
            if erase is not None:
                erased = self._erase(address, key, at, *erase)
                detail = {**detail, "erased": erased}
            if status is not None:
                # The token's hash stays: a second use is then told apart from a token never issued.
                self.db.execute("UPDATE requests SET status = ?, closed_at = CASE WHEN ? THEN ? ELSE closed_at END, "
                                "verified_at = CASE WHEN ? = 'verified' THEN ? ELSE verified_at END, "
                                "resolution = coalesce(?, resolution) WHERE id = ?",
                                [status, status in CLOSED, at, status, at, resolution, request_id])
            if due_at is not None:
                self.db.execute("UPDATE requests SET due_at = ?, extended_days = extended_days + ? WHERE id = ?",
                                [_iso(due_at), extended_days, request_id])
            self._audit(at, event, address, key, {"id": request_id, **detail})
            if reply is not None:
                self._queue(reply, key, at, request_id, erase_after_send=erase is not None)
                self.db.execute("UPDATE requests SET acknowledged_at = coalesce(acknowledged_at, ?) WHERE id = ?",
                                [at, request_id])
            self.db.execute("COMMIT")
        except sqlite3.OperationalError as error:
            self._rollback()
            raise _store_error(error, self.path) from error
        except BaseException:
            self._rollback()
            raise
        if erase is not None:
            self.compact()
        return erased

    def request_by_token(self, token: str) -> dict | None:
        """Return the request a confirmation token was issued for (matched by its hash), or None."""
        found = _dicts(self.db.execute(f"{_REQUEST_COLUMNS} WHERE token_hash = ?", [token_hash(token)]))
        return found[0] if found else None

    def requests_to_expire(self, now: datetime) -> list[dict]:
        """Return the requests still awaiting verification whose confirmation token has expired."""
        return _dicts(self.db.execute(
            f"{_REQUEST_COLUMNS} WHERE status = 'awaiting-verification' AND token_expires_at < ? ORDER BY id",
            [_iso(now)]))

    def contact_rows(self, address: str, tables: tuple[str, ...], database: str | None = None) -> dict[str, list[dict]]:
        """Return the rows of the configured contact tables ("TABLE.COLUMN") whose column holds the address."""
        address = normalise_address(address)
        found: dict[str, list[dict]] = {}
        schema = self._contact_schema(database)
        for spec in tables:
            table, column = contact_column(spec)
            found[spec] = _dicts(self.db.execute(
                f"SELECT * FROM {quote_identifier(schema)}.{quote_identifier(table)} "
                f"WHERE lower(trim({quote_identifier(column)})) = ?", [address]))
        return found

    def personal_data(self, address: str, tables: tuple[str, ...] = (), database: str | None = None) -> dict:
        """Return everything held about an address, as an access request hands it out."""
        found = self.timeline(address)
        found["replies"] = _dicts(self.db.execute(
            "SELECT created_at, kind, language, subject, status, sent_at FROM outbox WHERE to_address = ? "
            "ORDER BY id", [found["address"]]))
        found["unsubscribe_tokens"] = _dicts(self.db.execute(
            "SELECT list, issued_at FROM tokens WHERE address = ? ORDER BY issued_at", [found["address"]]))
        for event in found["audit"]:
            event["detail"] = json.loads(event["detail"])
        found["contacts"] = self.contact_rows(address, tables, database)
        return found

    def _erase(self, address: str, key: str | None, at: str, tables: tuple[str, ...], database: str | None) -> dict:
        """Erase an address's personal data (inside the caller's transaction); return what went, per place.

        What stays: a tombstone (the DROP hash, scope all) so the person stays suppressed and no import brings
        the address back; the ledger rows (without sender or evidence) that keep messages from being processed
        twice; the requests under the hash; the audit log, which only ever held the hash.
        """
        digest = drop_hash(address)
        erased = {}
        erased["messages"] = self.db.execute(
            "UPDATE ledger SET sender = NULL, evidence = '[]' WHERE sender = ?", [address]).rowcount
        erased["suppressions"] = self.db.execute("DELETE FROM suppressions WHERE address = ?", [address]).rowcount
        if not self.db.execute("SELECT 1 FROM suppressions WHERE address IS NULL AND address_hash = ? AND scope = 'all'",
                               [digest]).fetchone():
            self.db.execute("INSERT INTO suppressions (address, address_hash, display, scope, reason, source_key, "
                            "created_at) VALUES (NULL, ?, NULL, 'all', 'deletion', ?, ?)", [digest, key, at])
        erased["requests"] = self.db.execute(
            "UPDATE requests SET address = ?, display = NULL WHERE address = ?", [digest, address]).rowcount
        replies = [row[0] for row in self.db.execute("SELECT id FROM outbox WHERE to_address = ?", [address])]
        for outbox_id in replies:
            self.db.execute("UPDATE outbox_attempts SET detail = NULL WHERE outbox_id = ?", [outbox_id])
        erased["replies"] = self.db.execute(
            "UPDATE outbox SET to_address = ?, raw = NULL, subject = '', last_error = NULL, "
            "status = CASE WHEN status = 'queued' THEN 'erased' ELSE status END WHERE to_address = ?",
            [digest, address]).rowcount
        erased["unsubscribe_tokens"] = self.db.execute("DELETE FROM tokens WHERE address = ?", [address]).rowcount
        if tables:
            schema = self._contact_schema(database)  # attached before the transaction began (change_request)
            for spec in tables:
                table, column = contact_column(spec)
                erased[spec] = self.db.execute(
                    f"DELETE FROM {quote_identifier(schema)}.{quote_identifier(table)} "
                    f"WHERE lower(trim({quote_identifier(column)})) = ?", [address]).rowcount
        return erased

    def _contact_schema(self, database: str | None) -> str:
        """Return the schema that holds the contact tables: "main", or "contacts" (that file, attached once)."""
        if not database:
            return "main"
        self.attach_contacts(database)
        return "contacts"

    def attach_contacts(self, database: str) -> None:
        """Attach the SQLite file that holds the contact tables (as schema "contacts"), once."""
        if any(row[1] == "contacts" for row in self.db.execute("PRAGMA database_list")):
            return
        if not Path(database).is_file():
            raise StoreError(f"{database}: the contact database does not exist")
        self.db.execute("ATTACH DATABASE ? AS contacts", [database])
        self.db.execute("PRAGMA contacts.secure_delete = ON")

    def compact(self) -> None:
        """Rewrite the database files so that nothing deleted survives in them: VACUUM, then empty the WAL."""
        self.db.execute("VACUUM main")
        if any(row[1] == "contacts" for row in self.db.execute("PRAGMA database_list")):
            self.db.execute("VACUUM contacts")
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _queue(self, reply, key: str | None, at: str, request_id: int | None = None,
               erase_after_send: bool = False) -> None:
        self.db.execute(
            """INSERT INTO outbox (message_key, to_address, kind, language, subject, body, status, attempts,
                   created_at, next_attempt_at, message_id, raw, request_id, erase_after_send)
               VALUES (?, ?, ?, ?, ?, '', 'queued', 0, ?, ?, ?, ?, ?, ?)""",
            [key, reply.to, reply.template, reply.language, reply.subject, at, at, reply.message_id, reply.raw,
             request_id, int(erase_after_send)])
        self._audit(at, "reply.queued", reply.to, key,
                    {"template": reply.template, "language": reply.language, "message_id": reply.message_id})

    def request_report(self, year: int) -> dict[str, dict]:
        """Return, per kind, the requests received in a year: complied with, denied, pending, median days to answer.

        Denied counts rejected requests and those never verified (expired), as the CCPA metrics do.
        """
        report: dict[str, dict] = {}
        rows = self.db.execute("SELECT kind, status, received_at, closed_at FROM requests "
                               "WHERE substr(received_at, 1, 4) = ?", [f"{year:04d}"])
        days: dict[str, list[float]] = {}
        for kind, status, received_at, closed_at in rows:
            entry = report.setdefault(kind, {"received": 0, "complied": 0, "denied": 0, "expired": 0, "pending": 0})
            entry["received"] += 1
            if status == "fulfilled":
                entry["complied"] += 1
            elif status in ("rejected", "expired"):
                entry["denied"] += 1
                entry["expired"] += status == "expired"
            else:
                entry["pending"] += 1
            if status in ("fulfilled", "rejected") and closed_at:
                span = datetime.fromisoformat(closed_at) - datetime.fromisoformat(received_at)
                days.setdefault(kind, []).append(span.total_seconds() / 86400)
        for kind, entry in report.items():
            entry["median_days"] = round(statistics.median(days[kind]), 1) if days.get(kind) else None
        return dict(sorted(report.items()))

    def remember_token(self, token: str, address: str, list_name: str, now: datetime) -> None:
        """Keep which address and list a token was issued for (issuing the same token again changes nothing)."""
        self.db.execute("INSERT INTO tokens (token, address, list, issued_at) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (token) DO NOTHING", [token, normalise_address(address), list_name, _iso(now)])

    def token(self, token: str) -> tuple[str, str] | None:
        """Return the (address, list) a token was issued for, or None."""
        row = self.db.execute("SELECT address, list FROM tokens WHERE token = ?", [token.lower()]).fetchone()
        return (row[0], row[1]) if row else None

    def audit_event(self, event: str, address: str | None, key: str | None, detail: dict, now: datetime) -> None:
        """Append one event to the audit log in its own transaction."""
        self._begin()
        try:
            self._audit(_iso(now), event, address, key, detail)
            self.db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def checkpoint(self, source: str) -> tuple[int, int] | None:
        """Return the (UIDVALIDITY, last UID) a mailbox source has reached, or None."""
        row = self.db.execute("SELECT uidvalidity, last_uid FROM checkpoints WHERE source = ?", [source]).fetchone()
        return (int(row[0]), int(row[1])) if row else None

    def set_checkpoint(self, source: str, uidvalidity: int, last_uid: int, now: datetime) -> None:
        """Remember how far a mailbox source has got."""
        try:
            self.db.execute(
                "INSERT INTO checkpoints (source, uidvalidity, last_uid, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (source) DO UPDATE SET uidvalidity = excluded.uidvalidity, "
                "last_uid = excluded.last_uid, updated_at = excluded.updated_at",
                [source, uidvalidity, last_uid, _iso(now)])
        except sqlite3.OperationalError as error:
            raise _store_error(error, self.path) from error

    def verify_audit(self) -> int | None:
        """Return the id of the first audit event whose chain is broken, or None when all links hold."""
        prev = GENESIS
        for id_, at, event, address_hash, key, body, prev_hash, digest in self.db.execute(
                "SELECT id, at, event, address_hash, message_key, detail, prev_hash, hash FROM audit ORDER BY id"):
            if prev_hash != prev or digest != _link(prev, at, event, address_hash, key, body):
                return int(id_)
            prev = digest
        return None

    def suppressions(self, scope: str | None = None) -> list[dict]:
        """Return the suppression list, oldest first, optionally of one scope."""
        keep = ("address", "display", "scope", "reason", "created_at")
        return [{k: row[k] for k in keep} for row in self.suppression_rows(scope)]

    def suppressed(self, address: str) -> list[dict]:
        """Return the suppression rows of one address (matched normalised)."""
        cursor = self.db.execute(
            "SELECT address, scope, reason, created_at FROM suppressions WHERE address = ? OR address_hash = ? "
            "ORDER BY created_at, id", [normalise_address(address), drop_hash(address)])
        return _dicts(cursor)

    def ledger(self, key: str) -> dict | None:
        """Return the ledger row of a message key, or None."""
        cursor = self.db.execute("SELECT * FROM ledger WHERE key = ?", [key])
        row = cursor.fetchone()
        return dict(zip([c[0] for c in cursor.description], row)) if row else None

    def stats(self, since: datetime | None = None) -> dict:
        """Return counts: messages, messages per kind, suppressions (per scope) and requests (per kind and status).

        With `since`, only what happened from that moment on is counted, and `days` gives per-day counts.
        """
        after = _iso(since) if since else ""
        kinds = {kind: 0 for kind in ("opt-out", "access", "deletion", "other")}
        kinds.update({row[0]: row[1] for row in self.db.execute(
            "SELECT kind, count(*) FROM ledger WHERE received_at >= ? GROUP BY kind", [after])})
        scopes = {row[0]: row[1] for row in self.db.execute(
            "SELECT scope, count(*) FROM suppressions WHERE created_at >= ? GROUP BY scope", [after])}
        requests: dict[str, dict[str, int]] = {}
        for kind, status, count in self.db.execute(
                "SELECT kind, status, count(*) FROM requests WHERE received_at >= ? GROUP BY kind, status", [after]):
            requests.setdefault(kind, {})[status] = count
        reasons = {row[0]: row[1] for row in self.db.execute(
            "SELECT reason, count(*) FROM ledger WHERE kind = 'other' AND received_at >= ? GROUP BY reason "
            "ORDER BY count(*) DESC", [after])}
        days: dict[str, dict[str, int]] = {}
        for day, kind, count in self.db.execute(
                "SELECT substr(received_at, 1, 10), kind, count(*) FROM ledger WHERE received_at >= ? "
                "GROUP BY 1, 2 ORDER BY 1", [after]):
            days.setdefault(day, {k: 0 for k in kinds})[kind] = count
        for day, count in self.db.execute(
                "SELECT substr(created_at, 1, 10), count(*) FROM suppressions WHERE created_at >= ? GROUP BY 1",
                [after]):
            days.setdefault(day, {k: 0 for k in kinds})["suppressions"] = count
        return {
            "messages": sum(kinds.values()),
            "kinds": kinds,
            "other_reasons": reasons,
            "suppressions": {"total": sum(scopes.values()), "addresses": self.db.execute(
                "SELECT count(DISTINCT address_hash) FROM suppressions WHERE created_at >= ?", [after]).fetchone()[0],
                "scopes": scopes},
            "requests": {"total": sum(sum(v.values()) for v in requests.values()), "kinds": requests},
            "days": {day: {"suppressions": 0, **counts, "messages": sum(counts.get(k, 0) for k in kinds)}
                     for day, counts in sorted(days.items())},
        }

    # ------------------------------------------------------------ suppression administration

    def suppression_rows(self, scope: str | None = None, since: datetime | None = None) -> list[dict]:
        """Return suppression rows with hashes and sources, oldest first; optionally of one scope, or since a moment."""
        sql = ("SELECT address, address_hash, display, scope, reason, source_key, created_at FROM suppressions "
               "WHERE created_at >= ?")
        params: list[str] = [_iso(since) if since else ""]
        if scope:
            sql += " AND scope = ?"
            params.append(scope)
        cursor = self.db.execute(sql + " ORDER BY created_at, id", params)
        return _dicts(cursor)

    def suppressed_addresses(self, scopes: tuple[str, ...] | None = None) -> dict[str, str]:
        """Return {address: reason} of the rows that have an address, in these scopes (None: every scope)."""
        # The scrub hot path (NOTES.md: a Python set beats the SQL anti-join). Two group_concat columns of
        # one scan, split and zipped in C, load a million rows about twice as fast as iterating a cursor.
        condition, params = _scope_filter(scopes)
        where = "address IS NOT NULL AND address != ''" + condition
        addresses, reasons = self.db.conn.execute(
            f"SELECT group_concat(address, char(31)), group_concat(reason, char(31)) FROM suppressions "
            f"WHERE {where}", params).fetchone()
        if addresses is None:
            return {}
        addresses, reasons = addresses.split("\x1f"), reasons.split("\x1f")
        if len(addresses) == len(reasons):
            return dict(zip(addresses, reasons))
        # A reason holding the separator: take the slow way.
        return dict(self.db.conn.execute(f"SELECT address, reason FROM suppressions WHERE {where}", params))

    def suppressed_hashes(self, scopes: tuple[str, ...] | None = None) -> dict[str, str]:
        """Return {address_hash: reason} of the rows that keep only a hash (no address), in these scopes."""
        condition, params = _scope_filter(scopes)
        return dict(self.db.conn.execute(
            "SELECT address_hash, reason FROM suppressions WHERE (address IS NULL OR address = '')" + condition, params))

    def add_suppressions(self, entries, now: datetime, source: str) -> list[dict]:
        """Add (address, display, scope, reason) entries in one transaction, auditing each new row; return the new ones.

        An entry whose address is already suppressed in that scope changes nothing and is not audited; nor does
        one whose address was erased (a deletion tombstone holds its hash): it stays suppressed everywhere, and
        an import does not bring the address back into the database.
        """
        at = _iso(now)
        added: list[dict] = []
        self._begin()
        try:
            for address, display, scope, reason in entries:
                if self.db.execute("SELECT 1 FROM suppressions WHERE address IS NULL AND address_hash = ? "
                                   "AND scope = 'all'", [drop_hash(address)]).fetchone():
                    continue
                inserted = self.db.execute(
                    """INSERT INTO suppressions (address, address_hash, display, scope, reason, source_key, created_at)
                       VALUES (?, ?, ?, ?, ?, NULL, ?) ON CONFLICT (address, scope) DO NOTHING""",
                    [address, drop_hash(address), display, scope, reason, at]).rowcount
                if inserted:
                    added.append({"address": address, "scope": scope, "reason": reason})
                    self._audit(at, "suppression.add", address, None, {"scope": scope, "reason": reason,
                                                                         "source": source})
            self.db.execute("COMMIT")
        except BaseException as error:
            self._rollback()
            if isinstance(error, sqlite3.OperationalError):
                raise _store_error(error, self.path) from error
            raise
        return added

    def remove_suppression(self, address: str, scope: str, reason: str, now: datetime, refuse=None) -> list[dict]:
        """Remove an address's suppression in one scope, audited, in one transaction; return the removed rows.

        `refuse(rows)` sees every suppression row of the address (all scopes) inside the transaction and
        returns why the removal must not happen, or None; a reason raises StoreError and changes nothing.
        """
        at = _iso(now)
        address, digest = normalise_address(address), drop_hash(address)
        self._begin()
        try:
            cursor = self.db.execute(
                "SELECT id, address, address_hash, scope, reason, created_at FROM suppressions "
                "WHERE address = ? OR address_hash = ? ORDER BY created_at, id", [address, digest])
            rows = _dicts(cursor)
            why = refuse(rows) if refuse else None
            if why:
                raise RefusedError(why)
            removed = [row for row in rows if row["scope"] == scope]
            for row in removed:
                self.db.execute("DELETE FROM suppressions WHERE id = ?", [row["id"]])
                self._audit(at, "suppression.remove", address, None, {
                    "scope": scope, "reason": reason, "was": row["reason"], "since": row["created_at"],
                    "forced": refuse is None})
            self.db.execute("COMMIT")
        except BaseException as error:
            self._rollback()
            if isinstance(error, sqlite3.OperationalError):
                raise _store_error(error, self.path) from error
            raise
        return removed

    def _begin(self) -> None:
        self._head = None
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            raise _store_error(error, self.path) from error

    def _rollback(self) -> None:
        # SQLite may have rolled the whole transaction back itself (SQLITE_FULL, SQLITE_IOERR): a second
        # ROLLBACK would raise and hide the error that caused it.
        self._head = None
        if self.db.conn.in_transaction:
            self.db.execute("ROLLBACK")

    def timeline(self, address: str) -> dict:
        """Return everything known about an address: audit events, ledger rows, requests and suppressions."""
        address, digest = normalise_address(address), drop_hash(address)

        def rows(sql: str, params: list) -> list[dict]:
            cursor = self.db.execute(sql, params)
            return _dicts(cursor)

        return {
            "address": address,
            "address_hash": digest,
            "audit": rows("SELECT id, at, event, message_key, detail FROM audit WHERE address_hash = ? ORDER BY id",
                          [digest]),
            "messages": rows("SELECT key, received_at, source, kind, reason, scope, rule, action FROM ledger "
                             "WHERE sender = ? ORDER BY received_at, rowid", [address]),
            "requests": rows("SELECT id, kind, status, reference, received_at, due_at FROM requests "
                             "WHERE address = ? ORDER BY received_at, id", [address]),
            "suppressions": rows("SELECT scope, reason, created_at FROM suppressions "
                                 "WHERE address = ? OR address_hash = ? ORDER BY created_at, id", [address, digest]),
        }


_REQUEST_COLUMNS = ("SELECT id, reference, kind, address, display, status, flags, language, message_key, "
                    "received_at, due_at, jurisdiction, ack_due_at, acknowledged_at, token_expires_at, verified_at, "
                    "closed_at, resolution, extended_days FROM requests")


def _link(prev: str, at: str, event: str, address_hash: str | None, key: str | None, body: str) -> str:
    """Return an audit event's hash: over the previous event's hash and everything the event says."""
    return hashlib.sha256("\x1f".join((prev, at, event, address_hash or "", key or "", body)).encode()).hexdigest()


def _dicts(cursor) -> list[dict]:
    """Return a cursor's rows as dicts keyed by column name."""
    columns = [c[0] for c in cursor.description]
    return [dict(zip(columns, row)) for row in cursor]


def _scope_filter(scopes: tuple[str, ...] | None) -> tuple[str, list[str]]:
    """Return an SQL condition on `scope` (placeholders only) and its parameters; None: every scope."""
    if scopes is None:
        return "", []
    return f" AND scope IN ({','.join('?' for _ in scopes)})", list(scopes)


def _store_error(error: sqlite3.OperationalError, path: Path) -> StoreError:
    text = str(error)
    if "locked" in text or "busy" in text:
        return TransientError(f"{path}: the database is busy ({text}); try again")
    if "full" in text:  # SQLITE_FULL: like a busy database, it passes once there is room again (EX_TEMPFAIL)
        return TransientError(f"{path}: no room to write ({text}); try again")
    return StoreError(f"{path}: {text}")
