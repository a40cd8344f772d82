"""transforms/artifacts.py names every artifact path, for Python and the shell scripts alike."""

import re
import subprocess
import sys
from pathlib import Path

import apache_beam
import pytest

from pipelines import local_runner
from transforms import artifacts

ROOT = Path(__file__).resolve().parents[2]


def test_the_pin_in_requirements_is_the_installed_beam():
    assert artifacts.beam_version() == apache_beam.__version__


def test_prism_has_a_version_of_its_own():
    # Prism is a separate program the SDK talks to over the Fn API: it may run a newer Beam than the pin.
    assert re.fullmatch(r"\d+\.\d+\.\d+", artifacts.prism_version())
    script = str(ROOT / "transforms" / "artifacts.py")
    result = subprocess.run(["python3", script, "prism-version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == artifacts.prism_version()


def test_every_path_is_under_the_one_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGAGEMENT_CACHE_DIR", str(tmp_path))
    version = artifacts.beam_version()
    prism = f"{artifacts.prism_version()}-{artifacts.prism_patches_digest()}"
    assert artifacts.cache_root() == tmp_path
    assert artifacts.prism_binary() == tmp_path / "prism" / prism / "prism"
    assert artifacts.assembled_jar("kafka").parent == tmp_path / "beam-java" / version / "kafka"
    assert artifacts.bigquery_emulator_dir().parent == tmp_path
    assert artifacts.jvm_dir().parent == tmp_path


def test_the_prism_path_names_the_patches():
    digest = artifacts.prism_patches_digest()
    assert len(digest) == 12
    assert digest != "none"  # the project keeps patches; a build without them must never be picked


def test_builds_of_other_patches_or_versions_are_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGAGEMENT_CACHE_DIR", str(tmp_path))
    current = artifacts.prism_dir()
    old_patches = tmp_path / "prism" / f"{artifacts.prism_version()}-000000000000"
    unpatched = tmp_path / "prism" / artifacts.beam_version()  # the path the backfill once used
    # The same patches built at the SDK's version, as before Prism had a version of its own.
    other_version = tmp_path / "prism" / f"0.0.0-{artifacts.prism_patches_digest()}"
    for directory in (current, old_patches, unpatched, other_version):
        directory.mkdir(parents=True)
    assert artifacts.stale_prism_builds() == sorted([old_patches, unpatched, other_version])


def test_the_shell_gets_the_same_path_as_python(tmp_path):
    env = {"ENGAGEMENT_CACHE_DIR": str(tmp_path), "HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    # Any python3 without the project's virtualenv: the Dockerfile's build stage runs it that way.
    result = subprocess.run(
        ["python3", str(ROOT / "transforms" / "artifacts.py"), "prism-binary"],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    expected = tmp_path / "prism" / f"{artifacts.prism_version()}-{artifacts.prism_patches_digest()}" / "prism"
    assert result.stdout.strip() == str(expected)


def test_an_unknown_command_exits_2():
    result = subprocess.run(
        [sys.executable, str(ROOT / "transforms" / "artifacts.py"), "nonsense"], capture_output=True, check=False
    )
    assert result.returncode == 2


def test_a_missing_prism_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGAGEMENT_CACHE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="run scripts/fetch-beam-artifacts prism") as raised:
        local_runner.prism_binary()
    assert str(tmp_path) in str(raised.value)


def test_no_script_spells_an_artifact_path_itself():
    # The backfill once built prism/<version>/prism by hand and ran an unpatched Prism.
    for script in (path for path in (ROOT / "scripts").iterdir() if path.is_file()):
        code = [line for line in script.read_text(errors="replace").splitlines() if not line.lstrip().startswith("#")]
        assert not [line for line in code if "/prism/" in line or ".cache/engagement-pipeline" in line], script.name
