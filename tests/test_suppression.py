import base64
import csv
import hashlib
import io
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import NOW, err, make_mail, out
from conftest import run_bytes as run
from optout.suppression import Entry, Problem, address_problem, detect_format, read_import

OPTOUT = Path(sys.executable).parent / "optout"
OPT_OUT = make_mail("Please stop sending me emails. I want to opt out.", subject="Opt-out",
                    sender="Ann <ann@example.net>", message_id="<optout.1@example.net>")
DELETION = make_mail("Please delete my personal data and close my account.", subject="Delete my data",
                     sender="Bob <bob@example.net>", message_id="<delete.1@example.net>")


def ok(result):
    assert result.returncode == 0, err(result)
    return out(result)


def rows(cwd, sql):
    with sqlite3.connect(Path(cwd) / "optout.db") as connection:
        return connection.execute(sql).fetchall()


def drop(address):
    return base64.b64encode(hashlib.sha256(address.strip().lower().encode()).digest()).decode()


# ---------------------------------------------------------------- pure parts

@pytest.mark.parametrize("line, fmt", [
    ('{"email": "a@example.com"}', "jsonl"), ("id,Email,name", "csv"), ("address", "csv"),
    ("ann@example.com", "plain"), ("\ufeffemail;name", "csv")])
def test_detect_format(line, fmt):
    assert detect_format(line) == fmt


@pytest.mark.parametrize("text", ["", "ann", "@example.com", "ann@", "ann@localhost", "a b@example.com",
                                  "ann@exa mple.com", "x" * 65 + "@example.com", "ann@-bad-.com.", "ann@ex_ample.com"])
def test_address_problem_rejects(text):
    assert address_problem(text)


@pytest.mark.parametrize("text", ["ann@example.com", " <ANN@Example.COM> ", "ann+tag@bücher.de", "o'neil@x.co.uk"])
def test_address_problem_accepts(text):
    assert address_problem(text) is None


def test_read_import_normalises_and_numbers_lines():
    lines = ["email,scope\n", "ANN@Example.com,newsletters\n", "\n", "nope,\n", "bo@b\u00fccher.de,\n"]

    items = list(read_import(lines, "all", "import"))

    assert items == [Entry(2, "ann@example.com", "ANN@Example.com", "newsletters", "import"),
                     Problem(4, "'nope' has no @"),
                     Entry(5, "bo@xn--bcher-kva.de", "bo@b\u00fccher.de", "all", "import")]


# ---------------------------------------------------------------- add / remove

def test_add_and_remove_are_audited_and_the_chain_holds(tmp_path):
    added = run(["suppression", "add", "Ann@Example.net", "bob@example.net", "--scope", "newsletters",
                 "--reason", "asked by phone"], tmp_path)
    again = run(["suppression", "add", "ann@example.net", "--scope", "newsletters", "--reason", "again"], tmp_path)
    removed = run(["suppression", "remove", "ANN@example.net", "--scope", "newsletters", "--reason", "resubscribed"],
                  tmp_path)
    verify = run(["audit", "verify"], tmp_path)

    assert "ann@example.net: suppressed in newsletters" in ok(added)
    assert "already suppressed" in ok(again)
    assert "no longer suppressed in newsletters (was: asked by phone)" in ok(removed)
    assert rows(tmp_path, "SELECT address FROM suppressions") == [("bob@example.net",)]
    events = rows(tmp_path, "SELECT event, address_hash, detail FROM audit ORDER BY id")
    assert [e[0] for e in events] == ["suppression.add", "suppression.add", "suppression.remove"]
    assert events[2][1] == drop("ann@example.net")
    assert json.loads(events[2][2])["reason"] == "resubscribed"
    assert "intact: 3 events" in ok(verify)


def test_add_refuses_an_invalid_address_in_one_line(tmp_path):
    result = run(["suppression", "add", "ann@example.net", "not-an-address", "--scope", "all", "--reason", "x"],
                 tmp_path)

    assert result.returncode == 4
    assert len(err(result).strip().splitlines()) == 1 and "no @" in err(result)
    assert not (tmp_path / "optout.db").exists()


def test_a_deletion_tombstone_refuses_remove_without_force(tmp_path):
    ok(run(["suppression", "add", "bob@example.net", "--scope", "all", "--reason", "deletion"], tmp_path))

    refused = run(["suppression", "remove", "bob@example.net", "--scope", "all", "--reason", "wants mail"], tmp_path)
    assert refused.returncode == 8
    assert "tombstone" in err(refused) and "--force" in err(refused)
    assert "Traceback" not in err(refused) and len(err(refused).strip().splitlines()) == 1
    assert rows(tmp_path, "SELECT count(*) FROM suppressions") == [(1,)]

    forced = run(["suppression", "remove", "bob@example.net", "--scope", "all", "--reason", "asked", "--force"],
                 tmp_path)
    assert "no longer suppressed" in ok(forced)
    assert json.loads(rows(tmp_path, "SELECT detail FROM audit ORDER BY id DESC LIMIT 1")[0][0])["forced"] is True


