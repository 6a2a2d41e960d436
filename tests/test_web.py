"""The RFC 8058 one-click endpoint, served by the daemon: a real HTTP client, and the page in headless Chromium."""

import os
import shutil
import subprocess
import urllib.error
import urllib.request
from datetime import timedelta

import pytest

from optout.config import Settings
from optout.daemon import Daemon
from optout.process import Pipeline
from optout.store import Store
from optout.tokens import make_token

from conftest import LoopThread, NOW

KEY = b"web test key"


@pytest.fixture
def site(tmp_path, lexicon):
    database = tmp_path / "optout.db"
    settings = Settings(database=str(database), smtp_listen="127.0.0.1:0", web_listen="127.0.0.1:0", workers=0)
    daemon = Daemon(settings, Pipeline(lexicon, token_key=KEY), clock=lambda: NOW, parallel=False)
    loop = LoopThread()
    loop.run(daemon.start())
    with Store(database) as store:
        good = make_token(KEY, "ann@example.net", "weekly", NOW.date())
        old = make_token(KEY, "bob@example.net", "weekly", NOW.date() - timedelta(days=400))
        forged = make_token(b"not our key", "carl@example.net", "weekly", NOW.date())
        for token, address in ((good, "ann@example.net"), (old, "bob@example.net"), (forged, "carl@example.net")):
            store.remember_token(token, address, "weekly", NOW)
    base = f"http://127.0.0.1:{daemon.web_address[1]}/u/"
    yield {"base": base, "good": good, "old": old, "forged": forged, "database": database}
    loop.run(daemon.stop(grace=5))
    loop.close()


def request(url, data=None):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def suppressions(database):
    with Store(database) as store:
        return [(row["address"], row["scope"]) for row in store.suppressions()]


def test_get_shows_a_button_and_never_unsubscribes(site):
    status, page = request(site["base"] + site["good"])
    assert status == 200
    assert '<form method="post">' in page and 'name="List-Unsubscribe" value="One-Click"' in page
    assert "weekly" in page and "ann@example.net" not in page  # the address is masked
    assert suppressions(site["database"]) == []


def test_one_click_post_unsubscribes_from_the_tokens_list(site):
    status, page = request(site["base"] + site["good"], b"List-Unsubscribe=One-Click")
    assert status == 200 and "Unsubscribed" in page
    assert suppressions(site["database"]) == [("ann@example.net", "weekly")]
    status, _ = request(site["base"] + site["good"], b"List-Unsubscribe=One-Click")
    assert status == 200  # a second click changes nothing and still says so
    assert suppressions(site["database"]) == [("ann@example.net", "weekly")]


def test_a_post_without_the_one_click_body_is_refused(site):
    status, page = request(site["base"] + site["good"], b"something=else")
    assert status == 400 and "One-Click" in page
    assert suppressions(site["database"]) == []


@pytest.mark.parametrize("which, why", [("old", "expired"), ("forged", "not issued by us"),
                                         ("unknown", "do not know"), ("malformed", "not an unsubscribe link")])
def test_bad_tokens_get_a_400_page_that_says_why(site, which, why):
    token = {"unknown": "a" * 23, "malformed": "short"}.get(which) or site[which]
    for data in (None, b"List-Unsubscribe=One-Click"):
        status, page = request(site["base"] + token, data)
        assert status == 400 and why in page
    assert suppressions(site["database"]) == []


def test_the_page_in_headless_chromium(site, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (make test-deps installs it)")
        pytest.skip("chromium is not installed")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = site["base"] + site["good"]
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert "<button" in dom.stdout and "Unsubscribe</button>" in dom.stdout, dom.stderr[-500:]
    shot = tmp_path / "page.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=800,500", url],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert suppressions(site["database"]) == []  # rendering the page (a GET) unsubscribed nobody
