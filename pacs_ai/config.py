"""Configuration: one TOML file, validated eagerly into frozen dataclasses.

``load_config(path)`` reads ``path`` (or returns the embedded defaults when ``path`` is None). A wrong key,
type or value raises :class:`~pacs_ai.errors.ConfigError` naming the key. Relative paths are resolved
against the folder of the config file (against the current directory for the embedded defaults).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacs_ai.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = REPO_ROOT / "models" / "reference"


@dataclass(frozen=True)
class TlsConfig:
    """DICOM TLS. ``ca_file`` set on the listener means mutual TLS (client certificates required)."""

    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None


@dataclass(frozen=True)
class ListenerConfig:
    ae_title: str = "PACSAI"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()
    max_associations: int = 10
    max_pdu_size: int = 0
    network_timeout_s: float = 60.0
    tls: TlsConfig | None = None


@dataclass(frozen=True)
class StorageConfig:
    data_dir: Path = Path("pacs-ai-data")
    spool_dir: Path | None = None
    results_dir: Path | None = None
    outbox_dir: Path | None = None
    retention_days: float = 30.0

    @property
    def spool(self) -> Path:
        return self.spool_dir or self.data_dir / "spool"

    @property
    def results(self) -> Path:
        return self.results_dir or self.data_dir / "results"

    @property
    def outbox(self) -> Path:
        return self.outbox_dir or self.data_dir / "outbox"


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = ""
    busy_timeout_s: float = 10.0


@dataclass(frozen=True)
class ModelConfig:
    path: tuple[Path, ...] = (BUNDLED_MODEL,)
    shadow: tuple[Path, ...] = ()
    """Shadow model folders: scored on every analysed image in the same pass, stored, never sent."""
    device: str = "auto"
    batch_size: int = 8
    threads: int = 0


@dataclass(frozen=True)
class WorkerConfig:
    enabled: bool = True
    separate_process: bool = True
    niceness: int = 10
    poll_interval_s: float = 0.5
    lease_seconds: float = 300.0
    max_attempts: int = 5
    backoff_base_s: float = 10.0
    backoff_max_s: float = 3600.0


@dataclass(frozen=True)
class DeliveryConfig:
    poll_interval_s: float = 1.0
    max_attempts: int = 10
    backoff_base_s: float = 15.0
    backoff_max_s: float = 3600.0
    timeout_s: float = 30.0
    calling_ae_title: str = ""
    keep_open_s: float = 5.0
    associations: int = 1
    """Associations per destination used at once for one job's result objects (2: SC and SR side by
    side, each association kept open like the first); 1 = one association, the objects in turn."""


@dataclass(frozen=True)
class Destination:
    name: str
    ae_title: str
    host: str
    port: int
    tls: TlsConfig | None = None


@dataclass(frozen=True)
class LoggingConfig:
    format: str = "plain"
    level: str = "INFO"
    log_phi: bool = False
    audit_file: Path | None = None


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9110


@dataclass(frozen=True)
class RoutingRuleConfig:
    """One ``[[routing.rules]]`` entry (see pacs_ai/route/rules.py for the matching semantics)."""

    name: str
    action: str = "skip"
    modality: tuple[str, ...] = ()
    sop_class: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    view_position: tuple[str, ...] = ()
    laterality: tuple[str, ...] = ()
    calling_aet: tuple[str, ...] = ()
    series_description: tuple[str, ...] = ()
    protocol_name: tuple[str, ...] = ()
    min_age_years: float | None = None
    max_age_years: float | None = None


@dataclass(frozen=True)
class RoutingConfig:
    """Which images are analysed: configured rules first, then the model card's intended use."""

    intended_use: bool = True
    unknown_body_part: str = "analyse"
    rules: tuple[RoutingRuleConfig, ...] = ()


@dataclass(frozen=True)
class DashboardConfig:
    """The admin web page on the metrics port (``metrics.host:metrics.port``, path ``/``).

    Without ``admin_token`` the page is read-only; with it, signing in with the token allows actions
    (retry of dead jobs and deliveries). ``show_phi`` lets a signed-in admin (anyone, when no token is
    set and the page is bound to loopback) see patient name and ID and the DICOM UIDs of each job.
    ``thumbnails`` shows the heat-map overlay of each job (the image pixels: turn it off where images
    carry burned-in patient data). ``refresh_s`` is the page's refresh period (0: no auto-refresh).
    """

    enabled: bool = True
    admin_token: str = ""
    show_phi: bool = False
    thumbnails: bool = True
    recent_jobs: int = 25
    refresh_s: float = 5.0


@dataclass(frozen=True)
class StudiesConfig:
    """Study grouping: a study is complete ``quiet_period_s`` after its last image (or when forced)."""

    enabled: bool = True
    quiet_period_s: float = 60.0
    rule: str = ""
    """Study rule (max, mean, noisy_or); empty: the model card's ``study`` section (else max)."""
    poll_interval_s: float = 2.0


