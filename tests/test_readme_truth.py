"""The README says what the code does: its variables table, the ``with_connection``
keywords it lists and its layout table are checked against the package itself."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import lambda_pool
from lambda_pool import config
from lambda_pool.handler import with_connection

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _variables_table() -> set[str]:
    return set(re.findall(r"^\| `(LAMBDA_POOL_[A-Z_]+)` \|", README, re.M))


def test_the_variables_table_lists_exactly_the_variables_config_reads() -> None:
    read = {
        value
        for name, value in vars(config).items()
        if name.endswith("_ENV") and isinstance(value, str) and value.startswith("LAMBDA_POOL_")
    }
    assert read, "config.py names no LAMBDA_POOL_* variable"
    assert _variables_table() == read


def test_every_with_connection_keyword_is_named_in_the_readme_signature() -> None:
    listed = re.search(r"`with_connection\((.*?)\)` overrides the environment", README, re.S)
    assert listed, "the README lost its with_connection signature line"
    names = set(re.findall(r"([a-z_]+)=", listed.group(1)))
    parameters = {
        name
        for name, parameter in inspect.signature(with_connection).parameters.items()
        if parameter.kind is not inspect.Parameter.VAR_KEYWORD and name != "url"
    }
    assert parameters <= names, f"not in the README: {sorted(parameters - names)}"
    assert names <= parameters, f"not parameters: {sorted(names - parameters)}"


def test_the_layout_table_names_every_module_of_the_package() -> None:
    row = re.search(r"^\| `lambda_pool/` \|(.*)$", README, re.M)
    assert row, "the README's layout table has no lambda_pool/ row"
    named = set(re.findall(r"`([a-z_]+(?:\.py|/))`", row.group(1)))
    package = Path(lambda_pool.__file__).parent
    modules = {
        path.name if path.is_file() else path.name + "/"
        for path in package.iterdir()
        if (path.suffix == ".py" and path.name not in {"__init__.py", "__main__.py"})
        or (path.is_dir() and (path / "__init__.py").exists())
    }
    assert modules - named == set(), f"missing from the layout table: {sorted(modules - named)}"
