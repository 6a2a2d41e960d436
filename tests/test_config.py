import re
import tomllib
from dataclasses import fields

import pytest

from conftest import ROOT
from optout.config import SCHEMA, Settings, load_settings
from optout.errors import ConfigError

EXAMPLE = ROOT / "config" / "optout.example.toml"

FULL = """
[database]
path = "/srv/optout/optout.db"

[addresses]
privacy = ["privacy@example.org", "datenschutz@example.org"]
unsubscribe = ["unsubscribe@example.org", "leave@*"]
own = ["news@example.org"]

[requests]
days = 28
child_days = 10

[replies]
to_other = true
daily_cap = 2

[classify]
lexicon_dir = "config/lexicon"

[imap]
url = "imaps://privacy@imap.example.org/INBOX"
processed_folder = "Done"
review_folder = "Check"
review_reasons = ["unclear"]
batch_size = 100
poll_seconds = 30

[smtp]
listen = "127.0.0.1:2526"
lmtp = true
max_message_bytes = 1000000
max_recipients = 5
command_timeout = 30
session_timeout = 300
max_connections = 10

[run]
lock_file = "/run/optout.lock"
"""


def write(tmp_path, text, name="optout.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problem(path, environ=None):
    with pytest.raises(ConfigError) as raised:
        load_settings(path, environ={} if environ is None else environ)
    return str(raised.value)


def test_no_config_gives_the_embedded_defaults():
    settings = load_settings(environ={})

    assert settings == Settings()
    assert settings.database == "var/optout.db"
    assert settings.source == "embedded defaults"


def test_a_full_config_file_sets_every_value(tmp_path):
    path = write(tmp_path, FULL)

    settings = load_settings(path, environ={})

    assert settings.database == "/srv/optout/optout.db"
    assert settings.privacy_addresses == ("privacy@example.org", "datenschutz@example.org")
    assert settings.unsubscribe_addresses == ("unsubscribe@example.org", "leave@*")
    assert settings.own_addresses == ("news@example.org",)
    assert settings.request_days == 28
    assert settings.child_request_days == 10
    assert settings.reply_to_other is True
    assert settings.daily_reply_cap == 2
    assert settings.lexicon_dir == "config/lexicon"
    assert settings.imap_url == "imaps://privacy@imap.example.org/INBOX"
    assert settings.imap_batch_size == 100
    assert settings.smtp_listen == "127.0.0.1:2526"
    assert settings.smtp_lmtp is True
    assert settings.lock_file == "/run/optout.lock"
    assert settings.source == str(path)


def test_a_partial_config_keeps_the_other_defaults(tmp_path):
    settings = load_settings(write(tmp_path, "[requests]\ndays = 20\n"), environ={})

    assert settings.request_days == 20
    assert settings.child_request_days == Settings().child_request_days
    assert settings.database == Settings().database


def test_an_unknown_section_names_the_file_and_the_section(tmp_path):
    path = write(tmp_path, "[databse]\npath = 'x.db'\n")

    message = problem(path)

    assert str(path) in message
    assert "databse" in message


def test_an_unknown_key_names_the_file_and_the_key(tmp_path):
    path = write(tmp_path, "[database]\npaht = 'x.db'\n")

    message = problem(path)

    assert str(path) in message
    assert "database.paht" in message


def test_all_problems_are_reported_at_once(tmp_path):
    path = write(tmp_path, "[database]\npaht = 'x.db'\n\n"
                           "[replies]\ndaily_cpa = 3\nto_other = 'yes'\n\n"
                           "[bogus]\nx = 1\n")

    message = problem(path)

    assert "database.paht" in message
    assert "replies.daily_cpa" in message
    assert "replies.to_other" in message
    assert "bogus" in message
    assert "\n" not in message


@pytest.mark.parametrize("text, key", [
    ("[requests]\njurisdiction = 'lgpd'\n", "requests.jurisdiction"),
    ("[requests]\nfulfil = 'sometimes'\n", "requests.fulfil"),
    ("[contacts]\ntables = ['customers']\n", "contacts.tables"),
    ("[contacts]\ntables = ['customers.email; DROP TABLE x']\n", "contacts.tables"),
    ("[requests]\ndays = '30'\n", "requests.days"),
    ("[requests]\ndays = 30.5\n", "requests.days"),
    ("[replies]\ndaily_cap = true\n", "replies.daily_cap"),
    ("[replies]\nto_other = 'yes'\n", "replies.to_other"),
    ("[addresses]\nprivacy = 'privacy@example.com'\n", "addresses.privacy"),
    ("[addresses]\nprivacy = [1, 2]\n", "addresses.privacy"),
    ("[database]\npath = 5\n", "database.path"),
    ("database = 'x.db'\n", "database"),
])
def test_a_value_of_the_wrong_type_is_refused_naming_the_key(tmp_path, text, key):
    path = write(tmp_path, text)

    message = problem(path)

    assert str(path) in message
    assert key in message


@pytest.mark.parametrize("text, key", [
    ("[requests]\ndays = 0\n", "requests.days"),
    ("[requests]\nchild_days = -1\n", "requests.child_days"),
    ("[replies]\ndaily_cap = -1\n", "replies.daily_cap"),
    ("[addresses]\nprivacy = ['not-an-address']\n", "addresses.privacy"),
    ("[addresses]\nown = ['news@*']\n", "addresses.own"),
])
def test_a_value_out_of_range_is_refused_naming_the_key(tmp_path, text, key):
    assert key in problem(write(tmp_path, text))


def test_invalid_toml_names_the_file(tmp_path):
    path = write(tmp_path, "[database\npath = \n")

    assert str(path) in problem(path)


def test_a_missing_config_file_is_a_config_error(tmp_path):
    path = tmp_path / "nowhere.toml"

    assert str(path) in problem(path)


def test_optout_config_picks_the_file(tmp_path):
    path = write(tmp_path, "[requests]\ndays = 21\n")

    settings = load_settings(environ={"OPTOUT_CONFIG": str(path)})

    assert settings.request_days == 21
    assert settings.source == str(path)


def test_optout_config_is_read_from_the_process_environment(tmp_path, monkeypatch):
    path = write(tmp_path, "[requests]\ndays = 22\n")
    monkeypatch.setenv("OPTOUT_CONFIG", str(path))
    monkeypatch.delenv("OPTOUT_DATABASE", raising=False)

    assert load_settings().request_days == 22


def test_an_explicit_path_wins_over_optout_config(tmp_path):
    chosen = write(tmp_path, "[requests]\ndays = 23\n", "chosen.toml")
    other = write(tmp_path, "[requests]\ndays = 24\n", "other.toml")

    assert load_settings(chosen, environ={"OPTOUT_CONFIG": str(other)}).request_days == 23


def test_a_bad_file_named_by_optout_config_is_refused(tmp_path):
    path = write(tmp_path, "[requests]\nday = 1\n")

    assert "requests.day" in problem(None, environ={"OPTOUT_CONFIG": str(path)})


def test_optout_database_overrides_the_default():
    assert load_settings(environ={"OPTOUT_DATABASE": "/tmp/elsewhere.db"}).database == "/tmp/elsewhere.db"


def test_optout_database_overrides_the_config_file(tmp_path):
    path = write(tmp_path, "[database]\npath = 'from-file.db'\n[requests]\ndays = 25\n")

    settings = load_settings(path, environ={"OPTOUT_DATABASE": "from-env.db"})

    assert settings.database == "from-env.db"
    assert settings.request_days == 25


def test_the_example_config_loads_without_problems():
    settings = load_settings(EXAMPLE, environ={})

    assert settings.source == str(EXAMPLE)


def test_the_example_config_shows_the_defaults_of_the_code():
    assert load_settings(EXAMPLE, environ={}) == Settings()


def test_the_example_config_shows_every_key_that_has_a_default():
    table = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    defaults = {f.name: f.default for f in fields(Settings)}
    missing = [f"{section}.{key}" for section, keys in SCHEMA.items() for key, (attribute, _, _) in keys.items()
               if defaults[attribute] is not None and key not in table.get(section, {})]

    assert missing == []


def test_the_example_config_mentions_every_key_without_a_default():
    text = EXAMPLE.read_text(encoding="utf-8")
    defaults = {f.name: f.default for f in fields(Settings)}
    missing = [f"{section}.{key}" for section, keys in SCHEMA.items() for key, (attribute, _, _) in keys.items()
               if defaults[attribute] is None and not re.search(rf"^#?\s*{key}\s*=", text, re.M)]

    assert missing == []
