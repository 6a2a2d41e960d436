"""Security checks as tests: no SQL built from data, HTML replies autoescaped, no secret and no body in any log
or in the database."""

from __future__ import annotations

import ast
import asyncio
import re
import threading
import uuid
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from conftest import ROOT, make_mail, query, run_cli
from relay import Collector

SQL_METHODS = {"execute", "executemany", "executescript", "query", "rows_where", "count_where", "delete_where"}
# Functions whose result may stand in SQL as an identifier: each refuses anything but a plain name.
IDENTIFIER_QUOTERS = {"quote_identifier"}


class SqlChecker:
    """Find calls that pass SQL built from anything but string constants and "?" placeholders.

    Safe: a string constant; a name bound only to safe values (in the function or at module level); +, %,
    .format and f-strings whose every piece is safe; a join of "?"s; an index from enumerate() (an int);
    an identifier through one of IDENTIFIER_QUOTERS;
    a parameter that every caller in the module fills with a safe value; element i of a module function's
    tuple whose every `return` is safe at i.
    """

    def __init__(self, source: str, path: str) -> None:
        self.tree = ast.parse(source)
        self.path = path
        self.parents: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(self.tree):
            for child in ast.iter_child_nodes(node):
                self.parents[child] = node
        self.functions = [n for n in ast.walk(self.tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        self.module_functions = {n.name: n for n in self.tree.body if isinstance(n, ast.FunctionDef)}
        self.checking: set = set()

    def problems(self) -> list[str]:
        found = []
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SQL_METHODS:
                sql = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg in ("sql", "where")),
                                                          None)
                if sql is not None and not self.safe(sql, self.scope_of(node)):
                    found.append(f"{self.path}:{node.lineno}: {ast.unparse(sql)[:100]}")
        return found

    def scope_of(self, node: ast.AST):
        while node in self.parents:
            node = self.parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node
        return self.tree

    def safe(self, node: ast.AST, scope) -> bool:
        if isinstance(node, ast.Constant):
            return isinstance(node.value, (str, int, float)) or node.value is None
        if isinstance(node, ast.JoinedStr):
            return all(self.safe(v, scope) for v in node.values)
        if isinstance(node, ast.FormattedValue):
            return self.safe(node.value, scope)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
            return self.safe(node.left, scope) and self.safe(node.right, scope)
        if isinstance(node, ast.Tuple):
            return all(self.safe(e, scope) for e in node.elts)
        if isinstance(node, ast.IfExp):
            return self.safe(node.body, scope) and self.safe(node.orelse, scope)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in IDENTIFIER_QUOTERS:
            return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "join" and len(node.args) == 1 and self.placeholders(node.args[0]):
                return self.safe(node.func.value, scope)
            if node.func.attr == "format":
                return self.safe(node.func.value, scope) and all(self.safe(a, scope) for a in node.args)
        if isinstance(node, ast.Name):
            return self.safe_name(node.id, scope)
        return False

    def placeholders(self, node: ast.AST) -> bool:
        """Say whether node yields only "?" (a generator or list of "?", or ["?"] * n)."""
        if isinstance(node, (ast.GeneratorExp, ast.ListComp)):
            return isinstance(node.elt, ast.Constant) and node.elt.value == "?"
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            return any(isinstance(side, ast.List) and all(isinstance(e, ast.Constant) and e.value == "?" for e in side.elts)
                       for side in (node.left, node.right))
        return False

    def safe_name(self, name: str, scope) -> bool:
        key = (name, id(scope))
        if key in self.checking:
            return True  # `sql += " AND …"` refers to itself: the other bindings decide
        self.checking.add(key)
        try:
            bindings = self.bindings(name, scope)
            if bindings is None and scope is not self.tree:
                return self.safe_name(name, self.scope_of(scope))
            return bool(bindings) and all(bindings)
        finally:
            self.checking.discard(key)

    def bindings(self, name: str, scope) -> list[bool] | None:
        """Return whether each binding of name in scope (not in nested functions) is safe; None when unbound."""
        results: list[bool] = []
        if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for index, argument in enumerate(scope.args.args):
                if argument.arg == name:
                    results.append(self.parameter_is_safe(scope, index))
        for node in self.own_nodes(scope):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    results += self.assigned(target, node.value, name, scope)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
                results.append(node.value is not None and self.safe(node.value, scope))
            elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
                results.append(self.safe(node.value, scope))
            elif isinstance(node, (ast.For, ast.comprehension)):
                target, iterable = node.target, node.iter
                if self.binds(target, name):
                    # for number, item in enumerate(…): the number is an int.
                    enumerated = (isinstance(iterable, ast.Call) and isinstance(iterable.func, ast.Name)
                                  and iterable.func.id == "enumerate" and isinstance(target, ast.Tuple)
                                  and isinstance(target.elts[0], ast.Name) and target.elts[0].id == name)
                    results.append(enumerated)
        return results or None

    def own_nodes(self, scope):
        """Walk scope without descending into nested functions or classes."""
        stack = list(ast.iter_child_nodes(scope))
        while stack:
            node = stack.pop()
            yield node
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                stack.extend(ast.iter_child_nodes(node))

    @staticmethod
    def binds(target: ast.AST, name: str) -> bool:
        return any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(target))

    def assigned(self, target: ast.AST, value: ast.AST, name: str, scope) -> list[bool]:
        if isinstance(target, ast.Name):
            return [self.safe(value, scope)] if target.id == name else []
        if isinstance(target, ast.Tuple) and self.binds(target, name):
            index = next(i for i, e in enumerate(target.elts) if isinstance(e, ast.Name) and e.id == name)
            if isinstance(value, ast.Tuple):
                return [self.safe(value.elts[index], scope)]
            if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in self.module_functions:
                function = self.module_functions[value.func.id]
                returns = [n.value for n in self.own_nodes(function) if isinstance(n, ast.Return)]
                return [bool(returns) and all(isinstance(r, ast.Tuple) and self.safe(r.elts[index], function)
                                              for r in returns)]
            return [False]
        return []

    def parameter_is_safe(self, function, index: int) -> bool:
        """Say whether every call of a function (by its name, in this module) passes a safe value at index."""
        calls = [n for n in ast.walk(self.tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                 and n.func.id == function.name]
        return bool(calls) and all(len(c.args) > index and self.safe(c.args[index], self.scope_of(c)) for c in calls)


def sql_problems(source: str, path: str = "<test>") -> list[str]:
    return SqlChecker(source, path).problems()


def test_no_sql_in_optout_is_built_from_data():
    problems = []
    for path in sorted((ROOT / "optout").rglob("*.py")):
        problems += sql_problems(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))

    assert problems == []


