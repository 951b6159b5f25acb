"""How a result was made: overrides, resolved config, git commit and package versions.

`python train.py` adds these keys to each `summary.json` (`ospo.rl.run_train`), so that a kept
result can be traced to its command, its code and its environment without its run folder.
Collected when the run starts, i.e. for the code the run imported, not what the checkout holds
when it ends. Nothing here raises on a missing git, checkout or package: it records null.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("ospo")

PACKAGES: tuple[str, ...] = (
    "torch",
    "transformers",
    "peft",
    "pytorch_lightning",
    "bm25s",
    "sentence_transformers",
    "numpy",
)
"""Distributions whose versions change results (transformers and peft are unpinned)."""

SOURCE_DIR = Path(__file__).resolve().parent
"""The folder of the `ospo` package: its git checkout is the code that ran."""


def hydra_overrides() -> list[str]:
    """The job's command-line overrides (`hydra.overrides.task`); [] when Hydra did not compose
    the config (e.g. `ospo.config.compose_config`), which keeps no record of them."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return [str(o) for o in HydraConfig.get().overrides.task]
    except ValueError:  # HydraConfig was not set
        return []


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """`cfg` as plain containers with interpolations resolved, without the `hydra` node (present
    when composed with `return_hydra_config`). Values like `${oc.env:HOME}` become this machine's
    paths. Where some interpolation cannot be resolved, the config is kept as written."""
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # an unresolvable interpolation must not lose the summary
        log.warning("config recorded unresolved: %s", err)
        return OmegaConf.to_container(cfg, resolve=False)


def _git(root: Path, *args: str) -> str | None:
    """Stdout of `git -C root <args>`, or None when git is missing, fails or hangs."""
    try:
        proc = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_state(root: str | Path = SOURCE_DIR) -> dict[str, Any]:
    """`{"commit": HEAD of the checkout holding root, "dirty": whether git status --porcelain
    lists anything (uncommitted or untracked files)}`; both None outside a checkout or without
    git."""
    head = _git(Path(root), "rev-parse", "HEAD")
    if head is None:
        return {"commit": None, "dirty": None}
    status = _git(Path(root), "status", "--porcelain")
    return {"commit": head.strip(), "dirty": None if status is None else bool(status.strip())}


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Python's version and each installed distribution's (None when not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance(
    cfg: DictConfig, overrides: list[str] | None = None, root: str | Path = SOURCE_DIR
) -> dict[str, Any]:
    """The summary keys that say how a run was made: `overrides` (list of str; [] when
    unknown), `config` (:func:`resolved_config`), `commit` and `dirty` (:func:`git_state` of
    `root`) and `versions` (:func:`package_versions`)."""
    return {
        "overrides": list(overrides or []),
        "config": resolved_config(cfg),
        **git_state(root),
        "versions": package_versions(),
    }
