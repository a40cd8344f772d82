"""Debian packages for the services that come from the distribution (PostgreSQL, Redis, a JDK)."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Sequence

from devstack.config import StackConfig
from devstack.process import StackError, run_logged, say

# dpkg allows one writer at a time; threads of one `up` queue here, other processes wait on dpkg's own lock.
_APT_LOCK = threading.Lock()
_apt_lists_refreshed = False


def _apt_argv(args: Sequence[str]) -> list[str]:
    argv = ["apt-get", "-o", "DPkg::Lock::Timeout=600", *args]
    if os.geteuid() == 0:
        return argv
    if shutil.which("sudo"):
        return ["sudo", "-n", "--preserve-env=DEBIAN_FRONTEND", *argv]
    raise StackError(f"need root to run: {' '.join(argv)}")


def ensure_apt_packages(cfg: StackConfig, packages: Sequence[str], reason: str) -> None:
    """Install Debian packages non-interactively; refreshes the package lists once if they are stale."""
    global _apt_lists_refreshed
    if not shutil.which("apt-get"):
        raise StackError(f"{reason} needs the Debian packages {' '.join(packages)}, and apt-get is not available")
    log = cfg.log_dir / "install-apt.log"
    env = {"DEBIAN_FRONTEND": "noninteractive", "NEEDRESTART_MODE": "a"}
    install = _apt_argv(["install", "-y", "--no-install-recommends", *packages])
    with _APT_LOCK:
        say(f"installing Debian packages for {reason}: {' '.join(packages)}")
        try:
            run_logged(install, log, f"installing {' '.join(packages)}", env=env)
            return
        except StackError:
            # A fresh machine has no (or outdated) package lists; retry once after refreshing them.
            if _apt_lists_refreshed:
                raise
        _apt_lists_refreshed = True
        run_logged(_apt_argv(["update"]), log, "refreshing the Debian package lists", env=env)
        run_logged(install, log, f"installing {' '.join(packages)}", env=env)


def apt_candidate(package: str) -> bool:
    """True if the package lists know ``package`` (so we can choose between alternatives)."""
    result = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", package],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0 and bool(result.stdout.strip())
