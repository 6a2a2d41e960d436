import csv
import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import NOW
from optout.model import drop_hash, normalise_address
from optout.suppression import find_column, read_header, scopes_for, scrub_lines

OPTOUT = Path(sys.executable).parent / "optout"

SENDLIST = (
    'id,first_name,email,note\r\n'
    '1,Ann,ann@example.net,plain\r\n'
    '2,"Smith, Bob", BOB@Example.NET ,"quoted, with comma"\r\n'
    '3,Cy,cy@example.net,"two\r\nlines and ""quotes"""\r\n'
    '4,Dee,dee@example.net,kept\r\n'
    '5,Bo,Bo@B\u00dcCHER.de,idna\r\n'
    '6,Gone,"Erased@Example.org",tombstone\r\n'
    '7,Pat,pat@example.net,partners only\r\n'
    '8,Nobody,,no address\r\n'
    '9,Nia,<nia@example.net>,angle brackets\r\n'
)


def run(args, cwd):
    env = {key: value for key, value in os.environ.items() if not key.startswith("OPTOUT_")}
    env["OPTOUT_NOW"] = NOW.isoformat()
    env["OPTOUT_DATABASE"] = str(Path(cwd) / "optout.db")
    return subprocess.run([str(OPTOUT), *args], cwd=cwd, env=env, capture_output=True, timeout=60)


def ok(result):
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode("utf-8")


@pytest.fixture(scope="module")
def sendlist(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("scrub")
    ok(run(["suppression", "add", "ann@example.net", "bob@example.net", "--scope", "all", "--reason", "opt-out"], cwd))
    ok(run(["suppression", "add", "cy@example.net", "bo@b\u00fccher.de", "--scope", "newsletters", "--reason", "form"],
           cwd))
    ok(run(["suppression", "add", "pat@example.net", "--scope", "partners", "--reason", "form"], cwd))
    ok(run(["suppression", "add", "nia@example.net", "--scope", "all", "--reason", "deletion"], cwd))
    with sqlite3.connect(cwd / "optout.db") as connection:
        # A tombstone that kept only the DROP hash of the address.
        connection.execute("INSERT INTO suppressions (address, address_hash, scope, reason, created_at) "
                           "VALUES (NULL, ?, 'all', 'deletion', '2026-11-01T00:00:00+00:00')",
                           [drop_hash("erased@example.org")])
    (cwd / "send.csv").write_bytes(SENDLIST.encode("utf-8"))
    return cwd


def ids(text):
    return [row["id"] for row in csv.DictReader(io.StringIO(text, newline=""))]


def test_scrub_without_scope_removes_every_suppressed_address(sendlist):
    result = run(["scrub", "send.csv", "--column", "email", "-o", "clean.csv"], sendlist)

    ok(result)
    clean = (sendlist / "clean.csv").read_bytes().decode("utf-8")
    assert ids(clean) == ["4", "8"]
    assert clean.startswith("id,first_name,email,note\r\n")
    assert clean == "id,first_name,email,note\r\n4,Dee,dee@example.net,kept\r\n8,Nobody,,no address\r\n"
    summary = result.stderr.decode()
    assert summary == ("9 rows: 2 kept, 7 removed (3 form, 2 opt-out, 2 deletion); "
                       "1 row without an address kept; written to clean.csv.\n")


def test_scrub_keeps_other_columns_and_quoting_byte_for_byte(sendlist):
    (sendlist / "two.csv").write_bytes(SENDLIST.encode("utf-8"))

    clean = ok(run(["scrub", "two.csv", "--column", "EMAIL", "--scope", "partners"], sendlist))

    # partners: all-scope and partners rows go; newsletter-only rows (cy, bo) stay, exactly as written.
    assert ids(clean) == ["3", "4", "5", "8"]
    assert '3,Cy,cy@example.net,"two\r\nlines and ""quotes"""\r\n' in clean
    assert "5,Bo,Bo@B\u00dcCHER.de,idna\r\n" in clean


@pytest.mark.parametrize("scope, kept", [
    ("newsletters", ["4", "7", "8"]),
    ("all", ["3", "4", "5", "7", "8"]),
])
def test_scrub_scopes(sendlist, scope, kept):
    result = run(["scrub", "send.csv", "--scope", scope, "--json"], sendlist)

    assert ids(ok(result)) == kept
    summary = json.loads(result.stderr)
    assert summary["kept"] == len(kept) and summary["kept"] + summary["removed"] == 9
    assert summary["without_address"] == 1


def test_scrub_of_a_missing_column_is_one_line(sendlist):
    result = run(["scrub", "send.csv", "--column", "mail"], sendlist)

    assert result.returncode == 4
    assert result.stderr.decode().strip() == \
        "optout: error: send.csv: no column 'mail' (columns: id, first_name, email, note)"
    assert result.stdout == b""


def test_scrub_reads_semicolon_lists(tmp_path):
    ok(run(["suppression", "add", "ann@example.net", "--scope", "all", "--reason", "opt-out"], tmp_path))
    (tmp_path / "send.csv").write_text("name;email\nAnn;ANN@example.net\nBob;bob@example.net\n")

    assert ok(run(["scrub", "send.csv"], tmp_path)) == "name;email\nBob;bob@example.net\n"


# ---------------------------------------------------------------- the pure part

def scrub_text(text, addresses, hashes=None, column="email"):
    lines = iter(io.StringIO(text, newline=""))
    header_text, header, dialect = read_header(lines)
    kept = []
    result = scrub_lines(lines, find_column(header, column), dialect, addresses, hashes or {}, kept.append)
    return header_text + "".join(kept), result


def test_scrub_lines_matches_what_normalise_address_matches():
    spellings = ["Ann@Example.NET", " ann@example.net\t", "<ann@example.net>", "ann@example.net.", "ann@EXAMPLE.net "]
    text = "email\n" + "".join(f'"{s}"\n' if " " in s or "\t" in s else f"{s}\n" for s in spellings)

    clean, result = scrub_text(text, {"ann@example.net": "opt-out"})

    assert {normalise_address(s) for s in spellings} == {"ann@example.net"}
    assert clean == "email\n" and result.removed == 5


def test_scrub_lines_matches_hash_only_tombstones():
    clean, result = scrub_text("id,email\n1,Gone@Example.org\n2,kept@example.org\n", {},
                               {drop_hash("gone@example.org"): "deletion"})

    assert clean == "id,email\n2,kept@example.org\n"
    assert dict(result.reasons) == {"deletion": 1}


def test_scrub_lines_keeps_short_rows_and_refuses_an_unclosed_quote():
    clean, result = scrub_text("id,name,email\n1\n2,x,a@example.net\n", {"a@example.net": "x"})
    assert clean == "id,name,email\n1\n" and result.kept == 1 and result.blank == 1

    with pytest.raises(csv.Error):
        scrub_text('id,email\n1,"a@example.net\n', {})


def test_scopes_for():
    assert scopes_for(None) is None
    assert scopes_for("all") == ("all",)
    assert scopes_for("newsletters") == ("all", "newsletters")
