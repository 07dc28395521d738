"""The errors of preference data: a dataset the trainers cannot read, and a pipeline input that cannot work."""


class QRPODatasetError(ValueError):
    """A QRPO dataset row or column the trainers cannot use; the message names the row and the fix."""


class QRPOPrepareError(ValueError):
    """An option or input of the QRPO data pipeline that cannot work; the message names the problem and the fix."""
