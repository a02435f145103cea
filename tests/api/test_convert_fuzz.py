"""Property tests of the request converter (xaiserve.api.convert) on arbitrary messages.

Whatever the field values (huge or unicode strings, ints at their extremes, unknown enum
values, repeated fields, parameter messages of the wrong method, tensors whose shape and
data disagree), ``request_from_proto`` either returns a request or raises InvalidArgument
naming a field of the message; what it returns survives the trip back to protobuf that the
TorchServe backend makes. Deterministic: derandomized, bounded example counts.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from support.fuzz import fuzz_settings, messages, method_requests, tensors
from xaiserve.api import convert
from xaiserve.api.errors import InvalidArgument, XaiError
from xaiserve.api.reverse_convert import request_to_proto
from xaiserve.api.v1 import explain_pb2 as pb

FUZZ = fuzz_settings(max_examples=200)

#: ExplainRequest's fields, each of which an error may name (``methods[2].filter.mode``).
TOP_FIELDS = {f.name for f in pb.ExplainRequest.DESCRIPTOR.fields}

images = st.sampled_from(
    [
        st.builds(pb.Image, encoded=st.binary(min_size=1, max_size=32)),
        st.builds(pb.Image, tensor=tensors()),
        st.builds(pb.Image, tensor=tensors()),
        st.sampled_from([pb.Image(), pb.Image(encoded=b"")]),
    ]
).flatmap(lambda strategy: strategy)
#: Requests with an image (of any kind, or none in a quarter of them) and any other fields.
explain_requests = messages(
    pb.ExplainRequest.DESCRIPTOR,
    overrides={"image": images, "methods": st.lists(method_requests(), max_size=4)},
    always=("image",),
)


def _root(field: str) -> str:
    return field.split(".", 1)[0].split("[", 1)[0]


@FUZZ
@given(explain_requests)
def test_converter_returns_a_request_or_an_invalid_argument_naming_the_field(
    message: pb.ExplainRequest,
) -> None:
    try:
        plain = convert.request_from_proto(message)
    except InvalidArgument as error:
        assert error.field and _root(error.field) in TOP_FIELDS, error.field
        assert str(error).startswith(f"{error.field}: ")
        return
    assert plain.model == message.model_name and plain.version == message.model_version
    expected_fields = [f"methods[{i}]" for i in range(len(message.methods))]
    assert [m.field for m in plain.methods] == expected_fields
    # compared by repr: a NaN parameter is unequal to itself, its repr is not
    assert repr(convert.request_from_proto(request_to_proto(plain))) == repr(plain)


@FUZZ
@given(method_requests(), st.integers(0, 15))
def test_every_method_message_converts_or_names_its_own_field(
    method: pb.MethodRequest, index: int
) -> None:
    message = pb.ExplainRequest(model_name="m", image=pb.Image(encoded=b"x"))
    message.methods.extend([pb.MethodRequest(method=pb.SALIENCY)] * index + [method])
    try:
        plain = convert.request_from_proto(message)
    except XaiError as error:
        assert isinstance(error, InvalidArgument)
        assert error.field.startswith(f"methods[{index}]."), error.field
        return
    converted = plain.methods[index]
    assert converted.name == convert.METHOD_NAMES[method.method]
    assert (converted.reliability is not None) == method.reliability.enabled
    assert (converted.filter is not None) == method.filter.enabled
    assert converted.params_field == (method.WhichOneof("params") or converted.name)
