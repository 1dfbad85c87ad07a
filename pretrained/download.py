"""Resumable, verified downloads of published checkpoints (urllib only: no extra dependency).

The bytes stream into ``<cache>/pretrained/NAME.part``; a transfer that breaks off is resumed
with an HTTP ``Range`` request, a few times in the same call and otherwise by the next
``dcbench pretrained download NAME`` (the ``.part`` file stays). A finished file is checked
against the manifest's sha256 (or the user's pin, or the sha256 prefix) and for being a PyTorch
file at all, then renamed into place and its sha256 recorded in the lock file. A file that fails
the check is removed, so a corrupted download never lingers in the cache.

Only https is used: a plain-http URL, or a redirect to one, is refused (a network attacker could
otherwise swap the file of an entry without a published sha256). A resume sends ``If-Range``
with the ETag (or Last-Modified) the server gave for the bytes already in ``NAME.part``, kept
beside it in ``NAME.part.json`` (RFC 9110, section 13.1.5): if the file changed on the server,
the server sends all of it again instead of the rest of the new file, so two versions are never
spliced. Without a validator to send, the download starts over.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from dcbench.checkpoint import SourceFile
from dcbench.errors import CheckpointError
from dcbench.fileio import atomic_write_text
from dcbench.pretrained.registry import (Entry, cached_path, check_trust_allowed, checksum_problem, file_sha256, forget,
                                         get_entry, is_cached, partial_path, pin, record, unverified_reason,
                                         verify_cached)

log = logging.getLogger("dcbench")

TIMEOUT_S = 30.0  # per socket operation: a stalled server counts as an interruption
ATTEMPTS = 4  # transfers per call; each one after the first resumes where the last stopped
RETRY_WAIT_S = 1.0  # times the attempt number, between attempts
CHUNK = 1 << 20
#: hosts plain http is allowed for (none: tests add 127.0.0.1 for their local server)
INSECURE_HOSTS: frozenset[str] = frozenset()


class _Interrupted(Exception):
    """The transfer stopped early; the ``.part`` file holds what arrived and can be resumed."""


class _Unreachable(Exception):
    """No connection to the server at all (no network, DNS failure, refused, timed out)."""


def _by_hand(entry: Entry) -> str:
    return f"without network, fetch that file elsewhere and run `dcbench pretrained add {entry.name} FILE`"


def download(entry: Entry, force: bool = False, attempts: int | None = None,
             sha256: str | None = None) -> tuple[Path, str]:
    """Download ``entry`` into the cache (once), verify it, record it; ``(path, sha256)``.
    ``attempts``: transfers before giving up (default :data:`ATTEMPTS`); ``sha256``: the full
    hash the file must have, pinned for the entry first (:func:`dcbench.pretrained.registry.pin`)."""
    dest = cached_path(entry)
    _require_https(entry, entry.url)
    if force:
        forget(entry)
        dest.unlink(missing_ok=True)
        partial_path(entry).unlink(missing_ok=True)
        _validators_path(entry).unlink(missing_ok=True)
    if sha256:
        pin(entry, sha256, "download --sha256")
    if dest.is_file():
        return dest, verify_cached(entry)
    log.info("downloading %s from %s", entry.name, entry.url)
    with _open_part(entry) as part:
        try:
            _fetch(entry, part, attempts or ATTEMPTS)
        except BaseException:
            if os.fstat(part.fileno()).st_size == 0:  # nothing arrived: leave no empty .part behind
                Path(part.name).unlink(missing_ok=True)
                _validators_path(entry).unlink(missing_ok=True)
            raise
        sha = _check_finished(entry, Path(part.name))
        os.replace(part.name, dest)
    _validators_path(entry).unlink(missing_ok=True)
    record(entry, sha, "download")
    return dest, sha


# ----------------------------------------------------------------------------- https only
def _is_secure(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in INSECURE_HOSTS)


def _require_https(entry: Entry, url: str) -> None:
    if not _is_secure(url):
        raise CheckpointError(f"refusing to download {entry.name} from {url}: dcbench downloads only over https; "
                              f"{_by_hand(entry)}")


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to https URLs only; a redirect to http (a downgrade) is refused."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        newurl = urllib.parse.urljoin(req.full_url, newurl)
        if not _is_secure(newurl):
            raise CheckpointError(f"the server of {req.full_url} redirects to {newurl}, which is not https; "
                                  f"refusing to download over plain http")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _open(request: urllib.request.Request) -> http.client.HTTPResponse:
    """``urlopen`` through an opener that follows https redirects only."""
    return urllib.request.build_opener(_HttpsOnlyRedirects).open(request, timeout=TIMEOUT_S)


# ----------------------------------------------------------------------------- resume validators
def _validators_path(entry: Entry) -> Path:
    """``NAME.part.json``: the URL and the ETag / Last-Modified of the bytes in ``NAME.part``."""
    path = partial_path(entry)
    return path.with_name(path.name + ".json")


def _read_validators(entry: Entry) -> dict[str, str]:
    try:
        data = json.loads(_validators_path(entry).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("url") == entry.url else {}


def _save_validators(entry: Entry, response: http.client.HTTPResponse) -> None:
    """Remember what identifies the version of the file now streaming into ``NAME.part``."""
    data = {"url": entry.url, "etag": response.headers.get("ETag"),
            "last_modified": response.headers.get("Last-Modified")}
    atomic_write_text(_validators_path(entry), json.dumps(data) + "\n")


def _if_range(validators: dict[str, str]) -> str | None:
    """The ``If-Range`` value: a strong ETag, else Last-Modified (a weak ETag is not allowed
    there, RFC 9110 section 13.1.5); None: nothing identifies the partial file's version."""
    etag = validators.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    return validators.get("last_modified") or None


