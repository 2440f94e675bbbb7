"""`python -m tuneoff`: the same as the `tuneoff` console script."""

from tuneoff.cli import entry

entry()
