"""The close codes' one table (console_proxy.codes) against the viewer's and the wire."""

from __future__ import annotations

import json
import re
from pathlib import Path

from console_proxy import token
from console_proxy.admission import Refusal
from console_proxy.codes import REPORT_ONLY, Close, Refused
from console_proxy.protocol import rfb, wsframes
from console_proxy.relay import Ending

MESSAGES_JS = Path(__file__).resolve().parent.parent / "static" / "messages.js"


def _viewer_closes() -> dict[int, str]:
    """``CLOSES`` from static/messages.js: ``code: "text",`` lines between its braces."""
    source = MESSAGES_JS.read_text(encoding="utf-8")
    block = re.search(r"export const CLOSES = \{(.*?)\n\};", source, re.DOTALL)
    assert block, "static/messages.js has no CLOSES table"
    rows = re.findall(r"^\s*(\d{4}): (\".*\"),$", block[1], re.MULTILINE)
    return {int(code): json.loads(text) for code, text in rows}


def test_every_sent_code_has_the_viewers_message_and_only_those() -> None:
    sent = {int(code): code.message for code in Close if code not in REPORT_ONLY}
    assert sent == _viewer_closes()
    assert all(message for message in sent.values())
    assert len(set(sent.values())) == len(sent), "every way a console ends has its own sentence"


def test_report_only_codes_are_never_sent() -> None:
    assert {int(code) for code in REPORT_ONLY} == {1005, 1006, 1015}
    assert wsframes.close_frame(None) == b"\x88\x00"


def test_a_member_is_its_number_on_the_wire_and_in_records() -> None:
    code = Close.TARGET_AUTH_FAILED
    assert (code, code.reason) == (4501, "target_auth_failed")
    assert json.dumps({"close_code": code}) == '{"close_code": 4501}'
    assert wsframes.close_frame(code, code.reason)[2:4] == b"\x11\x95"
    assert Close(4502) is Close.TARGET_PROTOCOL_ERROR


def test_an_ending_and_an_rfb_error_take_their_reason_from_the_one_table() -> None:
    assert Ending.of(Close.IDLE_TIMEOUT, "quiet") == Ending(4408, "idle_timeout", "quiet")
    for error, close in (
        (rfb.RfbError.auth_failed("no"), Close.TARGET_AUTH_FAILED),
        (rfb.RfbError.protocol("bad"), Close.TARGET_PROTOCOL_ERROR),
    ):
        assert (error.close_code, error.code) == (close, close.reason)


def test_wire_names_are_unique() -> None:
    names = [code.reason for code in Close]
    assert len(names) == len(set(names))


def test_every_refusal_code_owns_its_status_and_message_and_the_token_uses_them() -> None:
    assert {code.status for code in Refused} <= {400, 401, 403, 409, 410, 426, 503}
    assert all(code.message for code in Refused)
    for reason in token.Reason:
        code = reason.refused
        assert (Refused(code).status, Refused(code).message) == (code.status, token.PUBLIC_MESSAGES[code]), reason
    refusal = Refusal(Refused.TOKEN_USED)
    assert (refusal.status, refusal.body()) == (409, {"error": "token_used", "message": Refused.TOKEN_USED.message})
    assert json.dumps(refusal.body()).startswith('{"error": "token_used"')
