"""The registry serves exactly the API's method catalog, and AUTO's candidates are checked
against it."""

from __future__ import annotations

import pytest

from xaiserve.api import catalog
from xaiserve.api.errors import InvalidArgument
from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.methods.auto import Auto
from xaiserve.methods.registry import METHODS, get_method


def test_every_registered_method_is_in_the_proto_catalog() -> None:
    assert set(METHODS) - set(catalog.METHODS) == set()


def test_every_proto_method_is_registered() -> None:
    assert set(catalog.METHODS) - set(METHODS) == set()


def test_catalog_names_are_the_proto_enum_names_lower_cased() -> None:
    assert catalog.METHOD_NAMES[pb.GRAD_CAM] == "grad_cam"
    assert catalog.METHOD_VALUES["integrated_gradients"] == pb.INTEGRATED_GRADIENTS
    assert pb.METHOD_UNSPECIFIED not in catalog.METHOD_NAMES
    assert len(catalog.METHODS) == len(pb.Method.values()) - 1
    assert catalog.method_enum_name(pb.AUTO) == "AUTO" and catalog.method_enum_name(999) == "999"


def test_auto_takes_catalog_methods_as_candidates_but_not_itself() -> None:
    given = {"candidates": ["saliency", "grad_cam"]}
    assert Auto().resolve_params(given, (3, 16, 16), "methods[0].params") == {
        "candidates": ("saliency", "grad_cam")
    }
    for bad in ("auto", "not_a_method"):
        with pytest.raises(InvalidArgument):
            Auto().resolve_params({"candidates": [bad]}, (3, 16, 16), "methods[0].params")


def test_unknown_method_names_the_field() -> None:
    with pytest.raises(InvalidArgument) as error:
        get_method("nope", "methods[2].method")
    assert error.value.field == "methods[2].method"