def test_the_sql_checker_sees_what_it_must():
    unsafe = [
        'def f(db, address):\n    db.execute(f"SELECT * FROM t WHERE a = \'{address}\'")',
        'def f(db, address):\n    db.execute("SELECT * FROM t WHERE a = \'%s\'" % address)',
        'def f(db, address):\n    db.execute("SELECT * FROM t WHERE a = \'" + address + "\'")',
        'def f(db, address):\n    db.execute("SELECT * FROM t WHERE a = \'{}\'".format(address))',
        'def f(db, address):\n    sql = "SELECT * FROM t"\n    sql += " WHERE a = " + address\n    db.execute(sql)',
        'def f(db, table):\n    db.query(f"SELECT * FROM {table}")',
        'def f(db, names):\n    marks = ",".join(names)\n    db.execute(f"SELECT * FROM t WHERE a IN ({marks})")',
        'def g(x):\n    return x, []\ndef f(db, a):\n    cond, params = g(a)\n    db.execute("SELECT 1 WHERE " + cond, params)',
        'def f(db, rows):\n    def run(sql):\n        db.execute(sql)\n    run("SELECT 1")\n    run(rows)',
    ]
    safe = [
        'def f(db, address):\n    db.execute("SELECT * FROM t WHERE a = ?", [address])',
        'def f(db, status):\n    sql = "SELECT * FROM t"\n    if status:\n        sql += " WHERE s = ?"\n    db.execute(sql, [status])',
        'def f(db, names):\n    marks = ",".join("?" for _ in names)\n    db.execute(f"SELECT * FROM t WHERE a IN ({marks})", names)',
        'COLUMNS = "SELECT a FROM t"\ndef f(db, x):\n    db.execute(f"{COLUMNS} WHERE a = ?", [x])',
        'def f(db, migrations):\n    for number, m in enumerate(migrations, 1):\n        db.execute(f"PRAGMA user_version = {number}")',
        'def f(db, table, a):\n    db.execute(f"SELECT * FROM {quote_identifier(table)} WHERE a = ?", [a])',
    ]

    assert [s for s in unsafe if not sql_problems(s)] == []
    assert [s for s in safe if sql_problems(s)] == []


# ------------------------------------------------------------------ HTML replies

def test_no_shipped_html_template_turns_autoescaping_off():
    for path in (ROOT / "config" / "templates").glob("*.html"):
        text = path.read_text(encoding="utf-8")
        assert "|safe" not in text.replace(" ", "") and "autoescape false" not in text, path.name


@pytest.mark.parametrize("sender", [
    '"<script>alert(1)</script>" <ann@example.net>',
    '"<img src=x onerror=alert(1)>" <ann@example.net>',
    '"\\"><b>bold</b>" <"<i>x</i>"@example.net>',
])
def test_an_overriding_html_template_is_autoescaped_too(tmp_path, lexicon, sender):
    import email
    import email.policy

    from conftest import NOW
    from optout.model import History
    from optout.parse import parse_message
    from optout.classify import classify
    from optout.policy import Rules, decide
    from optout.replies import render_reply, template_environment

    (tmp_path / "opt-out.en.html").write_text("{% block body %}<p>{{ name }} / {{ address }}</p>{% endblock %}")
    message = parse_message(make_mail("Please unsubscribe me from the newsletter.", sender=sender))
    decision = decide(message, classify(message, lexicon), History(), NOW, Rules())
    rendered = render_reply(decision.reply, message, template_environment(tmp_path), "privacy@example.com", NOW)
    html = email.message_from_bytes(rendered.raw, policy=email.policy.default).get_body(("html",)).get_content()

    assert "<p>" in html
    assert not re.search(r"<(script|img|b|i)\b", html), html
    assert "&lt;" in html


