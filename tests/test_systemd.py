"""The systemd unit verifies, is hardened (exposure at most MEDIUM), and install.sh lays everything out."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from pacs_ai.config import load_config

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "pacs-ai.service"
EXEC = "/opt/pacs-ai/venv/bin/pacs-ai"
# systemd-analyze's exposure levels, best first (src/analyze/analyze-security.c)
LEVELS = ("PERFECT", "SAFE", "OK", "MEDIUM", "EXPOSED", "UNSAFE", "DANGEROUS")

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def _settings(path: Path) -> dict[str, list[str]]:
    """``Key=`` -> every value given in the [Service] section (in order)."""
    section, settings = "", {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}{key.strip()}", []).append(value.strip())
    return settings


def test_unit_settings():
    s = {k.removeprefix("[Service]"): v for k, v in _settings(UNIT).items()}
    expect = {
        "Type": "notify", "NotifyAccess": "main", "Restart": "on-failure", "User": "pacs-ai",
        "DynamicUser": "no", "StateDirectory": "pacs-ai", "ConfigurationDirectory": "pacs-ai",
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
        "NoNewPrivileges": "yes", "ReadWritePaths": "/var/lib/pacs-ai", "CapabilityBoundingSet": "",
        "SystemCallArchitectures": "native", "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "UMask": "0027", "ExecStart": f"{EXEC} serve --config /etc/pacs-ai/pacs-ai.toml",
    }
    for key, value in expect.items():
        assert s.get(key) == [value], key
    assert "@system-service" in s["SystemCallFilter"]
    assert int(s["WatchdogSec"][0].rstrip("s")) > 0 and int(s["TimeoutStopSec"][0].rstrip("s")) > 0
    # off on purpose: torch's oneDNN JIT needs W+X memory (explained in the unit)
    assert "MemoryDenyWriteExecute" not in s


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )


@needs_analyze
def test_systemd_analyze_verify(tmp_path):
    # The real unit names a binary that only exists after `make install`: verify a copy whose ExecStart
    # points at an existing executable, and check that the original's only complaint is that binary.
    copy = tmp_path / "pacs-ai.service"
    copy.write_text(UNIT.read_text().replace(f"ExecStart={EXEC}", "ExecStart=/bin/true"))
    result = _verify(copy)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    if not Path(EXEC).exists():
        original = _verify(UNIT)
        complaints = [line for line in original.stderr.splitlines() if line.strip()]
        assert complaints and all(EXEC in line for line in complaints), original.stderr


def _exposure(unit: Path) -> tuple[float, str]:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60,
    )
    match = re.search(r"Overall exposure level for pacs-ai\.service:\s*([0-9.]+)\s+([A-Z]+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    return float(match.group(1)), match.group(2)


@needs_analyze
def test_security_exposure_at_most_medium():
    score, level = _exposure(UNIT)
    print(f"systemd-analyze security: exposure {score} {level}")
    assert level in LEVELS[: LEVELS.index("MEDIUM") + 1] and score < 7.0, (score, level)


@needs_analyze
@pytest.mark.parametrize("name", ["gpu", "port104", "worker-only"])
def test_drop_ins_verify_and_stay_at_most_medium(tmp_path, name):
    # A drop-in is parsed after the unit, so unit + drop-in in one file has the same meaning.
    merged = tmp_path / "pacs-ai.service"
    text = UNIT.read_text() + "\n" + (REPO / "systemd" / "drop-ins" / f"{name}.conf").read_text()
    merged.write_text(text.replace(f"ExecStart={EXEC}", "ExecStart=/bin/true"))
    result = _verify(merged)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    score, level = _exposure(merged)
    print(f"with drop-in {name}: exposure {score} {level}")
    assert level in LEVELS[: LEVELS.index("MEDIUM") + 1], (score, level)


def _fake_tools(folder: Path, log: Path) -> dict[str, str]:
    """PATH with systemctl/useradd/systemd-sysusers/systemd-tmpfiles replaced by loggers."""
    folder.mkdir()
    for tool in ("systemctl", "useradd", "systemd-sysusers", "systemd-tmpfiles", "chown", "chgrp"):
        script = folder / tool
        script.write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {log}\n")
        script.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"}


def test_install_into_destdir(tmp_path):
    model = tmp_path / "models" / "reference"
    model.mkdir(parents=True)
    (model / "model.json").write_text("{}")
    dest, calls = tmp_path / "root", tmp_path / "calls.log"
    env = _fake_tools(tmp_path / "bin", calls)
    env.update(DESTDIR=str(dest), SKIP_VENV="1", MODEL_DIR=str(model))
    result = subprocess.run(
        ["bash", str(REPO / "systemd" / "install.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not calls.exists(), calls.read_text()  # nothing started, no user created, nothing chowned
    assert (dest / "etc/systemd/system/pacs-ai.service").read_text() == UNIT.read_text()
    assert (dest / "etc/sysusers.d/pacs-ai.conf").is_file() and (dest / "etc/tmpfiles.d/pacs-ai.conf").is_file()
    assert (dest / "opt/pacs-ai/models/reference/model.json").is_file()
    assert (dest / "var/lib/pacs-ai").is_dir()
    assert (dest / "opt/pacs-ai/systemd/drop-ins/gpu.conf").is_file()
    conf = dest / "etc/pacs-ai/pacs-ai.toml"
    assert conf.stat().st_mode & 0o777 == 0o640
    table = tomllib.loads(conf.read_text())
    assert table["storage"]["data_dir"] == "/var/lib/pacs-ai"
    assert table["model"]["path"] == ["/opt/pacs-ai/models/reference"]
    config = load_config(conf)
    assert config.storage.data_dir == Path("/var/lib/pacs-ai")
    assert config.model.path == (Path("/opt/pacs-ai/models/reference"),)
    # a second run keeps the admin's edited configuration and writes the new default next to it
    conf.write_text(conf.read_text().replace('port = 11112', 'port = 11113'))
    again = subprocess.run(
        ["bash", str(REPO / "systemd" / "install.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0 and "port = 11113" in conf.read_text()
    assert (conf.parent / "pacs-ai.toml.new").is_file()


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None or os.geteuid() != 0,
    reason="needs systemd-sysusers and systemd-tmpfiles, as root",
)
def test_sysusers_and_tmpfiles_snippets(tmp_path):
    (tmp_path / "etc").mkdir()
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(REPO / "systemd/pacs-ai.sysusers.conf")],
        check=True, capture_output=True, timeout=60,
    )
    entry = next(line for line in (tmp_path / "etc/passwd").read_text().splitlines() if line.startswith("pacs-ai:"))
    name, _, uid, gid, _, home, shell = entry.split(":")
    assert int(uid) < 1000 and home == "/var/lib/pacs-ai" and shell.endswith("nologin")
    subprocess.run(
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(REPO / "systemd/pacs-ai.tmpfiles.conf")],
        check=True, capture_output=True, timeout=60,
    )
    state = (tmp_path / "var/lib/pacs-ai").stat()
    assert state.st_uid == int(uid) and state.st_mode & 0o777 == 0o750
