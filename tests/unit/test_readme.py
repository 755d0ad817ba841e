"""The README cites the test behind each guarantee; every citation must name a real test.

Citations look like `crash/test_crash.py::test_name` (a path under tests/), then `::other`
for another test of the same file, `[param]` for a parametrized case of the last test, and
`test_*` globs. A bare `integration/test_bad_input.py` cites the whole file."""

from __future__ import annotations

import ast
import fnmatch
import re

from tests.helpers import ROOT

TESTS = ROOT / "tests"
CITATION = re.compile(r"`((?:[a-z0-9]+/)+test_\w+\.py)?(?:::([\w*]+))?(\[[\w-]+\])?`")


def _tests_of(path: str) -> dict[str, str]:
    """Each test function of ``tests/<path>`` with the source of its decorators."""
    tree = ast.parse((TESTS / path).read_text())
    return {
        node.name: " ".join(ast.unparse(d) for d in node.decorator_list)
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }


def _citations() -> list[tuple[str, str | None, str | None]]:
    """(file, test name or glob, parameter) for every citation in README.md."""
    found: list[tuple[str, str | None, str | None]] = []
    for line in (ROOT / "README.md").read_text().splitlines():
        file = name = None
        for match in CITATION.finditer(line):
            cited_file, cited_name, param = match.groups()
            if cited_file is None and cited_name is None and (param is None or file is None):
                continue  # `[a-z]` in prose, not a citation
            if cited_file and cited_file.startswith("tests/"):
                cited_file = cited_file.removeprefix("tests/")
            if cited_file:
                file, name = cited_file, cited_name
            elif cited_name:
                name = cited_name
            assert file is not None, f"{match.group(0)} continues no file citation: {line[:80]}"
            found.append((file, name, param))
    return found


def test_every_test_the_readme_cites_exists() -> None:
    citations = _citations()
    assert len(citations) > 50  # the Guarantees table, at least
    for file, name, param in citations:
        assert (TESTS / file).is_file(), f"README cites {file}, not a file under tests/"
        if name is None:
            continue
        tests = _tests_of(file)
        matching = [t for t in tests if fnmatch.fnmatchcase(t, name)]
        assert matching, f"README cites {file}::{name}, which does not exist"
        if param is not None:
            assert any(param[1:-1] in tests[t] for t in matching), (
                f"README cites {file}::{name}{param}, a case its parametrize does not have"
            )
