"""The method catalog: the proto ``Method`` enum as method names, in one place.

A method's name is its enum name lower-cased (``GRAD_CAM`` -> ``"grad_cam"``); the method
registry (:data:`xaiserve.methods.registry.METHODS`), the converters, the client, the
command line and the metrics' ``method`` label all use these names. Torch-free: both the
gateway and the engine import it.
"""

from __future__ import annotations

from xaiserve.api.v1 import explain_pb2 as pb


def method_name(value: int) -> str:
    """The name of a ``Method`` enum value (``pb.GRAD_CAM`` -> ``"grad_cam"``).

    Raises:
        ValueError: the enum has no such value.
    """
    return str(pb.Method.Name(value)).lower()


def method_enum_name(value: int) -> str:
    """The proto name of a Method value (``"GRAD_CAM"``), or the number for unknown values."""
    try:
        return str(pb.Method.Name(value))
    except ValueError:
        return str(value)


#: Method names keyed by enum value, in enum order (METHOD_UNSPECIFIED is not a method).
METHOD_NAMES: dict[int, str] = {
    value: method_name(value) for value in pb.Method.values() if value != pb.METHOD_UNSPECIFIED
}
#: The enum value of each method name.
METHOD_VALUES: dict[str, pb.Method] = {
    method_name(value): value for value in pb.Method.values() if value != pb.METHOD_UNSPECIFIED
}
#: The method names the API knows, in enum order.
METHODS: tuple[str, ...] = tuple(METHOD_NAMES.values())
