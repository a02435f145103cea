"""The committed Python stubs must be exactly what `make proto` generates from the .proto."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"
# .proto file (relative to proto/) -> the stubs generated from it
GENERATED = {
    "xaiserve/v1/explain.proto": ("explain_pb2.py", "explain_pb2.pyi", "explain_pb2_grpc.py"),
    "xaiserve/torchserve/inference.proto": (
        "inference_pb2.py",
        "inference_pb2.pyi",
        "inference_pb2_grpc.py",
    ),
}


@pytest.mark.parametrize("proto", sorted(GENERATED))
def test_generated_stubs_are_current(proto: str, tmp_path: Path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc")
    # `python -m grpc_tools.protoc` (the Makefile) adds the well-known types' include path
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-Ixaiserve/api={PROTO_ROOT / 'xaiserve'}",
        f"-I{well_known}",
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        str(PROTO_ROOT / proto),
    ]
    assert protoc.main(args) == 0
    package = Path("xaiserve/api") / Path(proto).parent.relative_to("xaiserve")
    for name in GENERATED[proto]:
        fresh = (tmp_path / package / name).read_text()
        committed = (ROOT / "src" / package / name).read_text()
        assert fresh == committed, f"{package / name} is stale: run `make proto`"


def test_every_field_and_rpc_is_documented() -> None:
    """Each field, enum value, rpc and message in the .proto has a comment line above it."""
    lines = (PROTO_ROOT / "xaiserve/v1/explain.proto").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        text = line.strip()
        if not text or text.startswith("//") or text in ("}", "};"):
            continue
        if text.startswith(("syntax", "package", "oneof")):
            continue
        is_decl = text.startswith(("rpc ", "message ", "enum ", "service ")) or "=" in text
        if not is_decl or text.endswith("_UNSPECIFIED = 0;"):
            continue
        previous = lines[i - 1].strip()
        if not previous.startswith("//"):
            undocumented.append(f"{i + 1}: {text}")
    assert not undocumented, "undocumented declarations:\n" + "\n".join(undocumented)
