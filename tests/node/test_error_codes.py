"""The control API's error codes in one place: ``ERROR_CODES`` holds every code the node defines,
specs/control-api.md lists exactly those, and the HTTP API maps each to a status. A code added
to one and forgotten in another is what a script author meets as an unknown code."""

from __future__ import annotations

import re
from pathlib import Path

from crdtbook.node import control_errors
from crdtbook.node.control_errors import ERROR_CODES
from crdtbook.node.http_api import HTTP_STATUS, UNAUTHORIZED

SPEC = Path(__file__).resolve().parents[2] / "specs" / "control-api.md"


def spec_codes() -> set[str]:
    """The codes of the spec's "Error codes:" paragraph (each in backticks, first in its item)."""
    text = SPEC.read_text()
    start = text.index("Error codes:")
    paragraph = text[start : text.index("\n\n", start)]
    # Items are separated by commas at the paragraph's top level; a code is the item's first
    # backticked word (parentheses may name other things in backticks).
    depth, items, item = 0, [], ""
    for char in paragraph[len("Error codes:") :]:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            items.append(item)
            item = ""
        else:
            item += char
    items.append(item)
    codes = set()
    for entry in items:
        found = re.search(r"`([a-z_]+)`", entry)
        if found:
            codes.add(found.group(1))
    return codes


def test_error_codes_holds_every_code_the_module_defines() -> None:
    defined = {
        value
        for name, value in vars(control_errors).items()
        if name.isupper()
        and isinstance(value, str)
        and re.fullmatch(r"[a-z_]+", value)
        and name not in ("CONTROL_SOCKET_NAME",)
    }
    assert defined == set(ERROR_CODES)
    exported = {
        name
        for name, value in vars(control_errors).items()
        if isinstance(value, str) and value in ERROR_CODES
    }
    assert set(control_errors.__all__) >= exported


def test_spec_lists_exactly_the_error_codes() -> None:
    assert spec_codes() == set(ERROR_CODES)


#: Codes of control methods the HTTP API does not offer (reconfiguration) or never asks for
#: (an unknown method): they would fall back to 400.
NOT_OVER_HTTP = {"no_majority", "bad_approval", "unknown_method"}


def test_http_api_maps_every_code_it_can_meet_to_a_status() -> None:
    assert set(HTTP_STATUS) == (set(ERROR_CODES) - NOT_OVER_HTTP) | {UNAUTHORIZED}
