"""S3-compatible storage (AWS S3, DigitalOcean Spaces, MinIO) through boto3.

Endpoint, region and credentials come from boto3's standard chain
(AWS_* environment variables, ~/.aws/config and credentials, AWS_PROFILE);
`s3_endpoint_url` only overrides the endpoint. pushagent never reads,
logs or stores a credential itself.

Objects are streamed, never downloaded first. Every GET carries the ETag
recorded when the input was listed (If-Match), so bytes from two versions of
an object are never mixed: a changed object stops the run instead.
"""

import contextlib
import functools
import gzip
import io
import logging
import time
from typing import NamedTuple

import boto3
import botocore.config
import botocore.exceptions
import urllib3.exceptions

from pushagent.errors import ConfigError, InputChangedError, StorageError
from pushagent.inputs.source import InputFile
from pushagent.redact import register_secret

INPUT_SUFFIXES = (".jsonl", ".jsonl.gz")
READ_RETRIES = 5
READ_BUFFER = 1024 * 1024
# What a broken or stalled connection raises while a body streams; resumed with a ranged GET.
STREAM_ERRORS = (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError, OSError)

log = logging.getLogger(__name__)
# botocore's debug log prints signed request headers (access key id, session token): keep it quiet
# even under --debug.
for _name in ("boto3", "botocore", "s3transfer"):
    logging.getLogger(_name).setLevel(logging.WARNING)


class S3Url(NamedTuple):
    bucket: str
    key: str

    def __str__(self):
        return f"s3://{self.bucket}/{self.key}"


def parse_url(url: str) -> S3Url:
    """'s3://bucket/some/key' -> S3Url('bucket', 'some/key'); the key may be empty or a prefix."""
    if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
        raise ConfigError(f"not an S3 URL: {url!r}", hint="write s3://bucket/key or s3://bucket/prefix/")
    bucket, _, key = url[5:].partition("/")
    return S3Url(bucket, key)


@functools.lru_cache(maxsize=None)
def client(endpoint_url: str | None = None):
    """A boto3 S3 client (thread-safe, cached per endpoint); None means boto3's own choice."""
    retries = botocore.config.Config(retries={"mode": "standard", "max_attempts": 5})
    session = boto3.session.Session()
    _register_credentials(session)
    return session.client("s3", endpoint_url=endpoint_url or None, config=retries)


def _register_credentials(session) -> None:
    """Hand the resolved secret key and session token to the redactor: a second line of defence."""
    credentials = session.get_credentials()
    if credentials is not None:
        frozen = credentials.get_frozen_credentials()
        for secret in (frozen.secret_key, frozen.token):
            if secret:
                register_secret(secret)


def list_inputs(url: str, endpoint_url: str | None = None) -> list[InputFile]:
    """`s3://bucket/key`: that object; `s3://bucket/prefix/`: its .jsonl(.gz) objects in key order."""
    location = parse_url(url)
    s3 = client(endpoint_url)
    if location.key and not location.key.endswith("/"):
        with _storage_errors(location):
            head = s3.head_object(Bucket=location.bucket, Key=location.key)
        return [_input(location, head["ETag"], head["ContentLength"], head["LastModified"], endpoint_url)]
    found = []
    with _storage_errors(location):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=location.key):
            found += [_input(S3Url(location.bucket, item["Key"]), item["ETag"], item["Size"], item["LastModified"],
                             endpoint_url)
                      for item in page.get("Contents", []) if item["Key"].endswith(INPUT_SUFFIXES)]
    if not found:
        raise ConfigError(f"no .jsonl or .jsonl.gz objects under {url}")
    return sorted(found, key=lambda f: f.path)


def _input(location: S3Url, etag: str, size: int, modified, endpoint_url) -> InputFile:
    # Whole seconds: HEAD reports Last-Modified to the second, listings sometimes to the millisecond.
    return InputFile(str(location), size, int(modified.timestamp()) * 1_000_000_000, etag=etag.strip('"'),
                     endpoint_url=endpoint_url)


