"""The one exception tree of nextn.

Every error a user can cause or meet maps to one class here, carries one message meant for a person,
and (for the server) one HTTP status. Tracebacks are for bugs, not for bad input.
"""


class NextnError(Exception):
    """Base of every error nextn raises on purpose. `str(err)` is the user-facing message."""

    exit_code = 1
    http_status = 500


class ConfigError(NextnError):
    """A setting is wrong: names the file, key, bad value and allowed values."""

    exit_code = 78  # EX_CONFIG; listed in RestartPreventExitStatus= so systemd does not restart-loop


class ModelLoadError(NextnError):
    """A GGUF file cannot be used: names the file and the problem."""

    exit_code = 65  # EX_DATAERR


class UnsupportedArchitecture(ModelLoadError):
    """The file's `general.architecture` is not one nextn implements."""


class DeviceError(NextnError):
    """No usable OpenCL device, or the model does not fit on it."""

    exit_code = 69  # EX_UNAVAILABLE


class OutOfDeviceMemory(DeviceError):
    """The model (plus caches) needs more device memory than there is; says both amounts."""


class KernelBuildError(NextnError):
    """An OpenCL program failed to compile; carries the build log."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message + (f"\n--- build log ---\n{log}" if log else ""))
        self.log = log


class CLCallError(NextnError):
    """An OpenCL API call returned an error status."""

    def __init__(self, call: str, status: int):
        super().__init__(f"OpenCL call {call} failed with status {status}")
        self.call = call
        self.status = status


class RequestError(NextnError):
    """The request is malformed or asks for something impossible (-> 400)."""

    http_status = 400


class Overloaded(NextnError):
    """The queue is full (-> 503)."""

    http_status = 503
