"""Studies from a DICOMweb archive (a PACS, Orthanc, dcm4chee, a cloud DICOM store) and results back.

QIDO-RS lists a study's series, WADO-RS retrieves its CT series into a folder that then reads like
any DICOM folder, and STOW-RS stores the SEG and the SR back in one request (``dicomweb-client``).

Credentials come from the environment, never from the command line, where ``ps`` and shell history
would show them: :data:`TOKEN_ENV` (a bearer token) or :data:`USER_ENV` with :data:`PASSWORD_ENV`
(HTTP basic). TLS certificates are verified; an archive signed by a private CA is trusted through
``REQUESTS_CA_BUNDLE``. Connection failures and answers that mean "try again" (429, 502, 503, 504)
are retried with exponential back-off; every other failure is one :class:`ArchiveError` line naming
the URL, what was asked and what the archive answered.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from ich_engine.errors import UserError

__all__ = ["PASSWORD_ENV", "TOKEN_ENV", "USER_ENV", "ArchiveError", "DICOMwebArchive"]

TOKEN_ENV = "SAM3D_DICOMWEB_TOKEN"
USER_ENV = "SAM3D_DICOMWEB_USER"
PASSWORD_ENV = "SAM3D_DICOMWEB_PASSWORD"
RETRIED_STATUS = (429, 502, 503, 504)
BACKOFF_S = 0.5  # waits of 0.5, 1, 2, ... s between tries


class ArchiveError(UserError):
    """The archive could not be reached, refused a request, or does not hold what was asked for."""


def _session(retries: int) -> requests.Session:
    """A session that authenticates from the environment and retries what may succeed a moment later.
    STOW (POST) is retried on connection failures only: a store the archive may have received is not sent twice."""
    token, user, password = (os.environ.get(name, "") for name in (TOKEN_ENV, USER_ENV, PASSWORD_ENV))
    if token and user:
        raise ArchiveError(f"both {TOKEN_ENV} and {USER_ENV} are set; set the one the archive expects")
    if bool(user) != bool(password):
        raise ArchiveError(f"HTTP basic authentication needs both {USER_ENV} and {PASSWORD_ENV}; one is empty")
    session = requests.Session()
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif user:
        session.auth = (user, password)
    retry = Retry(
        total=retries,
        backoff_factor=BACKOFF_S,
        status_forcelist=RETRIED_STATUS,
        allowed_methods=frozenset({"GET"}),
        raise_on_status=False,
    )
    for scheme in ("http://", "https://"):
        session.mount(scheme, HTTPAdapter(max_retries=retry))
    return session


def _reason(err: Exception) -> str:
    """The operating system's words for a failed connection ("[Errno 111] Connection refused"), not the
    nested urllib3 exception reprs around them."""
    found = re.search(r"\[Errno -?\d+\] [^'\")]+", str(err))
    return found.group(0) if found else type(err).__name__


class DICOMwebArchive:
    """One DICOMweb service root (``--dicomweb``), e.g. ``http://localhost:8042/dicom-web``."""

    def __init__(self, url: str, timeout_s: float = 30.0, retries: int = 3) -> None:
        if not re.match(r"https?://[^/]+", url):
            raise ArchiveError(f"--dicomweb {url}: expected an http:// or https:// URL of the DICOMweb root")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.client = DICOMwebClient(self.url, session=_session(retries), timeout=timeout_s)
        self.client.set_http_retry_params(retry=False)  # the session retries, connection failures included

    @contextlib.contextmanager
    def _asking(self, what: str) -> Iterator[None]:
        """Turn the ways a request fails into one line: ``what`` says which request it was."""
        where = f"--dicomweb {self.url}"
        try:
            yield
        except requests.exceptions.SSLError as err:
            raise ArchiveError(
                f"{where}: TLS certificate not accepted for {what} ({_reason(err)}); an archive signed by a "
                "private CA needs REQUESTS_CA_BUNDLE=/path/to/ca.pem"
            ) from None
        except requests.exceptions.ConnectionError as err:
            raise ArchiveError(
                f"{where}: cannot connect for {what} ({_reason(err)}, {self.retries + 1} tries); "
                "is the archive running and the host and port right?"
            ) from None
        except requests.exceptions.Timeout:
            raise ArchiveError(f"{where}: no answer to {what} within {self.timeout_s:g} s") from None
        except requests.exceptions.HTTPError as err:
            status = err.response.status_code if err.response is not None else 0
            answer = f"HTTP {status} {err.response.reason if err.response is not None else ''}".strip()
            if status in (401, 403):
                hint = f"set {USER_ENV} and {PASSWORD_ENV}, or {TOKEN_ENV}, to an account allowed to do this"
            elif status == 404:
                hint = "is the URL the DICOMweb root (for Orthanc http://host:8042/dicom-web)?"
            else:
                hint = "see the archive's log"
            raise ArchiveError(f"{where}: {what} refused ({answer}); {hint}") from None
        except (requests.exceptions.RequestException, ValueError) as err:
            # A 200 that is not DICOM JSON: the URL names a web server, not a DICOMweb service.
            raise ArchiveError(
                f"{where}: {what} got an answer that is not DICOMweb ({err}); is the URL the DICOMweb root?"
            ) from None

    def series_of_study(self, study_uid: str) -> list[pydicom.Dataset]:
        """QIDO-RS: the study's series (Modality, SeriesDescription, SeriesInstanceUID, ...); an
        unknown study is an :class:`ArchiveError` naming it."""
        with self._asking(f"the series of study {study_uid} (QIDO-RS)"):
            found = [pydicom.Dataset.from_json(item) for item in self.client.search_for_series(study_uid)]
        if not found:
            raise ArchiveError(f"--study {study_uid}: no such study on {self.url}")
        return found

    def retrieve_ct(self, study_uid: str, series: str | None, folder: Path) -> Path:
        """WADO-RS: the study's CT series into ``folder`` (one file per instance), which then reads
        like any DICOM folder. ``series`` (``--series_uid``) is a SeriesInstanceUID or part of a
        SeriesDescription, matched as a folder's series are; without it every CT series comes, and
        reading chooses the axial one with the most slices."""
        listing = self.series_of_study(study_uid)
        ct = [s for s in listing if s.get("Modality") == "CT"]
        if series:
            ct = [s for s in ct if s.SeriesInstanceUID == series] or [
                s for s in ct if series.lower() in str(s.get("SeriesDescription", "")).lower()
            ]
        if not ct or (series and len(ct) > 1):
            held = ", ".join(
                f"{s.SeriesInstanceUID} {s.get('Modality', '?')} '{s.get('SeriesDescription', '')}'" for s in listing
            )
            asked = f" matching --series_uid {series!r}" if series else ""
            found = f"{len(ct)} CT series" if ct else "no CT series"
            raise ArchiveError(f"--study {study_uid}: {found}{asked} on {self.url}; it holds {held}")
        folder.mkdir(parents=True, exist_ok=True)
        for item in ct:
            with self._asking(f"series {item.SeriesInstanceUID} of study {study_uid} (WADO-RS)"):
                for instance in self.client.iter_series(study_uid, item.SeriesInstanceUID):
                    instance.save_as(folder / f"{instance.SOPInstanceUID}.dcm", enforce_file_format=True)
        return folder

    def store(self, study_uid: str, paths: Sequence[Path]) -> list[str]:
        """STOW-RS: the files at ``paths`` in one request, in that order (the SEG before the SR that
        refers to it). Returns their SOPInstanceUIDs once QIDO-RS lists every one of them.

        STOW-RS reports per instance, so an archive may keep part of a request (PS3.18 answers 202
        with a FailedSOPSequence) or say it stored an instance its import filter then dropped; the
        error names what the archive holds and what it does not.
        """
        datasets = [pydicom.dcmread(path) for path in paths]
        names = {str(ds.SOPInstanceUID): f"{ds.Modality} {Path(path).name}" for ds, path in zip(datasets, paths)}
        with self._asking(f"storing {', '.join(names.values())} in study {study_uid} (STOW-RS)"):
            answer = self.client.store_instances(datasets, study_uid)
        failed = {str(item.ReferencedSOPInstanceUID) for item in answer.get("FailedSOPSequence", [])}
        with self._asking(f"checking the stored instances of study {study_uid} (QIDO-RS)"):
            held = {
                str(pydicom.Dataset.from_json(item).SOPInstanceUID)
                for item in self.client.search_for_instances(study_uid, fields=["SOPInstanceUID"])
            }
        missing = [uid for uid in names if uid not in held or uid in failed]
        if missing:
            kept = ", ".join(names[uid] for uid in names if uid not in missing)
            lost = ", ".join(names[uid] for uid in missing)
            said = "STOW-RS reported the failure" if failed else "STOW-RS reported it stored, QIDO-RS does not list it"
            raise ArchiveError(
                f"--store: the archive kept {kept} but not {lost} ({said}; see the archive's log)"
                if kept
                else f"--store: the archive kept none of {lost} ({said}; see the archive's log)"
            )
        return list(names)