@dataclass(frozen=True)
class Config:
    listener: ListenerConfig = field(default_factory=ListenerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    destinations: tuple[Destination, ...] = ()
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    studies: StudiesConfig = field(default_factory=StudiesConfig)
    source: Path | None = None

    @property
    def database_url(self) -> str:
        """The database URL, defaulting to SQLite under ``data_dir``."""
        return self.database.url or f"sqlite:///{self.storage.data_dir / 'pacs-ai.db'}"


_CHOICES: dict[str, tuple[str, ...]] = {
    "model.device": ("auto", "cpu", "cuda"),
    "logging.format": ("plain", "json"),
    "logging.level": ("DEBUG", "INFO", "WARNING", "ERROR"),
    "routing.unknown_body_part": ("analyse", "skip"),
    "studies.rule": ("", "max", "mean", "noisy_or"),
}


def _check_value(key: str, value: Any) -> None:
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(key, f"must be one of {', '.join(_CHOICES[key])}, not {value!r}")
    name = key.rsplit(".", 1)[-1]
    if name == "port" and not 0 < value < 65536:
        raise ConfigError(key, f"must be a TCP port between 1 and 65535, not {value}")
    if name in ("ae_title", "calling_ae_title") and (
        len(value) > 16 or (name == "ae_title" and not value.strip()) or "\\" in value
    ):
        raise ConfigError(key, f"must be a DICOM AE title of 1 to 16 characters, not {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        positive = ("max_associations", "batch_size", "max_attempts", "lease_seconds", "timeout_s", "busy_timeout_s", "associations")
        if name in positive and value <= 0:
            raise ConfigError(key, f"must be greater than 0, not {value}")
        if value < 0:
            raise ConfigError(key, f"must not be negative, not {value}")


def _convert(key: str, tp: Any, raw: Any, base: Path) -> Any:
    """Convert one TOML value to the annotated type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(key, args[0], raw, base)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        items = raw if isinstance(raw, list) else [raw] if item is Path and isinstance(raw, str) else None
        if items is None:
            raise ConfigError(key, f"must be a list, not {type(raw).__name__}")
        return tuple(_convert(f"{key}[{i}]", item, v, base) for i, v in enumerate(items))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(raw, dict):
            raise ConfigError(key, f"must be a table, not {type(raw).__name__}")
        return _build(tp, raw, key, base)
    if tp is Path:
        if not isinstance(raw, str) or not raw:
            raise ConfigError(key, "must be a non-empty path string")
        path = Path(raw).expanduser()
        return path if path.is_absolute() else (base / path).resolve()
    if tp is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ConfigError(key, f"must be a number, not {type(raw).__name__}")
        value: Any = float(raw)
    elif tp is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(key, f"must be an integer, not {type(raw).__name__}")
        value = raw
    elif tp is bool:
        if not isinstance(raw, bool):
            raise ConfigError(key, f"must be true or false, not {raw!r}")
        value = raw
    elif tp is str:
        if not isinstance(raw, str):
            raise ConfigError(key, f"must be a string, not {type(raw).__name__}")
        value = raw
    else:  # pragma: no cover - a programming error in the dataclasses above
        raise TypeError(f"unsupported config type {tp!r} for {key}")
    _check_value(key, value)
    return value


def _build(cls: type, table: dict[str, Any], prefix: str, base: Path) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs: dict[str, Any] = {}
    for key, raw in table.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(full, f"unknown key (known: {', '.join(sorted(names))})")
        kwargs[key] = _convert(full, hints[key], raw, base)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        raise ConfigError(f"{prefix}.{missing[0]}" if missing else prefix, "is required") from exc


def _validate(config: Config) -> Config:
    names = [d.name for d in config.destinations]
    for i, name in enumerate(names):
        if not name.strip():
            raise ConfigError(f"destinations[{i}].name", "must not be empty")
        if name in names[:i]:
            raise ConfigError(f"destinations[{i}].name", f"duplicate destination name {name!r}")
    for key, tls in [("listener.tls", config.listener.tls)] + [
        (f"destinations[{i}].tls", d.tls) for i, d in enumerate(config.destinations)
    ]:
        if tls is None:
            continue
        if key == "listener.tls" and (tls.cert_file is None or tls.key_file is None):
            raise ConfigError(key, "the listener needs both cert_file and key_file")
        if (tls.cert_file is None) != (tls.key_file is None):
            raise ConfigError(key, "cert_file and key_file go together")
    for i, aet in enumerate(config.listener.allowed_calling_aets):
        if not aet.strip() or len(aet) > 16 or "\\" in aet:
            raise ConfigError(
                f"listener.allowed_calling_aets[{i}]", f"must be a DICOM AE title of 1 to 16 characters, not {aet!r}"
            )
    if not config.model.path:
        raise ConfigError("model.path", "must name at least one model folder")
    _validate_routing(config.routing)
    _validate_dashboard(config)
    if config.studies.poll_interval_s <= 0:
        raise ConfigError("studies.poll_interval_s", f"must be greater than 0, not {config.studies.poll_interval_s}")
    return config


def _validate_routing(routing: RoutingConfig) -> None:
    from pacs_ai.route.body_part import GENERIC_TERMS, SYNONYMS
    from pacs_ai.route.rules import resolve_sop_class

    known_parts = set(SYNONYMS) | set(GENERIC_TERMS) | {"UNKNOWN"}
    seen: set[str] = set()
    for i, rule in enumerate(routing.rules):
        key = f"routing.rules[{i}]"
        if not rule.name.strip():
            raise ConfigError(f"{key}.name", "must not be empty")
        if rule.name in seen:
            raise ConfigError(f"{key}.name", f"duplicate rule name {rule.name!r}")
        if rule.name.startswith("intended_use") or rule.name == "default":
            raise ConfigError(f"{key}.name", f"{rule.name!r} is reserved for the model card's criteria")
        seen.add(rule.name)
        if rule.action not in ("analyse", "skip"):
            raise ConfigError(f"{key}.action", f"must be one of analyse, skip, not {rule.action!r}")
        for j, value in enumerate(rule.sop_class):
            try:
                resolve_sop_class(value)
            except ValueError as exc:
                raise ConfigError(f"{key}.sop_class[{j}]", str(exc)) from exc
        for j, value in enumerate(rule.body_part):
            if value.upper() not in known_parts:
                raise ConfigError(
                    f"{key}.body_part[{j}]", f"unknown body part {value!r} (known: {', '.join(sorted(known_parts))})"
                )
        for name in ("modality", "view_position", "laterality", "calling_aet", "series_description", "protocol_name"):
            for j, value in enumerate(getattr(rule, name)):
                if not value.strip():
                    raise ConfigError(f"{key}.{name}[{j}]", "must not be empty")
        lo, hi = rule.min_age_years, rule.max_age_years
        if lo is not None and hi is not None and lo >= hi:
            raise ConfigError(f"{key}.max_age_years", f"must be greater than min_age_years ({lo:g}), not {hi:g}")


ADMIN_TOKEN_MIN_CHARS = 16


def is_loopback(host: str) -> bool:
    """True when ``host`` (an address or ``localhost``) only accepts connections from this machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost, or "" (all interfaces)
        return False


def _validate_dashboard(config: Config) -> None:
    dashboard = config.dashboard
    token = dashboard.admin_token
    if token and (len(token) < ADMIN_TOKEN_MIN_CHARS or token != token.strip() or any(c.isspace() for c in token)):
        raise ConfigError(
            "dashboard.admin_token",
            f"must be at least {ADMIN_TOKEN_MIN_CHARS} characters without spaces "
            "(e.g. the output of `python3 -c 'import secrets; print(secrets.token_urlsafe(24))'`)",
        )
    if not 1 <= dashboard.recent_jobs <= 500:
        raise ConfigError("dashboard.recent_jobs", f"must be between 1 and 500, not {dashboard.recent_jobs}")
    if 0 < dashboard.refresh_s < 1:
        raise ConfigError("dashboard.refresh_s", f"must be 0 (no refresh) or at least 1 second, not {dashboard.refresh_s}")
    if config.metrics.enabled and dashboard.enabled and not token and not is_loopback(config.metrics.host):
        raise ConfigError(
            "dashboard.admin_token",
            f"is required when the dashboard is served beyond loopback (metrics.host = {config.metrics.host!r}): "
            "set an admin token, bind metrics.host to 127.0.0.1, or set dashboard.enabled = false",
        )


def default_config(base: Path | None = None) -> Config:
    """The embedded defaults: SQLite and spool under ./pacs-ai-data, the bundled model, 127.0.0.1:11112."""
    base = (base or Path.cwd()).resolve()
    return _validate(Config(storage=StorageConfig(data_dir=base / "pacs-ai-data")))


def parse_config(table: dict[str, Any], base: Path, source: Path | None = None) -> Config:
    """Build a validated Config from an already-parsed TOML table."""
    table = dict(table)
    if "destinations" in table and not isinstance(table["destinations"], list):
        raise ConfigError("destinations", "must be an array of tables ([[destinations]])")
    if "storage" not in table or "data_dir" not in table.get("storage", {}):
        table.setdefault("storage", {})
        table["storage"] = {**table["storage"], "data_dir": "pacs-ai-data"}
    config = _build(Config, table, "", base)
    return _validate(dataclasses.replace(config, source=source))


def load_config(path: Path | None) -> Config:
    """Read and validate ``path``; None gives :func:`default_config`."""
    if path is None:
        return default_config()
    path = Path(path).expanduser().resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("(file)", f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("(file)", f"{path} is not valid TOML: {exc}") from exc
    return parse_config(table, path.parent, source=path)
