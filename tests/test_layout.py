"""The layout stays readable: no package folder of src/xaiserve holds more than
MAX_MODULES modules, and no module is longer than MAX_LINES lines unless LONG_MODULES says
why. The generated protobuf and gRPC stubs are left out."""

from __future__ import annotations

from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "xaiserve"
GENERATED = ("api/v1", "api/torchserve")
MAX_MODULES = 15
MAX_LINES = 400
#: Modules allowed over MAX_LINES (path under src/xaiserve -> why). None at present.
LONG_MODULES: dict[str, str] = {}


def modules() -> list[Path]:
    """Every hand-written module under src/xaiserve."""
    return [
        path
        for path in sorted(SOURCE.rglob("*.py"))
        if not any(path.relative_to(SOURCE).as_posix().startswith(g) for g in GENERATED)
    ]


def test_no_package_folder_holds_more_than_max_modules() -> None:
    counts = {
        folder.relative_to(SOURCE).as_posix(): len(list(folder.glob("*.py")))
        for folder in {path.parent for path in modules()}
    }
    assert {folder: n for folder, n in counts.items() if n > MAX_MODULES} == {}


def test_no_module_is_longer_than_max_lines_unless_allowed() -> None:
    lengths = {
        path.relative_to(SOURCE).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
        for path in modules()
    }
    long = {name: n for name, n in lengths.items() if n > MAX_LINES}
    assert {name: n for name, n in long.items() if name not in LONG_MODULES} == {}


def test_every_allowed_long_module_exists_and_is_still_long() -> None:
    for name in LONG_MODULES:
        lines = (SOURCE / name).read_text(encoding="utf-8").splitlines()
        assert len(lines) > MAX_LINES, f"{name} is short now: drop it from LONG_MODULES"
