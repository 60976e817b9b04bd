"""The inputs of every image fluxgate makes (fixtures/prompts.toml): the weight seed and each model's fixed set of
cases. Imports nothing heavy (no torch): options are checked against it when pytest starts."""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fluxgate.errors import FixtureError
from fluxgate.storing.names import is_name


@dataclass(frozen=True)
class Case:
    """One image of a model's fixed set (fixtures/prompts.toml): every precision makes it, and the BF16 image of the
    case is the reference its quantized images are compared with."""

    name: str
    prompt: str
    seed: int  # the initial noise
    image: Path | None = None  # an editing model's input image

    def settings(self) -> dict:
        """What decides the image, for the baseline's staleness check: name, prompt, seed and the input image's
        SHA-256 (its content, not its path)."""
        entry = {"name": self.name, "prompt": self.prompt, "seed": self.seed}
        if self.image is not None:
            entry["image_sha256"] = hashlib.sha256(self.image.read_bytes()).hexdigest()[:16]
        return entry

    def input_image(self, size_px: int):
        """The input image as a `size_px` square RGB PIL image (None for a text-to-image case)."""
        if self.image is None:
            return None
        from PIL import Image

        with Image.open(self.image) as image:
            return image.convert("RGB").resize((size_px, size_px), Image.Resampling.LANCZOS)


def _check_image(path: Path, model: str, case: Case) -> None:
    """FixtureError (one line naming the prompts file, the case and the image) unless the input image reads."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(case.image) as image:
            image.verify()
    except FileNotFoundError:
        raise FixtureError(f"{path}: case {case.name!r} of [[{model}]]: input image {case.image} not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise FixtureError(f"{path}: case {case.name!r} of [[{model}]]: input image {case.image} is not a readable "
                           f"image ({error})") from None


def _seed(value) -> int:
    """A seed as the prompts file gives it: a TOML integer that torch's generators take (0 to 2**64 - 1). Raises
    TypeError for anything but an integer (a float such as `inf` or 1.5, a string, a boolean), ValueError out of
    range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"seed {value!r} is not an integer")
    if not 0 <= value < 2 ** 64:
        raise ValueError(f"seed {value} is outside 0 to 2**64 - 1")
    return value


@dataclass(frozen=True)
class Inputs:
    """The weight seed and each model's cases (fixtures/prompts.toml): a `default` set and per-model sets."""

    seed: int
    cases_by_model: dict[str, tuple[Case, ...]]
    source: str = "prompts file"  # where they were read, for errors

    @classmethod
    def from_file(cls, path: Path) -> "Inputs":
        """The inputs in a prompts file. FixtureError (one line naming the file) when it is unreadable or not TOML,
        lacks `seed` or a `[[default]]` case, names a table after no model, a case lacks name/prompt/seed, or two
        cases of a model share a name. Input images are checked for the models a run makes (`check`)."""
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError) as error:
            raise FixtureError(f"{path}: unreadable ({type(error).__name__}: {error})") from None
        except tomllib.TOMLDecodeError as error:
            raise FixtureError(f"{path}: not valid TOML ({error})") from None
        try:
            seed = _seed(data["seed"])
        except (KeyError, TypeError, ValueError) as error:
            raise FixtureError(f"{path}: needs `seed = <int>` (the weight seed) ({type(error).__name__}: "
                               f"{error})") from None
        if "prompts" in data and "default" not in data:
            raise FixtureError(f"{path}: the [prompts] table of fluxgate 0.1 is replaced by cases: [[default]] "
                               "name/prompt/seed (see fixtures/prompts.toml)")
        from fluxgate.models import MODELS

        sets = {}
        for model, entries in data.items():
            if model == "seed":
                continue
            if model != "default" and model not in MODELS:
                raise FixtureError(f"{path}: [[{model}]] names no model (models: {', '.join(MODELS)}; `default` is "
                                   "the set of the others)")
            if not isinstance(entries, list) or not entries:
                raise FixtureError(f"{path}: [[{model}]] must be a list of cases (name, prompt, seed)")
            cases = []
            for index, entry in enumerate(entries):
                try:
                    image = entry.get("image")
                    case = Case(str(entry["name"]), str(entry["prompt"]), _seed(entry["seed"]),
                                None if image is None else (path.parent / image).resolve())
                except (KeyError, TypeError, ValueError, AttributeError) as error:
                    raise FixtureError(f"{path}: case {index + 1} of [[{model}]] needs name, prompt and an integer "
                                       f"seed ({type(error).__name__}: {error})") from None
                if not is_name(case.name):  # it names the case's image file in history and in baselines
                    raise FixtureError(f"{path}: case {index + 1} of [[{model}]]: name {case.name!r} is not a safe "
                                       "file name (letters, digits, '._@+-'; no '/', space or leading '.')")
                cases.append(case)
            names = [case.name for case in cases]
            if len(set(names)) != len(names):
                raise FixtureError(f"{path}: [[{model}]] names a case twice ({', '.join(names)})")
            sets[model] = tuple(cases)
        if "default" not in sets:
            raise FixtureError(f"{path}: needs [[default]] cases (name, prompt, seed)")
        return cls(seed=seed, cases_by_model=sets, source=str(path))

    def check(self, models: list[str], counts: dict[str, int | None] | None = None) -> None:
        """FixtureError (one line naming the prompts file) unless each of `models` has the cases it will make
        (`counts`: model -> how many, None: its set) and their input images read."""
        for model in models:
            for case in self.cases(model, (counts or {}).get(model)):
                if case.image is not None:
                    _check_image(Path(self.source), model, case)

    def cases(self, model: str, count: int | None = None) -> tuple[Case, ...]:
        """The first `count` cases of `model` (all for None). FixtureError when the file holds fewer."""
        cases = self.cases_by_model.get(model, self.cases_by_model["default"])
        if count is not None and len(cases) < count:
            raise FixtureError(f"{self.source}: {model} has {len(cases)} case(s), its profile makes {count}")
        return cases if count is None else cases[:count]
