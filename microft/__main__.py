"""`python -m microft …`, `torchrun … -m microft …` and the `microft` command run the CLI.

Ctrl-C may come at any moment of start-up, even while torch or numpy is being imported: the SIGINT
handler goes in first (microft.errors is tiny), so an interrupted start-up ends with exit 130 and
no traceback, and a KeyboardInterrupt that C code swallows is still remembered (see cli.user_errors).
"""

import os
import signal
import sys


def main() -> None:
    """The console entry point: install the SIGINT handler, then import and run the CLI."""
    try:
        from microft.errors import record_signal

        try:  # also where a script started us with `&` (SIGINT ignored): kill -INT still stops us
            signal.signal(signal.SIGINT, record_signal)
        except ValueError:  # not the main thread (an embedding host): keep its handler
            pass
        from microft.cli import main as cli_main
    except KeyboardInterrupt:  # Ctrl-C while the CLI's modules load
        try:  # going down: a second Ctrl-C (or a deferred one sent again) must not raise again
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
        os._exit(130)  # not sys.exit: see cli.exit_interrupted
    cli_main()


if __name__ == "__main__":
    main()
