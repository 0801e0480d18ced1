"""The wire container parses what it packs and rejects every malformed message."""

from __future__ import annotations

import struct

import pytest

from fedcrypt.exceptions import ProtocolError
from fedcrypt.protection import wire


def test_round_trip_keeps_header_and_sections() -> None:
    blob = wire.pack({"scheme": "x", "n": 3}, [b"abc", b"", b"\x00" * 10])
    env = wire.unpack(blob, expect_scheme="x")
    assert env.header == {"scheme": "x", "n": 3}
    assert [bytes(s) for s in env.sections] == [b"abc", b"", b"\x00" * 10]


def test_wrong_scheme_is_rejected() -> None:
    blob = wire.pack({"scheme": "plain"}, [])
    with pytest.raises(ProtocolError, match="scheme 'plain', expected 'ckks'"):
        wire.unpack(blob, expect_scheme="ckks")


def test_a_scheme_and_its_older_tags_are_accepted() -> None:
    assert wire.unpack(wire.pack({"scheme": "ckks"}, []), expect_scheme=("he", "ckks"))
    with pytest.raises(ProtocolError, match="scheme 'plain', expected 'he'"):
        wire.unpack(wire.pack({"scheme": "plain"}, []), expect_scheme=("he", "ckks"))


@pytest.mark.parametrize("cut", [0, 3, 8, 12, 20])
def test_truncation_is_rejected(cut: int) -> None:
    blob = wire.pack({"scheme": "x"}, [b"payload-bytes"])
    with pytest.raises(ProtocolError):
        wire.unpack(blob[: len(blob) - 1 - cut])


def test_trailing_bytes_bad_magic_and_version_are_rejected() -> None:
    blob = wire.pack({"scheme": "x"}, [b"a"])
    with pytest.raises(ProtocolError, match="trailing"):
        wire.unpack(blob + b"\x00")
    with pytest.raises(ProtocolError, match="magic"):
        wire.unpack(b"XXXX" + blob[4:])
    with pytest.raises(ProtocolError, match="version"):
        wire.unpack(blob[:4] + b"\x09" + blob[5:])


def test_header_must_be_a_json_object_with_scheme() -> None:
    hdr = b"[1,2]"
    blob = wire.MAGIC + struct.pack(">BI", wire.VERSION, len(hdr)) + hdr + struct.pack(">I", 0)
    with pytest.raises(ProtocolError, match="no scheme"):
        wire.unpack(blob)
    hdr = b"\xff\xfe"
    blob = wire.MAGIC + struct.pack(">BI", wire.VERSION, len(hdr)) + hdr + struct.pack(">I", 0)
    with pytest.raises(ProtocolError, match="not JSON"):
        wire.unpack(blob)


def test_section_length_beyond_buffer_is_rejected() -> None:
    blob = bytearray(wire.pack({"scheme": "x"}, [b"abcd"]))
    # the section length field sits 8 + 4 bytes before the end
    struct.pack_into(">Q", blob, len(blob) - 12, 1 << 40)
    with pytest.raises(ProtocolError, match="truncated section"):
        wire.unpack(bytes(blob))


def test_header_int_validates() -> None:
    assert wire.header_int({"a": 5}, "a", minimum=1) == 5
    for bad in ({"a": -1}, {"a": True}, {"a": "5"}, {}):
        with pytest.raises(ProtocolError, match="'a'"):
            wire.header_int(bad, "a")
