"""Build DeepSpeed's JIT shared-memory comm op once, before any test or training run.

On CPU DeepSpeed compiles this op at the first `init_distributed` (~36 s, RUNTIME.md); doing
it here keeps that cost out of test timeouts. The result is cached in TORCH_EXTENSIONS_DIR.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from pipelines.args import setup_logging

log = logging.getLogger(__name__)


def main() -> int:
    setup_logging(sys.argv[1:])
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.abspath(".cache/torch_extensions"))
    start = time.perf_counter()
    try:
        from deepspeed.comm.torch import build_shm_op

        op = build_shm_op()
    except Exception as err:  # noqa: BLE001 - a missing compiler only costs speed later
        log.warning("DeepSpeed shm comm op not built (%s); training will build it on demand", err)
        return 0
    state = "ready" if op is not None else "not available on this accelerator"
    took = time.perf_counter() - start
    log.info(
        "DeepSpeed shm comm op %s in %.1f s (%s)", state, took, os.environ["TORCH_EXTENSIONS_DIR"]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
