"""Text another party chose reaches the terminal inert.

An order's tag is set by whoever placed the order, at any node; a peer's addresses are what
it announced. The CLI shows them as the characters they are: rich markup is not interpreted
and control characters (ESC sequences, bidi overrides, newlines) are shown as escapes.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from crdtbook.cli.app import app
from crdtbook.cli.render import inert, printable

runner = CliRunner()

MARKUP = "[bold red]HI[/]"
ESCAPES = "\x1b[31mred\x1b[0m\x07"
BIDI = "abc\u202edcba"
NEWLINE = "two\nlines\r"
TAGS = [MARKUP, ESCAPES, BIDI, NEWLINE]
SHOWN = [
    "[bold red]HI[/]",
    "\\x1b[31mred\\x1b[0m\\x07",
    "abc\\u202edcba",
    "two\\x0alines\\x0d",
]


def run(*args: str) -> Result:
    return runner.invoke(app, list(args), env={"COLUMNS": "200"})


def assert_inert(output: str) -> None:
    for bad in ("\x1b", "\x07", "\u202e", "\r"):
        assert bad not in output


@pytest.mark.parametrize(("tag", "shown"), list(zip(TAGS, SHOWN, strict=True)))
def test_order_shows_a_remote_tag_inert(fake_node: Any, samples: Any, tag: str, shown: str) -> None:
    fake_node.answers["order"] = samples.order(author=samples.B, mine=False, tag=tag)
    res = run("order", samples.A[:8])
    assert res.exit_code == 0, res.output
    assert_inert(res.output)
    (line,) = [ln for ln in res.output.splitlines() if ln.split()[:1] == ["tag"]]
    assert line.split(None, 1)[1].rstrip() == shown


@pytest.mark.parametrize(("tag", "shown"), list(zip(TAGS, SHOWN, strict=True)))
def test_orders_all_shows_remote_tags_inert(
    fake_node: Any, samples: Any, tag: str, shown: str
) -> None:
    fake_node.answers["orders"] = {
        "market": "DEMO",
        "orders": [samples.order(author=samples.B, mine=False, tag=tag, status="open")],
    }
    res = run("orders", "--all")
    assert res.exit_code == 0, res.output
    assert_inert(res.output)
    assert shown in res.output


def test_submit_result_shows_the_tag_inert(fake_node: Any, samples: Any) -> None:
    tag = MARKUP + ESCAPES
    fake_node.answers["submit"] = {"order": samples.order(tag=tag), "fills": []}
    res = run("submit", "buy", "5@100", "--tag", tag)
    assert res.exit_code == 0, res.output
    assert_inert(res.output)
    assert f"tag {SHOWN[0]}{SHOWN[1]}" in res.output


def test_status_and_id_show_peer_announced_text_inert(fake_node: Any, samples: Any) -> None:
    status = dict(samples.STATUS)
    status["addrs"] = [f"/unix/{MARKUP}", f"/unix/{ESCAPES}"]
    status["peers"] = [
        {"peer_id": f"12D3KooW{MARKUP}", "addrs": [f"/dns4/{ESCAPES}/tcp/1"]},
    ]
    fake_node.answers["status"] = status
    fake_node.answers["id"] = {"peer_id": status["peer_id"], "addrs": status["addrs"]}
    for command in ("status", "id"):
        res = run(command)
        assert res.exit_code == 0, res.output
        assert_inert(res.output)
        assert f"/unix/{SHOWN[0]}" in res.output
        assert f"/unix/{SHOWN[1]}" in res.output
    res = run("status")
    assert f"12D3KooW{SHOWN[0]}" in res.output
    assert f"/dns4/{SHOWN[1]}/tcp/1" in res.output


def test_json_output_escapes_control_characters(fake_node: Any, samples: Any) -> None:
    fake_node.answers["order"] = samples.order(tag=ESCAPES)
    res = run("order", samples.A[:8], "--json")
    assert res.exit_code == 0, res.output
    assert_inert(res.output)
    assert "\\u001b[31mred" in res.output


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain tag-1 ü ß 日本 🙂", "plain tag-1 ü ß 日本 🙂"),
        ("\x00\x1f\x7f\x85\x9b", "\\x00\\x1f\\x7f\\x85\\x9b"),  # C0, DEL, C1 (NEL, CSI)
        ("a\u2028b\u2029c", "a\\u2028b\\u2029c"),
        ("\u200b\u2066x\u2069", "\\u200b\\u2066x\\u2069"),
        ("\U000e0041", "\\U000e0041"),  # a tag character (format)
        ("\ud800", "\\ud800"),  # a lone surrogate (JSON can carry one)
        (None, "None"),
    ],
)
def test_printable(text: object, expected: str) -> None:
    assert printable(text) == expected


def test_inert_escapes_markup_too() -> None:
    assert inert(MARKUP) == "\\[bold red]HI\\[/]"
    assert inert("\x1b[1m") == "\\x1b[1m"  # not markup: left as is
    assert inert("[link=https://x]y[/link]") == "\\[link=https://x]y\\[/link]"
    assert SimpleNamespace(shown=inert("no markup here")).shown == "no markup here"
