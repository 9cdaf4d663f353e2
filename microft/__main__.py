"""`python -m microft …` (and `torchrun … -m microft …`) runs the CLI."""

from microft.cli import main

main()
