"""One place that owns URIs: local paths, ``file://`` and ``s3://`` (any S3-compatible endpoint).

Everything in storymm reads and writes through here so that the same code runs on a laptop folder
and on object storage, and so that Ray Train can be handed the very same pyarrow filesystem.

Rules this module keeps:
- Writes are atomic per file: a reader sees the old object or the whole new one, never a prefix
  (local: write a temp file then ``os.replace``; S3: one PUT or a completed multipart upload).
- Transient errors (connection refused/reset, throttling, 5xx) are retried with backoff (tenacity,
  logged at DEBUG: visible with ``-v``); missing files and permission errors are not. Whatever
  still fails is a :class:`StorageError` whose one-line message names the URI and what to check
  (endpoint, credentials, bucket), or a ``FileNotFoundError`` naming what is missing.
- Credentials never leave the process: they come from the usual AWS variables, are never put into
  URIs, and :func:`redact` strips anything secret-looking from a URI before it is logged.
"""

from __future__ import annotations

import functools
import logging
import os
import posixpath
import re
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow.fs as pafs
from tenacity import (
    before_sleep_log,
    retry,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from storymm.errors import StorymmError, UsageError

log = logging.getLogger(__name__)

RETRY_ATTEMPTS = int(os.environ.get("STORYMM_STORAGE_RETRIES", "6"))
# Retrying stops after this many seconds too: each attempt is itself up to 3 tries by the AWS SDK
# (~1 s against a closed port), so an endpoint that is down is reported within a few seconds, while
# a server restart or a burst of 5xx/throttling of a few seconds is ridden out.
RETRY_SECONDS = float(os.environ.get("STORYMM_STORAGE_RETRY_SECONDS", "5"))

# Matched against the lower-cased message with "_" turned into " ": pyarrow reports AWS errors as
# e.g. "AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7, Could not connect",
# "AWS Error SERVICE_UNAVAILABLE ..." or "AWS Error UNKNOWN (HTTP status 503) ...".
_TRANSIENT_MARKERS = (
    "connection refused",
    "connection reset",
    "couldn't connect",
    "could not connect",
    "timed out",
    "timeout",
    "throttl",
    "slow down",
    "slowdown",
    "service unavailable",
    "internal error",
    "internal failure",
    "internalerror",
    "curl error",
    "curlcode",
    "network",
    "temporarily",
    "broken pipe",
)
_PERMANENT_MARKERS = (
    "access denied",
    "accessdenied",
    "forbidden",
    "nosuchbucket",
    "no such bucket",
    "signature does not match",
    "signaturedoesnotmatch",
    "invalid access key",
    "invalidaccesskeyid",
)
# HTTP status codes only where they are reported as a status, never bare digits (request ids and
# object keys contain "500" often enough).
_TRANSIENT_STATUS = re.compile(r"(?:status|code)\W{0,3}(?:429|500|502|503|504)\b")


class StorageError(StorymmError, OSError):
    """Storage failed for good (after retries where it may pass): unreachable, refused, no bucket."""


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError):
        text = str(exc).lower().replace("_", " ")
        if any(marker in text for marker in _PERMANENT_MARKERS):
            return False
        return bool(_TRANSIENT_STATUS.search(text)) or any(m in text for m in _TRANSIENT_MARKERS)
    return False


def _retrying(fn):
    """Retry ``fn(uri, ...)`` on transient storage errors with exponential backoff; a failure that
    remains becomes a :class:`StorageError` naming ``uri`` (``FileNotFoundError`` stays as it is)."""
    retried = retry(
        retry=retry_if_exception(_is_transient),
        stop=stop_after_attempt(RETRY_ATTEMPTS) | stop_after_delay(RETRY_SECONDS),
        wait=wait_exponential(multiplier=0.2, max=5.0),
        before_sleep=before_sleep_log(log, logging.DEBUG),
        reraise=True,
    )(fn)

    @functools.wraps(fn)
    def call(uri, *args, **kwargs):
        try:
            return retried(uri, *args, **kwargs)
        except (StorymmError, FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise
        except OSError as err:
            attempts = retried.retry.statistics.get("attempt_number", 1)
            raise _storage_error(err, str(uri), attempts) from err

    call.retry = retried.retry  # tests tune the stop condition
    return call


def _masked(text: str) -> str:
    text = redact(text)
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "REDACTED")
    return text


def _storage_error(err: OSError, uri: str, attempts: int) -> StorageError:
    """One line: what failed, where, and what to check."""
    cause = _masked(" ".join(str(err).split()))[:200]
    text = cause.lower().replace("_", " ")
    where = redact(uri)
    if "no such bucket" in text or "nosuchbucket" in text:
        bucket = urlparse(uri).netloc if is_remote(uri) else "?"
        return StorageError(f"bucket {bucket!r} does not exist ({where}): create it or fix the URI")
    if any(marker in text for marker in _PERMANENT_MARKERS) or "access denied" in text:
        return StorageError(
            f"S3 refused access to {where} ({cause}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
            "(or the node's role) and the bucket's permissions"
        )
    if is_remote(uri) and _is_transient(err):
        endpoint = _s3_settings()[0] or "the default AWS endpoint"
        return StorageError(
            f"cannot reach S3 at {redact(endpoint)} for {where} after {attempts} attempt(s) ({cause}): "
            "check AWS_ENDPOINT_URL and that the server is up"
        )
    return StorageError(f"storage error on {where} after {attempts} attempt(s): {cause}")


