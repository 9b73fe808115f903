"""``python -m broker``: the same as the ``console-broker`` command."""

from broker.cli import main

raise SystemExit(main())
