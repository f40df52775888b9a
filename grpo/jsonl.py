"""JSON-lines files the commands read (data files, `metrics.jsonl`, `grpo reward --input`): each line
a JSON object, a bad line named by its number, so that one stray line reads as one line of error, not
a traceback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def read_objects(
    path: Path, accept: Callable[[dict], bool], expected: str, text: str | None = None
) -> list[dict]:
    """The objects of `path`'s non-blank lines (of `text`, its contents, where the caller has read
    them already); a ValueError `PATH:N: ...` for a line that is not JSON, or not an object `accept`
    takes (`expected` says what it wants)."""
    objects = []
    # only "\n" ends a line: str.splitlines would also split inside a JSON string holding U+2028
    for number, line in enumerate((utf8_text(path) if text is None else text).split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
        if not isinstance(value, dict) or not accept(value):
            raise ValueError(f"{path}:{number}: {expected}")
        objects.append(value)
    return objects


def utf8_text(path: Path) -> str:
    """`path`'s text; a ValueError naming the file and the first byte that is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
