"""Stop requests: how a running job is asked to checkpoint and exit resumably.

A request comes from SIGTERM (scancel, torchrun passing on its own SIGTERM), SIGINT (Ctrl-C;
a second Ctrl-C aborts at once), SIGUSR1 (SLURM's warning before the time limit) or the file
named by ``$PIPELINE_STOP_FILE`` (train.sbatch's USR1 trap creates it on the shared
filesystem, so every rank on every node sees it; its first word, if any, is the reason). The
loop reads the request only at its sync points, so a stop costs no per-step host work.

``$PIPELINE_HOLD_AT_STEP=N`` is a test hook: right after optimizer step N the run holds until
a stop request arrives. A test can then signal a run that is certainly still training,
without racing it.
"""
from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger("pipeline")

REASONS = {signal.SIGTERM: "signal", signal.SIGINT: "signal", signal.SIGUSR1: "preempted"}
STOP_REASONS = ("preempted", "signal", "stop_file")  # the run's MLflow tag stop_reason


class StopRequest:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.reason: str | None = None
        self.stop_file = os.environ.get("PIPELINE_STOP_FILE") or None
        hold = os.environ.get("PIPELINE_HOLD_AT_STEP")
        self.hold_at = int(hold) if hold else None
        for sig in REASONS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.pid:
            return  # a forked data worker: the run stops it once it has checkpointed
        if signum == signal.SIGINT and self.reason is not None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt  # the second Ctrl-C: abort now
        if signum == signal.SIGINT:
            log.warning("Ctrl-C: checkpointing at the next sync point (again to abort)")
        self.reason = self.reason or REASONS[signal.Signals(signum)]

    def _stop_file_reason(self) -> str | None:
        if not (self.stop_file and os.path.exists(self.stop_file)):
            return None
        try:
            with open(self.stop_file) as f:
                words = f.read(64).split()
        except OSError:
            words = []
        return words[0] if words and words[0] in STOP_REASONS else "stop_file"

    def requested(self) -> bool:
        """Whether this process was asked to stop (reads the stop file: call at sync points)."""
        self.reason = self.reason or self._stop_file_reason()
        return self.reason is not None

    def hold(self, step: int, announce: bool) -> None:
        """The test hook: wait at step ``hold_at`` until a stop request arrives."""
        if step != self.hold_at:
            return
        if announce:
            log.warning("holding at step %d until a stop request (PIPELINE_HOLD_AT_STEP)", step)
        while not self.requested():
            time.sleep(0.05)

    def close(self) -> None:
        """The default handlers again: a signal after the run is no stop request."""
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)

    def consume_stop_file(self) -> None:
        """Remove the stop file once the stop it asked for is done, so that running the same
        command again resumes instead of stopping at once."""
        if self.stop_file and self.reason is not None:
            try:
                os.unlink(self.stop_file)
            except FileNotFoundError:
                pass
