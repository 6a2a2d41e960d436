"""Drain a 10,000-message IMAP backlog with `optout run --once`; print msg/s beside the bare fetch+parse ceiling.

Figures, not a test: both are measured in this run, against a private Dovecot started on a free port, over the
same seeded messages (two users, one copy each). Also prints the peak RSS of the optout process at a quarter,
half and all of the backlog (2,500 / 5,000 / 10,000 by default), to show memory stays flat.
Usage: python bench/imap_backlog.py [--messages N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from email.message import EmailMessage
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone
from pathlib import Path

logging.getLogger("flanker.addresslib._parser.parser").setLevel(logging.ERROR)
logging.getLogger("flanker").setLevel(logging.ERROR)

from imapclient import IMAPClient  # noqa: E402

from figures import peak_rss_kib, record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from classify import bare_parse  # noqa: E402  (the same ceiling as bench/classify.py)
from dovecot import Dovecot, dovecot_binary  # noqa: E402

# Per language: greeting, what the person asks (by kind), sign-off, and how their client introduces the quote.
LANGUAGES = {
    "en": ("Hello,", {
        "opt-out": ["Please unsubscribe me from your newsletter.", "Stop sending me these emails, I want to opt out."],
        "access": ["What personal data do you hold about me? Please send me a copy."],
        "deletion": ["Please delete my account and all personal data you hold about me."],
        "other": ["Do you ship to Ireland?", "Thanks, the discount code worked."],
    }, "Kind regards,", "On {date}, Example News <news@example.com> wrote:"),
    "de": ("Hallo,", {
        "opt-out": ["Bitte melden Sie mich vom Newsletter ab.", "Ich möchte keine Werbung mehr erhalten."],
        "access": ["Bitte teilen Sie mir mit, welche Daten Sie über mich gespeichert haben (Auskunft nach Art. 15 DSGVO)."],
        "deletion": ["Bitte löschen Sie alle meine personenbezogenen Daten und mein Konto."],
        "other": ["Wann kommt meine Bestellung an?", "Vielen Dank für die schnelle Antwort."],
    }, "Viele Grüße", "Am {date} schrieb Example News <news@example.com>:"),
    "fr": ("Bonjour,", {
        "opt-out": ["Merci de me désabonner de votre newsletter.", "Je ne veux plus recevoir vos e-mails."],
        "access": ["Je souhaite accéder aux données personnelles que vous détenez sur moi."],
        "deletion": ["Merci de supprimer mon compte et toutes mes données personnelles."],
        "other": ["Livrez-vous en Belgique ?", "Merci pour votre aide."],
    }, "Cordialement,", "Le {date}, Example News <news@example.com> a écrit :"),
    "es": ("Hola,", {
        "opt-out": ["Por favor, darme de baja de su boletín.", "No quiero recibir más correos."],
        "access": ["Quiero saber qué datos personales tienen sobre mí."],
        "deletion": ["Por favor, borren mi cuenta y todos mis datos personales."],
        "other": ["¿Hacen envíos a México?", "Gracias por la información."],
    }, "Saludos,", "El {date}, Example News <news@example.com> escribió:"),
    "it": ("Buongiorno,", {
        "opt-out": ["Vi prego di cancellarmi dalla newsletter.", "Non voglio più ricevere le vostre email."],
        "access": ["Vorrei sapere quali dati personali conservate su di me."],
        "deletion": ["Vi chiedo di cancellare il mio account e tutti i miei dati personali."],
        "other": ["Spedite anche in Svizzera?", "Grazie mille per l'aiuto."],
    }, "Cordiali saluti,", "Il {date}, Example News <news@example.com> ha scritto:"),
    "nl": ("Hallo,", {
        "opt-out": ["Graag wil ik me afmelden voor de nieuwsbrief.", "Ik wil geen e-mails meer ontvangen."],
        "access": ["Ik wil graag inzage in de persoonsgegevens die u van mij heeft."],
        "deletion": ["Verwijder alstublieft mijn account en al mijn gegevens."],
        "other": ["Leveren jullie ook in België?", "Bedankt voor de snelle reactie."],
    }, "Met vriendelijke groet,", "Op {date} schreef Example News <news@example.com>:"),
}
NEWSLETTER = [
    "This week in the shop: new arrivals in outdoor gear, and twenty percent off everything in the garden range.",
    "Our spring catalogue is out. Browse two hundred pages of ideas for the house, the balcony and the allotment.",
    "Members get free delivery on orders above thirty euros until the end of the month; see the terms below.",
    "You receive this email because you subscribed at example.com. Manage your preferences or unsubscribe here:",
    "https://example.com/preferences?u=4f2a9c81&list=weekly-news&utm_source=newsletter&utm_medium=email",
    "Example Shop GmbH, Musterstrasse 1, 10115 Berlin. Registered at Amtsgericht Berlin HRB 123456.",
]
KINDS = ("opt-out", "opt-out", "opt-out", "access", "deletion", "other")


def realistic_messages(count: int, seed: int = 7, tag: str = "bench") -> list[bytes]:
    """Return `count` distinct replies of 3-8 KB: a few lines from a person above a quoted newsletter."""
    rng = random.Random(seed)
    start = datetime(2026, 11, 1, 8, 0, tzinfo=timezone.utc)
    messages = []
    for n in range(count):
        language = rng.choice(tuple(LANGUAGES))
        greeting, asks, sign_off, attribution = LANGUAGES[language]
        kind = rng.choice(KINDS)
        name = f"Person {n % 2000}"
        when = start + timedelta(minutes=n)
        text = [greeting, "", rng.choice(asks[kind]), "", sign_off, name, "", "-- ", f"Sent from my phone ({n})", "",
                attribution.format(date=format_datetime(when - timedelta(days=2))), ">"]
        html = n % 3 == 0
        target = rng.randint(3200, 7800)
        # Headers take ~450 bytes; an HTML alternative repeats the text with markup (~1.1x).
        room = (target - 450) / (2.2 if html else 1.0)
        size = sum(map(len, text)) + len(text)
        while size < room - 60:
            line = "> " + rng.choice(NEWSLETTER)
            text.append(line)
            size += len(line) + 1
        message = EmailMessage()
        message["From"] = f"{name} <person{n % 2000}@example.net>"
        message["To"] = "privacy@example.com"
        message["Subject"] = "Re: " + rng.choice(["Weekly news", "Your spring catalogue", "Members' offers"])
        message["Date"] = format_datetime(when)
        message["Message-ID"] = f"<{tag}-{n:06d}.{seed}@mail.example.net>"
        message["In-Reply-To"] = f"<news-{n % 50}@example.com>"
        message["Content-Language"] = language
        body = "\n".join(text) + "\n"
        message.set_content(body)
        if html:
            html = "<html><body>" + "".join(f"<p>{line}</p>" for line in text[:10]) + "<blockquote>" + \
                   "<br>".join(line[2:] for line in text[12:]) + "</blockquote></body></html>"
            message.add_alternative(html, subtype="html")
        messages.append(bytes(message))
    return messages


def seed(mailbox, messages: list[bytes], batch: int = 100) -> float:
    """Append the messages in MULTIAPPEND batches; return the seconds it took."""
    started = time.perf_counter()
    mailbox.append(messages, batch=batch)
    return time.perf_counter() - started


def ceiling(mailbox) -> tuple[int, float]:
    """Fetch every message with BODY.PEEK[] in batches of 1000 and parse it; return (count, seconds)."""
    started = time.perf_counter()
    count = 0
    with IMAPClient(mailbox.server.host, port=mailbox.server.port, ssl=False, timeout=120) as client:
        client.login(mailbox.user, mailbox.server.password)
        client.select_folder("INBOX", readonly=True)
        uids = client.search(["ALL"])
        for at in range(0, len(uids), 1000):
            for item in client.fetch(uids[at:at + 1000], ["BODY.PEEK[]"]).values():
                bare_parse(item[b"BODY[]"])
                count += 1
    return count, time.perf_counter() - started


def tree_rss_kib(pid: int) -> int:
    """Return the resident set of a process and all its descendants now (the workers that examine mail)."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    pending += [int(child) for child in children.read().split()]
        except (OSError, ValueError):
            continue
    return total