# ------------------------------------------------------------------ secrets and bodies

class AuthRelay:
    """A relay that wants AUTH PLAIN/LOGIN (no TLS on loopback) and records each login."""

    def __init__(self, username: str, password: str) -> None:
        self.username, self.password = username, password
        self.logins: list[tuple[str, str]] = []
        self.handler = Collector()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="auth-relay", daemon=True)
        self.thread.start()

        async def serve():
            return await self.loop.create_server(
                lambda: SMTP(self.handler, hostname="relay.test", auth_require_tls=False,
                             authenticator=self.authenticate), "127.0.0.1", 0)

        self.server = asyncio.run_coroutine_threadsafe(serve(), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]

    def authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = (auth_data.login.decode(), auth_data.password.decode())
        self.logins.append(login)
        return AuthResult(success=login == (self.username, self.password))

    def close(self) -> None:
        async def stop():
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def auth_relay():
    relay = AuthRelay("replies", f"relay-pw-{uuid.uuid4().hex}")
    yield relay
    relay.close()


def everything_written(folder: Path, *results) -> dict[str, bytes]:
    """Return every file under folder (database, WAL, lock, sent mail) and every output of the runs."""
    written = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    for number, result in enumerate(results):
        written[f"run {number} stdout"] = result.stdout.encode()
        written[f"run {number} stderr"] = result.stderr.encode()
    return written


def test_secrets_and_bodies_never_reach_a_log_an_output_or_the_database(mailbox, tmp_path, auth_relay):
    imap_password = mailbox.server.password
    token_key = f"token-key-{uuid.uuid4().hex}"
    wrong_password = f"wrong-pw-{uuid.uuid4().hex}"
    url_password = f"url-pw-{uuid.uuid4().hex}"
    body_word = f"bodyword{uuid.uuid4().hex[:12]}"
    work = tmp_path / "work"
    work.mkdir()
    env = {**mailbox.env(), "OPTOUT_DATABASE": str(work / "optout.db"),
           "OPTOUT_RELAY_URL": f"smtp://replies@127.0.0.1:{auth_relay.port}", "OPTOUT_RELAY_PASSWORD": auth_relay.password,
           "OPTOUT_TOKEN_KEY": token_key}
    headers = run_cli(work, "headers", "ann@example.net", "--list", "weekly", env=env)
    token = re.search(r"unsubscribe\+([a-z0-9]+)@", headers.stdout).group(1)
    said = f"I have written to you before. The word {body_word} is only in this body, never in a subject."
    mailbox.append([
        make_mail(f"Please unsubscribe me from your newsletter. {said}", "Newsletter", sender="Bob <bob@example.net>",
                  message_id="<s1@example.net>"),
        make_mail(f"What personal data do you hold about me? {said}", "My data", sender="Cy <cy@example.net>",
                  message_id="<s2@example.net>"),
        make_mail(f"Please take me off this list. {said}", "List", sender="Ann <ann@example.net>",
                  to=f"unsubscribe+{token}@example.com", message_id="<s3@example.net>"),
        b"From: Dee <dee@example.net>\nSubject: broken\nContent-Type: multipart/mixed\n\n--x\n" + body_word.encode() + b"\n",
    ])

    run = run_cli(work, "run", "--once", env=env)
    # Passwords written into the URLs instead (allowed on loopback), the IMAP one wrong: the error path.
    in_urls = {key: value for key, value in env.items() if key != "OPTOUT_IMAP_PASSWORD"}
    in_urls["OPTOUT_IMAP_URL"] = mailbox.url().replace("@", f":{wrong_password}@", 1)
    in_urls["OPTOUT_RELAY_URL"] = f"smtp://replies:{url_password}@127.0.0.1:{auth_relay.port}"
    again = run_cli(work, "run", "--once", env=in_urls)

    assert headers.returncode == 0, headers.stderr
    assert run.returncode == 0, run.stderr
    assert again.returncode == 6, again.stderr  # the login refused: an error message, but no password in it
    assert "refused" in again.stderr
    assert "Outbox: 2 sent" in run.stdout, run.stdout  # Bob and Cy; a token unsubscribe is never answered
    assert auth_relay.logins == [("replies", auth_relay.password)]  # the secret was really used
    assert query(work / "optout.db", "SELECT count(*) FROM ledger") == [(4,)]
    written = everything_written(work, headers, run, again)
    assert any(b"bob@example.net" in data for name, data in written.items() if name.startswith("optout.db"))
    for secret in (imap_password, auth_relay.password, token_key, wrong_password, url_password, body_word):
        leaks = [name for name, data in written.items() if secret.encode() in data]
        assert leaks == [], f"{secret[:12]}… found in {leaks}"
