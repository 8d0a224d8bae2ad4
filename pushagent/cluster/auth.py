"""Credentials: an API key from a private file or PUSHAGENT_API_KEY, or basic auth.

The secret only ever lives in the Authorization header of the session; it is
never part of the Config, a log line or an exception message.
"""

import base64
import os
import stat
from pathlib import Path

from pushagent.errors import ConfigError
from pushagent.redact import register_secret

API_KEY_ENV = "PUSHAGENT_API_KEY"


def authorization_header(config, environ=None) -> dict:
    """{'Authorization': ...} for the configured scheme, or {} for an open cluster."""
    environ = os.environ if environ is None else environ
    if config.api_key_file:
        return _api_key(read_secret_file(config.api_key_file, "api_key_file"))
    if environ.get(API_KEY_ENV, "").strip():
        return _api_key(environ[API_KEY_ENV].strip())
    if config.username:
        if not config.password_file:
            raise ConfigError("username is set but password_file is not",
                              hint="put the password in a file only you can read (chmod 600) and set password_file")
        password = read_secret_file(config.password_file, "password_file")
        register_secret(password)
        token = base64.b64encode(f"{config.username}:{password}".encode()).decode()
        register_secret(token)
        return {"Authorization": "Basic " + token}
    return {}


def scheme_name(config, environ=None) -> str:
    """Which credentials would be used, in words, without reading any secret."""
    environ = os.environ if environ is None else environ
    if config.api_key_file:
        return f"API key from api_key_file {config.api_key_file}"
    if environ.get(API_KEY_ENV, "").strip():
        return f"API key from {API_KEY_ENV}"
    if config.username:
        return f"basic auth as {config.username}"
    return "none"


def _api_key(key: str) -> dict:
    if any(char.isspace() for char in key):
        raise ConfigError("the API key contains white space",
                          hint="use the encoded form of the key (one base64 word), as the cluster returned it")
    register_secret(key)
    return {"Authorization": "ApiKey " + key}


def read_secret_file(path_text: str, key: str) -> str:
    """Read a secret file refused unless private to the running user, as ssh does."""
    path = Path(path_text).expanduser()
    try:
        info = path.stat()
    except OSError as error:
        raise ConfigError(f"{key}: cannot read {path}: {error.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{key}: {path} is not a regular file")
    if info.st_uid != os.getuid():
        raise ConfigError(f"{key}: {path} is owned by uid {info.st_uid}, not by you: refusing a secret "
                          "others may have written or can read", hint=f"chown $USER {path}")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise ConfigError(f"{key}: permissions {mode:04o} for {path} are too open: it must not be "
                          "accessible by others", hint=f"chmod 600 {path}")
    try:
        secret = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{key}: cannot read {path}: {getattr(error, 'strerror', None) or 'not text'}") from None
    if not secret:
        raise ConfigError(f"{key}: {path} is empty", hint="write the encoded API key into it")
    return secret
