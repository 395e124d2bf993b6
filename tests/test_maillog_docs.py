"""The README's list of mail log lines against the lines mailx writes."""

from __future__ import annotations

import ast
import re
import string
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEVELS = {"info", "warn", "error", "critical", "failure"}


def written_formats(source: str) -> list[str]:
    """The format strings of the maillog calls in one module's source."""
    formats = []
    for node in ast.walk(ast.parse(source)):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "maillog"
            and node.func.attr in LEVELS
            and node.args
        ):
            continue
        formats.append(format_of(node.args[0]))
    return formats


def format_of(node: ast.expr) -> str:
    """A format string; a variable joined to it (``event + " {id}"``) as a field."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return format_of(node.left) + format_of(node.right)
    return "{variable}"


def shape_pattern(log_format: str) -> re.Pattern[str]:
    """A format string as a pattern: its fields match any text, the rest itself."""
    pieces = []
    for literal, field, _, _ in string.Formatter().parse(log_format):
        pieces.append(re.escape(literal))
        if field is not None:
            pieces.append(".*?")
    return re.compile("".join(pieces))


def documented_shapes(readme: str) -> list[str]:
    """The lines of the code blocks in the README's section on the mail log."""
    section = readme.split("\n## The mail log\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    return [line for block in blocks for line in block.splitlines()]


def undocumented(readme: str) -> list[str]:
    shapes = documented_shapes(readme)
    missing = []
    for module in sorted((ROOT / "mailx").glob("*.py")):
        for log_format in written_formats(module.read_text(encoding="utf-8")):
            pattern = shape_pattern(log_format)
            if not any(pattern.fullmatch(shape) for shape in shapes):
                missing.append(f"{module.name}: {log_format}")
    return missing


def test_every_mail_log_line_is_in_the_readme() -> None:
    """Each line mailx writes to the mail log has its shape in the README's list."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")

    assert undocumented(readme) == []


def test_an_undocumented_line_is_noticed() -> None:
    """A README list without the connect line is reported as missing it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    shortened = readme.replace("connect from [ADDRESS]:PORT\n", "", 1)

    assert undocumented(shortened) == [
        "session.py: connect from [{client_address}]:{client_port}"
    ]
