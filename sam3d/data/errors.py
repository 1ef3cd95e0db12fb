"""The error every reader raises for a file it cannot use (one place, so io and dicom share it)."""

from ich_engine.errors import UserError


class VolumeReadError(UserError, ValueError):
    """A volume or mask file could not be used; the message names the file and what was wrong."""


class SliceGapError(VolumeReadError):
    """Missing or duplicate slice positions in a DICOM series. ``problem`` says where; the message adds
    the command-line remedy (``--allow_gaps``), which an interface without that flag replaces."""

    def __init__(self, problem: str, remedy: str) -> None:
        super().__init__(f"{problem}; {remedy}")
        self.problem = problem
