"""The commands' entries, run before their imports. `flashlexctl`: a Ctrl-C during its imports
exits 130 without a traceback, as later. `flashlexd`: SIGHUP held from the first line `run`
executes (kept free of imports: every module imported before this runs widens the window in which
SIGHUP's default action ends the daemon without a word, and systemd counts a death by SIGHUP as
a clean exit, so it does not restart it). The supervisor reloads once for what was held
(cli.run hands it this list)."""
from __future__ import annotations

import signal
import sys

HELD: list[int] = []  # one entry per SIGHUP received before the supervisor's own handler
_installed = False


def hold() -> list[int]:
    """Note SIGHUPs instead of dying of them (a Python handler, not SIG_IGN, so that what
    start-up execs gets the default); idempotent. Returns the list they are noted in."""
    global _installed
    if not _installed:
        signal.signal(signal.SIGHUP, lambda signum, frame: HELD.append(signum))
        _installed = True
    return HELD


def _command(argv: list[str]) -> str | None:
    """The subcommand: the first word that is not an option (the top level's only options,
    -h and --version, take no value). `"run" in argv` also matched an option's value
    (`flashlexd store recover --to run`, `check --config run`)."""
    return next((word for word in argv if not word.startswith("-")), None)


def _std_fds_open() -> None:
    """Started with fds 0-2 closed (`flashlexd run >&- 2>&-`, a bare launcher), the first files
    the daemon opens would take their numbers and log lines would go into them (a store file,
    the API socket), and Python's streams are None (the fork server's flush died on it, rc 1
    without a word): /dev/null stands in, as daemons do, and the streams are made again."""
    import os
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False, errors="backslashreplace"))


def main() -> int:
    """The `flashlexd` command (`python -m flashlexd` and the console script): hold SIGHUP for
    `run` before importing the CLI."""
    _std_fds_open()
    running = _command(sys.argv[1:]) == "run"
    if running:
        hold()
    try:
        from flashlexd.cli import main as cli_main
        return cli_main()
    except KeyboardInterrupt:  # Ctrl-C before the supervisor's handlers, or during another command
        print("flashlexd: interrupted" + ("; stopped before it was ready" if running else ""),
              file=sys.stderr, flush=True)
        try:
            sys.stdout.flush()
        except (OSError, ValueError, AttributeError):  # a reader gone, stdout closed or None
            pass
        # a KeyboardInterrupt that passed through an import makes the interpreter end itself by
        # SIGINT at exit whatever is returned; nothing of the daemon runs yet that needs atexit
        import os
        if running:
            os._exit(0)  # README: SIGINT stops `run` gracefully, exit 0
        # any other command dies of the SIGINT, as before, so that a shell script running it
        # stops too (bash goes on with its next command when its child merely exits 130)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        os._exit(130)  # SIGINT blocked: the shell's convention


def ctl_main() -> int:
    """The `flashlexctl` command: its main handles Ctrl-C once imported (exit 130); before, it
    was a traceback (the first ~0.2 s): exit 130 there too."""
    try:
        from flashlexd.client.ctl import main as ctl
    except KeyboardInterrupt:
        import os
        sys.stderr.flush()
        os._exit(130)  # not by SIGINT at exit, which a KeyboardInterrupt through an import brings
    return ctl()
