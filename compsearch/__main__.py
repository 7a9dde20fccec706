"""`python -m compsearch` runs the command-line interface."""
import sys

from compsearch.search.cli import main

sys.exit(main())
