"""The two sides of an A/B run (`fluxgate ab`): which trees they are, what each side's process imports, its own
virtualenv (`--own-envs`), and the worker each side runs in.

**Trees.** The candidate is the repository in hand (`--candidate-tree`, default `.`); the base is a git worktree of
`--base REF` of that repository under `<--envs-dir>/base` (reused, moved to REF's commit when it is elsewhere), or a
checkout named by `--base-tree`. Any repository that uses the plugin works: a side's tree is what differs, fluxgate
is the same on both sides.

**What a side imports** (`Tree.worker_paths`, put first on the side's `sys.path` by `ab_worker`):

- its *import root*: `<tree>/src` when the tree has a `src/` folder, else the tree itself, so the team's package
  (and anything importable beside it) is that side's checkout, whatever the interpreter has installed;
- a generated distribution (`<name>-<version>.dist-info` with the tree's `pyproject.toml` `[project]` name and
  `[project.entry-points]`), so the side's registries (`fluxgate.models`, `fluxgate.precisions`, `fluxgate.hooks`)
  are read from that side's own entry points, inside its own process: an installed editable package re-pointed at
  the side's tree. A tree without a `[project]` table keeps the installed distributions' entry points.

fluxgate itself is imported from one folder named in the worker's config: the candidate's installed fluxgate (the
one running `fluxgate ab`) on both sides, except where a tree's import root holds the `fluxgate` package itself:
fluxgate's own repository, where fluxgate is the team code and each side imports its own tree's.

conftest.py hooks are pytest's alone (a worker runs no pytest): package them under the `fluxgate.hooks` group to have
an A/B run call them (`fluxgate.hooks.worker_manager`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fluxgate import defaults
from fluxgate.environ import DEFAULTS as ENV  # each worker's, set before it imports diffusers
from fluxgate.judging.interleave import BASE, CANDIDATE
from fluxgate.options import cpu_threads

DEFAULT_TORCH = "torch==2.13.0"  # noxfile.py's TORCH; `nox -s perf-ab` passes its own (FLUXGATE_TORCH) as --torch
ENV_STAMP = "fluxgate-ab-env.json"
# Folders a tree's digest never reads: build outputs, caches, virtualenvs (and every dot-folder: .git, .fluxgate, ...).
NOT_SOURCE = {"__pycache__", "build", "dist", "venv", "node_modules"}


class SideError(Exception):
    """A side that cannot be set up or started, or whose worker answered with an error (`oom`: it ran out of device
    memory) or could not be reached. The message is one line naming the side."""

    def __init__(self, message: str, oom: bool = False):
        super().__init__(message)
        self.oom = oom


@dataclass(frozen=True)
class Tree:
    """One side's checkout and what its worker imports from it (module docs)."""

    root: Path

    @classmethod
    def at(cls, root: Path, side: str) -> Tree:
        """The tree at `root` (resolved). Raises SideError when it is no folder."""
        if not root.is_dir():
            raise SideError(f"{side} side: {root} is no folder (give a checkout, or --base REF for a git worktree)")
        return cls(root.resolve())

    @property
    def import_root(self) -> Path:
        """`<tree>/src` for a src layout, else the tree itself."""
        return self.root / "src" if (self.root / "src").is_dir() else self.root

    @property
    def own_fluxgate(self) -> bool:
        """Whether the tree is fluxgate's own repository (its import root holds the fluxgate package)."""
        return (self.import_root / "fluxgate" / "__init__.py").is_file()

    def fluxgate_dir(self, installed: Path) -> Path:
        """The fluxgate package folder this side imports: its own tree's in fluxgate's repository, else `installed`."""
        return self.import_root / "fluxgate" if self.own_fluxgate else installed

    def project(self, side: str) -> dict | None:
        """The `[project]` table of the tree's pyproject.toml; None without one. Raises SideError for a file that
        cannot be read."""
        path = self.root / "pyproject.toml"
        if not path.is_file():
            return None
        try:
            project = tomllib.loads(path.read_text()).get("project")
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
            raise SideError(f"{side} side: {path}: {error}") from None
        return project if isinstance(project, dict) and isinstance(project.get("name"), str) else None

    def write_distribution(self, site: Path, side: str) -> Path | None:
        """Write the tree's project as a distribution (METADATA, entry_points.txt) into `site`; None when the tree
        declares no project. Distributions are found first on `sys.path` first, so `site` ahead of site-packages
        makes these entry points the side's."""
        project = self.project(side)
        if project is None:
            return None
        name, version = project["name"], str(project.get("version") or "0")
        folder = site / f"{name.replace('-', '_')}-{version}.dist-info"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        groups = project.get("entry-points") or {}
        (folder / "entry_points.txt").write_text("".join(
            f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in points.items()) + "\n"
            for group, points in groups.items() if isinstance(points, dict)))
        return folder

    def worker_paths(self, site: Path, side: str) -> list[str]:
        """What the side's worker puts first on `sys.path`, in order: its generated distribution's folder (when the
        tree declares a project), then its import root."""
        written = self.write_distribution(site, side)
        return ([str(site)] if written else []) + [str(self.import_root)]

    def digest(self) -> str:
        """sha256 (16 hex digits) of the import root's `*.py` files and `pyproject.toml`, paths and contents (dot-,
        cache and build folders left out): equal digests on both sides mark an A/A run (the detection card
        resamples those)."""
        digest = hashlib.sha256()
        sources = (path for path in self.import_root.rglob("*.py")
                   if not any(part.startswith(".") or part in NOT_SOURCE or part.endswith(".egg-info")
                              for part in path.relative_to(self.root).parts[:-1]))
        for path in sorted(sources) + [self.root / "pyproject.toml"]:
            if path.is_file():
                digest.update(str(path.relative_to(self.root)).encode() + b"\0" + path.read_bytes() + b"\0")
        return digest.hexdigest()[:16]


