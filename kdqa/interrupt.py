"""Stop a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (what Slurm and Kubernetes send first).

While the training loop runs, either signal only sets a flag (StopRequest). At the next optimizer
step boundary the trainer writes a checkpoint of that step (unless it has just written one) and
raises TrainingInterrupted, which train.py turns into one line naming the step and the command that
continues the run, and exit code 128 + the signal's number (130, 143). The first signal restores
the previous handlers, so a second Ctrl-C stops at once (KeyboardInterrupt, one line as well).
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """A signal stopped training at a step boundary, after a checkpoint of that step was written."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after optimizer step {step}; "
                         f"{checkpoint} holds it")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """While entered: SIGINT/SIGTERM set `signum` instead of stopping the process mid-step."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self._restore()  # a second signal acts at once, as it would without us

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}


class SignalsSeen:
    """While entered: SIGINT/SIGTERM act at once, as before (KeyboardInterrupt, or the handler train.py
    set), and are remembered, so that a library which catches what they raise cannot hide them:
    torch.export wraps a KeyboardInterrupt raised while it traces into its own error (export then
    exited 1, not 130). `raise_if_seen` acts on a remembered signal again."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "SignalsSeen":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                previous = signal.getsignal(sig)
                if previous is not signal.SIG_IGN:  # an ignored signal stays ignored
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        else:  # the default action (the process ends by the signal)
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    def raise_if_seen(self) -> None:
        if self.signum is not None:
            self._handle(self.signum, None)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: Ctrl-C and Slurm's SIGTERM reach the whole process group; the workers
    leave them to the main process (which stops at the step's end) instead of dying under it. They
    still end with the main process."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def exit_on_stop_signals(prog: str) -> None:
    """For a short command with nothing to save (python -m kdqa.evaluate), installed before its heavy
    imports: SIGINT / SIGTERM end it with one line and 130 / 143, not silently (-15) or with a traceback."""
    def stop(signum, frame):
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"{prog}: interrupted ({name})", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, stop)


def continue_command(argv: list[str], script: str = "train.py", world_size: int = 1) -> str:
    """The command line that continues a stopped run: the same flags, resuming from its latest checkpoint."""
    rest, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--resume_from_checkpoint":
            skip = True
        elif not (token.startswith("--resume_from_checkpoint=") or token == "--overwrite_output_dir"):
            rest.append(token)
    launcher = ["python"] if world_size == 1 else ["torchrun", f"--nproc_per_node={world_size}"]
    return shlex.join([*launcher, script, *rest, "--resume_from_checkpoint", "latest"])
