"""A TFDS builder for a directory (or glob) of text files; default: CPython's stdlib.

Each file is one example {'text', 'path'}. Files go to 'train' or 'validation' by a
hash of their relative path, so the split is deterministic and stable when files are
added. The output is ArrayRecord, read back with `as_data_source` (no TensorFlow).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import pathlib
import sysconfig

import tensorflow_datasets as tfds

from bigmodel import storage


def stdlib_source() -> str:
    """Glob of the running interpreter's standard-library sources (site-packages excluded)."""
    return os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py")


def resolve_files(source: str) -> tuple[str, list[str]]:
    """(root, sorted relative paths) for a directory or glob (local, gs:// or s3://); '' means the stdlib."""
    if storage.is_remote(source):
        return _resolve_in_bucket(source)
    pattern = source or stdlib_source()
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "**", "*")
    root = pattern.split("*", 1)[0]
    root = root if root.endswith(os.sep) else os.path.dirname(root) + os.sep
    files = sorted(
        os.path.relpath(p, root)
        for p in glob.glob(pattern, recursive=True)
        if os.path.isfile(p) and f"{os.sep}site-packages{os.sep}" not in p
    )
    if not files:
        raise FileNotFoundError(f"config.data.source={source!r} matches no files; give a directory or a glob")
    return root, files


def _resolve_in_bucket(source: str) -> tuple[str, list[str]]:
    """resolve_files for a bucket folder or glob (fsspec's glob: '*' within a folder, '**' across folders)."""
    storage.check_bucket(source)
    fs = storage.filesystem(source)
    scheme, bare = source.split("://", 1)
    pattern = bare.rstrip("/") + "/**" if fs.isdir(bare) else bare
    root = pattern.split("*", 1)[0]
    root = root if root.endswith("/") else root.rsplit("/", 1)[0] + "/"
    files = sorted(p[len(root):] for p in fs.glob(pattern) if p.startswith(root) and fs.isfile(p))
    if not files:
        raise FileNotFoundError(f"config.data.source={source!r} matches no objects; give a bucket folder or a glob")
    return f"{scheme}://{root}", files


def is_validation(relative_path: str, fraction: float) -> bool:
    """Deterministic file-level split from a hash of the path."""
    bucket = int(hashlib.sha1(relative_path.encode()).hexdigest()[:8], 16) % 10_000
    return bucket < fraction * 10_000


def config_name(source: str, validation_fraction: float = 0.05) -> str:
    """A readable TFDS config name, unique per source and split fraction."""
    split = "" if validation_fraction == 0.05 else f"_val{round(validation_fraction * 10_000)}"
    if not source:
        version = sysconfig.get_python_version().replace(".", "_")
        return f"cpython_stdlib_{version}{split}"
    digest = hashlib.sha1((source if storage.is_remote(source) else os.path.abspath(source)).encode()).hexdigest()[:10]
    stem = "".join(c if c.isalnum() else "_" for c in pathlib.Path(source.split("*")[0]).name)[:30]
    return f"files_{stem}_{digest}{split}"


class TextFiles(tfds.core.GeneratorBasedBuilder):
    """Text files as a TFDS dataset with a deterministic train/validation split."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, source: str = "", validation_fraction: float = 0.05, **kwargs):
        self._source = source
        self._validation_fraction = validation_fraction
        kwargs.setdefault("config", tfds.core.BuilderConfig(name=config_name(source, validation_fraction)))
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Text files, one example per file.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            "train": self._generate_examples(validation=False),
            "validation": self._generate_examples(validation=True),
        }

    def _generate_examples(self, validation: bool):
        root, files = resolve_files(self._source)
        chosen = [rel for rel in files if is_validation(rel, self._validation_fraction) == validation]
        if not chosen:
            raise ValueError(
                f"the {'validation' if validation else 'train'} split of {self._source or 'the stdlib'} would be "
                f"empty ({len(files)} files, validation_fraction={self._validation_fraction}); "
                "adjust config.data.validation_fraction or add files"
            )
        for rel in chosen:
            if storage.is_remote(root):
                data = storage.as_path(root + rel).read_bytes()
            else:
                with open(os.path.join(root, rel), "rb") as f:
                    data = f.read()
            yield rel, {"text": data, "path": rel}


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(source: str, data_dir: str, validation_fraction: float = 0.05) -> TextFiles:
    """Build the dataset once (under a file lock, so parallel processes wait) and return it."""
    builder = TextFiles(source=source, validation_fraction=validation_fraction, data_dir=data_dir or None)
    with _file_lock(pathlib.Path(builder.data_dir_root) / f".{builder.builder_config.name}.lock"):
        builder.download_and_prepare(file_format="array_record")
    # A builder created while another process was still writing holds stale metadata;
    # a fresh one reads the finished dataset's.
    return TextFiles(source=source, validation_fraction=validation_fraction, data_dir=data_dir or None)