@contextlib.contextmanager
def _storage_errors(location: S3Url):
    """Turn boto3 failures into our errors, naming the object and never the credentials."""
    try:
        yield
    except botocore.exceptions.NoCredentialsError:
        raise StorageError("no S3 credentials found", file=str(location),
                           hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE") from None
    except botocore.exceptions.ClientError as error:
        raise _client_error(error, location) from None
    except botocore.exceptions.BotoCoreError as error:
        raise StorageError(f"S3 request failed: {error}", file=str(location),
                           hint="check s3_endpoint_url and the network") from None


def _client_error(error, location: S3Url):
    code = error.response.get("Error", {}).get("Code", "")
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in ("404", "NoSuchKey"):
        return ConfigError("S3 object not found", file=str(location),
                           hint="for every object under a prefix, end the URL with /")
    if code == "NoSuchBucket":
        return ConfigError(f"S3 bucket {location.bucket!r} does not exist", file=str(location))
    message = error.response.get("Error", {}).get("Message", "")
    return StorageError(f"S3 refused the request: {code or status} {message}".rstrip(), file=str(location))


def open_object(input_file: InputFile, offset: int = 0):
    """Binary stream of the object's uncompressed bytes from `offset`.

    A plain object starts with a ranged GET at `offset`. A gzip object is read
    from its first byte and decompressed up to `offset`: a gzip stream has no
    index, so there is no other way to find where uncompressed byte N is.
    """
    if not input_file.is_gzip:
        return io.BufferedReader(ObjectReader(input_file, offset), READ_BUFFER)
    stream = _GzipObject(ObjectReader(input_file, 0))
    if offset:
        stream.seek(offset)
    return stream


class _GzipObject(gzip.GzipFile):
    """GzipFile over an object body; closing it closes the body too (GzipFile alone would not)."""

    def __init__(self, raw: "ObjectReader"):
        self._raw = raw
        super().__init__(fileobj=io.BufferedReader(raw, READ_BUFFER), mode="rb")

    def close(self):
        try:
            super().close()
        finally:
            self._raw.close()


class ObjectReader(io.RawIOBase):
    """The bytes of one object version from `start`.

    A connection that breaks mid-body is resumed with a ranged GET from the
    current offset (up to READ_RETRIES times in a row); If-Match pins the ETag.
    """

    def __init__(self, input_file: InputFile, start: int = 0):
        super().__init__()
        self.location = parse_url(input_file.path)
        self.etag = input_file.etag
        self.size = input_file.size
        self.position = start
        self._client = client(input_file.endpoint_url)
        self._body = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.position >= self.size:
            return 0
        for attempt in range(READ_RETRIES + 1):
            try:
                data = self._stream().read(len(buffer))
                if not data:
                    raise ConnectionError("the connection closed before the end of the object")
                break
            except STREAM_ERRORS as error:
                self._drop_body()
                if attempt == READ_RETRIES:
                    raise StorageError(f"reading at byte {self.position} failed {attempt + 1} times: {error}",
                                       file=str(self.location), hint="rerun the same command to resume") from None
                log.warning("%s: reading at byte %d failed (%s); resuming there", self.location, self.position, error)
                time.sleep(min(0.2 * 2 ** attempt, 5))
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)

    def _stream(self):
        if self._body is None:
            self._body = self._get()
        return self._body

    def _get(self):
        arguments = {"Bucket": self.location.bucket, "Key": self.location.key, "IfMatch": f'"{self.etag}"'}
        if self.position:
            arguments["Range"] = f"bytes={self.position}-"
        try:
            return self._client.get_object(**arguments)["Body"]
        except botocore.exceptions.ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                raise InputChangedError(f"object changed while it was read (ETag was {self.etag})",
                                        file=str(self.location),
                                        hint="rerun with --restart to push the new version from the start") from None
            raise _client_error(error, self.location) from None

    def _drop_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except STREAM_ERRORS:
                pass
            self._body = None

    def close(self) -> None:
        self._drop_body()
        super().close()


def upload(url: str, data: bytes, endpoint_url: str | None = None) -> None:
    """Put `data` at `s3://bucket/key`, replacing what is there."""
    location = parse_url(url)
    with _storage_errors(location):
        client(endpoint_url).put_object(Bucket=location.bucket, Key=location.key, Body=data)