@contextlib.contextmanager
def _open_part(entry: Entry) -> Iterator[BinaryIO]:
    """``NAME.part`` opened for appending, locked so that two processes never write it at once."""
    path = partial_path(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): no cross-process guard
            pass
        except BlockingIOError as exc:
            raise CheckpointError(f"another dcbench process is downloading {entry.name} into {path}; "
                                  f"wait for it to finish") from exc
        yield f


def _fetch(entry: Entry, part: BinaryIO, attempts: int) -> None:
    """Transfer until complete, resuming after interruptions; one-line errors otherwise."""
    reason = ""
    for attempt in range(1, attempts + 1):
        try:
            _transfer(entry, part)
            return
        except _Unreachable as exc:
            if attempt == 1:  # never connected in this call: offline, or the server is gone
                raise CheckpointError(f"cannot download {entry.name} from {entry.url} ({exc}); "
                                      f"{_by_hand(entry)}") from exc
            reason = str(exc)
        except _Interrupted as exc:
            reason = str(exc)
        if attempt < attempts:
            log.warning("download of %s interrupted (%s); resuming", entry.name, reason)
            time.sleep(RETRY_WAIT_S * attempt)
    have = os.fstat(part.fileno()).st_size
    raise CheckpointError(f"download of {entry.name} interrupted after {_mb(have)} ({reason}); run "
                          f"`dcbench pretrained download {entry.name}` again to resume from there")


def _transfer(entry: Entry, part: BinaryIO) -> None:
    """One HTTP request: ``Range: bytes=<size of .part>-`` with ``If-Range`` when there is
    something to resume and a validator of its version; a full GET otherwise."""
    offset = os.fstat(part.fileno()).st_size
    headers = {"User-Agent": "dcbench (pretrained download)"}
    validators = _read_validators(entry) if offset else {}
    if offset and _if_range(validators) is None:  # the partial's version is unknown: never splice
        log.warning("cannot tell which version of %s the partial download holds; starting over", entry.name)
        part.truncate(0)
        offset = 0
    if offset:
        headers["Range"] = f"bytes={offset}-"
        headers["If-Range"] = _if_range(validators)
    try:
        response = _open(urllib.request.Request(entry.url, headers=headers))
    except urllib.error.HTTPError as exc:
        _http_error(entry, part, offset, exc)
        return
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _Unreachable(_reason(exc)) from exc
    with response:
        if offset and not _continues(response, offset, validators):
            part.truncate(0)  # a different version, or the server ignored Range: start over
            if response.status == 206:  # only part of the other version: fetch all of it next
                raise _Interrupted("the file changed on the server since the partial download; starting over")
            offset = 0
        if not offset:
            _save_validators(entry, response)
        _copy(entry, response, part, offset, _expected_size(response, offset))


def _continues(response: http.client.HTTPResponse, offset: int, validators: dict[str, str]) -> bool:
    """Whether ``response`` carries the rest of the partial file: a 206 starting at ``offset``
    whose ETag (when the server sends one) is the partial's. A 200 (the file changed, so
    If-Range failed, or Range is not supported) is the whole file; a server that ignored
    If-Range but changed the ETag is caught here too."""
    if response.status != 206:
        return False
    match = re.match(r"\s*bytes\s+(\d+)-", response.headers.get("Content-Range", ""))
    if not match or int(match.group(1)) != offset:
        return False
    etag = response.headers.get("ETag")
    return not (etag and validators.get("etag") and etag != validators["etag"])