def _git(folder: Path, *args: str) -> str:
    """`git -C folder args...`'s output, stripped. Raises SideError (one line: the command and git's message)."""
    command = ["git", "-C", str(folder), *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
        raise SideError(f"base side: cannot run git: {error}") from None
    if done.returncode != 0:
        text = " ".join((done.stderr or done.stdout).split())[-300:]
        raise SideError(f"base side: `{shlex.join(command)}` failed ({done.returncode}): {text}")
    return done.stdout.strip()


def base_worktree(candidate: Path, ref: str, where: Path, log=None) -> Path:
    """The base's tree: a detached git worktree of `ref` of the candidate's repository at `where`, made, reused, or
    moved to ref's commit; the candidate's folder inside it when the candidate is a subfolder of its repository.
    Raises SideError (one line) when `ref` names no commit or git fails."""
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    prefix = _git(candidate, "rev-parse", "--show-prefix")  # first: a candidate outside any repository says so
    try:
        sha = _git(candidate, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except SideError:
        raise SideError(f"base side: --base {ref!r} names no commit of the repository at {candidate}") from None
    where = where.absolute()
    if not (where / ".git").exists():
        _git(candidate, "worktree", "prune")
        _git(candidate, "worktree", "add", "--detach", str(where), sha)
        log(f"base side: made the worktree {where} at {ref} ({sha[:12]})")
    elif _git(where, "rev-parse", "HEAD") != sha:
        _git(where, "checkout", "--detach", "--force", sha)
        log(f"base side: moved the worktree {where} to {ref} ({sha[:12]})")
    ignore = where.parent / ".gitignore"  # the A/B's own folder: never the candidate's uncommitted changes
    if not ignore.exists():
        ignore.write_text("*\n")
    return where / prefix


def side_env(venv: Path, tree: Path, torch_spec: str, name: str, log=None) -> str:
    """The interpreter of `name`'s own virtualenv (`--own-envs`), made or reused: `python -m venv`, then one `pip
    install <torch_spec> -e <tree>` (one resolve: torch's pin wins over the tree's `torch>=...`). Reused only while
    its stamp (`ENV_STAMP`: interpreter, torch spec, tree, sha256 of the tree's pyproject.toml) matches and its
    interpreter imports torch and fluxgate. Raises SideError (one line naming the side and the failing step)."""
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    venv, tree = venv.absolute(), tree.resolve()
    python = venv / "bin" / "python"
    pyproject = tree / "pyproject.toml"
    interpreter = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    want = {"python": f"{platform.python_version()} {interpreter}",
            "torch": torch_spec, "tree": str(tree),
            "pyproject_sha256": hashlib.sha256(pyproject.read_bytes()).hexdigest() if pyproject.is_file() else None}
    try:
        have = json.loads((venv / ENV_STAMP).read_text())
    except (OSError, ValueError):
        have = None
    if have == want and python.exists():
        probe = subprocess.run([str(python), "-c", "import torch, fluxgate"], capture_output=True, text=True)
        if probe.returncode == 0:
            log(f"{name} side: reusing {venv} ({torch_spec}, {tree}'s pins)")
            return str(python)
        log(f"{name} side: {venv} cannot import torch and fluxgate: making it again")
    elif have is not None:
        changed = ", ".join(key for key in want if have.get(key) != want[key])
        log(f"{name} side: {venv} was made for another {changed}: making it again")
    started = time.monotonic()
    log(f"{name} side: making {venv} (pip install {torch_spec} -e {tree})")
    (venv / ENV_STAMP).unlink(missing_ok=True)
    pip = [str(python), "-m", "pip", "install", "-q", *shlex.split(torch_spec), "-e", str(tree)]
    for step in ([sys.executable, "-m", "venv", "--clear", str(venv)], pip):
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            text = " ".join((done.stderr or done.stdout).split())[-400:]
            raise SideError(f"{name} side: `{shlex.join(step)}` failed ({done.returncode}): {text}")
    (venv / ENV_STAMP).write_text(json.dumps(want, indent=1) + "\n")  # last: an interrupted make is never reused
    log(f"{name} side: made {venv} in {time.monotonic() - started:.0f} s")
    return str(python)


def shared_cpus(threads: int) -> list[int]:
    """The CPUs both sides run on when the device is a CPU: the last `threads` this process may use, the same for
    both. The sides take turns (one image at a time), so sharing costs nothing, and it keeps a per-core difference
    out of the comparison: on a 2-core virtual machine an A/A with each side on its own core came out +10.7 % on the
    steps (one core's hyperthread sibling busy elsewhere, which no run-queue wait shows)."""
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return usable[-threads:] if usable else []


def worker_config(options: argparse.Namespace, tree: Tree, side: str, site: Path, installed: Path) -> dict:
    """The worker config of `side` (`ab_worker`'s first message): what it imports (`Tree.worker_paths`, its
    generated distribution written under `site`; fluxgate from `tree.fluxgate_dir(installed)`) and how it measures."""
    candidate_tree = options.candidate_tree.resolve()
    # each side reads its own tree's prompts file (its format is that tree's: fluxgate 0.1's [prompts] table or
    # cases), unless one is given for both; the first case is the old default prompt and seed
    prompts = Path(options.prompts).resolve() if options.prompts else defaults.input_file("prompts", tree.root)
    models_file = Path(options.models_file) if options.models_file else candidate_tree / defaults.MODELS_FILE
    config = {"tree": str(tree.root), "paths": tree.worker_paths(site, side),
              "fluxgate": str(tree.fluxgate_dir(installed)), "profile": options.profile, "device": options.device,
              "prompts": str(prompts), "models_file": str(models_file.resolve()),
              "fixture_cache": str(Path(options.fixture_cache).resolve()), "warmup_steps": options.warmup_steps,
              "steps": options.steps, "cpu_threads": cpu_threads(options.cpu_threads), "env": ENV,
              "cpus": shared_cpus(cpu_threads(options.cpu_threads)), "inject": None}
    if side == CANDIDATE and options.inject_slow:
        plan = options.inject_slow  # [(combo, fraction, shape), ...]
        combo, fraction, shape = plan[0]
        injectors = tree.root / "tests" / "injectors"
        if not (injectors / "slow_combo.py").is_file():
            raise SideError(f"candidate side: --inject-slow needs {injectors / 'slow_combo.py'} (fluxgate's test "
                            "injector; only fluxgate's own repository has it)")
        config["inject"] = {"path": str(injectors), "module": "slow_combo"}
        config["env"] = {**ENV, "FLUXGATE_SLOW_COMBO": combo, "FLUXGATE_SLOW_FRACTION": str(fraction),
                         "FLUXGATE_SLOW_SHAPE": shape}
        if len(plan) > 1:
            config["env"]["FLUXGATE_SLOW_PLAN"] = json.dumps({c: [f, s] for c, f, s in plan})
    return config


def prepare(options: argparse.Namespace, site: Path) -> tuple[dict[str, Tree], dict[str, dict], dict[str, str]]:
    """Each side's tree (the base's worktree made for --base), worker config (generated distributions under `site`)
    and interpreter (its own venv, made or reused, for --own-envs). Raises SideError (one line naming the side)."""
    import fluxgate

    candidate = Tree.at(options.candidate_tree, CANDIDATE)
    if options.base:
        base = Tree.at(base_worktree(candidate.root, options.base, options.envs_dir / "base"), BASE)
    else:
        base = Tree.at(options.base_tree, BASE)
    trees = {BASE: base, CANDIDATE: candidate}
    installed = Path(fluxgate.__file__).resolve().parent  # the candidate's fluxgate: both sides' in a team's repo
    configs = {name: worker_config(options, tree, name, site / name, installed) for name, tree in trees.items()}
    pythons = {BASE: options.base_python, CANDIDATE: options.candidate_python}
    if options.own_envs:  # both venvs at once: pip mostly waits on unpacking
        with ThreadPoolExecutor(2) as pool:
            made = {name: pool.submit(side_env, options.envs_dir / f"venv-{name}", trees[name].root, options.torch,
                                      name) for name in (BASE, CANDIDATE)}
        pythons = {name: future.result() for name, future in made.items()}
    return trees, configs, pythons


class Side:
    """One side's worker: an execnet gateway to `python` running `fluxgate.ab_worker` in `tree` with
    `config` (its "paths" and "fluxgate": what it imports). Raises SideError (one line naming the side) when it
    cannot start or imported fluxgate from elsewhere than `config["fluxgate"]`."""

    def __init__(self, name: str, tree: Tree, python: str, config: dict):
        import execnet

        from fluxgate import ab_worker

        self.name, self.tree = name, tree
        try:
            self.gateway = execnet.makegateway(f"popen//python={python}//chdir={tree.root}")
            self.channel = self.gateway.remote_exec(ab_worker)
        except Exception as error:  # execnet raises plain exceptions for a missing or broken interpreter
            raise SideError(f"{name} side: cannot start {python}: {type(error).__name__}: {error}") from None
        try:
            self.hello = self.ask(config)
        except SideError:
            self.gateway.exit()
            raise
        expected = Path(config["fluxgate"]).resolve()
        if Path(self.hello["fluxgate"]).resolve().parent != expected:
            self.close()
            raise SideError(f"{name} side: imported fluxgate from {self.hello['fluxgate']}, not {expected}")

    def ask(self, message: dict) -> dict:
        """Send one message, return the answer; SideError for an error answer or a worker that ended."""
        try:
            self.channel.send(message)
            answer = self.channel.receive()
        except Exception as error:  # execnet: RemoteError, EOFError, channel closed
            text = " ".join(str(error).split())[-400:]
            raise SideError(f"{self.name} side: worker failed: {type(error).__name__}: {text}") from None
        if not answer.get("ok"):
            raise SideError(f"{self.name} side: {answer.get('error')}", oom=bool(answer.get("oom")))
        return answer

    def close(self) -> None:
        try:
            self.ask({"op": "close"})
        except SideError:
            pass
        self.gateway.exit()
