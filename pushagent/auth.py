"""Credentials: an API key from a private file or PUSHAGENT_API_KEY, or basic auth.

The secret only ever lives in the Authorization header of the session; it is
never part of the Config, a log line or an exception message.
"""

import base64
import os
import stat
from pathlib import Path

from .errors import ConfigError

API_KEY_ENV = "PUSHAGENT_API_KEY"


def authorization_header(config, environ=None) -> dict:
    """{'Authorization': ...} for the configured scheme, or {} for an open cluster."""
    environ = os.environ if environ is None else environ
    if config.api_key_file:
        return {"Authorization": "ApiKey " + read_secret_file(config.api_key_file, "api_key_file")}
    if environ.get(API_KEY_ENV):
        return {"Authorization": "ApiKey " + environ[API_KEY_ENV].strip()}
    if config.username:
        if not config.password_file:
            raise ConfigError("username is set but password_file is not")
        password = read_secret_file(config.password_file, "password_file")
        token = base64.b64encode(f"{config.username}:{password}".encode()).decode()
        return {"Authorization": "Basic " + token}
    return {}


def read_secret_file(path_text: str, key: str) -> str:
    """Read a secret file refused unless private to the running user, as ssh does."""
    path = Path(path_text).expanduser()
    try:
        info = path.stat()
    except OSError as error:
        raise ConfigError(f"{key}: cannot read {path}: {error.strerror}") from None
    if info.st_uid != os.getuid():
        raise ConfigError(f"{key}: {path} is not owned by you", hint=f"chown $USER {path}")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise ConfigError(f"{key}: {path} is readable by others (mode {stat.S_IMODE(info.st_mode):04o})",
                          hint=f"chmod 600 {path}")
    secret = path.read_text().strip()
    if not secret:
        raise ConfigError(f"{key}: {path} is empty")
    return secret
