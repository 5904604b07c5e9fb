"""Postfix policy codec: captured requests, chunking, CRLF, limits, bad input, replies."""

from __future__ import annotations

import re

import pytest

from ratelimit_policyd import codec
from ratelimit_policyd.codec import (
    DEFAULT_MAX_ATTRS,
    DEFAULT_MAX_REQUEST_BYTES,
    MalformedLine,
    PolicyDecoder,
    ProtocolError,
    RequestTooLarge,
    TooManyAttributes,
    encode_reply,
    validate_action,
)
from tests.fixtures_common import fixture_names, read_fixture

FIXTURES = fixture_names()


def expected_attrs(raw: bytes) -> dict[str, str]:
    """Parse a captured request independently of the codec: LF lines, split on first '='."""
    assert raw.endswith(b"\n\n")
    text = raw.decode("ascii")
    attrs: dict[str, str] = {}
    for line in text[:-2].split("\n"):
        name, value = line.split("=", 1)
        attrs[name] = value
    return attrs


def decode_all(data: bytes, chunk: int, **limits: int) -> list[dict[str, str]]:
    decoder = PolicyDecoder(**limits)
    out: list[dict[str, str]] = []
    for i in range(0, len(data), chunk):
        out += decoder.feed(data[i : i + chunk])
    assert decoder.pending == 0
    return out


def request(*lines: str) -> bytes:
    return "".join(f"{line}\n" for line in lines).encode() + b"\n"


# --- captured Postfix requests --------------------------------------------------------


def test_fixtures_present() -> None:
    assert len(FIXTURES) >= 20


@pytest.mark.parametrize("name", FIXTURES)
def test_captured_request_decodes(name: str) -> None:
    raw = read_fixture(name)
    want = expected_attrs(raw)
    decoder = PolicyDecoder()
    [got] = decoder.feed(raw)
    assert got == want
    assert decoder.pending == 0
    # The attributes the policy layer relies on, checked against the file text itself.
    text = raw.decode()
    for key in ("protocol_state", "sasl_username", "recipient_count", "instance"):
        found = re.search(rf"^{key}=(.*)$", text, re.MULTILINE)
        assert found is not None, key
        assert got[key] == found.group(1)
    assert got["request"] == "smtpd_access_policy"


def test_captured_values_known() -> None:
    [got] = PolicyDecoder().feed(read_fixture("data-sasl-alice-3rcpt.txt"))
    assert got["protocol_state"] == "DATA"
    assert got["sasl_username"] == "alice@example.com"
    assert got["recipient_count"] == "3"
    assert got["instance"] == "3a95.6b050c49.662e8.0"
    assert got["recipient"] == ""
    [unauth] = PolicyDecoder().feed(read_fixture("rcpt-unauth-null-sender.txt"))
    assert unauth["sasl_username"] == ""
    assert unauth["sender"] == ""
    assert unauth["protocol_state"] == "RCPT"


@pytest.mark.parametrize("name", FIXTURES)
def test_captured_request_split_at_every_byte(name: str) -> None:
    raw = read_fixture(name)
    want = expected_attrs(raw)
    for cut in range(len(raw) + 1):
        decoder = PolicyDecoder()
        first = decoder.feed(raw[:cut])
        if cut < len(raw):
            assert first == []
            assert decoder.pending == cut
        second = decoder.feed(raw[cut:])
        assert first + second == [want], cut
        assert decoder.pending == 0


@pytest.mark.parametrize("name", FIXTURES)
def test_captured_request_one_byte_at_a_time(name: str) -> None:
    raw = read_fixture(name)
    decoder = PolicyDecoder()
    got: list[dict[str, str]] = []
    for i in range(len(raw)):
        got += decoder.feed(raw[i : i + 1])
        assert decoder.pending == (i + 1) % len(raw)
    assert got == [expected_attrs(raw)]


@pytest.mark.parametrize("chunk", [1, 7, 16, 128, 4096, 1 << 20])
def test_all_captured_requests_on_one_stream(chunk: int) -> None:
    raws = [read_fixture(name) for name in FIXTURES]
    stream = b"".join(raws)
    assert decode_all(stream, chunk) == [expected_attrs(raw) for raw in raws]


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_captured_requests_with_crlf(chunk: int) -> None:
    raws = [read_fixture(name) for name in FIXTURES]
    stream = b"".join(raw.replace(b"\n", b"\r\n") for raw in raws)
    assert decode_all(stream, chunk) == [expected_attrs(raw) for raw in raws]


def test_pending_zero_between_requests_and_positive_inside() -> None:
    raw = read_fixture("rcpt-sasl-alice-1.txt")
    decoder = PolicyDecoder()
    assert decoder.pending == 0
    assert decoder.feed(raw + raw[:10]) == [expected_attrs(raw)]
    assert decoder.pending == 10
    assert decoder.feed(raw[10:]) == [expected_attrs(raw)]
    assert decoder.pending == 0
    assert decoder.feed(b"") == []
    assert decoder.pending == 0