def test_a_hash_only_tombstone_also_refuses_remove(tmp_path):
    ok(run(["suppression", "add", "cy@example.net", "--scope", "all", "--reason", "opt-out"], tmp_path))
    with sqlite3.connect(tmp_path / "optout.db") as connection:
        connection.execute("INSERT INTO suppressions (address, address_hash, scope, reason, created_at) "
                           "VALUES (NULL, ?, 'partners', 'erased', '2026-11-01T00:00:00+00:00')",
                           [drop("cy@example.net")])

    refused = run(["suppression", "remove", "cy@example.net", "--scope", "all", "--reason", "x"], tmp_path)

    assert refused.returncode == 8, err(refused)


# ---------------------------------------------------------------- import

def test_import_csv_reports_invalid_rows_by_line_and_applies_the_rest(tmp_path):
    (tmp_path / "list.csv").write_text(
        'id,name,Email\n1,"Ann, A",ann@example.net\n2,Bob,bob-at-example.net\n3,"Cy\nwith a break",cy@example.net\n'
        '4,Dee,\n5,Eve,EVE@Example.NET\n', encoding="utf-8")

    result = run(["suppression", "import", "list.csv", "--scope", "newsletters"], tmp_path)

    ok(result)
    assert "list.csv:3: 'bob-at-example.net' has no @" in err(result)
    assert "list.csv:6: empty address" in err(result)
    assert "3 suppressions added" in out(result) and "2 invalid" in out(result)
    assert rows(tmp_path, "SELECT address, scope, reason FROM suppressions ORDER BY id") == [
        ("ann@example.net", "newsletters", "import"), ("cy@example.net", "newsletters", "import"),
        ("eve@example.net", "newsletters", "import")]


def test_import_plain_lines_and_twice_changes_nothing(tmp_path):
    (tmp_path / "list.txt").write_text("ann@example.net\n# a comment\n\nbroken@\n Bob@Example.NET \nann@example.net\n",
                                       encoding="utf-8")

    first = run(["suppression", "import", "list.txt", "--reason", "old crm"], tmp_path)
    second = run(["suppression", "import", "list.txt", "--json"], tmp_path)

    assert "list.txt:4: 'broken@' has no domain" in err(first)
    assert "2 suppressions added" in ok(first)
    summary = json.loads(ok(second))
    assert (summary["added"], summary["already"], summary["invalid"]) == (0, 3, 1)
    assert summary["problems"] == [{"line": 4, "why": "'broken@' has no domain"}]
    assert rows(tmp_path, "SELECT count(*) FROM suppressions") == [(2,)]
    assert rows(tmp_path, "SELECT count(*) FROM audit") == [(2,)]


def test_import_json_lines(tmp_path):
    (tmp_path / "list.jsonl").write_text(
        '{"email": "ann@example.net", "scope": "partners"}\n{"address": "bob@example.net", "reason": "crm"}\n'
        '{"name": "no address"}\nnot json\n[1]\n', encoding="utf-8")

    result = run(["suppression", "import", "list.jsonl"], tmp_path)

    ok(result)
    assert "list.jsonl:3: no \"email\" or \"address\" key" in err(result)
    assert "list.jsonl:4: not JSON" in err(result)
    assert "list.jsonl:5: not a JSON object" in err(result)
    assert rows(tmp_path, "SELECT address, scope, reason FROM suppressions ORDER BY id") == [
        ("ann@example.net", "partners", "import"), ("bob@example.net", "all", "crm")]


def test_import_summarises_many_invalid_rows(tmp_path):
    (tmp_path / "list.txt").write_text("".join(f"bad{i}\n" for i in range(30)) + "ok@example.net\n")

    result = run(["suppression", "import", "list.txt"], tmp_path)

    lines = err(ok(result) and result).splitlines()
    assert len(lines) == 21
    assert "10 more invalid rows (lines 21–30" in lines[-1]


def test_import_of_a_missing_file_is_one_line(tmp_path):
    result = run(["suppression", "import", "nope.csv"], tmp_path)

    assert result.returncode == 4
    assert err(result).strip() == "optout: error: nope.csv: no such file"


# ---------------------------------------------------------------- list / export

@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("filled")
    ok(run(["suppression", "add", "ann@example.net", "--scope", "all", "--reason", "opt-out"], cwd))
    ok(run(["suppression", "add", "ann@example.net", "bob@b\u00fccher.de", "--scope", "newsletters",
            "--reason", "form"], cwd, now=NOW.replace(day=30)))
    return cwd


def test_export_drop_is_the_base64_sha256_of_each_address_once(filled):
    result = run(["suppression", "export", "--format", "drop"], filled)

    assert ok(result).splitlines() == sorted([drop("ann@example.net"), drop("bob@xn--bcher-kva.de")])
    assert "@" not in out(result)


