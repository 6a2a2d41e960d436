"""Start and stop a private Dovecot on 127.0.0.1 and a free port, for tests and benchmarks.

- One instance per test session (start ~30 ms, stop ~3 s); a fresh user, i.e. a fresh empty maildir, per test.
- Everything lives in one temp folder: config, base_dir, state_dir, log and the mail; nothing touches /etc.
- Dovecot's output goes to a file, never a pipe: a caller that captures it hangs until Dovecot exits.
- Works as root (mail owned by nobody:nogroup, the mail user cannot be root) and as an ordinary user.
- Imports no pytest: `bench/` uses it too. `require_dovecot()` is the only place that decides skip or fail.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

from imapclient import IMAPClient

FOLDER_KINDS = ("opt-out", "access", "deletion", "other")
REVIEW_REASONS = ("unclear", "question", "malformed", "subscribe", "empty", "error")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    """Wait until host:port accepts a connection; raise TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing accepts connections on {host}:{port} after {timeout:.0f}s") from None
            time.sleep(0.02)


def dovecot_binary() -> str | None:
    """Return the path of the dovecot binary (it lives in /usr/sbin, often not on a user's PATH), or None."""
    return shutil.which("dovecot") or shutil.which("dovecot", path="/usr/sbin:/usr/local/sbin:/sbin")


def require_dovecot() -> str:
    """Return the dovecot binary; without one, fail when the CI variable is set and skip otherwise."""
    import pytest

    binary = dovecot_binary()
    if binary is None:
        reason = ("dovecot is not installed (apt-get install dovecot-imapd): the IMAP tests need a real Dovecot")
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip", pytrace=False)
        pytest.skip(reason)
    return binary


def processed_folder(kind: str, delimiter: str = ".") -> str:
    """Return the folder optout files a message of this kind in."""
    return f"Processed{delimiter}{kind}"


def folder_of(kind: str, reason: str | None) -> str:
    """Return the folder optout should file a message in, from its kind and reason (Review for the unclear ones)."""
    if kind == "other" and (reason or "") in REVIEW_REASONS:
        return "Review"
    return processed_folder(kind)


ALL_FOLDERS = ("INBOX",) + tuple(processed_folder(kind) for kind in FOLDER_KINDS) + ("Review",)


class Dovecot:
    """One private Dovecot instance, configured in `root`."""

    def __init__(self, root: Path, port: int | None = None, password: str | None = None) -> None:
        self.root = Path(root)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        # A password unique to this instance, so a test can grep logs for it without false hits.
        self.password = password or f"pw-{uuid.uuid4().hex}"
        self.binary = dovecot_binary()
        self.config = self.root / "dovecot.conf"
        self.log = self.root / "dovecot.log"
        self.mail = self.root / "mail"
        self.running = False

    def _identity(self) -> tuple[str, str]:
        if os.geteuid() == 0:
            group = "nogroup" if _group_exists("nogroup") else grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
            return "nobody", group
        entry = pwd.getpwuid(os.geteuid())
        return entry.pw_name, grp.getgrgid(entry.pw_gid).gr_name

    def write_config(self) -> None:
        """Write dovecot.conf and make the folders it names."""
        user, group = self._identity()
        for folder in (self.root, self.root / "base", self.root / "state", self.mail):
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o755)
        if os.geteuid() == 0:
            shutil.chown(self.mail, user, group)
        self.config.write_text(f"""\
instance_name = optout-test-{uuid.uuid4().hex[:12]}
base_dir = {self.root / 'base'}
state_dir = {self.root / 'state'}
log_path = {self.log}
info_log_path = {self.log}
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{self.mail}/%u
mail_fsync = never
default_internal_user = {user}
default_login_user = {user}
first_valid_uid = 0
passdb {{
  driver = static
  args = password={self.password}
}}
userdb {{
  driver = static
  args = uid={user} gid={group} home={self.mail}/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
protocol imap {{
  mail_max_userip_connections = 50
}}
""")

    def start(self, timeout: float = 10.0) -> None:
        """Start the server (it daemonises) and wait until its port accepts connections."""
        if self.binary is None:
            raise RuntimeError("dovecot is not installed (apt-get install dovecot-imapd)")
        if not self.config.exists():
            self.write_config()
        with open(self.log, "ab") as log:
            result = subprocess.run([self.binary, "-c", str(self.config)], stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"dovecot did not start (exit {result.returncode}):\n{self.log_tail()}")
        self.running = True
        try:
            wait_for_port(self.port, timeout)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"dovecot started but does not listen on {self.port}:\n{self.log_tail()}") from None

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server and wait until it has exited."""
        if not self.running:
            return
        with open(self.log, "ab") as log:
            subprocess.run([self.binary, "-c", str(self.config), "stop"], stdin=subprocess.DEVNULL, stdout=log,
                           stderr=subprocess.STDOUT, timeout=timeout)
        self.running = False

    def log_tail(self, lines: int = 20) -> str:
        """Return the end of Dovecot's log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def mailbox(self, user: str | None = None) -> Mailbox:
        """Return a mailbox of a new user: empty until something is appended."""
        return Mailbox(self, user or f"u{uuid.uuid4().hex[:16]}")

    @classmethod
    @contextlib.contextmanager
    def temporary(cls, **options) -> Iterator[Dovecot]:
        """Run a Dovecot in a new temp folder under /tmp, then stop it and remove the folder.

        Not under pytest's tmp_path: its parents are mode 700, and the mail user (nobody) must reach the mail.
        """
        root = Path(tempfile.mkdtemp(prefix="optout-dovecot-"))
        server = cls(root, **options)
        try:
            server.start()
            yield server
        finally:
            try:
                server.stop()
            finally:
                shutil.rmtree(root, ignore_errors=True)


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


