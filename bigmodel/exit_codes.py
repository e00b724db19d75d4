"""Exit statuses of the `bigmodel` command: one definition for the trainer, the sweep and the launchers."""

OK = 0
ERROR = 1  # an unexpected failure: rerun with --debug for the traceback
USAGE = 2  # bad command line, config or path: refused before anything started
NONFINITE = 3  # the loss or the gradients stopped being finite: halted without saving
CHECKPOINT = 74  # EX_IOERR: a checkpoint could not be written (the previous one is intact)
PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after saving a checkpoint; run again to resume
INTERRUPTED = 130  # Ctrl-C (KeyboardInterrupt) outside the trainer's signal handling: 128 + SIGINT, as shells report