def test_export_csv_and_json_to_a_file(filled):
    ok(run(["suppression", "export", "--format", "csv", "-o", "out.csv"], filled))
    json_lines = ok(run(["suppression", "export", "--format", "json", "--scope", "newsletters"], filled))

    table = list(csv.DictReader(io.StringIO((filled / "out.csv").read_text())))
    assert [(r["address"], r["scope"]) for r in table] == [
        ("ann@example.net", "all"), ("ann@example.net", "newsletters"), ("bob@xn--bcher-kva.de", "newsletters")]
    assert table[0]["address_hash"] == drop("ann@example.net")
    assert [json.loads(line)["address"] for line in json_lines.splitlines()] == [
        "ann@example.net", "bob@xn--bcher-kva.de"]


def test_list_since_and_csv(filled):
    listed = ok(run(["suppression", "list", "--since", "2026-11-30", "--csv"], filled))

    assert [r["address"] for r in csv.DictReader(io.StringIO(listed))] == ["ann@example.net", "bob@xn--bcher-kva.de"]
    assert run(["suppression", "list", "--since", "yesterday"], filled).returncode == 2


# ---------------------------------------------------------------- audit, stats, config

def test_audit_address_shows_everything_in_time_order(tmp_path):
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "a.eml").write_bytes(OPT_OUT)
    ok(run(["process", "mail"], tmp_path))
    later = NOW.replace(hour=13)
    ok(run(["suppression", "remove", "ann@example.net", "--scope", "all", "--reason", "resubscribed"], tmp_path,
           now=later))
    ok(run(["suppression", "add", "ann@example.net", "--scope", "partners", "--reason", "phone"], tmp_path,
           now=later.replace(hour=14)))

    report = json.loads(ok(run(["audit", "ANN@example.net", "--json"], tmp_path)))
    table = ok(run(["audit", "ann@example.net"], tmp_path))

    events = [e["event"] for e in report["events"]]
    assert events[:2] == ["message", "suppression.add"]
    assert events[-2:] == ["suppression.remove", "suppression.add"]
    assert [e["at"] for e in report["events"]] == sorted(e["at"] for e in report["events"])
    assert report["events"][0]["detail"]["kind"] == "opt-out"
    assert [s["scope"] for s in report["suppressions"]] == ["partners"]
    assert table.index("suppression.remove") < table.rindex("suppression.add")
    assert "nothing recorded" in ok(run(["audit", "nobody@example.net"], tmp_path))


def test_audit_verify_detects_tampering(tmp_path):
    ok(run(["suppression", "add", "a@example.net", "b@example.net", "c@example.net", "--scope", "all",
            "--reason", "x"], tmp_path))
    assert json.loads(ok(run(["audit", "verify", "--json"], tmp_path)))["intact"] is True
    with sqlite3.connect(tmp_path / "optout.db") as connection:
        connection.execute("DROP TRIGGER audit_no_update")
        connection.execute("UPDATE audit SET detail = '{\"scope\": \"none\"}' WHERE id = 2")

    broken = run(["audit", "verify"], tmp_path)

    assert broken.returncode == 1
    assert "BROKEN at event 2" in out(broken)


def test_stats_json_has_per_day_counts_and_the_table_a_chart(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (tmp_path / "one" / "a.eml").write_bytes(OPT_OUT)
    (tmp_path / "two" / "b.eml").write_bytes(DELETION)
    ok(run(["process", "one"], tmp_path, now=NOW.replace(day=27)))
    ok(run(["process", "two"], tmp_path))

    numbers = json.loads(ok(run(["stats", "--json"], tmp_path)))
    recent = json.loads(ok(run(["stats", "--json", "--since", "2026-11-28"], tmp_path)))
    table = ok(run(["stats"], tmp_path))

    assert {"messages", "kinds", "suppressions", "requests", "days"} <= set(numbers)
    assert numbers["days"]["2026-11-27"]["opt-out"] == 1
    assert numbers["days"]["2026-11-29"]["deletion"] == 1
    assert numbers["days"]["2026-11-29"]["messages"] == 1
    assert recent["messages"] == 1 and list(recent["days"]) == ["2026-11-29"]
    assert "2026-11-27" in table and "█" in table


def test_config_check_lists_every_problem_at_once(tmp_path):
    (tmp_path / "bad.toml").write_text('[smtp]\nmax_recipients = "many"\n[replies]\nfrom = "nobody"\n[colour]\nx = 1\n')
    (tmp_path / "good.toml").write_text('[requests]\ndays = 30\n')

    bad = run(["config", "check", "bad.toml"], tmp_path)
    via_env = run(["config", "check"], tmp_path, extra_env={"OPTOUT_CONFIG": str(tmp_path / "bad.toml")})
    good = run(["config", "check", "good.toml"], tmp_path)

    assert bad.returncode == 3 and via_env.returncode == 3
    lines = out(bad).splitlines()
    assert len(lines) == 3
    assert any("smtp.max_recipients" in line and "whole number" in line for line in lines)
    assert any("replies.from" in line and "not an address" in line for line in lines)
    assert any("[colour]" in line for line in lines)
    assert all(line.startswith("bad.toml: ") for line in lines)
    assert "no problems" in ok(good)


def test_help_documents_the_exit_codes():
    result = subprocess.run([str(OPTOUT), "--help"], capture_output=True, timeout=30)

    assert "8   refused" in out(result) and "75  the database is busy" in out(result)