# --------------------------------------------------------------------------------------- URIs


_SECRET_QUERY = re.compile(
    r"(?i)(x-amz-signature|x-amz-credential|x-amz-security-token|signature|awsaccesskeyid|"
    r"access_key|secret_key|session_token|token)=[^&\s]*"
)


# ``user@`` or ``user:password@`` right after the scheme. A secret may contain "/" (AWS secret keys
# often do, and an unescaped "@" may too), so after a ":" everything up to the last "@" goes.
_USERINFO = re.compile(r"(?<=://)(?:[^/@\s:]*:\S*|[^/@\s]*)@")


def redact(uri: str) -> str:
    """A URI safe to print: no user:password part, no signed-query secrets."""
    text = str(uri)
    text = _USERINFO.sub("", text)
    return _SECRET_QUERY.sub(lambda m: f"{m.group(1)}=REDACTED", text)


def is_remote(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or local path, always with ``/`` inside object stores."""
    uri = str(uri)
    if is_remote(uri) or uri.startswith("file://"):
        out = uri.rstrip("/")
        for part in parts:
            out = out + "/" + str(part).strip("/")
        return out
    return os.path.join(uri, *[str(p) for p in parts])


def basename(uri: str) -> str:
    return posixpath.basename(str(uri).rstrip("/"))


@dataclass(frozen=True)
class Location:
    """A filesystem and a path inside it (what pyarrow and Ray Train want)."""

    fs: pafs.FileSystem
    path: str
    uri: str


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem configured from the standard AWS environment variables.

    ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) selects any S3-compatible server; its scheme
    decides http vs https. Credentials are never handed to the filesystem: the AWS SDK's default
    chain resolves them at use (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
    ``~/.aws``, instance or pod roles). So the object carries only endpoint, scheme and region, and
    pickling it (Ray Train and Tune store it in ``trainer.pkl``/``tuner.pkl`` under the run) stores
    no secret; an unpickled copy on a Ray worker resolves the worker's own credentials.
    """
    return _s3_filesystem_cached(*_s3_settings())


def _s3_settings() -> tuple:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    # The credentials are only part of the cache key (new variables, new filesystem), never passed on.
    credentials = tuple(
        os.environ.get(name)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    )
    return endpoint, region, hash(credentials)


@lru_cache(maxsize=8)
def _s3_filesystem_cached(endpoint: str, region: str, credentials_key: int) -> pafs.S3FileSystem:
    kwargs = dict(
        region=region,
        allow_bucket_creation=True,  # ensure_bucket(); buckets are never deleted through here
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        connect_timeout=5,
        request_timeout=60,
        # a write is done by the thread that writes, not by Arrow's IO threads: the checkpoint writer
        # uploads from its own low-priority thread (training.checkpoint) and the training threads
        # keep the CPU; a multipart upload then sends its parts one after the other
        background_writes=False,
    )
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def locate(uri: str) -> Location:
    """Resolve a URI (local path, ``file://``, ``s3://bucket/key``) to a filesystem and path."""
    uri = str(uri)
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        if "@" in parsed.netloc or _USERINFO.search(uri):
            raise UsageError(
                f"credentials in a URI are not accepted ({redact(uri)}); "
                "use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY instead"
            )
        if not parsed.netloc:
            raise UsageError(f"an s3 URI needs a bucket: {redact(uri)!r}")
        path = (parsed.netloc + "/" + parsed.path.lstrip("/")).rstrip("/")
        return Location(s3_filesystem(), path, uri)
    if uri.startswith("file://"):
        path = urlparse(uri).path
    elif "://" in uri:
        raise UsageError(f"unsupported storage scheme in {redact(uri)!r}: use a path, file:// or s3://")
    else:
        path = uri
    return Location(pafs.LocalFileSystem(), os.path.abspath(path), uri)


# ------------------------------------------------------------------------------- operations


@_retrying
def exists(uri: str) -> bool:
    loc = locate(uri)
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


@_retrying
def is_file(uri: str) -> bool:
    loc = locate(uri)
    return loc.fs.get_file_info(loc.path).type == pafs.FileType.File


@_retrying
def read_bytes(uri: str) -> bytes:
    loc = locate(uri)
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(_not_found(loc, uri))
    with loc.fs.open_input_stream(loc.path) as stream:
        return stream.read()


def _not_found(loc: Location, uri: str) -> str:
    """'not found: URI', or that the whole bucket is missing (a typo there is the usual cause)."""
    if not isinstance(loc.fs, pafs.LocalFileSystem):
        bucket = loc.path.split("/", 1)[0]
        if loc.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            return f"bucket {bucket!r} does not exist ({redact(uri)}): create it or fix the URI"
    return f"not found: {redact(uri)}"


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@_retrying
def write_bytes(uri: str, data: bytes | memoryview) -> None:
    """Publish ``data`` (any bytes-like object) at ``uri`` atomically: readers never see a partial file."""
    loc = locate(uri)
    if isinstance(loc.fs, pafs.LocalFileSystem):
        directory = os.path.dirname(loc.path) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; publish with the usual mode
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, loc.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    # S3: an object becomes visible only when its PUT (or multipart upload) completes.
    with loc.fs.open_output_stream(loc.path) as stream:
        stream.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


@_retrying
def upload_file(local_path: str, uri: str) -> None:
    """Copy a local file to ``uri`` atomically (used for checkpoints and report images)."""
    with open(local_path, "rb") as handle:
        data = handle.read()
    write_bytes.__wrapped__(uri, data)  # already inside a retry


@_retrying
def list_files(uri: str, suffix: str = "", recursive: bool = False) -> list[str]:
    """URIs of the files directly under ``uri`` (sorted); empty if the folder does not exist."""
    loc = locate(uri)
    selector = pafs.FileSelector(loc.path, allow_not_found=True, recursive=recursive)
    infos = loc.fs.get_file_info(selector)
    prefix = loc.path.rstrip("/") + "/"
    out = []
    for info in infos:
        if info.type != pafs.FileType.File or not info.path.endswith(suffix):
            continue
        name = posixpath.basename(info.path)
        if name.startswith(".tmp-"):
            continue
        relative = info.path[len(prefix) :] if info.path.startswith(prefix) else name
        out.append(join(uri, relative))
    return sorted(out)


@_retrying
def list_dirs(uri: str) -> list[str]:
    """Names of the sub-folders directly under ``uri`` (sorted)."""
    loc = locate(uri)
    selector = pafs.FileSelector(loc.path, allow_not_found=True, recursive=False)
    return sorted(
        posixpath.basename(info.path.rstrip("/"))
        for info in loc.fs.get_file_info(selector)
        if info.type == pafs.FileType.Directory
    )


@_retrying
def delete(uri: str) -> None:
    """Delete a file or a whole folder; missing is fine."""
    loc = locate(uri)
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.File:
        loc.fs.delete_file(loc.path)
    elif info.type == pafs.FileType.Directory:
        loc.fs.delete_dir(loc.path)


@_retrying
def ensure_bucket(uri: str) -> None:
    """Create the bucket of an ``s3://`` URI if it is missing (local: create the folder)."""
    loc = locate(uri)
    if isinstance(loc.fs, pafs.LocalFileSystem):
        os.makedirs(loc.path, exist_ok=True)
        return
    bucket = loc.path.split("/", 1)[0]
    if loc.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
        loc.fs.create_dir(bucket)


@_retrying
def open_input_file(uri: str):
    """A seekable random-access file (what pyarrow.parquet wants for streaming row groups). Only
    opening is retried; reads through it are the caller's (shards are read with ``read_bytes``)."""
    loc = locate(uri)
    return loc.fs.open_input_file(loc.path)


def safe_name(text: str, keep: str = "._-") -> str:
    """``text`` as one path component: runs of characters other than letters, digits and ``keep``
    become ``_``; never empty, never hidden (no leading dot)."""
    allowed = re.escape(keep)
    return re.sub(rf"[^A-Za-z0-9{allowed}]+", "_", str(text)).strip("._") or "run"


def unique_names(names: list[str], reserved: tuple[str, ...] = ()) -> list[str]:
    """``names`` with repeats (and ``reserved`` names) made unique by ``-2``, ``-3``, … suffixes."""
    out: list[str] = []
    for name in names:
        candidate, n = name, 1
        while candidate in out or candidate in reserved:
            n += 1
            candidate = f"{name}-{n}"
        out.append(candidate)
    return out


def presigned_url(uri: str, expires: int = 3600, content_type: str | None = None) -> str:
    """A presigned ``GET`` URL for an ``s3://`` object, valid ``expires`` seconds: the same endpoint
    and region as every other S3 access here; credentials from the AWS SDK's chain (nothing stored)."""
    import boto3
    from botocore.config import Config as BotoConfig

    parsed = urlparse(str(uri))
    if parsed.scheme != "s3":
        raise ValueError(f"only s3:// objects can be presigned, not {redact(uri)}")
    endpoint, region = _s3_settings()[:2]
    config = BotoConfig(signature_version="s3v4", s3={"addressing_style": "path" if endpoint else "auto"})
    client = boto3.client("s3", endpoint_url=endpoint or None, region_name=region, config=config)
    params = {"Bucket": parsed.netloc, "Key": parsed.path.lstrip("/")}
    if content_type:
        params["ResponseContentType"] = content_type
    return client.generate_presigned_url("get_object", Params=params, ExpiresIn=int(expires))
