"""Property tests of the policy codec: round trip, chunking, and a naive reference decoder."""

from __future__ import annotations

import itertools
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit_policyd.codec import (
    MalformedLine,
    PolicyDecoder,
    ProtocolError,
    RequestTooLarge,
    TooManyAttributes,
)

NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCXYZ0123456789_.-", min_size=1, max_size=20)
# Any text a value can carry through the protocol: no LF, no CR (a trailing CR is stripped
# by design), no lone surrogates (not encodable as UTF-8).
values = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"),
    max_size=40,
)
attr_dicts = st.dictionaries(names, values, max_size=30)


def encode_request(attrs: dict[str, str], crlf: bool = False) -> bytes:
    eol = "\r\n" if crlf else "\n"
    return ("".join(f"{k}={v}{eol}" for k, v in attrs.items()) + eol).encode()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def reference_decode(
    stream: bytes, max_bytes: int, max_attrs: int
) -> tuple[list[dict[str, str]], type[ProtocolError] | None, int]:
    """Naive line-by-line decoder of a whole stream, written from the protocol rules.

    Returns the requests before the first error, the error class (or None) and the
    number of bytes left over of an incomplete request.
    """
    requests: list[dict[str, str]] = []
    pos = 0
    while True:
        lines: list[bytes] = []
        line_start = pos
        while True:
            lf = stream.find(b"\n", line_start)
            if lf < 0:
                rest = len(stream) - pos
                if rest > max_bytes:
                    return requests, RequestTooLarge, rest
                if len(lines) > max_attrs:
                    return requests, TooManyAttributes, rest
                if rest == 0:
                    return requests, None, 0
                return requests, None, rest
            line = stream[line_start:lf]
            if line.endswith(b"\r"):
                line = line[:-1]
            line_start = lf + 1
            if line:
                lines.append(line)
                continue
            if line_start - pos > max_bytes:
                return requests, RequestTooLarge, 0
            if len(lines) > max_attrs:
                return requests, TooManyAttributes, 0
            attrs: dict[str, str] = {}
            for raw in lines:
                if b"=" not in raw:
                    return requests, MalformedLine, 0
                raw_name, raw_value = raw.split(b"=", 1)
                if not NAME_RE.fullmatch(raw_name.decode("latin-1")):
                    return requests, MalformedLine, 0
                attrs[raw_name.decode("ascii")] = raw_value.decode("utf-8", "replace")
            requests.append(attrs)
            pos = line_start
            break


@settings(max_examples=200, deadline=None)
@given(attrs=attr_dicts, crlf=st.booleans())
def test_round_trip(attrs: dict[str, str], crlf: bool) -> None:
    decoder = PolicyDecoder()
    assert decoder.feed(encode_request(attrs, crlf)) == [attrs]
    assert decoder.pending == 0


@settings(max_examples=150, deadline=None)
@given(
    requests=st.lists(attr_dicts, min_size=1, max_size=6),
    crlf=st.lists(st.booleans(), min_size=6, max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
)
def test_any_chunking_gives_same_requests(
    requests: list[dict[str, str]], crlf: list[bool], cuts: list[int]
) -> None:
    stream = b"".join(encode_request(r, c) for r, c in zip(requests, crlf, strict=False))
    decoder = PolicyDecoder()
    got: list[dict[str, str]] = []
    for chunk in split_at(stream, cuts):
        got += decoder.feed(chunk)
    assert got == requests
    assert decoder.pending == 0


# Bytes biased towards the protocol's structure so the interesting paths get hit.
tokens = st.sampled_from(
    [b"a", b"Z", b"_", b"=", b"\n", b"\r", b"\r\n", b"\n\n", b"\x00", b"\xff", b"\xc3\xa9",
     b"sender=x@y\n", b"request=smtpd_access_policy\n", b" "]
)  # fmt: skip
streams = st.one_of(
    st.binary(max_size=300),
    st.lists(tokens, max_size=120).map(b"".join),
)


@settings(max_examples=300, deadline=None)
@given(
    stream=streams,
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    max_bytes=st.integers(min_value=1, max_value=120),
    max_attrs=st.integers(min_value=1, max_value=8),
)
def test_arbitrary_bytes_only_protocol_errors_and_bounded_buffer(
    stream: bytes, cuts: list[int], max_bytes: int, max_attrs: int
) -> None:
    want, want_error, want_pending = reference_decode(stream, max_bytes, max_attrs)
    decoder = PolicyDecoder(max_request_bytes=max_bytes, max_attrs=max_attrs)
    got: list[dict[str, str]] = []
    error: ProtocolError | None = None
    for chunk in split_at(stream, cuts):
        try:
            got += decoder.feed(chunk)
        except ProtocolError as exc:  # any other exception fails the test
            error = exc
        assert decoder.pending <= max_bytes + len(chunk)
        if error is not None:
            break
        assert decoder.pending <= max_bytes
        for request in got:
            for name, value in request.items():
                assert NAME_RE.fullmatch(name)
                assert "\n" not in value
    # Requests completed in the chunk that raised are lost with it; all others match.
    assert got == want[: len(got)]
    if want_error is None:
        assert error is None
        assert got == want
        assert decoder.pending == want_pending
    else:
        assert error is not None


@settings(max_examples=200, deadline=None)
@given(
    stream=streams,
    max_bytes=st.integers(min_value=1, max_value=120),
    max_attrs=st.integers(min_value=1, max_value=8),
)
def test_whole_stream_matches_reference_exactly(
    stream: bytes, max_bytes: int, max_attrs: int
) -> None:
    # Fed in one piece, the decoder meets the errors in the same order as the reference.
    want, want_error, want_pending = reference_decode(stream, max_bytes, max_attrs)
    decoder = PolicyDecoder(max_request_bytes=max_bytes, max_attrs=max_attrs)
    if want_error is None:
        assert decoder.feed(stream) == want
        assert decoder.pending == want_pending
    else:
        try:
            decoder.feed(stream)
        except ProtocolError as exc:
            assert type(exc) is want_error
        else:
            raise AssertionError(f"expected {want_error.__name__}")
