"""Parse and classify in worker processes while one writer decides and records.

Workers import only what examining needs (flanker, the phrase tables), not the store, templates or CLI,
so that each costs as little memory as it can.
"""

from __future__ import annotations

from optout.classify import classify
from optout.parse import parse_message


_WORKER: tuple | None = None


def _start_worker(lexicon_dir: str | None, unsubscribe_addresses: tuple[str, ...], parent: int) -> None:
    global _WORKER
    import threading
    from pathlib import Path

    from optout.lexicon import load_lexicon

    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()

    lexicon = load_lexicon(Path(lexicon_dir)) if lexicon_dir else load_lexicon()
    _WORKER = (lexicon, unsubscribe_addresses)


def _exit_with(parent: int) -> None:
    # A worker outlives nothing: when its parent dies (kill -9 included), it exits within a second.
    import os
    import time

    while True:
        time.sleep(1)
        if os.getppid() != parent:
            os._exit(0)


def _examine_in_worker(raw: bytes, envelope_sender: str | None = None, envelope_recipients: tuple[str, ...] = ()):
    try:
        message = parse_message(raw, envelope_sender, envelope_recipients)
        lexicon, unsubscribe_addresses = _WORKER
        return message, classify(message, lexicon, unsubscribe_addresses)
    except Exception as error:  # the writer records it for review; a worker must not die on one message
        return error


class Examiner:
    """Parse and classify in worker processes (both are pure), while one writer decides and records.

    Parsing and classifying are most of the work; on a machine with several cores a backlog goes through
    faster this way. Workers are spawned (never forked from a threaded parent) and exit with their parent.
    """

    def __init__(self, lexicon_dir: str | None, unsubscribe_addresses: tuple[str, ...], workers: int | None = None):
        import multiprocessing
        import os
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        self.pool = ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 2, mp_context=context,
                                        initializer=_start_worker,
                                        initargs=(lexicon_dir, unsubscribe_addresses, os.getpid()))

    async def examine_one(self, raw: bytes, envelope_sender: str | None, envelope_recipients: tuple[str, ...]):
        """Examine one message in a worker, from the event loop."""
        import asyncio
        from functools import partial

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, partial(_examine_in_worker, raw, envelope_sender,
                                                             envelope_recipients))

    def examine_many(self, raws: list[bytes]):
        """Yield (Message, Classification) per raw message, in order, as workers finish them (an exception
        where one failed): the writer starts on the first while the workers go on with the rest."""
        return self.pool.map(_examine_in_worker, raws, chunksize=8)

    def close(self) -> None:
        """Stop the workers."""
        self.pool.shutdown(wait=True, cancel_futures=True)
