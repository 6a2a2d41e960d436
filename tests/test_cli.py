import json
import mailbox
import re
import sys
from pathlib import Path

import pytest

from conftest import err, make_mail, out
from conftest import run_bytes as run

OPTOUT = Path(sys.executable).parent / "optout"
JSON_KEYS = {"path", "kind", "reason", "scope", "sender", "language", "rule", "evidence", "confidence"}

OPT_OUT = make_mail("Please stop sending me emails. I want to opt out.", subject="Opt-out",
                    sender="Ann <ann@example.net>", message_id="<optout.1@example.net>")
DELETION = make_mail("Please delete my personal data and close my account.", subject="Delete my data",
                     sender="Bob <bob@example.net>", message_id="<delete.1@example.net>")
ACCESS = make_mail("Please send me a copy of all personal data you hold about me.", subject="Data access request",
                   sender="Cy <cy@example.net>", message_id="<access.1@example.net>")
OTHER = make_mail("When does your shop open on Sunday?", subject="Opening hours",
                  sender="Dan <dan@example.net>", message_id="<other.1@example.net>")


def write_mail(folder, **messages):
    folder.mkdir(parents=True, exist_ok=True)
    for name, raw in messages.items():
        (folder / f"{name}.eml").write_bytes(raw)
    return folder


def assert_one_line_error(result, code):
    assert result.returncode == code, err(result)
    assert "Traceback" not in err(result)
    assert len(err(result).strip().splitlines()) == 1, err(result)
    assert out(result) == ""


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("processed")
    write_mail(cwd / "mail", a=OPT_OUT, b=DELETION, c=ACCESS, d=OTHER)
    result = run(["process", "mail"], cwd)
    assert result.returncode == 0, err(result)
    return cwd


def test_the_console_script_is_installed():
    assert OPTOUT.is_file()


def test_classify_json_prints_one_object_per_message_and_writes_nothing(tmp_path):
    write_mail(tmp_path, a=OPT_OUT, b=DELETION)

    result = run(["classify", "--json", "a.eml", "b.eml"], tmp_path)

    assert result.returncode == 0, err(result)
    records = [json.loads(line) for line in out(result).splitlines()]
    assert len(records) == 2
    for record in records:
        assert JSON_KEYS <= set(record)
    assert [(r["path"], r["kind"], r["sender"]) for r in records] == [
        ("a.eml", "opt-out", "ann@example.net"), ("b.eml", "deletion", "bob@example.net")]
    assert [r["scope"] for r in records] == ["all", "all"]
    assert records[1]["language"] == "en"
    assert records[1]["rule"] == "words.deletion"
    assert records[1]["evidence"] and isinstance(records[1]["evidence"], list)
    assert 0 < records[1]["confidence"] <= 1
    assert not (tmp_path / "optout.db").exists()


def test_classify_reads_standard_input(tmp_path):
    result = run(["classify", "--json", "-"], tmp_path, stdin=DELETION)

    assert result.returncode == 0, err(result)
    record = json.loads(out(result))
    assert record["path"] == "-"
    assert record["kind"] == "deletion"
    assert record["sender"] == "bob@example.net"


def test_process_a_folder_prints_a_summary_and_twice_reports_already_processed(tmp_path):
    write_mail(tmp_path / "mail", a=OPT_OUT, b=DELETION, c=ACCESS, d=OTHER)

    first = run(["process", "mail"], tmp_path)
    second = run(["process", "mail"], tmp_path)

    assert first.returncode == 0, err(first)
    assert "4 messages: 4 new (1 opt-out, 1 access, 1 deletion, 1 other), 0 already processed." in out(first)
    assert "2 suppressions added, 2 requests opened." in out(first)
    assert second.returncode == 0, err(second)
    assert "4 messages: 0 new (0 opt-out, 0 access, 0 deletion, 0 other), 4 already processed." in out(second)
    assert "0 suppressions added, 0 requests opened." in out(second)


def test_process_an_mbox(tmp_path):
    box = mailbox.mbox(tmp_path / "inbox.mbox")
    box.add(OPT_OUT)
    box.add(ACCESS)
    box.close()

    result = run(["process", "--mbox", "inbox.mbox"], tmp_path)

    assert result.returncode == 0, err(result)
    assert "2 messages: 2 new (1 opt-out, 1 access, 0 deletion, 0 other)" in out(result)


def test_process_a_maildir(tmp_path):
    box = mailbox.Maildir(tmp_path / "Maildir", create=True)
    box.add(DELETION)
    box.add(OTHER)
    box.add(OPT_OUT)
    box.close()

    result = run(["process", "--maildir", "Maildir"], tmp_path)

    assert result.returncode == 0, err(result)
    assert "3 messages: 3 new (1 opt-out, 0 access, 1 deletion, 1 other)" in out(result)


def test_the_same_message_in_a_folder_and_an_mbox_is_processed_once(tmp_path):
    write_mail(tmp_path / "mail", a=OPT_OUT)
    box = mailbox.mbox(tmp_path / "inbox.mbox")
    box.add(OPT_OUT)
    box.close()

    result = run(["process", "mail", "--mbox", "inbox.mbox"], tmp_path)

    assert result.returncode == 0, err(result)
    assert "2 messages: 1 new" in out(result)
    assert "1 already processed" in out(result)


