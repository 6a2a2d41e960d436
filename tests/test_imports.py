import ast
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "optout"

CORE = frozenset({"model", "parse", "text", "classify", "lexicon", "policy", "tokens", "replies", "suppression"})
SHELL = frozenset({"store", "fulfil", "config", "process", "examiner", "sources", "outbox", "signing", "daemon", "cli"})
EVERYTHING = CORE | SHELL | {"errors"}

# Which optout modules each module may import (by first name under optout/), from DESIGN.md.
ALLOWED_INTERNAL = {
    **{name: CORE | {"errors"} for name in CORE},
    "errors": frozenset(),
    "store": frozenset({"model", "errors"}),
    "fulfil": CORE | {"store", "errors"},
    "process": CORE | {"store", "fulfil", "errors"},
    "config": frozenset({"errors"}),
    "sources": frozenset({"process", "store", "model", "errors"}),
    "outbox": frozenset({"process", "store", "model", "errors"}),
    "signing": frozenset({"errors"}),
    "examiner": CORE | {"errors"},
    "daemon": EVERYTHING - {"cli"},
    # The CLI is the entry point of everything, `optout run` (the daemon) included; nothing imports the CLI.
    "cli": EVERYTHING,
}

# The one third-party library each adapter wraps; every other module uses the standard library only.
ALLOWED_THIRD_PARTY = {
    "parse": {"flanker"},
    "text": {"inscriptis"},
    "replies": {"jinja2"},
    "store": {"sqlite_utils"},
    "cli": {"click"},
    "sources.imap": {"imapclient"},
    "sources.smtp": {"aiosmtpd"},
    "sources.web": {"aiohttp"},
    "signing": {"dkim"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or "__init__"


def package_of(path: Path) -> list[str]:
    return ["optout", *path.relative_to(PACKAGE).parent.parts]


def imports_in(source: str, package: list[str]) -> set[str]:
    """Return every module a source imports, made absolute, wherever the import statement stands."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            if prefix == "optout" or (node.level and not node.module):
                found.update(f"{prefix}.{alias.name}" for alias in node.names)
            else:
                found.add(prefix)
    return found


def imports_of(path: Path) -> set[str]:
    return imports_in(path.read_text(encoding="utf-8"), package_of(path))


def internal(imports: set[str]) -> set[str]:
    return {name.split(".", 1)[1] for name in imports if name.startswith("optout.")}


def third_party(imports: set[str]) -> set[str]:
    tops = {name.split(".")[0] for name in imports}
    return {top for top in tops if top != "optout" and top != "__future__" and top not in sys.stdlib_module_names}


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in path.parts}
IMPORTS = {name: imports_of(path) for name, path in MODULES.items()}


def group(name: str) -> str:
    return name.split(".")[0]


def test_the_walker_finds_the_modules_of_the_package():
    assert {"model", "parse", "text", "store", "process", "config", "cli", "errors", "lexicon"} <= set(MODULES)


def test_the_walker_sees_module_level_imports():
    assert "flanker" in third_party(IMPORTS["parse"])
    assert "model" in internal(IMPORTS["store"])
    assert "sqlite_utils" in third_party(IMPORTS["store"])


def test_the_walker_sees_imports_inside_functions():
    # cli.py opens the store and loads the pipeline lazily, inside functions.
    assert {"store", "process"} <= internal(IMPORTS["cli"])
    assert "inscriptis" in third_party(IMPORTS["text"])


def test_the_walker_resolves_relative_and_nested_imports():
    source = ("from . import smtp\nfrom ..store import Store\nfrom .. import errors\n"
              "def run():\n    from optout import config\n    import optout.daemon\n")

    assert imports_in(source, ["optout", "sources"]) == {
        "optout.sources.smtp", "optout.store", "optout.errors", "optout.config", "optout.daemon"}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_has_a_dependency_rule(name):
    assert group(name) in ALLOWED_INTERNAL or name == "__init__", f"optout/{name}: add it to a rule in DESIGN.md"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_imports_only_the_optout_modules_design_allows(name):
    allowed = ALLOWED_INTERNAL.get(group(name), frozenset())
    imported = {group(module) for module in internal(IMPORTS[name])} - {group(name)}

    assert imported - allowed == set()


@pytest.mark.parametrize("name", sorted(n for n in MODULES if group(n) in CORE))
def test_core_never_imports_the_shell(name):
    assert {group(module) for module in internal(IMPORTS[name])} & SHELL == set()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_imports_only_its_own_third_party_library(name):
    allowed = ALLOWED_THIRD_PARTY.get(name, set())

    assert third_party(IMPORTS[name]) - allowed == set()


@pytest.mark.parametrize("name", sorted(n for n in MODULES if group(n) not in ("daemon", "cli")))
def test_nothing_imports_daemon_or_cli(name):
    assert {group(module) for module in internal(IMPORTS[name])} & {"daemon", "cli"} == set()


@pytest.mark.parametrize("name", sorted(n for n in MODULES if group(n) == "sources"))
def test_sources_never_import_each_other(name):
    others = {module for module in internal(IMPORTS[name]) if group(module) == "sources" and module != name}

    assert others - {"sources"} == set()
