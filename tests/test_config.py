"""Configuration: wrong keys, types and values stop start-up with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs_ai.config import REPO_ROOT, default_config, load_config
from pacs_ai.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pacs-ai.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_example_config_loads_and_resolves_paths_against_its_folder() -> None:
    example = REPO_ROOT / "config" / "pacs-ai.toml"
    config = load_config(example)
    assert config.listener.ae_title == "PACSAI"
    assert (config.listener.host, config.listener.port) == ("127.0.0.1", 11112)
    assert config.storage.data_dir == (example.parent / "../var").resolve()
    assert config.database_url == f"sqlite:///{config.storage.data_dir / 'pacs-ai.db'}"
    assert config.storage.spool == config.storage.data_dir / "spool"
    assert config.source == example.resolve()


def test_defaults() -> None:
    config = default_config(Path("/srv/x"))
    assert config.listener.allowed_calling_aets == ()
    assert config.storage.data_dir == Path("/srv/x/pacs-ai-data")
    assert config.destinations == ()


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    path = sub / "c.toml"
    path.write_text('[storage]\ndata_dir = "data"\nspool_dir = "../spool"\n[database]\nurl = ""\n')
    config = load_config(path)
    assert config.storage.data_dir == sub / "data"
    assert config.storage.spool == tmp_path / "spool"
    assert config.database_url == f"sqlite:///{sub / 'data' / 'pacs-ai.db'}"


def test_destinations_and_allow_list(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            '[listener]\nallowed_calling_aets = ["ROUTER", "MODALITY1"]\nmax_associations = 3\n'
            '[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = 4242\n',
        )
    )
    assert config.listener.allowed_calling_aets == ("ROUTER", "MODALITY1")
    assert config.listener.max_associations == 3
    assert [(d.name, d.ae_title, d.port) for d in config.destinations] == [("pacs", "ORTHANC", 4242)]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[listener]\nae_titel = "X"\n', "listener.ae_titel"),  # unknown key
        ('[listner]\nport = 1\n', "listner"),  # unknown table
        ('[listener]\nport = "11112"\n', "listener.port"),  # wrong type
        ("[listener]\nport = 70000\n", "listener.port"),  # out of range
        ("[listener]\nport = true\n", "listener.port"),  # bool is not an int
        ('[listener]\nae_title = "A_TITLE_LONGER_THAN_16"\n', "listener.ae_title"),
        ('[listener]\nallowed_calling_aets = "ROUTER"\n', "listener.allowed_calling_aets"),
        ("[listener]\nmax_associations = 0\n", "listener.max_associations"),
        ('[model]\ndevice = "tpu"\n', "model.device"),
        ("[worker]\nmax_attempts = -1\n", "worker.max_attempts"),
        ('[worker]\nbackoff_base_s = "10s"\n', "worker.backoff_base_s"),
        ('[storage]\ndata_dir = ""\n', "storage.data_dir"),
        ('[[destinations]]\nname = "a"\nae_title = "A"\nhost = "h"\n', "destinations[0].port"),
        (
            '[[destinations]]\nname = "a"\nae_title = "A"\nhost = "h"\nport = 1\n'
            '[[destinations]]\nname = "a"\nae_title = "B"\nhost = "h"\nport = 2\n',
            "destinations[1].name",  # the second of the duplicates is the one named
        ),
        ('[[destinations]]\nname = "a"\nae_title = "A"\nhost = "h"\nport = 1\ncolour = 1\n', "destinations[0].colour"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.key == key
    assert key in str(info.value)


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[listener\nport = 1\n"))
