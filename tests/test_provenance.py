"""ospo.provenance: overrides, resolved config, git commit and versions of a run."""

import json
import platform
import subprocess

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from ospo.provenance import (
    PACKAGES,
    git_state,
    hydra_overrides,
    package_versions,
    provenance,
    resolved_config,
)


def _git(root, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(root), *args],
        check=True,
        capture_output=True,
    )


def test_no_commit_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no checkout above
    assert git_state(tmp_path) == {"commit": None, "dirty": None}
    assert provenance(OmegaConf.create({"seed": 0}), root=tmp_path)["commit"] is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert git_state() == {"commit": None, "dirty": None}


def test_commit_and_dirty_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "commit", "-q", "-m", "a")
    head = subprocess.run(
        ["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert len(head) == 40
    assert git_state(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_state(tmp_path) == {"commit": head, "dirty": True}
    _git(tmp_path, "checkout", "-q", "a.py")
    (tmp_path / "new.py").write_text("")  # an untracked file is a difference too
    assert git_state(tmp_path)["dirty"] is True


def test_package_versions():
    versions = package_versions()
    assert list(versions) == ["python", *PACKAGES]
    assert versions["python"] == platform.python_version()
    assert versions["torch"] == torch.__version__
    assert package_versions(("no-such-package-ospo",)) == {
        "python": platform.python_version(),
        "no-such-package-ospo": None,
    }


def test_resolved_config_drops_hydra_and_resolves(monkeypatch):
    monkeypatch.setenv("OSPO_TEST_DIR", "/data/x")
    cfg = OmegaConf.create(
        {
            "seed": 3,
            "rl": {"seed": "${seed}", "dir": "${oc.env:OSPO_TEST_DIR}/runs"},
            "hydra": {"job": {"name": "${nope}"}},
        }
    )
    assert resolved_config(cfg) == {"seed": 3, "rl": {"seed": 3, "dir": "/data/x/runs"}}
    assert "hydra" in cfg  # the config itself is left as it was
    broken = OmegaConf.create({"seed": 3, "a": "${seed}", "b": "${hydra:runtime.output_dir}"})
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    assert resolved_config(broken) == {
        "seed": 3,
        "a": "${seed}",
        "b": "${hydra:runtime.output_dir}",
    }


def test_overrides_of_the_composed_config(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg(["baseline=grpo", "seed=7"])
    assert hydra_overrides() == ["baseline=grpo", "seed=7", f"cache_dir={tmp_path / 'cache'}"]
    made = provenance(cfg, hydra_overrides())
    assert set(made) == {"overrides", "config", "commit", "dirty", "versions"}
    assert made["config"]["seed"] == 7 and made["config"]["baseline"]["name"] == "grpo"
    assert made["config"]["cache_dir"] == str(tmp_path / "cache")
    assert "${" not in json.dumps(made["config"])  # every interpolation resolved
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # composed without Hydra
    assert hydra_overrides() == []
    assert provenance(cfg)["overrides"] == []


def test_provenance_of_this_checkout_is_json(make_cfg):
    made = provenance(make_cfg(["logger=csv"]), ["logger=csv"])
    assert json.loads(json.dumps(made)) == made  # what write_json keeps
    if made["commit"] is None:  # tests run from a copy without .git
        assert made["dirty"] is None
    else:
        assert len(made["commit"]) == 40 and isinstance(made["dirty"], bool)
