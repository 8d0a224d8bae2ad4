"""Configuration: defaults < YAML file < PUSHAGENT_* environment < flags (SPEC section 9)."""

import dataclasses
import ipaddress
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from pushagent.errors import ConfigError

DEFAULT_CONFIG_FILES = ("./pushagent.yaml", "~/.config/pushagent/config.yaml")
ENV_PREFIX = "PUSHAGENT_"
# Read from the environment by cluster/auth.py only: a secret is never a config value.
SECRET_ENV_KEYS = {"PUSHAGENT_API_KEY"}

# Keys an older configuration may still carry, and what replaced them.
RETIRED_KEYS = {"max_consecutive_failures": "remove it: outage_seconds (default 15m) says how long an outage is "
                                            "ridden out before the run stops"}
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
               "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


@dataclasses.dataclass
class Config:
    url: str = "http://127.0.0.1:9200"
    api_key_file: str | None = None
    username: str | None = None
    password_file: str | None = None
    ca_bundle: str | None = None
    insecure: bool = False
    index: str | None = None
    index_field: str | None = None
    allowed_indices: list | None = None
    id_field: str = "id"
    version_field: str | None = None
    batch_time: str | None = None
    op_field: str | None = None
    allow_delete: bool = False
    embedding_version: str | None = None
    embedding_version_field: str = "embedding_version"
    timestamp_field: str = "last_updated"
    checksum_field: str = "sync_checksum"
    batch_field: str = "sync_batch"
    snapshot: bool = False                   # the batch is a full snapshot of its index (verification)
    incremental: bool = False                # send only what the cluster does not hold as written
    max_delete_fraction: float = 0.05        # verify --delete-extra refuses above this share of the batch
    chunk_docs: int = 5000
    chunk_bytes: int = 50 * 1024**2
    compress: bool | str = "auto"           # true, false, or auto: measured (cluster/compression.py)
    compress_level: int = 1
    concurrency: int = 2                    # requests in flight at the start; the sender adapts from there
    max_concurrency: int = 8                # the most it goes to (cluster/concurrency.py)
    max_in_flight_bytes: int = 48 * 1024**2  # bodies (gzip'd ones packed) and unbuilt lines of chunks out
    build_workers: int = 0                  # processes building documents; 0: by the job's cores
    requests_per_minute: float = 100
    timeout_seconds: float = 60
    max_retries: int = 3
    retry_backoff_seconds: float = 1.0
    max_backoff_seconds: float = 60
    outage_seconds: float = 900             # how long whole-request failures are retried before the run stops
    requeue_on_outage: bool = False          # past the budget, exit 75 (Slurm templates: requeue) instead of 1
    state_dir: str = "~/.local/state/pushagent"
    queue_url: str | None = None
    max_attempts: int = 8
    max_retry_delay: float = 6 * 3600
    lease_seconds: float = 900              # how long a drainer holds taken items before others may take them
    sample_size: int = 100
    count_settle_seconds: float = 5         # a count off the expected one is final once unchanged this long
    grace_seconds: float = 60
    progress_seconds: float = 30
    metrics_file: str | None = None
    pushgateway_url: str | None = None
    push_interval: float = 60
    health_lag_warning: float = 6 * 3600     # `status`: sync lag above this is a warning
    health_lag_critical: float = 24 * 3600
    health_dead_warning: int = 0             # `status`: more dead-lettered items than this is a warning
    health_dead_critical: int = 1000
    state_mirror: str | None = None
    s3_endpoint_url: str | None = None

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser().absolute()

    @property
    def allowed(self) -> set:
        """Indices the agent may write: `allowed_indices`, else the `index` value only."""
        if self.allowed_indices:
            return set(self.allowed_indices)
        return {self.index} if self.index else set()

    @property
    def concurrency_ceiling(self) -> int:
        """The most requests in flight: max_concurrency, or `concurrency` where a configuration sets it higher
        (one written before max_concurrency existed asked for that many)."""
        return max(self.max_concurrency, self.concurrency)

    @property
    def resolved_queue_url(self) -> str:
        return self.queue_url or f"sqlite://{self.state_path / 'queue.db'}"


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def load_config(config_file=None, flags=None, environ=None) -> Config:
    """Merge defaults, the YAML file, PUSHAGENT_* variables and flags (highest wins).

    `flags` maps key -> value; None values mean "flag not given".
    """
    environ = os.environ if environ is None else environ
    values = {}
    values.update(_read_file(config_file))
    values.update(_read_environment(environ))
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    config = Config(**{key: _coerce(key, value) for key, value in values.items()})
    validate(config)
    return config