# --- syntax ---------------------------------------------------------------------------


def test_value_containing_equals_splits_on_first() -> None:
    srs = "SRS0=HHH=TT=example.org=alice@forwarder.example"
    [got] = PolicyDecoder().feed(request(f"sender={srs}", "x==", "y=a=b=c"))
    assert got == {"sender": srs, "x": "=", "y": "a=b=c"}


def test_crlf_lines_and_crlf_terminator() -> None:
    data = b"request=smtpd_access_policy\r\nsender=a@b\r\n\r\n"
    assert PolicyDecoder().feed(data) == [{"request": "smtpd_access_policy", "sender": "a@b"}]


@pytest.mark.parametrize(
    "data",
    [
        b"a=1\r\nb=2\n\n",  # CRLF lines, LF terminator
        b"a=1\nb=2\r\n\r\n",  # mixed
        b"a=1\r\nb=2\n\r\n",
        b"a=1\nb=2\r\n\n",
    ],
)
def test_mixed_line_endings(data: bytes) -> None:
    for cut in range(len(data) + 1):
        decoder = PolicyDecoder()
        got = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        assert got == [{"a": "1", "b": "2"}], cut
        assert decoder.pending == 0


def test_only_one_trailing_cr_is_stripped() -> None:
    # The CR inside the value is data; only the line ending's CR goes.
    [got] = PolicyDecoder().feed(b"a=x\ry\r\r\n\r\n")
    assert got == {"a": "x\ry\r"}


@pytest.mark.parametrize(
    ("data", "count"),
    [(b"\n", 1), (b"\r\n", 1), (b"\n\n", 2), (b"\r\n\n\r\n", 3)],
)
def test_empty_request_yields_empty_dict(data: bytes, count: int) -> None:
    decoder = PolicyDecoder()
    assert decoder.feed(data) == [{}] * count
    assert decoder.pending == 0


def test_empty_line_before_a_request() -> None:
    assert PolicyDecoder().feed(b"\na=1\n\n") == [{}, {"a": "1"}]


def test_lone_cr_waits_for_next_byte() -> None:
    decoder = PolicyDecoder()
    assert decoder.feed(b"\r") == []
    assert decoder.pending == 1
    assert decoder.feed(b"\n") == [{}]
    assert decoder.pending == 0


def test_repeated_attribute_keeps_last_value() -> None:
    [got] = PolicyDecoder().feed(request("sender=first@x", "sender=second@x"))
    assert got == {"sender": "second@x"}


def test_unknown_attributes_kept_and_order_free() -> None:
    [got] = PolicyDecoder().feed(
        request("future_attr=42", "Mixed.Case-name_1=v", "protocol_state=RCPT", "request=x")
    )
    assert got == {
        "future_attr": "42",
        "Mixed.Case-name_1": "v",
        "protocol_state": "RCPT",
        "request": "x",
    }


def test_empty_values_kept() -> None:
    [got] = PolicyDecoder().feed(request("sasl_username=", "recipient="))
    assert got == {"sasl_username": "", "recipient": ""}


@pytest.mark.parametrize(
    "line",
    [
        b"no_equals_sign",
        b"=value without name",
        b"bad name=x",
        b"na/me=x",
        b"n\xc3\xa9=x",  # valid UTF-8, but not an ASCII name
        b"n\xff=x",
        b"\x00\x01\x02",
        b"\x00=x",
        b" sender=x",
        b"\rsender=x",
    ],
)
def test_malformed_line(line: bytes) -> None:
    with pytest.raises(MalformedLine):
        PolicyDecoder().feed(b"request=smtpd_access_policy\n" + line + b"\nsender=a\n\n")


def test_known_names_fast_path_is_within_the_name_rule() -> None:
    # The set skips the regex, so it must never admit a name the regex would refuse.
    for name in codec._KNOWN_NAMES:
        assert re.fullmatch(r"[A-Za-z0-9_.-]+", name), name


def test_non_utf8_value_replaced() -> None:
    [got] = PolicyDecoder().feed(b"sasl_username=j\xe9r\xf4me@example.com\nsender=\xff\xfe\n\n")
    assert got == {"sasl_username": "j\ufffdr\ufffdme@example.com", "sender": "\ufffd\ufffd"}


def test_utf8_value_decoded() -> None:
    [got] = PolicyDecoder().feed("sender=jérôme@exämple.com\n\n".encode())
    assert got == {"sender": "jérôme@exämple.com"}


