class UsageError(ValueError):
    """Arguments an `mcihn` command cannot run with: one line naming what to pass instead, exit 2."""
