"""Hypothesis strategies for the property and fuzz tests: protobuf messages with arbitrary
field values, and encoded images that are random or mutated from real files."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image

from xaiserve.api.v1 import explain_pb2 as pb

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
#: Unknown enum values on both sides of the defined ones (proto3 enums are open).
UNKNOWN_ENUM_VALUES = st.integers(-3, 40) | st.integers(*INT32)

# Strings: short (any code point a protobuf string can carry), plus a few huge ones of a
# repeated character (up to ``huge_chars``); surrogates are not valid UTF-8 and protobuf
# refuses them before any server code sees them.
_CHARS = st.characters(exclude_categories=("Cs",))


def fuzz_settings(max_examples: int) -> settings:
    """Hypothesis settings of every fuzz test: ``max_examples`` derandomized examples (the
    same ones on every run), no deadline, no example database, large and slow
    examples allowed."""
    return settings(
        max_examples=max_examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def strings(huge_chars: int) -> st.SearchStrategy[str]:
    """Short arbitrary strings, now and then one ``huge_chars`` long at most."""
    huge = st.builds(lambda c, n: c * n, _CHARS, st.integers(256, huge_chars))
    return st.text(_CHARS, max_size=24) | huge


def _ints(low: int, high: int) -> st.SearchStrategy[int]:
    """Small values most of the time, the whole range (extremes included) too."""
    return st.integers(-4, 70) | st.integers(low, high) | st.sampled_from((low, high, 0))


_FLOATS = st.floats(width=32) | st.sampled_from((0.0, -0.0, 1.0, 0.5, 1e-45, 3.4e38))


def _scalar(field: FieldDescriptor, huge_chars: int) -> st.SearchStrategy:
    types = FieldDescriptor
    if field.enum_type is not None:  # mostly a defined value
        defined = st.sampled_from([v.number for v in field.enum_type.values])
        return st.integers(0, 7).flatmap(lambda i: UNKNOWN_ENUM_VALUES if i == 7 else defined)
    return {
        types.TYPE_INT32: _ints(*INT32),
        types.TYPE_SINT32: _ints(*INT32),
        types.TYPE_SFIXED32: _ints(*INT32),
        types.TYPE_INT64: _ints(*INT64),
        types.TYPE_SINT64: _ints(*INT64),
        types.TYPE_SFIXED64: _ints(*INT64),
        types.TYPE_UINT32: st.integers(0, 2**32 - 1),
        types.TYPE_UINT64: st.integers(0, 2**64 - 1),
        types.TYPE_FLOAT: _FLOATS,
        types.TYPE_DOUBLE: st.floats(),
        types.TYPE_BOOL: st.booleans(),
        types.TYPE_STRING: strings(huge_chars),
        types.TYPE_BYTES: st.binary(max_size=64),
    }[field.type]


def messages(
    descriptor: Descriptor,
    depth: int = 4,
    huge_chars: int = 70_000,
    overrides: dict[str, st.SearchStrategy] | None = None,
    always: tuple[str, ...] = (),
) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor``'s type with any subset of their fields set to arbitrary
    values: every scalar type over its whole range, enums with unknown values, repeated
    fields of 0-4 items, sub-messages to ``depth`` levels. Of a oneof, the last field set
    wins, as in any protobuf message. ``overrides`` replaces the strategy of top-level
    fields by name (a message strategy for message fields, lists for repeated ones); the
    top-level fields named in ``always`` are always set."""
    overrides = overrides or {}

    def field_value(field: FieldDescriptor) -> st.SearchStrategy:
        if field.name in overrides:
            return overrides[field.name]
        if field.message_type is not None:
            if depth <= 0:
                return st.just(GetMessageClass(field.message_type)())
            item = messages(field.message_type, depth - 1, huge_chars)
        else:
            item = _scalar(field, huge_chars)
        return st.lists(item, max_size=4) if field.is_repeated else item

    fields = list(descriptor.fields)
    required = [f for f in fields if f.name in always]
    chosen = st.lists(st.sampled_from(fields), max_size=len(fields), unique=True).map(
        lambda drawn: required + [f for f in drawn if f not in required]
    )

    @st.composite
    def build(draw: Callable) -> Message:
        message = GetMessageClass(descriptor)()
        for field in draw(chosen):
            value = draw(field_value(field))
            if field.is_repeated:
                getattr(message, field.name).extend(value)
            elif field.message_type is not None:
                getattr(message, field.name).CopyFrom(value)
            else:
                setattr(message, field.name, value)
        return message

    return build() if descriptor.fields else st.just(GetMessageClass(descriptor)())