def test_utf8_value_split_across_chunks() -> None:
    raw = "sender=jérôme@x\n\n".encode()
    cut = raw.index(b"\xc3") + 1  # inside the two-byte sequence
    decoder = PolicyDecoder()
    assert decoder.feed(raw[:cut]) == []
    assert decoder.feed(raw[cut:]) == [{"sender": "jérôme@x"}]


def test_nul_and_binary_in_value_kept_as_text() -> None:
    [got] = PolicyDecoder().feed(b"sender=a\x00b\x01\xff\n\n")
    assert got == {"sender": "a\x00b\x01\ufffd"}


def test_binary_garbage_raises_protocol_error() -> None:
    garbage = bytes(range(256)) * 4  # has LFs, but no empty line until we send one
    decoder = PolicyDecoder()
    assert decoder.feed(garbage) == []
    with pytest.raises(MalformedLine):
        decoder.feed(b"\n\n")


def test_binary_garbage_without_newline_is_bounded() -> None:
    decoder = PolicyDecoder(max_request_bytes=4096)
    chunk = bytes(b for b in range(256) if b not in (10, 13)) * 2
    fed = 0
    with pytest.raises(RequestTooLarge):
        while True:
            decoder.feed(chunk)
            fed += len(chunk)
            assert decoder.pending == fed <= 4096
    assert fed <= 4096


# --- limits ---------------------------------------------------------------------------


def test_default_limits() -> None:
    assert DEFAULT_MAX_REQUEST_BYTES == 64 * 1024
    assert DEFAULT_MAX_ATTRS == 256


def test_error_tree() -> None:
    for exc in (RequestTooLarge, TooManyAttributes, MalformedLine):
        assert issubclass(exc, ProtocolError)
    assert not issubclass(ProtocolError, ValueError)


@pytest.mark.parametrize("chunk", [1, 100, 999, 4096])
def test_endless_line_hits_limit(chunk: int) -> None:
    limit = 1000
    decoder = PolicyDecoder(max_request_bytes=limit)
    fed = 0
    with pytest.raises(RequestTooLarge):
        while fed < 10 * limit:
            decoder.feed(b"x" * chunk)
            fed += chunk
            assert decoder.pending <= limit
    # Raised by the first feed that went over: never more than the limit plus one chunk.
    assert limit < fed + chunk <= limit + chunk
    assert decoder.pending <= limit + chunk


@pytest.mark.parametrize("chunk", [1, 64, 1024])
def test_endless_request_of_valid_lines_hits_limit(chunk: int) -> None:
    limit = 2048
    decoder = PolicyDecoder(max_request_bytes=limit, max_attrs=100_000)
    stream = b"a=bcdefghijklmnopq\n" * 1000
    fed = 0
    with pytest.raises(RequestTooLarge):
        for i in range(0, len(stream), chunk):
            decoder.feed(stream[i : i + chunk])
            fed += chunk
            assert decoder.pending <= limit
    assert fed <= limit
    assert decoder.pending <= limit + chunk


def test_request_exactly_at_byte_limit_is_accepted() -> None:
    raw = read_fixture("rcpt-sasl-alice-1.txt")
    assert PolicyDecoder(max_request_bytes=len(raw)).feed(raw) == [expected_attrs(raw)]
    assert decode_all(raw, 1, max_request_bytes=len(raw)) == [expected_attrs(raw)]
    with pytest.raises(RequestTooLarge):
        PolicyDecoder(max_request_bytes=len(raw) - 1).feed(raw)
    with pytest.raises(RequestTooLarge):
        decode_all(raw, 1, max_request_bytes=len(raw) - 1)


def test_complete_oversized_request_in_one_chunk() -> None:
    big = request("request=smtpd_access_policy", "sender=" + "a" * 70_000)
    with pytest.raises(RequestTooLarge):
        PolicyDecoder().feed(big)


def test_attribute_count_limit_exact() -> None:
    ok = request(*(f"a{i}=v" for i in range(10)))
    assert len(PolicyDecoder(max_attrs=10).feed(ok)[0]) == 10
    with pytest.raises(TooManyAttributes):
        PolicyDecoder(max_attrs=9).feed(ok)


def test_repeated_lines_count_towards_attribute_limit() -> None:
    with pytest.raises(TooManyAttributes):
        PolicyDecoder(max_attrs=5).feed(request(*["a=1"] * 6))


def test_too_many_attrs_default() -> None:
    data = request(*(f"x{i}=1" for i in range(DEFAULT_MAX_ATTRS + 1)))
    with pytest.raises(TooManyAttributes):
        PolicyDecoder().feed(data)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_too_many_attrs_detected_while_streaming(chunk: int) -> None:
    # No terminator ever comes: the line count, not the byte limit, must stop it.
    decoder = PolicyDecoder(max_request_bytes=DEFAULT_MAX_REQUEST_BYTES, max_attrs=50)
    stream = b"a=1\n" * 1000
    fed = 0
    with pytest.raises(TooManyAttributes):
        for i in range(0, len(stream), chunk):
            decoder.feed(stream[i : i + chunk])
            fed += chunk
    assert fed < 51 * len(b"a=1\n")


