"""Errors meant for people: each message is one line naming the problem and the fix."""


class HwrjaxError(Exception):
    """Base class of every error hwrjax raises on purpose."""


class ConfigError(HwrjaxError, ValueError):
    """A config value is missing, unknown or out of range."""


class DataError(HwrjaxError):
    """A dataset cannot be found or has the wrong shape."""


class CheckpointError(HwrjaxError):
    """A checkpoint or workdir cannot be used as asked."""


class WorkdirBusy(CheckpointError):
    """Another run holds the workdir's lock."""


class Diverged(HwrjaxError):
    """Training produced a non-finite loss, gradient norm or weights; nothing non-finite was saved."""


class Preempted(Exception):
    """Raised after a checkpoint was saved because the process was asked to stop."""