def tensors(max_values: int = 64) -> st.SearchStrategy[pb.Tensor]:
    """``Tensor`` messages whose shape and data may or may not agree: any shape (negative,
    zero and huge dimensions included), data of any length, float values of any kind."""
    dims = st.integers(-2, 20) | st.integers(*INT64)
    values = st.lists(st.floats(width=32), max_size=max_values)
    agreeing = st.lists(st.integers(1, 4), min_size=1, max_size=4).flatmap(
        lambda shape: st.tuples(
            st.just(shape),
            st.lists(
                st.floats(0.0, 1.0, width=32) | st.floats(width=32),
                min_size=int(np.prod(shape)),
                max_size=int(np.prod(shape)),
            ),
        )
    )
    free = st.tuples(st.lists(dims, max_size=5), values)
    return (agreeing | free).map(
        lambda pair: pb.Tensor(shape=pair[0], data=np.asarray(pair[1], "<f4").tobytes())
    ) | st.builds(
        lambda shape, data: pb.Tensor(shape=shape, data=data),
        st.lists(dims, max_size=5),
        st.binary(max_size=256),
    )


# ------------------------------------------------------------------------------ images


def _encoded(mode: str, fmt: str, size: tuple[int, int] = (12, 10), **options: object) -> bytes:
    rng = np.random.default_rng(len(mode) * 31 + len(fmt))
    channels = len(Image.new(mode, (1, 1)).getbands())
    if mode == "I;16":
        pixels = rng.integers(0, 65536, size[::-1], dtype=np.uint16)
        img = Image.frombytes("I;16", size, pixels.astype("<u2").tobytes())
    else:
        shape = size[::-1] + ((channels,) if channels > 1 else ())
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8).squeeze(), mode)
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (12, 10), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=50)
    return buffer.getvalue()


def seed_images() -> list[bytes]:
    """Small real files to mutate: PNG (RGB, L, LA, RGBA, P, 16-bit, animated), JPEG (RGB,
    L), WebP (lossy, lossless, animated)."""
    return [
        _animated("PNG"),
        _animated("WEBP"),
        _encoded("RGB", "PNG"),
        _encoded("L", "PNG"),
        _encoded("LA", "PNG"),
        _encoded("RGBA", "PNG"),
        _encoded("P", "PNG"),
        _encoded("I;16", "PNG"),
        _encoded("RGB", "JPEG", quality=80),
        _encoded("L", "JPEG"),
        _encoded("RGB", "WEBP", quality=80),
        _encoded("RGBA", "WEBP", lossless=True),
    ]


#: Bytes of a file's signature (PNG 8, JPEG 3, WebP 12) that mutations leave alone.
MAGIC_BYTES = 12


@st.composite
def mutated(draw: Callable, seeds: list[bytes]) -> bytes:
    """A real encoded image with 1-4 byte-level mutations: a byte flipped or set, a run
    inserted or deleted, the tail cut off. The first ``MAGIC_BYTES`` (the formats' magic
    numbers) are kept, so the decoders get to parse; a quarter of the mutations hit the bytes
    up to the 64th, where the headers are."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        if len(data) <= MAGIC_BYTES:
            break
        reach = draw(st.sampled_from((64, len(data), len(data), len(data))))  # headers: 1 in 4
        # sampled_from picks evenly; integers() would favour the first bytes
        where = draw(st.sampled_from(range(MAGIC_BYTES, min(reach, len(data)))))
        kind = draw(st.sampled_from(("flip", "set", "insert", "delete", "truncate")))
        if kind == "flip":
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[where] = draw(st.sampled_from((0x00, 0xFF, 0x7F, 0x80)) | st.integers(0, 255))
        elif kind == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[where : where + draw(st.integers(1, 16))]
        else:
            del data[where:]
    return bytes(data)


def image_bytes() -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, bytes behind a real file's magic number, and (half of the
    examples) mutated real files."""
    seeds = seed_images()
    magics = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"GIF89a")
    behind_magic = st.builds(lambda m, rest: m + rest, st.sampled_from(magics), st.binary())
    kinds = [st.binary(max_size=512), behind_magic, mutated(seeds), mutated(seeds)]
    return st.sampled_from(kinds).flatmap(lambda kind: kind)


@st.composite
def _consistent_method(draw: Callable, names: tuple[str, ...]) -> pb.MethodRequest:
    name = draw(st.sampled_from(names))
    message = draw(
        messages(
            pb.MethodRequest.DESCRIPTOR,
            overrides={"method": st.just(pb.Method.Value(name))},
            always=("method",),
        )
    )
    message.ClearField("params")  # oneof: whichever the fuzzed message set
    params = pb.MethodRequest.DESCRIPTOR.fields_by_name.get(name.lower())
    if params is not None and draw(st.booleans()):
        getattr(message, params.name).CopyFrom(draw(messages(params.message_type)))
    return message


def method_requests(names: tuple[str, ...] = ()) -> st.SearchStrategy[pb.MethodRequest]:
    """``MethodRequest`` messages: mostly one of ``names`` (``Method`` names; default: all)
    with its own parameter message (or none), every other field arbitrary; one in four
    fully arbitrary."""
    names = names or tuple(n for n in pb.Method.keys() if n != "METHOD_UNSPECIFIED")
    consistent = _consistent_method(names)
    return st.integers(0, 3).flatmap(
        lambda i: messages(pb.MethodRequest.DESCRIPTOR) if i == 3 else consistent
    )
