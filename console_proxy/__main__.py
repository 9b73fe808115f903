"""``python -m console_proxy``: the same as the ``console-proxy`` command."""

from console_proxy.cli import main

raise SystemExit(main())
