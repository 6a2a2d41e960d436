"""Fulfil, reject and expire access and deletion requests: gather what is held, erase it, and say so.

- Access: everything held about the address (suppressions, ledger, requests, replies, audit events and the
  configured contact tables) as a JSON attachment and a summary, sent only to the request's own address.
- Deletion: the address is erased from the store and the contact tables; a tombstone (its DROP hash, scope
  `all`) keeps it suppressed; the reply that says what was erased loses the address once it is sent.
- A request not confirmed in time expires with a reply that says how to ask again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime

from optout.errors import RefusedError, StoreError
from optout.model import Message, Reply
from optout.replies import render_reply
from optout.store import Store

log = logging.getLogger("optout.requests")


@dataclass(frozen=True)
class Fulfilment:
    """What fulfilling requests needs: the reply templates and sender, the contact tables, and whether it is automatic."""

    templates: object
    reply_from: str
    organisation: str = ""
    contact_tables: tuple[str, ...] = ()  # "TABLE.COLUMN"
    contacts_database: str | None = None  # another SQLite file that holds them; None: the optout database
    automatic: bool = True  # False: a verified request waits for `optout requests fulfil`


def export(store: Store, request: dict, now: datetime, fulfilment: Fulfilment) -> dict:
    """Return the access export of a request: everything held about its address, as one JSON-ready object."""
    data = store.personal_data(request["address"], fulfilment.contact_tables, fulfilment.contacts_database)
    return {"request": {k: request[k] for k in ("reference", "kind", "received_at", "status")},
            "generated_at": now.isoformat(timespec="seconds"), "controller": fulfilment.organisation or None, **data}


def summary(data: dict) -> dict[str, int]:
    """Count what an export holds, place by place (what the reply lists for a person)."""
    counts = {name: len(data[name]) for name in ("messages", "suppressions", "requests", "replies", "audit",
                                                     "unsubscribe_tokens")}
    counts.update({f"contacts:{spec}": len(rows) for spec, rows in data["contacts"].items()})
    return counts


def fulfil(store: Store, request_id: int, now: datetime, fulfilment: Fulfilment, by: str = "automatic",
           verified_by: str | None = None) -> dict:
    """Fulfil a verified request: send the data (access) or erase it (deletion), in one transaction with its reply.

    Returns what was sent or erased, place by place. Only a verified request is fulfilled — by mail, or by an
    admin who says how (`verified_by`, audited); the reply goes to the address the request came from and was
    confirmed from, never to any other.
    """
    request = _request(store, request_id)
    if verified_by and request["status"] == "awaiting-verification":
        store.change_request(request_id, now, "request.verified", {"by": "admin", "how": verified_by},
                             status="verified")
        request = _request(store, request_id)
    if request["status"] != "verified":
        raise RefusedError(f"request {request['reference'] or request_id} is {request['status']}: only a verified "
                           "request is fulfilled (the requester confirms by replying to the acknowledgement)")
    data = export(store, request, now, fulfilment)
    counts = summary(data)
    if request["kind"] == "access":
        document = json.dumps(data, ensure_ascii=False, indent=1, default=str).encode("utf-8")
        filename = f"personal-data-{request['reference'] or request_id}.json"
        rendered = _render(store, request, "access-fulfilled", now, fulfilment, found=counts,
                           attachments=((filename, "application/json", document),), filename=filename)
        store.change_request(request_id, now, "request.fulfil", {"by": by, "sent": counts}, status="fulfilled",
                             resolution="data sent", reply=rendered)
        return counts
    # The audit log is not erased: it only ever held the address's hash.
    rendered = _render(store, request, "deletion-fulfilled", now, fulfilment,
                       erased={place: count for place, count in counts.items() if place != "audit"})
    erased = store.change_request(request_id, now, "request.fulfil", {"by": by}, status="fulfilled",
                                  resolution="erased", reply=rendered,
                                  erase=(fulfilment.contact_tables, fulfilment.contacts_database))
    return erased


def hold(store: Store, request_id: int, now: datetime, fulfilment: Fulfilment) -> None:
    """Tell the requester a confirmed request is in a person's hands (fulfilment held for an admin), audited."""
    request = _request(store, request_id)
    rendered = _render(store, request, "request-verified", now, fulfilment)
    store.change_request(request_id, now, "request.held", {"reason": "fulfilment is held for an admin"},
                         reply=rendered)


def reject(store: Store, request_id: int, now: datetime, fulfilment: Fulfilment, reason: str,
           notify: bool = True) -> None:
    """Reject an open request with a reason (audited); tell the requester unless `notify` is False."""
    request = _request(store, request_id)
    rendered = _render(store, request, "request-rejected", now, fulfilment, reason=reason) if notify else None
    store.change_request(request_id, now, "request.reject", {"reason": reason, "notified": notify},
                         status="rejected", resolution=f"rejected: {reason}", reply=rendered)


def expire(store: Store, request_id: int, now: datetime, fulfilment: Fulfilment) -> None:
    """Close a request that was not confirmed in time, with a reply that says how to ask again."""
    request = _request(store, request_id)
    rendered = _render(store, request, "request-expired", now, fulfilment)
    store.change_request(request_id, now, "request.expire", {"reason": "not confirmed in time"}, status="expired",
                         resolution="not confirmed in time", reply=rendered)


def sweep(store: Store, now: datetime, fulfilment: Fulfilment) -> dict[str, int]:
    """Expire the requests whose confirmation time has passed and, when automatic, fulfil the verified ones.

    Run by the daemon and by `run --once`; a verified request left unfulfilled by a crash is picked up here.
    One request that fails is logged and left for the next sweep; the others go on.
    """
    done = {"expired": 0, "fulfilled": 0, "failed": 0}
    work = [(expire, row["id"], "expired") for row in store.requests_to_expire(now)]
    if fulfilment.automatic:
        work += [(fulfil, row["id"], "fulfilled") for row in store.requests("verified")]
    for action, request_id, outcome in work:
        try:
            action(store, request_id, now, fulfilment)
            done[outcome] += 1
        except RefusedError:
            continue  # changed meanwhile (an admin closed it)
        except StoreError:
            raise
        except Exception as error:  # a broken template or contact table: the request waits, the others go on
            done["failed"] += 1
            log.error("request %s not %s: %s: %s", request_id, outcome, type(error).__name__, str(error)[:200])
    return done


def _request(store: Store, request_id: int) -> dict:
    request = store.request(str(request_id))
    if request is None:
        raise StoreError(f"no request {request_id}")
    return request


def _render(store: Store, request: dict, template: str, now: datetime, fulfilment: Fulfilment, attachments=(),
            **facts):
    """Render a reply about a request: to its address, in its language, threaded under the request's message."""
    ledger = store.ledger(request["message_key"]) if request["message_key"] else None
    original = Message(sha256=hashlib.sha256(f"{request['message_key']}\x1f{template}".encode()).hexdigest(), size=0,
                       message_id=ledger["message_id"] if ledger else None)
    due = datetime.fromisoformat(request["due_at"])
    reply = Reply(template, request["address"], request["display"] or request["address"],
                  request["language"] or "en", (request["kind"],), request["reference"] or str(request["id"]), due,
                  tuple(filter(None, (request["flags"] or "").split(","))), facts=tuple(facts.items()),
                  attachments=tuple(attachments))
    return render_reply(reply, original, fulfilment.templates, fulfilment.reply_from, now, fulfilment.organisation)
