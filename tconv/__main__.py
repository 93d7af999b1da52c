"""``python -m tconv``: see :mod:`tconv.cli`."""

from tconv.cli import main

raise SystemExit(main())
