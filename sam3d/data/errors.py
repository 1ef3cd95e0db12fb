"""The error every reader raises for a file it cannot use (one place, so io and dicom share it)."""

from sam3d.engine.errors import UserError


class VolumeReadError(UserError, ValueError):
    """A volume or mask file could not be used; the message names the file and what was wrong."""
