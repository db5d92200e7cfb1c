"""Static checks of the container files: Dockerfile, .dockerignore, docker-compose.yml.

No Docker engine is available to the test suite, so nothing is built or run here (see
docs/container.md for what was and was not exercised). These tests parse the files and
check the properties a build and a run depend on: a pinned CUDA runtime base whose CUDA
matches the locked torch build, installation from the lock, a non-root user, telemetry
off, `kedro run` as the command, every COPY source present and not ignored, the outputs
and local state ignored, and a compose file whose training service waits for a healthy
MLflow server with an artifact volume, which itself waits for the healthy PostgreSQL
service holding its runs and registry (tests/tracking/test_mlflow_postgres.py runs such a
server on a real PostgreSQL).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from fedmic_pipeline.telemetry import TELEMETRY_OFF

from fixtures_pipelines import PROJECT_ROOT as ROOT
RUNTIME_IMAGE = re.compile(
    r"^(?:docker\.io/|nvcr\.io/)?(?:"
    r"nvidia/cuda:(?P<cuda>\d+\.\d+(?:\.\d+)?)-(?:cudnn\d*-)?runtime-ubuntu\d+\.\d+"
    r"|pytorch/pytorch:\d+\.\d+\.\d+-cuda(?P<pt_cuda>\d+\.\d+)-cudnn\d+-runtime"
    r")$"
)


# ---------------------------------------------------------------------------------------
# A small Dockerfile parser
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case, e.g. "RUN"
    value: str  # the arguments, continuation lines joined with a space
    line: int  # 1-based line of the keyword


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: comments and blank lines dropped, a trailing
    backslash continues the instruction on the next line (comment lines inside a
    continuation are skipped, as Docker does)."""
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not parts and (not stripped or stripped.startswith("#")):
            continue
        if parts and stripped.startswith("#"):
            continue  # a comment line inside a continuation
        if not parts:
            start = number
        continued = stripped.endswith("\\")
        parts.append(stripped[:-1].strip() if continued else stripped)
        if not continued:
            line = " ".join(p for p in parts if p)
            keyword, _, value = line.partition(" ")
            instructions.append(Instruction(keyword.upper(), value.strip(), start))
            parts = []
    if parts:
        raise ValueError(f"Dockerfile ends inside a continued instruction (line {start}).")
    return instructions


def substitute_args(value: str, args: dict[str, str]) -> str:
    """Expand ${NAME}, ${NAME:-default} and $NAME from ARG defaults."""

    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        default = match.group(2)
        return args.get(name) or (default if default is not None else match.group(0))

    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", repl, value)


def command_words(value: str) -> list[str]:
    """CMD/ENTRYPOINT/RUN arguments: the JSON exec form or the shell form split by shlex."""
    value = value.strip()
    if value.startswith("["):
        words = json.loads(value)
        assert isinstance(words, list) and all(isinstance(w, str) for w in words)
        return words
    return shlex.split(value)


def copy_sources(value: str) -> tuple[list[str], str, dict[str, str]]:
    """(sources, destination, flags) of a COPY/ADD instruction (both forms)."""
    words = command_words(value) if value.strip().startswith("[") else shlex.split(value)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, val = words.pop(0)[2:].partition("=")
        flags[key] = val
    assert len(words) >= 2, f"COPY needs a source and a destination: {value!r}"
    return words[:-1], words[-1], flags


def env_pairs(value: str) -> dict[str, str]:
    """ENV key=value pairs (several per instruction, quoted values) or the legacy `ENV key value`."""
    words = shlex.split(value)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


# ---------------------------------------------------------------------------------------
# .dockerignore matching (Docker's rules)
# ---------------------------------------------------------------------------------------


