"""The input files a run reads when the command line names none: the repository's own under `fixtures/` where it has
them, else the ones fluxgate ships (`fluxgate/data/`), so a team's first run from an empty repository has prompts,
an editing model's input images and decision prices without copying anything."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).parent / "data"
PACKAGED = {"prompts": DATA / "prompts.toml", "decision": DATA / "decision.toml"}
# Where a repository keeps its own copy (relative to pytest's rootdir or the command's working folder).
IN_REPOSITORY = {"prompts": Path("fixtures/prompts.toml"), "decision": Path("fixtures/decision.toml")}
MODELS_FILE = Path("fixtures/models.toml")  # the real profile's checkpoints: the user's own, never shipped


def input_file(kind: str, root: Path | None = None) -> Path:
    """The `kind` ("prompts", "decision") file a run uses by default: `<root>/fixtures/<kind>.toml` if it exists,
    else the packaged one."""
    own = (root or Path.cwd()) / IN_REPOSITORY[kind]
    return own if own.is_file() else PACKAGED[kind]


def describe(kind: str) -> str:
    """How `--help` states the default: "fixtures/prompts.toml if present, else fluxgate's own"."""
    return f"{IN_REPOSITORY[kind]} if the repository has one, else fluxgate's own ({PACKAGED[kind].name})"
