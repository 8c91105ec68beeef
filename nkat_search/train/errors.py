"""What the trainer raises when a run cannot go on, worded without the CLI's flags.

The CLI names the flag that set the value (``cli/main.py``). No torch here, so the CLI's error
handler reads these classes without importing it.
"""

from __future__ import annotations

from nkat_search.errors import UserError


class DeviceError(UserError):
    """A device name that is no device, or a device that is not there."""

    def __init__(self, device: object, reason: str):
        self.device, self.reason = str(device), reason
        super().__init__(f"device '{self.device}': {reason}")


class CheckpointMismatch(UserError):
    """A checkpoint made with another config sits where this run would resume from."""

    def __init__(self, path: object):
        self.path = path
        super().__init__(f"checkpoint {path} was made with a different config")
