"""`python -m microft …` (and `torchrun … -m microft …`) runs the CLI."""

import signal
import sys

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started with `&` by a script: kill -INT still stops us
    signal.signal(signal.SIGINT, signal.default_int_handler)
try:
    from microft.cli import main
except KeyboardInterrupt:  # Ctrl-C while the CLI's modules load
    sys.stderr.write("error: interrupted\n")
    sys.exit(130)

main()
