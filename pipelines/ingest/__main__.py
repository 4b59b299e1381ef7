"""`python -m pipelines.ingest` == `dcm ingest`."""

import sys

from pipelines.args import run_main
from pipelines.ingest.cli import main

sys.exit(run_main(main))
