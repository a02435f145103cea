"""One direction of imports: the import-linter contracts of pyproject.toml are all kept
(gateway -> api <- engine; methods, reliability and runtime below the engine; offline above
it; matplotlib and scipy only in offline; TorchServe only in the worker), and no two modules
of xaiserve import each other, directly or around a longer loop (imports inside functions
count). Each check is also shown to fail on a wrong arrow."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import grimp
from importlinter import configuration
from importlinter.application.use_cases import lint_imports

REPO_ROOT = Path(__file__).resolve().parents[1]


def import_cycles(imports: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module of an import graph
    (module -> the modules it imports), each sorted: every import cycle lies in one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in imports:
        if root in index:
            continue
        work = [(root, iter(imports.get(root, ())))]  # depth-first, without recursion
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(imports.get(child, ()))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return cycles


def contracts_kept(config: Path) -> bool:
    """Whether every contract of ``config`` is kept (its report goes to stdout)."""
    configuration.configure()  # what the lint-imports command does first
    return lint_imports(config_filename=str(config), cache_dir=None, no_logo=True)


def test_every_import_contract_is_kept() -> None:
    assert contracts_kept(REPO_ROOT / "pyproject.toml")


def test_a_contract_against_an_arrow_the_code_has_is_broken(tmp_path: Path) -> None:
    """The gateway imports api (gateway -> api): a contract forbidding it must fail."""
    config = tmp_path / "wrong.toml"
    config.write_text(
        '[tool.importlinter]\nroot_package = "xaiserve"\n\n'
        "[[tool.importlinter.contracts]]\n"
        'name = "a wrong arrow: the gateway may not import api"\n'
        'type = "forbidden"\n'
        'source_modules = ["xaiserve.gateway"]\n'
        'forbidden_modules = ["xaiserve.api"]\n'
    )
    assert not contracts_kept(config)


def test_no_module_imports_itself_around_a_loop() -> None:
    graph = grimp.build_graph("xaiserve", cache_dir=None)
    imports = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert import_cycles(imports) == []


def test_the_graph_counts_imports_inside_functions() -> None:
    """common.py imports the demo data set inside ``demo_images`` only."""
    graph = grimp.build_graph("xaiserve", cache_dir=None)
    assert graph.direct_import_exists(
        importer="xaiserve.offline.cli.common", imported="xaiserve.model_store.synthetic"
    )


def test_import_cycles_finds_direct_and_longer_loops() -> None:
    imports = {
        "registry": ["auto", "base"],
        "auto": ["registry"],
        "a": ["b"],
        "b": ["c"],
        "c": ["a", "base"],
        "base": [],
    }
    assert sorted(import_cycles(imports)) == [["a", "b", "c"], ["auto", "registry"]]
    assert import_cycles({"a": ["b"], "b": ["c"], "c": []}) == []