def _read_file(config_file) -> dict:
    path = _find_config_file(config_file)
    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read configuration: {error}", file=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("configuration must be a mapping of key: value", file=str(path))
    retired = sorted(set(data) & set(RETIRED_KEYS))
    if retired:
        raise ConfigError(f"configuration key {retired[0]} is no longer used", file=str(path),
                          hint=RETIRED_KEYS[retired[0]])
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown configuration key(s): {', '.join(unknown)}", file=str(path),
                          hint="see config/pushagent.example.yaml for every key")
    return data


def _find_config_file(config_file):
    if config_file:
        path = Path(config_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"configuration file not found: {path}")
        return path
    for candidate in DEFAULT_CONFIG_FILES:
        path = Path(candidate).expanduser()
        if path.is_file():
            return path
    return None


def _read_environment(environ) -> dict:
    values = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in SECRET_ENV_KEYS:
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key in FIELDS:
            values[key] = value
    return values


def _coerce(key, value):
    kind = FIELDS[key].type
    try:
        if value is None:
            return None
        if key in ("chunk_bytes", "max_in_flight_bytes"):
            return parse_size(value)
        if key in ("max_retry_delay", "lease_seconds", "outage_seconds", "grace_seconds", "progress_seconds",
                   "count_settle_seconds", "push_interval", "health_lag_warning", "health_lag_critical"):
            return parse_duration(value)
        if key == "compress":
            return _parse_compress(value)
        if kind in (bool, "bool"):
            return _parse_bool(value)
        if kind in (int, "int"):
            return int(value)
        if kind in (float, "float"):
            return float(value)
        if key == "allowed_indices" and isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
    except (TypeError, ValueError) as error:
        raise ConfigError(f"bad value for {key}: {value!r} ({error})") from None


def _parse_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _parse_compress(value):
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        return _parse_bool(value)
    except ValueError:
        raise ValueError("expected true, false or auto") from None


def parse_size(value) -> int:
    """'50MiB', '1mb', '1048576' -> bytes."""
    return int(_number_with_unit(value, _SIZE_UNITS, "a size such as 50MiB"))


def parse_duration(value) -> float:
    """'6h', '90s', '2m', 30 -> seconds."""
    return _number_with_unit(value, _DURATION_UNITS, "a duration such as 6h, 90s or 30")


def _number_with_unit(value, units: dict, example: str) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in units:
        raise ValueError(f"expected {example}")
    return float(match.group(1)) * units[match.group(2).lower()]


def validate(config: Config) -> None:
    """Refuse settings that cannot work before anything is read or sent."""
    if not 1 <= config.chunk_docs <= 100_000:
        raise ConfigError(f"chunk_docs must be between 1 and 100000, got {config.chunk_docs}")
    for key in ("chunk_bytes", "max_in_flight_bytes"):
        if getattr(config, key) < 1024:
            raise ConfigError(f"{key} must be at least 1 KiB, got {getattr(config, key)}")
    if config.build_workers < 0:
        raise ConfigError(f"build_workers must be 0 (one per core the job may use, less one) or more, got "
                          f"{config.build_workers}")
    if min(config.concurrency, config.max_concurrency) < 1 or config.requests_per_minute <= 0:
        raise ConfigError("concurrency, max_concurrency and requests_per_minute must be positive")
    if config.max_retries < 0 or config.outage_seconds < 0:
        raise ConfigError("max_retries and outage_seconds must not be negative")
    if config.progress_seconds <= 0 or config.push_interval <= 0:
        raise ConfigError("progress_seconds and push_interval must be positive durations")
    if config.count_settle_seconds <= 0:
        raise ConfigError(f"count_settle_seconds must be a positive duration, got {config.count_settle_seconds}")
    _validate_url("url", config.url, config.insecure)
    if config.s3_endpoint_url:
        _validate_url("s3_endpoint_url", config.s3_endpoint_url, config.insecure)
    if config.state_mirror and not re.fullmatch(r"s3://[^/]+(/.*)?", config.state_mirror):
        raise ConfigError(f"state_mirror must be s3://bucket[/prefix], got {config.state_mirror!r}")


def _validate_url(key: str, url: str, insecure: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key} must be http(s)://host[:port], got {url!r}")
    if parts.username or parts.password:
        raise ConfigError(f"{key} must not carry credentials",
                          hint="put the API key in api_key_file or PUSHAGENT_API_KEY; S3 credentials in "
                               "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile")
    if parts.scheme == "http" and not is_loopback(parts.hostname) and not insecure:
        raise ConfigError(f"refusing plain http:// to {parts.hostname}: only loopback may be reached without TLS",
                          hint="use https://, or pass --insecure if you really mean it")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
