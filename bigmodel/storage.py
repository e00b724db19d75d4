"""Workdirs on object storage (gs://, s3://) as well as on local disk.

Paths go through `etils.epath` and fsspec (gcsfs / s3fs underneath for buckets), which read
the usual environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and
AWS_ENDPOINT_URL (an S3-compatible server) for s3://; Google's application default
credentials and STORAGE_EMULATOR_HOST (a GCS emulator) for gs://.

Object stores cannot append or rename atomically, so: a small file is written as one object
(a reader sees the old object or the new one, never a part), an appended log is rewritten
whole, and files a library keeps open (TensorBoard's event files) are written to a local
directory and uploaded. Checkpoints are written by orbax into a local cache folder
(BIGMODEL_CACHE_DIR, default ~/.cache/bigmodel) and uploaded step by step (see
bigmodel.checkpoint): orbax 0.12.8 hands tensorstore a local 'file' spec for every path that
is not gs://, so it cannot write s3:// itself, and one way for both protocols is simpler to
trust.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

from etils import epath

from bigmodel.config import ConfigError

SCHEMES = ("gs://", "s3://")
INSTALL_HINT = "pip install -e '.[cloud]' (gcsfs, s3fs)"


class StorageError(ConfigError):
    """A bucket that cannot be used: missing, not visible with these credentials, or no credentials at all."""


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` names an object-store location (gs://, s3://)."""
    return str(path).startswith(SCHEMES)


def as_path(path: str | os.PathLike) -> epath.Path:
    """An epath.Path for a local path (made absolute) or a bucket URL."""
    return epath.Path(str(path) if is_remote(path) else os.path.abspath(path))


def bucket_of(path: str | os.PathLike) -> str:
    """'s3://bucket' of 's3://bucket/some/dir'."""
    scheme, _, rest = str(path).partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _fix(scheme: str, bucket: str) -> tuple[str, str]:
    """(how to create the bucket, how to provide credentials) for one protocol."""
    if scheme == "s3":
        create = f"create it (aws s3 mb {bucket}) or fix the path"
        credentials = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL for "
                       "an S3-compatible server")
    else:
        create = f"create it (gcloud storage buckets create {bucket}) or fix the path"
        credentials = ("run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS "
                       "(STORAGE_EMULATOR_HOST for an emulator)")
    return create, credentials


def check_bucket(path: str | os.PathLike) -> None:
    """Raise StorageError (one line: the bucket and the fix) unless `path`'s bucket exists and answers.

    A local path is not checked. The bucket is listed once with the credentials in the
    environment, before a run writes anything.
    """
    if not is_remote(path):
        return
    bucket = bucket_of(path)
    scheme = bucket.split(":", 1)[0]
    create, credentials = _fix(scheme, bucket)
    try:
        import fsspec

        fs = fsspec.filesystem("s3" if scheme == "s3" else "gcs", skip_instance_cache=True)
        # Both clients fall back to anonymous access without credentials; say so before that fails later.
        missing = _missing_credentials(scheme)
    except ImportError as e:
        raise StorageError(f"{bucket}: the {scheme}:// protocol needs {e.name}; {INSTALL_HINT}") from None
    if missing:
        raise StorageError(f"no credentials for bucket {bucket} ({missing}); {credentials}")
    try:
        fs.ls(bucket.split("://", 1)[1], refresh=True)
    except FileNotFoundError:
        raise StorageError(f"bucket {bucket} does not exist; {create}") from None
    except Exception as e:  # noqa: BLE001 - botocore, aiohttp and google-auth raise many types
        text = f"{type(e).__name__}: {e}"
        if _is_credentials_error(text):
            raise StorageError(f"no usable credentials for bucket {bucket} ({_first_line(text)}); {credentials}") \
                from None
        if "NoSuchBucket" in text or "404" in text or "does not exist" in text.lower():
            raise StorageError(f"bucket {bucket} does not exist; {create}") from None
        raise StorageError(f"bucket {bucket} cannot be listed ({_first_line(text)}); check the endpoint, the "
                           f"network and the credentials: {credentials}") from None


def _missing_credentials(scheme: str) -> str | None:
    """Why the client would have no credentials for `scheme`, or None if it finds some (or needs none)."""
    if scheme == "s3":
        import botocore.session

        return None if botocore.session.get_session().get_credentials() else "none in the environment or ~/.aws"
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return None  # an emulator takes anonymous requests
    import google.auth
    import google.auth.exceptions

    try:
        google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError as e:
        return _first_line(str(e))
    return None


