"""The one base class of a user's input errors.

``InputError`` is what the user can fix by changing what they typed or pointed at: a config key
or value (``pipeline.config.ConfigError``), the dataset on disk
(``pipeline.data.layout.DataError``), a command-line option, a file or folder named on the
command line that does not exist or is not what it should be. Its message is one line naming the
problem; the command line prints it and exits 2. Every other exception is a failure of the
program or its surroundings (a full disk while checkpointing, a broken invariant, an unreachable
tracking server) and keeps its traceback (exit 1), so that it is not mistaken for a typo.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user; the message is one line naming it (the key, file or option)."""
