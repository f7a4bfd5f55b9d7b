"""`python -m pipeline.cli`: the same as the `drn-label` command."""
from pipeline.cli import main

main()
