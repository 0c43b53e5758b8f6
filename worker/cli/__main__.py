"""`python -m worker.cli`: what `up` runs its children with (and the tests)."""

from worker.cli import main

main()
