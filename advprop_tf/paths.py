"""Path arithmetic for every filesystem TensorFlow knows: local paths, and URLs (gs://, ram://, s3://).

os.path would use '\\' on Windows and, for `dirname`/`abspath`, mangle URLs;
URLs always use '/'. Reading and writing goes through tf.io.gfile elsewhere.
"""

from __future__ import annotations

import os
import posixpath


def is_url(path: str) -> bool:
    return "://" in path


def join(first: str, *rest: str) -> str:
    return posixpath.join(first, *rest) if is_url(first) else os.path.join(first, *rest)


def dirname(path: str) -> str:
    return posixpath.dirname(path) if is_url(path) else os.path.dirname(os.path.abspath(path))


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_url(path) else os.path.basename(os.path.normpath(path))