class Mailbox:
    """One user's mailbox on a Dovecot: how optout is told to reach it, and an IMAP client to inspect it."""

    def __init__(self, server: Dovecot, user: str) -> None:
        self.server = server
        self.user = user

    def url(self, folder: str = "INBOX") -> str:
        """Return the OPTOUT_IMAP_URL of a folder of this mailbox."""
        return f"imap://{self.user}@{self.server.host}:{self.server.port}/{folder}"

    def env(self, folder: str = "INBOX") -> dict[str, str]:
        """Return the environment variables that point optout at this mailbox."""
        return {"OPTOUT_IMAP_URL": self.url(folder), "OPTOUT_IMAP_PASSWORD": self.server.password}

    def client(self, timeout: float = 30.0) -> IMAPClient:
        """Return a logged-in IMAP client; use it in a `with` block, which logs out."""
        client = IMAPClient(self.server.host, port=self.server.port, ssl=False, timeout=timeout)
        try:
            client.login(self.user, self.server.password)
        except BaseException:
            client.shutdown()
            raise
        return client

    def append(self, messages: list[bytes], folder: str = "INBOX", flags: list[tuple] | None = None,
               batch: int = 100) -> None:
        """Append messages in MULTIAPPEND batches (one command per batch), each with its own flags."""
        flags = flags or [()] * len(messages)
        with self.client() as client:
            if not client.folder_exists(folder):
                client.create_folder(folder)
            multi = client.has_capability("MULTIAPPEND")
            for start in range(0, len(messages), batch):
                chunk = [{"msg": raw, "flags": list(flag)} for raw, flag in
                         zip(messages[start:start + batch], flags[start:start + batch])]
                if multi:
                    client.multiappend(folder, chunk)
                else:
                    for item in chunk:
                        client.append(folder, item["msg"], item["flags"])

    def counts(self, client: IMAPClient | None = None) -> dict[str, int]:
        """Return the number of messages in every folder of the mailbox."""
        if client is None:
            with self.client() as opened:
                return self.counts(opened)
        # "Processed" itself only holds the kinds' folders: \Noselect (maildir makes it implicitly).
        return {name: int(client.folder_status(name, ["MESSAGES"])[b"MESSAGES"])
                for flags, _, name in client.list_folders()
                if not {flag.lower() for flag in flags} & {b"\\noselect", b"\\nonexistent"}}

    def messages(self, folder: str, client: IMAPClient | None = None) -> list[tuple[bytes, tuple[bytes, ...]]]:
        """Return (raw bytes, flags) of every message in a folder, read without setting \\Seen."""
        if client is None:
            with self.client() as opened:
                return self.messages(folder, opened)
        if not client.folder_exists(folder):
            return []
        client.select_folder(folder, readonly=True)
        try:
            uids = client.search(["ALL"])
            found = []
            for start in range(0, len(uids), 1000):
                fetched = client.fetch(uids[start:start + 1000], ["BODY.PEEK[]", "FLAGS"])
                found += [(item[b"BODY[]"], tuple(item[b"FLAGS"])) for _, item in sorted(fetched.items())]
            return found
        finally:
            client.unselect_folder()