def _http_error(entry: Entry, part: BinaryIO, offset: int, exc: urllib.error.HTTPError) -> None:
    """416 on a resume means the ``.part`` is complete (or stale); anything else is final."""
    if exc.code == 416 and offset:
        total = _total_from_content_range(exc.headers.get("Content-Range", ""))
        if total == offset:
            return
        part.truncate(0)
        raise _Interrupted("the server refused the resume range; starting over") from exc
    raise CheckpointError(f"cannot download {entry.name} from {entry.url} (HTTP {exc.code} {exc.reason}); "
                          f"{_by_hand(entry)}") from exc


def _copy(entry: Entry, response: http.client.HTTPResponse, part: BinaryIO, offset: int,
          total: int | None) -> None:
    from dcbench.progress import Progress

    received = offset
    with Progress(total, entry.name, "B", initial=offset, unit_scale=True) as bar:
        while True:
            try:
                chunk = response.read(CHUNK)
            except (OSError, http.client.HTTPException) as exc:  # reset, timeout, truncated chunk
                part.flush()
                raise _Interrupted(_reason(exc)) from exc
            if not chunk:
                break
            part.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    part.flush()
    # http.client returns b"" when the peer closes early, even with a Content-Length: compare sizes
    if total is not None and received < total:
        raise _Interrupted(f"connection closed after {_mb(received)} of {_mb(total)}")


def _expected_size(response: http.client.HTTPResponse, offset: int) -> int | None:
    """Size of the whole file: from Content-Range for a 206, else offset + Content-Length."""
    if response.status == 206:
        total = _total_from_content_range(response.headers.get("Content-Range", ""))
        if total is not None:
            return total
    length = response.headers.get("Content-Length")
    return offset + int(length) if length and length.isdigit() else None


def _total_from_content_range(value: str) -> int | None:
    match = re.search(r"/(\d+)\s*$", value)
    return int(match.group(1)) if match else None


def _check_finished(entry: Entry, path: Path) -> str:
    """sha256 of a finished download; a corrupted one is removed and refused."""
    sha = file_sha256(path)
    problem = checksum_problem(entry, sha) or _not_torch_file(path)
    if problem:
        path.unlink(missing_ok=True)
        _validators_path(entry).unlink(missing_ok=True)
        raise CheckpointError(f"download of {entry.name} from {entry.url} is corrupted ({problem}); removed it "
                              f"from the cache: run `dcbench pretrained download {entry.name}` again")
    return sha


def _not_torch_file(path: Path) -> str | None:
    """Why ``path`` cannot be a torch.save file (zip or pickle), e.g. an HTML error page."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return None
    return f"not a PyTorch file: it starts with {head[:12]!r}" if head else "the file is empty"


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    text = str(reason).strip() or type(reason).__name__
    return text.splitlines()[0]


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def ensure_cached(entry: Entry) -> tuple[Path, str]:
    """The verified cached file of ``entry`` and its sha256, downloading it first if needed."""
    if not is_cached(entry):
        download(entry)
    return cached_path(entry), verify_cached(entry)


def verified_file(name: str) -> tuple[Entry, Path, str]:
    """``(entry, cached file, file sha256)`` for ``name``: downloaded once, verified on every call."""
    entry = get_entry(name)
    path, sha = ensure_cached(entry)
    return entry, path, sha


def resolve_source(name: str) -> SourceFile:
    """``pretrained:NAME`` for :func:`dcbench.checkpoint.resolve_checkpoint` (registered in the
    ``dcbench.checkpoint_sources`` entry-point group): the verified cached file of ``name``.

    A file that needs full unpickling (``--trust-checkpoint``) is refused unless its full sha256
    is pinned (:func:`dcbench.pretrained.registry.check_trust_allowed`): a resolver is not told
    whether the caller trusts the file, so it refuses before the caller can unpickle it."""
    entry, path, file_sha = verified_file(name)
    check_trust_allowed(entry, path, file_sha)
    meta = {"pretrained": entry.name, "file_sha256": file_sha, "url": entry.url}
    reason = unverified_reason(entry)
    if reason:  # a `pretrained add --force` file: results record it (dcbench.evaluate.run)
        meta["unverified"] = reason
    return SourceFile(path, f"pretrained:{entry.name}", entry.arch, entry.input_size, meta)
