"""Profiles: complete params files under ``profiles/`` that a run installs as params.yaml.

Why copy instead of pointing DVC at another file: dvc.yaml reads params.yaml and
dvc.lock records the values each stage used, so a copied profile is tracked like
a hand edit (``git diff params.yaml``, ``dvc params diff``) — exactly what
``cp profiles/paper.yaml params.yaml && dvc repro`` does, but validated first, so
a broken profile stops the run before it replaces anything.
"""

from __future__ import annotations

from pathlib import Path

from selfcal.artifacts import atomic_write_text
from selfcal.config import DEFAULT_PARAMS, parse_params, read_yaml
from selfcal.errors import ConfigError

PROFILE_DIR = Path("profiles")


def known_profiles(root: Path) -> list[str]:
    return sorted(p.stem for p in (Path(root) / PROFILE_DIR).glob("*.yaml"))


def resolve_profile(root: Path, profile: str) -> Path:
    """``paper`` means profiles/paper.yaml; anything with a slash or suffix is a path from ``root``."""
    looks_like_path = "/" in profile or profile.endswith((".yaml", ".yml"))
    path = Path(root) / (profile if looks_like_path else PROFILE_DIR / f"{profile}.yaml")
    if not path.is_file():
        raise ConfigError(f"profile '{profile}': {path} not found; known profiles: {known_profiles(root)}")
    return path


def _load(root: Path, profile: str):
    path = resolve_profile(root, profile)
    text = path.read_text()
    data = read_yaml(text, source=path)
    # Relative paths in it resolve from the workspace root, as they will in params.yaml.
    params = parse_params(data, source=str(path), root=Path(root).resolve())
    dvc_yaml = Path(root) / "dvc.yaml"
    if dvc_yaml.is_file():  # every key the stages read or interpolate, spelt out (DVC knows no defaults)
        from selfcal.pipeline.check import check_dvc_params

        check_dvc_params(path, dvc_yaml, data)
    return path, text, params


def read_profile(root: Path, profile: str) -> str:
    """The profile's text, once it validates as the params.yaml it would become (the schema and the keys
    dvc.yaml reads: what holds on any machine; ``check_profile`` also checks this one's model and files)."""
    return _load(root, profile)[1]


def check_profile(root: Path, profile: str) -> tuple[str, str]:
    """The profile's text and ``selfcal check``'s summary of it: everything the guard stage would refuse
    (a missing model or data file, a context too short...) refused before the profile replaces anything."""
    from selfcal.pipeline.check import check

    path, text, params = _load(root, profile)
    return text, check(params, path)


def apply_profile(root: Path, profile: str) -> tuple[bool, str]:
    """Check the profile as ``selfcal check`` would, then make it params.yaml. Returns whether params.yaml
    changed, and the check's summary."""
    text, summary = check_profile(root, profile)
    target = Path(root) / DEFAULT_PARAMS
    if target.is_file() and target.read_text() == text:
        return False, summary
    atomic_write_text(target, text)
    return True, summary