def ledger_count(database: Path) -> int:
    try:
        connection = sqlite3.connect(f"file:{database}?mode=rw", uri=True, timeout=1)
    except sqlite3.OperationalError:
        return 0
    try:
        return connection.execute("SELECT count(*) FROM ledger").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        connection.close()


def run_optout(mailbox, workdir: Path, total: int) -> dict:
    """Run `optout run --once --json` on the mailbox; return seconds, summary and RSS figures."""
    database = workdir / "optout.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTOUT_")}
    env.update(mailbox.env(), OPTOUT_DATABASE=str(database))
    if os.environ.get("OPTOUT_CONFIG"):  # e.g. a config with [processing] workers = 0, to compare
        env["OPTOUT_CONFIG"] = os.environ["OPTOUT_CONFIG"]
    script = Path(sys.executable).with_name("optout")
    command = [str(script)] if script.exists() else [sys.executable, "-c", "from optout.cli import main; main()"]
    milestones = sorted({max(1, total // 4), max(1, total // 2), total})
    at_milestone: dict[int, int] = {}
    peak = 0
    tree_peak = 0
    first_row: float | None = None
    with open(workdir / "optout.log", "wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command + ["run", "--once", "--json"], cwd=workdir, env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
        done = threading.Event()

        def watch() -> None:
            nonlocal peak, tree_peak, first_row
            ticks = 0
            while not done.is_set():
                peak = max(peak, peak_rss_kib(process.pid))
                if ticks % 10 == 0:
                    tree_peak = max(tree_peak, tree_rss_kib(process.pid))
                ticks += 1
                if (first_row is None or ticks % 5 == 0) and len(at_milestone) < len(milestones):
                    processed = ledger_count(database)
                    if processed and first_row is None:
                        first_row = time.perf_counter() - started
                    for milestone in milestones:
                        if processed >= milestone and milestone not in at_milestone:
                            at_milestone[milestone] = peak
                done.wait(0.01)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        output, _ = process.communicate()
        seconds = time.perf_counter() - started
        done.set()
        watcher.join()
    try:
        summary = json.loads(output.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        summary = {"error": (workdir / "optout.log").read_text(errors="replace")[-2000:]}
    return {"seconds": seconds, "first_row": first_row, "status": process.returncode, "summary": summary,
            "peak_kib": peak, "tree_peak_kib": tree_peak, "milestones": at_milestone,
            "ledger": ledger_count(database)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    options = parser.parse_args()
    if dovecot_binary() is None:
        sys.exit("dovecot is not installed (apt-get install dovecot-imapd)")
    total = options.messages
    messages = realistic_messages(total)
    size = sum(map(len, messages))
    print(f"backlog: {total} messages, {size / 1e6:.1f} MB, {size / total / 1e3:.1f} KB on average, "
          f"{len(LANGUAGES)} languages")
    workdir = Path(tempfile.mkdtemp(prefix="optout-bench-"))
    try:
        with Dovecot.temporary() as server:
            bare_box, optout_box = server.mailbox(), server.mailbox()
            seconds = seed(bare_box, messages) + seed(optout_box, messages)
            print(f"seeded 2 x {total} with MULTIAPPEND batches of 100: {2 * total / seconds:,.0f} msg/s")
            count, bare_seconds = ceiling(bare_box)
            result = run_optout(optout_box, workdir, total)
            left = optout_box.counts().get("INBOX")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    bare_rate = count / bare_seconds
    our_rate = total / result["seconds"]
    print(f"{'':44}{'msg/s':>10}{'seconds':>10}")
    print(f"{'ceiling: FETCH BODY.PEEK[] x1000 + flanker':44}{bare_rate:>10,.0f}{bare_seconds:>10.2f}")
    print(f"{'optout run --once (process start included)':44}{our_rate:>10,.0f}{result['seconds']:>10.2f}")
    if result["first_row"]:
        rest = result["seconds"] - result["first_row"]
        print(f"{'optout, from its first ledger row':44}{(total - 1) / rest:>10,.0f}{rest:>10.2f}"
              f"   (start-up, imports and login: {result['first_row']:.2f} s)")
    print(f"ratio: {our_rate / bare_rate:.2f} of the ceiling end to end (aim: at least 0.50)")
    record(f"IMAP backlog of {total:,}, run --once (ceiling: FETCH x1000 + flanker)", our_rate, bare_rate, "msg/s",
           result["peak_kib"] / 1024, aim="0.50", note=f"with workers {result['tree_peak_kib'] / 1024:.0f} MiB")
    for milestone, peak in sorted(result["milestones"].items()):
        print(f"peak RSS of optout after {milestone:>6,} messages: {peak / 1024:7.1f} MiB")
    # VmHWM, not getrusage(RUSAGE_CHILDREN): a child's ru_maxrss also counts the pages it shared with this
    # process between fork and exec, i.e. the seeded messages held here (~110 MiB at 10,000).
    print(f"peak RSS of optout at exit (replies sent too): {result['peak_kib'] / 1024:7.1f} MiB")
    print(f"peak RSS of optout with its worker processes (sampled every 0.1 s): "
          f"{result['tree_peak_kib'] / 1024:7.1f} MiB")
    print(f"optout exit {result['status']}; ledger rows {result['ledger']}; left in INBOX {left}; "
          f"summary {json.dumps(result['summary'])[:300]}")


if __name__ == "__main__":
    main()
