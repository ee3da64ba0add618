"""``python -m compressor`` is the ``compressor`` command."""

from .cli import main

raise SystemExit(main())