def _is_credentials_error(text: str) -> bool:
    words = ("NoCredentials", "Unable to locate credentials", "InvalidAccessKeyId", "SignatureDoesNotMatch",
             "AccessDenied", "Forbidden", "403", "401", "DefaultCredentialsError", "RefreshError",
             "Anonymous caller", "credentials")
    return any(w in text for w in words)


def _first_line(text: str) -> str:
    return " ".join(text.split())[:200]


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so readers see the old or the new content, never a partial one.

    Local: a temporary file renamed over the target. Bucket: one object upload, which the
    store makes visible whole.
    """
    if is_remote(path):
        epath.Path(str(path)).write_text(text)
        return
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def filesystem(url: str) -> Any:
    """The fsspec filesystem of a bucket URL (s3fs or gcsfs)."""
    import fsspec

    # The endpoint is part of fsspec's instance-cache key, so a changed AWS_ENDPOINT_URL or
    # STORAGE_EMULATOR_HOST gets a new client (None: the client's own default).
    if url.startswith("s3://"):
        return fsspec.filesystem("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))
    return fsspec.filesystem("gcs", endpoint_url=os.environ.get("STORAGE_EMULATOR_HOST"))


def cache_dir(url: str) -> pathlib.Path:
    """The local folder that stands in for a bucket folder (BIGMODEL_CACHE_DIR/buckets/SCHEME/BUCKET/PATH)."""
    root = os.environ.get("BIGMODEL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "bigmodel")
    scheme, _, rest = url.rstrip("/").partition("://")
    return pathlib.Path(root, "buckets", scheme, rest)


def read_text(path: str | os.PathLike) -> str:
    """A local file's or an object's text; an object is fetched in one request (it may be replaced meanwhile).

    Raises FileNotFoundError if there is none.
    """
    if not is_remote(path):
        return pathlib.Path(path).read_text()
    fs = filesystem(str(path))
    fs.invalidate_cache()  # another process may have just written it
    return fs.cat_file(str(path)).decode()


def upload_file(local: str | os.PathLike, url: str) -> None:
    """Copy one local file to an object (streamed, not read into memory)."""
    filesystem(url).put_file(str(local), url)


def download_file(url: str, local: str | os.PathLike) -> None:
    """Copy one object to a local file, through a temporary name."""
    local = pathlib.Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.download.{os.getpid()}")
    filesystem(url).get_file(url, str(tmp))
    os.replace(tmp, local)


def download_tree(url: str, local: str | os.PathLike, last: Sequence[str] = ()) -> None:
    """Copy every object under a bucket folder to the same relative path under the local folder `local`.

    Objects named in `last` come after the others (see upload_tree).
    """
    fs, prefix = filesystem(url), url.rstrip("/") + "/"
    bare = prefix.split("://", 1)[1]
    for path in sorted(fs.find(bare), key=lambda p: (p.rsplit("/", 1)[-1] in last, p)):
        relative = path[len(bare):]
        download_file(f"{prefix}{relative}", pathlib.Path(local, relative))


def remove_tree(url: str) -> None:
    """Delete every object under a bucket folder."""
    fs = filesystem(url)
    if fs.exists(url):
        fs.rm(url, recursive=True)


def upload_tree(local: str | os.PathLike, target: str | os.PathLike, last: Sequence[str] = (),
                skip: Sequence[str] = ()) -> None:
    """Copy every file under the local folder `local` to the same relative path under `target`.

    Files named in `last` go after the others (a file whose presence says the rest is complete);
    files named in `skip` stay local.
    """
    local = pathlib.Path(local)
    files = [p for p in local.rglob("*") if p.is_file() and p.name not in skip]
    for file in sorted(files, key=lambda p: (p.name in last, str(p))):
        upload_file(file, f"{str(target).rstrip('/')}/{file.relative_to(local).as_posix()}")


class Staged:
    """A local folder standing in for a bucket folder: files written there are uploaded by `sync()`.

    For writers that need a real file (TensorBoard's event writer keeps its file open and
    appends). For a local target the folder is the target itself and `sync()` does nothing.
    """

    def __init__(self, target: str | os.PathLike) -> None:
        self.target = target
        self.remote = is_remote(target)
        self.local = pathlib.Path(tempfile.mkdtemp(prefix="bigmodel-staged-")) if self.remote else pathlib.Path(target)

    def sync(self) -> None:
        """Upload what the local folder holds now (whole files, replacing the previous upload)."""
        if self.remote:
            upload_tree(self.local, self.target)

    def close(self) -> None:
        """Upload a last time and remove the local folder."""
        if self.remote:
            self.sync()
            shutil.rmtree(self.local, ignore_errors=True)
