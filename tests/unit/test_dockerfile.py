"""Static checks of the Dockerfile and checks of the busybox helper it ships.

The Dockerfile is read with a small instruction parser, because no Dockerfile parser
is a project dependency. The helper checks run the host's /bin/busybox from Debian's
busybox-static package, the same file that the image's helper stage copies.
"""

from __future__ import annotations

import json
import re
import signal
import struct
import subprocess
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
WORKFLOW = REPO / ".github" / "workflows" / "image.yml"
HELPER_PATH = "/usr/local/lib/imgcache/busybox"
INSTALL_HINT = "install Debian's busybox-static package: apt-get update && apt-get install -y busybox-static"

KEYWORDS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK",
    "LABEL", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip
PT_INTERP = 3
DIGEST_PINNED = re.compile(r"@sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    line: int


@dataclass
class Stage:
    index: int
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def find(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_instructions(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions, joining backslash continuations.

    Comment lines (including parser directives) are dropped, also inside a
    continuation, as Docker does. Heredocs are not supported.
    """
    instructions: list[Instruction] = []
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        if keyword.upper() not in KEYWORDS:
            raise ValueError(f"Dockerfile line {start}: unknown instruction {keyword!r}")
        if "<<" in arguments:
            raise ValueError(f"Dockerfile line {start}: heredocs are not supported here")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
        pending = ""
    if pending:
        raise ValueError(f"Dockerfile line {start}: file ends inside a line continuation")
    return instructions


def expand(text: str, variables: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise ValueError(f"undefined build argument {name!r} in {text!r}")
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", replace, text)


def parse_stages(instructions: list[Instruction]) -> tuple[dict[str, str], list[Stage]]:
    """Group instructions by FROM, expanding global ARG defaults in each FROM."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = [w for w in instruction.arguments.split() if not w.startswith("--")]
            if len(words) not in (1, 3) or (len(words) == 3 and words[1].upper() != "AS"):
                raise ValueError(f"Dockerfile line {instruction.line}: malformed FROM")
            name = words[2] if len(words) == 3 else None
            stages.append(Stage(len(stages), expand(words[0], global_args), name))
        elif not stages:
            if instruction.keyword != "ARG":
                raise ValueError(f"Dockerfile line {instruction.line}: only ARG may precede FROM")
            arg_name, _, default = instruction.arguments.partition("=")
            global_args[arg_name] = default
        else:
            stages[-1].instructions.append(instruction)
    return global_args, stages


@dataclass(frozen=True)
class Copy:
    flags: dict[str, str]
    sources: list[str]
    destination: str


def parse_copy(instruction: Instruction) -> Copy:
    words = instruction.arguments.split()
    flags = {}
    while words and words[0].startswith("--"):
        flag_name, _, value = words.pop(0)[2:].partition("=")
        flags[flag_name] = value
    if words and words[0].startswith("["):
        words = json.loads(" ".join(words))
    assert len(words) >= 2, f"Dockerfile line {instruction.line}: COPY needs a source and a target"
    return Copy(flags, words[:-1], words[-1])


def exec_form(instruction: Instruction) -> list[str] | None:
    try:
        value = json.loads(instruction.arguments)
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """Read .dockerignore as (is_exception, regex) pairs in file order."""
    patterns = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        glob = line.removeprefix("!").strip("/")
        regex = ""
        index = 0
        while index < len(glob):
            if glob.startswith("**", index):
                regex += ".*"
                index += 2
            elif glob[index] == "*":
                regex += "[^/]*"
                index += 1
            elif glob[index] == "?":
                regex += "[^/]"
                index += 1
            else:
                regex += re.escape(glob[index])
                index += 1
        patterns.append((exception, re.compile(regex.replace(".*/", "(?:.*/)?"))))
    return patterns


def is_ignored(path: str) -> bool:
    """Apply .dockerignore as Docker does: the last pattern matching the path or a parent wins."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for exception, pattern in dockerignore_patterns():
        if any(pattern.fullmatch(candidate) for candidate in candidates):
            ignored = not exception
    return ignored


def elf_program_header_types(path: Path) -> list[int]:
    """Return the p_type of every program header of an ELF file."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF":
        raise ValueError(f"{path} is not an ELF file")
    elf_class, byte_order = data[4], data[5]
    endian = {1: "<", 2: ">"}[byte_order]
    if elf_class == 2:
        (header_offset,) = struct.unpack_from(endian + "Q", data, 0x20)
        entry_size, entry_count = struct.unpack_from(endian + "HH", data, 0x36)
    elif elf_class == 1:
        (header_offset,) = struct.unpack_from(endian + "I", data, 0x1C)
        entry_size, entry_count = struct.unpack_from(endian + "HH", data, 0x2A)
    else:
        raise ValueError(f"{path}: unknown ELF class {elf_class}")
    return [struct.unpack_from(endian + "I", data, header_offset + i * entry_size)[0] for i in range(entry_count)]


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def global_args(instructions: list[Instruction]) -> dict[str, str]:
    return parse_stages(instructions)[0]


@pytest.fixture(scope="module")
def stages(instructions: list[Instruction]) -> list[Stage]:
    return parse_stages(instructions)[1]


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> Stage:
    return stages[-1]


def stage_by_name(stages: list[Stage], name: str) -> Stage:
    (stage,) = [s for s in stages if s.name == name]
    return stage


def helper_copy(runtime: Stage) -> Copy:
    copies = [parse_copy(i) for i in runtime.find("COPY")]
    (helper,) = [c for c in copies if c.destination == HELPER_PATH]
    return helper


@pytest.fixture(scope="module")
def busybox(runtime: Stage) -> Path:
    """The host's copy of the file that the helper stage puts into the image."""
    (source,) = helper_copy(runtime).sources
    path = Path(source)
    if not path.exists():
        pytest.fail(f"{path} not found; {INSTALL_HINT}")
    return path


# --- Parser -------------------------------------------------------------------


def test_parser_joins_continuations() -> None:
    text = "# syntax=docker/dockerfile:1\nFROM a AS b\nRUN one \\\n  # comment\n  two\n"
    parsed = parse_instructions(text)
    assert parsed == [Instruction("FROM", "a AS b", 2), Instruction("RUN", "one two", 3)]


def test_parser_rejects_unknown_instruction() -> None:
    with pytest.raises(ValueError, match="unknown instruction"):
        parse_instructions("FROM a\nRUNN b\n")


def test_dockerignore_matcher() -> None:
    assert not is_ignored("pyproject.toml")
    assert not is_ignored("imgcache/config.py")
    assert is_ignored("imgcache/__pycache__/config.cpython-311.pyc")
    assert is_ignored(".git/config")


# --- Dockerfile structure ------------------------------------------------------


def test_dockerfile_parses(instructions: list[Instruction], stages: list[Stage]) -> None:
    assert instructions
    assert [s.name for s in stages] == ["builder", "helpers", "helper", "runtime"]


def test_base_images_pinned_by_digest(stages: list[Stage]) -> None:
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.base in names:
            earlier = {s.name for s in stages[: stage.index]}
            assert stage.base in earlier, f"stage {stage.name} builds on a later stage"
            continue
        if stage.base == "scratch":
            continue
        assert DIGEST_PINNED.search(stage.base), f"stage {stage.name}: {stage.base}"
        assert stage.base.startswith("python:3.11-slim"), stage.base


def test_build_arg_pins_base(global_args: dict[str, str]) -> None:
    assert DIGEST_PINNED.search(global_args["PYTHON_IMAGE"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", global_args["UV_VERSION"])


def test_copy_from_earlier_stages(stages: list[Stage]) -> None:
    for stage in stages:
        earlier = {s.name for s in stages[: stage.index]}
        for instruction in stage.find("COPY"):
            source_stage = parse_copy(instruction).flags.get("from")
            if source_stage is not None:
                assert source_stage in earlier, f"Dockerfile line {instruction.line}"


def test_copy_sources_in_context(stages: list[Stage]) -> None:
    copied = []
    for stage in stages:
        assert not stage.find("ADD"), "use COPY, which cannot fetch URLs or unpack archives"
        for instruction in stage.find("COPY"):
            copy = parse_copy(instruction)
            if "from" in copy.flags:
                continue
            for source in copy.sources:
                copied.append(source)
                assert (REPO / source).exists(), f"Dockerfile line {instruction.line}: {source}"
                assert not is_ignored(source), f".dockerignore excludes {source}"
    assert set(copied) >= {"pyproject.toml", "uv.lock", "README.md", "imgcache"}


def test_dockerignore_excludes_local_state() -> None:
    for path in (".git", ".venv", ".cluster", "tests", "manifests", ".github"):
        assert is_ignored(path), path


def test_builder_installs_locked(stages: list[Stage]) -> None:
    runs = [i.arguments for i in stage_by_name(stages, "builder").find("RUN")]
    assert any(re.search(r"\buv sync --frozen --no-dev\b", run) for run in runs)
    assert any("--no-editable" in run for run in runs)


def test_helper_stage_installs_busybox_static(stages: list[Stage]) -> None:
    runs = " ".join(i.arguments for i in stage_by_name(stages, "helpers").find("RUN"))
    assert re.search(r"apt-get install .*\bbusybox-static\b", runs)


def test_helper_image_holds_only_busybox(stages: list[Stage]) -> None:
    helper = stage_by_name(stages, "helper")
    copies = [parse_copy(i) for i in helper.find("COPY")]

    assert helper.base == "scratch"
    assert [(c.flags.get("from"), c.sources, c.destination) for c in copies] == [
        ("helpers", ["/bin/busybox"], HELPER_PATH)
    ]
    assert not helper.find("RUN")
    assert helper.find("USER")[-1].arguments == "65532:65532"


def test_runtime_copies(runtime: Stage, stages: list[Stage]) -> None:
    copies = [parse_copy(i) for i in runtime.find("COPY")]
    assert all(c.flags.get("from") in {"builder", "helpers"} for c in copies)
    helper = helper_copy(runtime)
    assert helper.flags["from"] == "helpers"
    assert helper.sources == ["/bin/busybox"]

    builder_env = " ".join(i.arguments for i in stage_by_name(stages, "builder").find("ENV"))
    venv = re.search(r"UV_PROJECT_ENVIRONMENT=(\S+)", builder_env)
    assert venv, "the builder must set UV_PROJECT_ENVIRONMENT"
    assert any(c.sources == [venv.group(1)] and c.destination == venv.group(1) for c in copies)
    runtime_env = " ".join(i.arguments for i in runtime.find("ENV"))
    assert f"PATH={venv.group(1)}/bin:" in runtime_env


def test_runtime_user_non_root(runtime: Stage) -> None:
    users = runtime.find("USER")
    assert users, "the runtime stage must set USER"
    assert users[-1].arguments == "65532:65532"


def test_entrypoint_exec_form(runtime: Stage) -> None:
    (entrypoint,) = runtime.find("ENTRYPOINT")
    (command,) = runtime.find("CMD")
    assert exec_form(entrypoint) == ["imgcache"], entrypoint.arguments
    assert exec_form(command) == ["run"], command.arguments
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "imgcache" in scripts


def test_no_healthcheck(instructions: list[Instruction]) -> None:
    assert not [i for i in instructions if i.keyword == "HEALTHCHECK"]


def test_workflow_builds_both_platforms(global_args: dict[str, str]) -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    steps = [step for job in workflow["jobs"].values() for step in job["steps"]]
    builds = [s for s in steps if str(s.get("uses", "")).startswith("docker/build-push-action")]
    assert builds
    platforms = {p for build in builds for p in build["with"]["platforms"].split(",")}
    assert {"linux/amd64", "linux/arm64"} <= platforms
    for build in builds:
        arg_name = build["with"]["build-args"].partition("=")[0]
        assert arg_name in global_args, arg_name


# --- Helper binary --------------------------------------------------------------


def test_elf_parser_finds_interpreter() -> None:
    # /bin/sh is dynamically linked on Debian, so a working parser finds PT_INTERP.
    assert PT_INTERP in elf_program_header_types(Path("/bin/sh").resolve())


def test_helper_statically_linked(busybox: Path) -> None:
    types = elf_program_header_types(busybox.resolve())
    assert types, f"{busybox} has no program headers"
    assert PT_INTERP not in types, (
        f"{busybox} has a PT_INTERP header, so it is dynamically linked, as the busybox "
        f"package installs it. To get the static build, {INSTALL_HINT}"
    )


def test_helper_runs_true(busybox: Path) -> None:
    # An empty environment, as in a scratch image with no PATH.
    result = subprocess.run([str(busybox), "true"], env={}, capture_output=True, timeout=10)
    assert result.returncode == 0, result.stderr


def test_helper_sleeps(busybox: Path) -> None:
    started = time.monotonic()
    result = subprocess.run([str(busybox), "sleep", "0.1"], env={}, capture_output=True, timeout=10)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert elapsed >= 0.09


def test_helper_accepts_pinner_sleep(busybox: Path) -> None:
    # Pinner containers run "busybox sleep 2147483647". A rejected argument would
    # make busybox exit at once.
    with subprocess.Popen(
        [str(busybox), "sleep", "2147483647"],
        env={},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    ) as process:
        try:
            time.sleep(0.5)
            assert process.poll() is None, process.communicate(timeout=5)[1]
        finally:
            process.terminate()
            process.wait(timeout=5)
    assert process.returncode == -signal.SIGTERM