def test_suppression_list_json(processed):
    result = run(["suppression", "list", "--json"], processed)

    assert result.returncode == 0, err(result)
    rows = json.loads(out(result))
    assert sorted((row["address"], row["scope"]) for row in rows) == [
        ("ann@example.net", "all"), ("bob@example.net", "all")]


@pytest.mark.parametrize("address", ["ann@example.net", "ANN@Example.NET", "<bob@example.net>"])
def test_suppression_check_exits_0_for_a_suppressed_address(processed, address):
    result = run(["suppression", "check", address], processed)

    assert result.returncode == 0, out(result) + err(result)
    assert "suppressed" in out(result)


@pytest.mark.parametrize("address", ["cy@example.net", "nobody@example.org"])
def test_suppression_check_exits_1_for_an_address_not_suppressed(processed, address):
    result = run(["suppression", "check", address], processed)

    assert result.returncode == 1
    assert "not suppressed" in out(result)
    assert "Traceback" not in err(result)


def test_suppression_check_json(processed):
    result = run(["suppression", "check", "--json", "ANN@example.net", "nobody@example.org"], processed)

    assert result.returncode == 1
    records = [json.loads(line) for line in out(result).splitlines()]
    assert [(r["address"], r["suppressed"]) for r in records] == [
        ("ann@example.net", True), ("nobody@example.org", False)]
    assert records[0]["scopes"] == ["all"]


def test_suppression_check_json_of_suppressed_addresses_exits_0(processed):
    result = run(["suppression", "check", "--json", "ann@example.net", "bob@example.net"], processed)

    assert result.returncode == 0
    assert all(json.loads(line)["suppressed"] for line in out(result).splitlines())


def test_stats_json_counts_what_was_processed(processed):
    result = run(["stats", "--json"], processed)

    assert result.returncode == 0, err(result)
    stats = json.loads(out(result))
    assert {"messages", "kinds", "suppressions", "requests"} <= set(stats)
    assert stats["messages"] == 4
    assert stats["kinds"] == {"opt-out": 1, "access": 1, "deletion": 1, "other": 1}
    assert stats["suppressions"]["total"] == 2
    assert stats["requests"]["total"] == 2


def test_a_missing_file_exits_4(tmp_path):
    result = run(["classify", "missing.eml"], tmp_path)

    assert_one_line_error(result, 4)
    assert "missing.eml" in err(result)


def test_a_missing_mbox_exits_4(tmp_path):
    result = run(["process", "--mbox", "missing.mbox"], tmp_path)

    assert_one_line_error(result, 4)


def test_a_bad_config_exits_3_naming_the_key(tmp_path):
    (tmp_path / "optout.toml").write_text("[database]\npaht = 'x.db'\n")

    result = run(["--config", "optout.toml", "stats"], tmp_path)

    assert_one_line_error(result, 3)
    assert "database.paht" in err(result)


def test_a_bad_config_named_by_optout_config_exits_3(tmp_path):
    (tmp_path / "optout.toml").write_text("[replies]\ndaily_cap = 'five'\n")

    result = run(["stats"], tmp_path, extra_env={"OPTOUT_CONFIG": str(tmp_path / "optout.toml")})

    assert_one_line_error(result, 3)
    assert "replies.daily_cap" in err(result)


def test_a_database_path_that_is_a_folder_exits_5(tmp_path):
    (tmp_path / "db").mkdir()

    result = run(["stats"], tmp_path, database="db")

    assert_one_line_error(result, 5)


def test_a_database_path_that_cannot_be_created_exits_5(tmp_path):
    (tmp_path / "var").write_text("a file where a folder should be")

    result = run(["stats"], tmp_path, database="var/optout.db")

    assert_one_line_error(result, 5)
    assert "var" in err(result)


def test_a_file_that_is_not_a_database_exits_5(tmp_path):
    (tmp_path / "optout.db").write_bytes(b"not a database at all\n" * 100)

    result = run(["stats"], tmp_path)

    assert_one_line_error(result, 5)


def test_an_unknown_option_exits_2(tmp_path):
    result = run(["stats", "--bogus"], tmp_path)

    assert result.returncode == 2
    assert "Traceback" not in err(result)
    assert "--bogus" in err(result)
    assert out(result) == ""


def test_help_lists_the_exit_codes(tmp_path):
    result = run(["--help"], tmp_path)

    assert result.returncode == 0
    text = out(result)
    assert "Exit codes" in text
    for code in ("0", "1", "2", "3", "4", "5", "70", "75"):
        assert re.search(rf"^\s+{code}\s+\S", text, re.M), code


def test_without_config_or_database_it_creates_var_optout_db_in_the_working_directory(tmp_path):
    write_mail(tmp_path / "mail", a=OPT_OUT)

    result = run(["process", "mail"], tmp_path, database=None)

    assert result.returncode == 0, err(result)
    assert (tmp_path / "var" / "optout.db").is_file()
    assert "var/optout.db" in out(result)