def _glob_to_regex(pattern: str) -> str:
    """fnmatch-style glob -> regex for whole relative paths: `*` and `?` stay within a
    segment, `**` spans segments (`**/` may match nothing), `[...]` is a character class."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1 : end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class IgnoreRule:
    pattern: str
    exclude: bool  # False for a `!` exception
    regex: re.Pattern[str]


def parse_dockerignore(text: str) -> list[IgnoreRule]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pattern = line if exclude else line[1:].strip()
        pattern = re.sub(r"/+", "/", pattern).strip("/")
        pattern = pattern[2:] if pattern.startswith("./") else pattern
        if pattern:
            rules.append(IgnoreRule(pattern, exclude, re.compile(_glob_to_regex(pattern) + r"\Z")))
    return rules


def is_ignored(path: str, rules: list[IgnoreRule]) -> bool:
    """Whether Docker leaves ``path`` (relative, '/'-separated) out of the build context.

    A rule matches a path or any of its parent directories (ignoring a directory ignores
    its contents); the last matching rule decides, so `!` exceptions after an exclusion
    re-include.
    """
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for rule in rules:
        if any(rule.regex.match(c) for c in candidates):
            ignored = rule.exclude
    return ignored


# ---------------------------------------------------------------------------------------
# Fixtures over the repository's files
# ---------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _instructions() -> tuple[Instruction, ...]:
    return tuple(parse_dockerfile((ROOT / "Dockerfile").read_text(encoding="utf-8")))


@lru_cache(maxsize=1)
def _ignore_rules() -> tuple[IgnoreRule, ...]:
    return tuple(parse_dockerignore((ROOT / ".dockerignore").read_text(encoding="utf-8")))


@lru_cache(maxsize=1)
def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


@lru_cache(maxsize=1)
def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


def _arg_defaults(instructions: tuple[Instruction, ...]) -> dict[str, str]:
    args = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.value:
            name, default = ins.value.split("=", 1)
            args[name.strip()] = default.strip().strip('"')
    return args


def _final_stage(instructions: tuple[Instruction, ...]) -> list[Instruction]:
    starts = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
    assert starts, "the Dockerfile has no FROM"
    return list(instructions[starts[-1] :])


# ---------------------------------------------------------------------------------------
# The parser and matcher themselves
# ---------------------------------------------------------------------------------------


def test_parser_joins_continuations_and_skips_comments() -> None:
    text = (
        "# syntax comment\nARG BASE=img:1.0\nFROM ${BASE}\n\nRUN apt-get update \\\n"
        "    # a comment inside\n    && apt-get install -y x \\\n    && echo done\n"
        'ENV A=1 B="two words"\nCMD ["kedro", "run"]\n'
    )
    ins = parse_dockerfile(text)
    assert [i.keyword for i in ins] == ["ARG", "FROM", "RUN", "ENV", "CMD"]
    assert ins[2].value == "apt-get update && apt-get install -y x && echo done" and ins[2].line == 5
    assert substitute_args(ins[1].value, _arg_defaults(tuple(ins))) == "img:1.0"
    assert env_pairs(ins[3].value) == {"A": "1", "B": "two words"}
    assert command_words(ins[4].value) == ["kedro", "run"]
    with pytest.raises(ValueError):
        parse_dockerfile("RUN echo \\\n")


def test_dockerignore_matcher_follows_docker_rules() -> None:
    rules = parse_dockerignore(
        "# c\n.venv\n**/__pycache__\n/data/0[2-8]_*\ndata/01_raw/*\n!data/01_raw/keep.npz\n*.log\n!important.log\n"
    )
    assert is_ignored(".venv/lib/x.py", rules)  # a directory's contents
    assert is_ignored("src/pkg/__pycache__/m.pyc", rules)  # ** across directories
    assert is_ignored("__pycache__/m.pyc", rules)  # **/ matching nothing
    assert is_ignored("data/05_model_input/clients/c.npz", rules)  # character class
    assert not is_ignored("data/01_raw/keep.npz", rules)  # ! exception after an exclusion
    assert is_ignored("data/01_raw/other.npz", rules)
    assert not is_ignored("data/01_raw", rules)  # `dir/*` leaves the directory itself
    assert is_ignored("debug.log", rules) and not is_ignored("important.log", rules)
    assert not is_ignored("logs/debug.log", rules)  # `*` stays within one segment
    assert not is_ignored("src/venv.py", rules)


# ---------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------


def test_base_image_is_a_pinned_cuda_runtime_matching_the_locked_torch() -> None:
    instructions = _instructions()
    args = _arg_defaults(instructions)
    froms = [ins for ins in instructions if ins.keyword == "FROM"]
    assert froms
    for ins in froms:
        image = substitute_args(ins.value.split()[0], args)
        assert "$" not in image, f"FROM {image}: unresolved variable"
        name, sep, tag = image.rpartition(":") if "@" not in image else (image, "@", "digest")
        assert sep and tag and tag != "latest" and "/" not in tag, f"FROM {image} must be pinned by an explicit tag"
    final = substitute_args(_final_stage(instructions)[0].value.split()[0], args)
    match = RUNTIME_IMAGE.match(final)
    assert match, f"{final} is not an official CUDA or PyTorch *runtime* image"
    base_cuda = match.group("cuda") or match.group("pt_cuda")
    lock_cuda = _lock().get("nvidia-cuda-runtime") or _lock().get("nvidia-cuda-runtime-cu12")
    assert lock_cuda, "requirements.lock has no nvidia-cuda-runtime: which CUDA does torch use?"
    assert base_cuda.split(".")[0] == lock_cuda.split(".")[0], (
        f"base image CUDA {base_cuda} vs the locked torch's CUDA runtime {lock_cuda}"
    )


def test_lock_pins_torch_consistently_with_the_project() -> None:
    lock = _lock()
    assert re.fullmatch(r"\d+\.\d+\.\d+", lock.get("torch", "")), "requirements.lock must pin torch==X.Y.Z"
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    pinned = re.search(r'"torch==([^"]+)"', pyproject)
    assert pinned and pinned.group(1) == lock["torch"]
    assert lock.get("mlflow") and lock.get("kedro"), "the image needs mlflow and kedro from the lock"


def test_installs_from_the_lock_without_resolution() -> None:
    runs = [ins.value for ins in _final_stage(_instructions()) if ins.keyword == "RUN"]
    lock_installs = [r for r in runs if re.search(r"pip install[^&;]*--no-deps[^&;]*-r\s+requirements\.lock", r)]
    assert lock_installs, "no `pip install --no-deps -r requirements.lock`"
    project_installs = [r for r in runs if re.search(r"pip install[^&;]*--no-deps[^&;]*(?:-e\s+)?\.(?:\s|$)", r)]
    assert project_installs, "the project itself must be installed with --no-deps"
    copies = [ins for ins in _final_stage(_instructions()) if ins.keyword == "COPY"]
    lock_copy = next(i for i in copies if "requirements.lock" in copy_sources(i.value)[0])
    first_lock_install = next(i for i in _final_stage(_instructions()) if i.keyword == "RUN" and i.value in lock_installs)
    assert lock_copy.line < first_lock_install.line


def test_runs_kedro_as_a_non_root_user_with_telemetry_off() -> None:
    stage = _final_stage(_instructions())
    commands = [ins for ins in stage if ins.keyword in ("CMD", "ENTRYPOINT")]
    assert commands, "no CMD/ENTRYPOINT"
    entry = next((command_words(i.value) for i in reversed(commands) if i.keyword == "ENTRYPOINT"), [])
    cmd = next((command_words(i.value) for i in reversed(commands) if i.keyword == "CMD"), [])
    words = entry + cmd
    assert any(words[i : i + 2] == ["kedro", "run"] for i in range(len(words))), f"runs {words}, not kedro run"

    cmd_line = max(i.line for i in commands)
    users = [i for i in stage if i.keyword == "USER" and i.line < cmd_line]
    assert users, "no USER before CMD: the container would run as root"
    user = substitute_args(users[-1].value, _arg_defaults(_instructions())).split(":")[0]
    assert user not in ("root", "0", ""), f"USER {user} is root"

    env: dict[str, str] = {}
    for ins in stage:
        if ins.keyword == "ENV":
            env.update(env_pairs(ins.value))
    missing = {k: v for k, v in TELEMETRY_OFF.items() if env.get(k) != v}
    assert not missing, f"telemetry not switched off: {missing}"


def test_every_copy_source_exists_and_is_not_ignored() -> None:
    rules = list(_ignore_rules())
    copies = [ins for ins in _instructions() if ins.keyword in ("COPY", "ADD")]
    assert copies
    for ins in copies:
        sources, _, flags = copy_sources(ins.value)
        if "from" in flags:
            continue  # a multi-stage copy reads another stage, not the context
        for source in sources:
            rel = source.strip("/") or "."
            assert not any(ch in rel for ch in "*?["), f"line {ins.line}: use explicit COPY sources, got {source}"
            path = ROOT / rel
            assert path.exists(), f"line {ins.line}: COPY source {source} does not exist"
            assert not is_ignored(rel, rules), f"line {ins.line}: COPY source {source} is excluded by .dockerignore"
            if path.is_dir():
                files = [p.relative_to(ROOT).as_posix() for p in path.rglob("*") if p.is_file()]
                kept = [f for f in files if not is_ignored(f, rules)]
                assert kept, f"line {ins.line}: everything under {source} is excluded by .dockerignore"


def test_bundled_raw_data_and_sources_reach_the_image() -> None:
    rules = list(_ignore_rules())
    for name in ("pneumoniamnist.npz", "breastmnist.npz"):
        assert (ROOT / "data/01_raw" / name).is_file()
        assert not is_ignored(f"data/01_raw/{name}", rules), f"data/01_raw/{name} must be in the image"
    for rel in ("src/fedmic_pipeline/__init__.py", "conf/base/catalog.yml", "pyproject.toml", "requirements.lock"):
        assert not is_ignored(rel, rules), rel


def test_local_state_and_outputs_stay_out_of_the_image() -> None:
    rules = list(_ignore_rules())
    must_ignore = [
        ".venv/bin/python", "mlflow.db", "mlruns/0/meta.yaml", "mlartifacts/1/a.txt", ".git/HEAD",
        "dvc-remote/files/md5/ab/cd", ".dvc/cache/files/x", "src/fedmic_pipeline/__pycache__/m.cpython-311.pyc",
        ".pytest_cache/v/cache", "data/01_raw/some_other_download.npz", "conf/local/credentials.yml",
    ] + [f"data/{d}/anything.npz" for d in (
        "02_intermediate", "03_primary", "04_feature", "05_model_input", "06_models", "07_model_output", "08_reporting",
    )]  # fmt: skip
    leaked = [p for p in must_ignore if not is_ignored(p, rules)]
    assert not leaked, f"not excluded by .dockerignore: {leaked}"
    # and whatever outputs exist right now in this checkout
    for folder in sorted((ROOT / "data").glob("0[2-8]_*")):
        for path in folder.rglob("*"):
            if path.is_file():
                rel = path.relative_to(ROOT).as_posix()
                assert is_ignored(rel, rules), f"{rel} would be sent to the build"


# ---------------------------------------------------------------------------------------
# docker-compose.yml
# ---------------------------------------------------------------------------------------


def _words(command: str | list[str] | None) -> list[str]:
    if command is None:
        return []
    return [str(w) for w in command] if isinstance(command, list) else shlex.split(command)


def _option(words: list[str], name: str) -> str | None:
    for i, word in enumerate(words):
        if word == name and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _mounts(service: dict) -> dict[str, str]:
    """container path -> source (named volume or host path) for short and long syntax."""
    out = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        out[target.rstrip("/")] = source
    return out


def _builds_this_dockerfile(service: dict) -> bool:
    build = service.get("build")
    if isinstance(build, str):
        return Path(build) == Path(".")
    return isinstance(build, dict) and Path(build.get("context", ".")) == Path(".") and build.get("dockerfile", "Dockerfile") == "Dockerfile"


_COMPOSE_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?-)(?P<default>[^}]*))?\}")


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """`value` as compose hands it to the container: `${VAR}`, `${VAR:-default}` (default
    when unset or empty), `${VAR-default}` (default when unset), `$$` a literal `$`."""

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, default = match.group("name"), match.group("op"), match.group("default") or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    return _COMPOSE_VARIABLE.sub(replace, value)


def test_interpolate_follows_compose_rules() -> None:
    assert interpolate("${A:-x}/${B-y}/${C}/$$HOME", {}) == "x/y//$HOME"
    assert interpolate("${A:-x}/${B-y}", {"A": "", "B": ""}) == "x/"
    assert interpolate("${A:-x}", {"A": "set"}) == "set"


#: No override (the defaults) and every credential overridden, as an .env file would.
_DB_ENVS = ({}, {"MLFLOW_DB_USER": "tracker", "MLFLOW_DB_PASSWORD": "s3cret", "MLFLOW_DB_NAME": "runs"})


def _backend_url(env: Mapping[str, str]):
    words = _words(_compose()["services"]["mlflow"].get("command"))
    backend = _option(words, "--backend-store-uri")
    assert backend, "the mlflow service has no --backend-store-uri"
    return urlsplit(interpolate(backend, env))


def test_mlflow_service_has_a_postgres_backend_an_artifact_volume_and_a_healthcheck() -> None:
    compose = _compose()
    services = compose["services"]
    mlflow = services["mlflow"]
    words = _words(mlflow.get("command")) or _words(mlflow.get("entrypoint"))
    assert words[:2] == ["mlflow", "server"], words
    if _builds_this_dockerfile(mlflow):
        assert _lock()["mlflow"] == "3.17.2"
    else:
        assert "3.17.2" in mlflow["image"], "the server must be the locked mlflow 3.17.2"

    url = _backend_url({})
    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3: the driver must be named, and locked.
    drivers = {"postgresql+psycopg2": "psycopg2-binary", "postgresql+psycopg": "psycopg"}
    assert url.scheme in drivers, f"--backend-store-uri {url.geturl()}: a PostgreSQL URI naming its driver, one of {sorted(drivers)}"
    assert drivers[url.scheme] in _lock(), f"{url.scheme} needs {drivers[url.scheme]} in requirements.lock (the image's only source)"
    assert url.hostname in services, f"backend database host {url.hostname} is not a compose service"
    assert (mlflow.get("depends_on") or {}).get(url.hostname, {}).get("condition") == "service_healthy", (
        "mlflow must wait until its database is healthy: the server creates its schema at start-up and "
        "gives up after about 100 s of connection retries"
    )

    mounts = _mounts(mlflow)
    named = set(compose.get("volumes") or {})
    assert "--serve-artifacts" in words
    destination = _option(words, "--artifacts-destination")
    assert destination and mounts.get(destination.rstrip("/")) in named, "artifacts must go to a named volume"

    port = _option(words, "--port") or "5000"
    health = " ".join(_words(mlflow["healthcheck"]["test"]))
    assert "/health" in health and f":{port}" in health
    assert _option(words, "--host") == "0.0.0.0", "the server must listen beyond its own loopback"
    allowed = _option(words, "--allowed-hosts") or ""
    assert "mlflow" in allowed.split(",") or "*" in allowed, "MLflow 3 rejects Host: mlflow unless allowed"


def test_postgres_service_is_pinned_persistent_healthchecked_and_matches_the_mlflow_uri() -> None:
    compose = _compose()
    host = _backend_url({}).hostname
    database = compose["services"][host]
    name, _, tag = database["image"].rpartition(":")
    assert name in ("postgres", "docker.io/postgres", "docker.io/library/postgres"), f"{database['image']}: the official image"
    assert re.fullmatch(r"\d+(\.\d+)?(-[\w.]+)?", tag), f"{database['image']} must be pinned by a version tag"

    data_dir = "/var/lib/postgresql/data"  # PGDATA of the official image up to major 17
    assert int(tag.split(".")[0].split("-")[0]) <= 17, "postgres 18+ keeps its data under /var/lib/postgresql: move the mount"
    assert _mounts(database).get(data_dir) in set(compose.get("volumes") or {}), f"{data_dir} must be a named volume"
    health = " ".join(_words(database["healthcheck"]["test"]))
    assert "pg_isready" in health and "-h" in health.split(), "healthcheck: pg_isready over TCP, not the init-time socket"
    assert "ports" not in database, "the database needs no port on the host: only mlflow talks to it"

    raw = _environment(database)
    for variable in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        assert re.fullmatch(r"\$\{\w+:-[^}]+\}", raw.get(variable, "")), f"{variable}: from the environment, with a default"
    for env in _DB_ENVS:
        url, container = _backend_url(env), {k: interpolate(v, env) for k, v in raw.items()}
        credentials = (url.username, url.password, url.path.lstrip("/"), url.port or 5432)
        assert credentials == (container["POSTGRES_USER"], container["POSTGRES_PASSWORD"], container["POSTGRES_DB"], 5432), (
            f"with {env or 'the defaults'}: the mlflow URI {url.geturl()} does not match the database service {container}"
        )


def test_train_service_waits_for_mlflow_and_reserves_the_gpu() -> None:
    compose = _compose()
    train = compose["services"]["train"]
    assert _builds_this_dockerfile(train), "train must be built from the Dockerfile"
    mlflow_words = _words(compose["services"]["mlflow"]["command"])
    port = _option(mlflow_words, "--port") or "5000"
    assert _environment(train).get("MLFLOW_TRACKING_URI") == f"http://mlflow:{port}"
    assert train["depends_on"]["mlflow"]["condition"] == "service_healthy"
    devices = train["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    data_mounts = [target for target in _mounts(train) if target.endswith("/data")]
    assert data_mounts, "train needs a data volume"
    command = _words(train.get("command"))
    assert not command or command == ["kedro", "run"] or command[:2] == ["kedro", "run"]


def test_multisite_profile_runs_one_supernode_per_partition_without_runtime_installs():
    services = _compose()["services"]
    sites = {name: svc for name, svc in services.items() if name.startswith("supernode-")}
    assert len(sites) >= 2
    partitions = set()
    for name, svc in sites.items():
        assert svc["profiles"] == ["multisite"], name
        command = " ".join(svc["command"])
        assert "--superlink superlink:" in command
        partitions.add(command.split("partition-id=")[1].split()[0])
        assert svc["environment"]["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
        assert svc["environment"]["FLWR_TELEMETRY_ENABLED"] == "0"
    assert len(partitions) == len(sites)  # each site reads its own hospital's partition
    assert "--disable-runtime-dependency-installation" in services["superlink"]["command"]
    assert "flwr run" in " ".join(services["federate"]["command"])
