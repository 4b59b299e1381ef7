"""Ray stages of the DCM platform: thin adapters over the `dcm` library.

Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is first imported. A run on this
machine alone (no RAY_ADDRESS) must have it set to 0 before any stage imports ray, so that
every Ray process listens on 127.0.0.1 only (RUNTIME.md). Runs that join a cluster through
RAY_ADDRESS (e.g. under `ray job submit`) are left untouched.
"""

import os as _os

if not _os.environ.get("RAY_ADDRESS"):
    _os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