def test_limits_apply_per_request_not_per_stream() -> None:
    raw = read_fixture("rcpt-sasl-alice-1.txt")
    decoder = PolicyDecoder(max_request_bytes=len(raw), max_attrs=len(expected_attrs(raw)))
    assert len(decoder.feed(raw * 50)) == 50
    for _ in range(50):
        assert decoder.feed(raw) == [expected_attrs(raw)]


def test_invalid_limits_rejected() -> None:
    with pytest.raises(ValueError):
        PolicyDecoder(max_request_bytes=0)
    with pytest.raises(ValueError):
        PolicyDecoder(max_attrs=0)


# --- replies --------------------------------------------------------------------------


def test_encode_reply() -> None:
    assert encode_reply("DUNNO") == b"action=DUNNO\n\n"
    assert encode_reply("DEFER 4.7.1 quota exceeded") == b"action=DEFER 4.7.1 quota exceeded\n\n"
    assert encode_reply("REJECT trop d'envois, réessayez") == (
        "action=REJECT trop d'envois, réessayez\n\n".encode()
    )


@pytest.mark.parametrize("action", ["", "DUNNO\n", "DEFER a\r\nb", "REJECT \x00", "OK\ud800"])
def test_encode_reply_rejects_what_breaks_framing(action: str) -> None:
    with pytest.raises(ValueError):
        encode_reply(action)


@pytest.mark.parametrize(
    "action",
    [
        "OK",
        "DUNNO",
        "dunno",
        "Dunno",
        "REJECT",
        "REJECT Rate limit exceeded",
        "reject 5.7.1 too many messages",
        "DEFER",
        "DEFER 4.7.1 Rate limit exceeded, try again later",
        "DEFER_IF_REJECT",
        "DEFER_IF_PERMIT Service temporarily unavailable",
        "defer_if_permit",
        "HOLD",
        "HOLD over quota",
        "DISCARD",
        "DISCARD silently dropped",
        "FILTER smtp:[127.0.0.1]:10025",
        "PREPEND X-Rate-Limit: exceeded",
        "PREPEND X-Rate-Limit:exceeded",
        "REDIRECT abuse@example.com",
        "BCC archive@example.com",
        "WARN over quota",
        "WARN",
        "INFO counted",
        "450 Rate limit exceeded",
        "471 daily message quota exceeded",
        "550 5.7.1 Daily sending quota exceeded",
        "451 4.7.1 Über dem Tageslimit",
        "421 4.7.0 closing",
        "450 4.7.1",
        "450\tquota exceeded",
        "DEFER\tquota",
    ],
)
def test_validate_action_accepts(action: str) -> None:
    validate_action(action)


@pytest.mark.parametrize(
    ("action", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("450", "bare reply code"),
        ("450 ", "bare reply code"),
        ("550", "bare reply code"),
        ("4NN", "three digits"),
        ("5xx over quota", "three digits"),
        ("4NN over quota", "three digits"),
        ("250 ok", "4NN or 5NN"),
        ("12345", "all-numeric"),
        ("4500 text", "4NN or 5NN"),
        ("450 5.7.1 text", "does not match"),
        ("550 4.7.1 text", "does not match"),
        ("DEFER\nREJECT", "LF"),
        ("DEFER\r", "CR"),
        ("DEFER \x00", "NUL"),
        ("DEFER \udcff", "UTF-8"),
        (" DEFER", "whitespace"),
        ("DEFERR over quota", "unknown action word"),
        ("PERMIT", "unknown action word"),
        ("reject_unauth_destination", "unknown action word"),
        ("HANGUP", "unknown action word"),
        ("DUNNO over quota", "takes no text"),
        ("OK fine", "takes no text"),
        ("FILTER", "transport:destination"),
        ("FILTER smtp", "transport:destination"),
        ("PREPEND", "Header-Name"),
        ("PREPEND no header here", "Header-Name"),
        ("PREPEND : value", "Header-Name"),
        ("REDIRECT", "user@domain"),
        ("BCC archive", "user@domain"),
    ],
)
def test_validate_action_rejects_with_reason(action: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        validate_action(action)


def test_bare_code_reason_says_postfix_accepts() -> None:
    with pytest.raises(ValueError, match="OK") as info:
        validate_action("450")
    assert "accept" in str(info.value)


def test_every_valid_action_encodes() -> None:
    for action in ("DUNNO", "DEFER 4.7.1 over quota", "471 daily message quota exceeded"):
        validate_action(action)
        assert encode_reply(action) == b"action=" + action.encode() + b"\n\n"
