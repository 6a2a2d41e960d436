"""The exception tree of optout.

    OptoutError                 anything optout reports as one clear line (the CLI's exit code in brackets)
    ├── ConfigError             a config file or environment value is wrong (3)
    ├── LexiconError            a phrase table does not load (3)
    ├── InputError              a file or mailbox given to the CLI cannot be read (4)
    ├── StoreError              the database cannot be used (5)
    │   ├── TransientError      try again later: the database is busy, locked or full (75, EX_TEMPFAIL)
    │   └── RefusedError        a change the rows forbid: a deletion tombstone without --force (8)
    ├── MailboxError            the IMAP server cannot be reached or refuses us (6)
    └── LockedError             another `optout run` holds the lock (7)

Core modules raise only LexiconError; parsing never raises on bad mail.
"""


class OptoutError(Exception):
    """An error optout reports as one clear line."""

    exit_code = 1


class ConfigError(OptoutError):
    """A config file or environment value is wrong."""

    exit_code = 3


class LexiconError(OptoutError):
    """A phrase table does not load."""

    exit_code = 3


class InputError(OptoutError):
    """A file or mailbox given on the command line cannot be read."""

    exit_code = 4


class StoreError(OptoutError):
    """The database cannot be used."""

    exit_code = 5


class TransientError(StoreError):
    """A failure that goes away by itself: try again later."""

    exit_code = 75


class RefusedError(StoreError):
    """A change the store will not make: the rows it would touch forbid it."""

    exit_code = 8


class MailboxError(OptoutError):
    """The IMAP server cannot be reached or refuses us."""

    exit_code = 6


class LockedError(OptoutError):
    """Another run holds the lock."""

    exit_code = 7


def one_line(value: object, limit: int = 300) -> str:
    """Return what a server or an exception said as one short line (for errors and logs; never a body)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, BaseException):
        value = str(value) or type(value).__name__
    return " ".join(str(value).split())[:limit]
