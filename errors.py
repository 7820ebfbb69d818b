"""Typed errors a user can cause. The CLI prints them as one message, never a traceback."""


class JambaTRTError(Exception):
    """Base class: the message names what is wrong and what would be accepted."""

    exit_code = 2


class UsageError(JambaTRTError):
    """A command-line option is malformed or out of its range (the parser's own errors, one line)."""


class ConfigError(JambaTRTError):
    """A config.json or preset is inconsistent or unknown."""


class CheckpointError(JambaTRTError):
    """A checkpoint is missing a tensor, has a wrong shape/dtype or cannot be read."""


class ArtifactError(JambaTRTError):
    """An exported artifact is missing, corrupt or was tampered with."""


class InputError(JambaTRTError):
    """Bad runtime input: ids out of range, empty prompt, sequence too long, foreign state."""


class BackendUnavailable(JambaTRTError):
    """A backend's library, plugin or hardware is absent (TensorRT, CUDA, onnxruntime-extensions)."""


class ParityError(JambaTRTError):
    """Engine outputs differ from the reference beyond tolerance; lists every mismatch."""

    exit_code = 1

    def __init__(self, mismatches: list[str]):
        self.mismatches = list(mismatches)
        super().__init__("parity failed:\n  " + "\n  ".join(self.mismatches))
