"""``python -m shadowkv ...`` is the ``shadowkv`` command."""

from .cli import main

raise SystemExit(main())
