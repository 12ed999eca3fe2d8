#!/usr/bin/env python
"""Generate the configuration reference of ``docs/deploy.md`` from ``sae_shared.settings.Settings``.

One row per field: its environment variable (``SAEV_`` + the name in capitals), type, default and the docstring written
under the field in ``sae_shared/settings.py``. The table sits between two markers in ``docs/deploy.md``::

    <!-- settings-reference:begin -->
    ...
    <!-- settings-reference:end -->

    python scripts/settings_reference.py            # rewrite the table in docs/deploy.md
    python scripts/settings_reference.py --check    # exit 1 if it is stale (tests/deploy runs this)
    python scripts/settings_reference.py --print    # print the table
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "deploy.md"
BEGIN = "<!-- settings-reference:begin -->"
END = "<!-- settings-reference:end -->"


def field_docstrings(cls: type) -> dict[str, str]:
    """The string literal under each annotated field of ``cls``'s source (the convention of settings.py)."""
    tree = ast.parse(inspect.getsource(cls))
    (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    docs: dict[str, str] = {}
    body = node.body
    for stmt, following in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(following.value.value)
    return docs


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation)
    for noise in ("typing.", "pydantic.types.", "pathlib.", "typing_extensions."):
        text = text.replace(noise, "")
    if text.startswith("Annotated["):  # Annotated[list[SecretStr], NoDecode] -> list[SecretStr]
        text = text[len("Annotated["):].split(",")[0]
    return text


def _default(field: Any) -> str:
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, Path):
            return "`$SAEV_HOME` or `.saev`"
        return f"`{value!r}`"
    if field.default is PydanticUndefined:
        return "required"
    if field.default is None:
        return "unset"
    return f"`{field.default!r}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def table() -> str:
    sys.path.insert(0, str(REPO))
    from sae_shared.settings import ENV_PREFIX, Settings

    docs = field_docstrings(Settings)
    lines = [
        "| variable | type | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for name, field in Settings.model_fields.items():
        env = f"`{ENV_PREFIX}{name.upper()}`"
        secret = "SecretStr" in _type_name(field.annotation)
        kind = _type_name(field.annotation) + (" (secret)" if secret else "")
        lines.append(f"| {env} | {_cell(kind)} | {_cell(_default(field))} | {_cell(docs.get(name, ''))} |")
    return "\n".join(lines) + "\n"


def render_doc(text: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC}: markers {BEGIN} / {END} not found")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table()}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="exit 1 if docs/deploy.md's table is stale")
    group.add_argument("--print", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    if args.print:
        sys.stdout.write(table())
        return 0
    current = DOC.read_text()
    wanted = render_doc(current)
    if args.check:
        if current != wanted:
            print(f"{DOC.relative_to(REPO)}: the configuration reference is stale; "
                  "run python scripts/settings_reference.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(wanted)
    print(f"updated the configuration reference in {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
