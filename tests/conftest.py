"""Shared test setup."""

import logging

# bitsandbytes logs a warning about an optional GPU-kernel package on import; it is noise here.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
