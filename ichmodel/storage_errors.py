"""Storage failures as one line naming the location and the cause.

What a job meets when its storage misbehaves arrives in many shapes: ``OSError`` with an ``errno`` from the
local disk (``ENOSPC``, ``EDQUOT``, ``EACCES``, ``EPERM``, ``EROFS``), pyarrow's ``OSError`` for S3 whose text
carries the AWS error name (``AWS Error NO_SUCH_BUCKET during CreateMultipartUpload operation``, ``ACCESS_DENIED``,
``INVALID_ACCESS_KEY_ID``, ``SIGNATURE_DOES_NOT_MATCH``), and botocore's ``ClientError`` with an error code
(``NoSuchBucket``, ``InvalidAccessKeyId``, ``AccessDenied``; used by :mod:`ichmodel.lease`). :func:`classify`
names the kind; :func:`storage_error` builds a :class:`StorageError` whose message is one line::

    Out of space writing /mnt/runs/a/checkpoint.pt (No space left on device, about 210 MB needed): free space there, then resume the run
    Bucket missing for s3://ich-runs/a/lease.json (NoSuchBucket): create the bucket or correct the name

``torch.save`` given a *path* reports a full disk as ``RuntimeError: unexpected pos``, with no errno and no
cause: :func:`ichmodel.checkpoint.save_checkpoint` therefore writes through a Python file object, whose
``OSError`` (errno 28) is then raised itself or is the ``__context__`` of torch's ``RuntimeError``, which
:func:`classify` follows.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_CREDENTIALS = "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN or the node's instance profile"
#: kind → (what is wrong, what to do); the kinds :func:`classify` returns.
KINDS = {
    "no_space": ("Out of space", "free space there, then resume the run"),
    "read_only": ("Read-only storage", "use a writable location or remount it read-write"),
    "permission": ("Permission denied", "give this user (or these credentials) write access there"),
    "no_bucket": ("Bucket missing", "create the bucket or correct the name"),
    "credentials": ("Credentials refused", f"check the credentials this job runs with ({_CREDENTIALS})"),
    # S3 answers a HEAD (pyarrow's first request) with a bare 403: an unknown key and a missing right look alike
    "access_denied": (
        "Access refused",
        f"the credentials in use are unknown, expired or may not write there: check them ({_CREDENTIALS}) "
        "and the bucket's policy",
    ),
    "unreachable": ("Storage unreachable", "check the endpoint (AWS_ENDPOINT_URL) and the network"),
}

_ERRNO_KINDS = {
    errno.ENOSPC: "no_space",
    errno.EDQUOT: "no_space",
    errno.EROFS: "read_only",
    errno.EACCES: "permission",
    errno.EPERM: "permission",
}
#: AWS error names as pyarrow spells them (``AWS Error NAME during ...``) and as S3 returns them (codes).
_AWS_KINDS = {
    "NO_SUCH_BUCKET": "no_bucket",
    "NoSuchBucket": "no_bucket",
    "ACCESS_DENIED": "access_denied",
    "AccessDenied": "access_denied",
    "AllAccessDisabled": "access_denied",
    "INVALID_ACCESS_KEY_ID": "credentials",
    "InvalidAccessKeyId": "credentials",
    "SIGNATURE_DOES_NOT_MATCH": "credentials",
    "SignatureDoesNotMatch": "credentials",
    "EXPIRED_TOKEN": "credentials",
    "ExpiredToken": "credentials",
    "InvalidToken": "credentials",
    "MISSING_AUTHENTICATION_TOKEN": "credentials",
    "NETWORK_CONNECTION": "unreachable",
    "EntityTooLarge": "no_space",
    "QuotaExceeded": "no_space",
}
_AWS_ERROR = re.compile(r"AWS Error (\w+)")
#: pyarrow's own words where it names no AWS error (``S3FileSystem.create_dir`` checks the bucket first).
_TEXT_KINDS = ((re.compile(r"Bucket '[^']*' not found"), "no_bucket", "NoSuchBucket"),)


class StorageError(OSError):
    """A storage failure in one line: ``"<what> <action> <location> (<cause>): <what to do>"``.

    Attributes:
        location: the file or folder (path or URI) being used.
        kind: one of :data:`KINDS`.
        cause: the short cause from the original error (its errno text or AWS error name).
    """

    def __init__(self, location: str | Path, kind: str, cause: str, action: str = "writing", needed: int = 0):
        what, advice = KINDS[kind]
        need = f", about {needed / 1e6:.0f} MB needed" if needed >= 1e6 else ""
        need = f", about {needed / 1e3:.0f} kB needed" if 0 < needed < 1e6 else need
        super().__init__(f"{what} {action} {display(location)} ({cause}{need}): {advice}")
        self.location, self.kind, self.cause = str(location), kind, cause


def display(location: str | Path) -> str:
    """A location as messages show it: a URI without its ``?query`` and without a ``KEY:SECRET@`` part."""
    text = str(location).partition("?")[0]
    scheme, sep, rest = text.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def _aws_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)  # botocore.exceptions.ClientError
    if isinstance(response, dict):
        code = (response.get("Error") or {}).get("Code")
        if code:
            return str(code)
    found = _AWS_ERROR.search(str(exc))  # pyarrow's S3 errors
    return found.group(1) if found else None


def classify(exc: BaseException) -> tuple[str, str] | None:
    """``(kind, cause)`` of a storage failure (kinds: :data:`KINDS`), or None for anything else.

    Follows ``__cause__``/``__context__`` (a torch writer's ``RuntimeError`` raised while an ``OSError`` was
    being handled, an error re-raised by a wrapper).
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = _aws_code(exc)
        if code in _AWS_KINDS:
            return _AWS_KINDS[code], code
        if isinstance(exc, OSError):
            number = exc.errno
            if number is None:  # pyarrow: "[errno 28] No space left on device" in the text only
                found = re.search(r"\[errno (\d+)\]", str(exc), re.IGNORECASE)
                number = int(found.group(1)) if found else None
            if number in _ERRNO_KINDS:  # the short cause (pyarrow's strerror is its whole message)
                return _ERRNO_KINDS[number], os.strerror(number)
        for pattern, kind, cause in _TEXT_KINDS:
            if isinstance(exc, OSError) and pattern.search(str(exc)):
                return kind, cause
        if type(exc).__name__ in (
            "NoCredentialsError",
            "PartialCredentialsError",
        ):  # botocore, before a request
            return "credentials", type(exc).__name__
        if type(exc).__name__ in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"):
            return "unreachable", type(exc).__name__
        exc = exc.__cause__ or exc.__context__
    return None


def storage_error(
    exc: BaseException, location: str | Path, action: str = "writing", needed: int = 0
) -> StorageError | None:
    """A :class:`StorageError` for ``exc`` at ``location`` (``needed``: bytes the write needed), or None when
    ``exc`` is not a storage failure :func:`classify` knows."""
    if isinstance(exc, StorageError):
        return exc
    found = classify(exc)
    if found is None:
        return None
    kind, cause = found
    return StorageError(location, kind, cause, action, needed)


@contextmanager
def storage_errors(location: str | Path, action: str = "writing", needed: int = 0) -> Iterator[None]:
    """Re-raise a storage failure inside the block as a one-line :class:`StorageError` (the original as its
    ``__cause__``, for ``-v``); anything else passes unchanged."""
    try:
        yield
    except Exception as exc:
        error = storage_error(exc, location, action, needed)
        if error is None or error is exc:
            raise
        raise error from exc
