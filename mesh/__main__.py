"""`python -m mesh` is the `zeromesh` command."""

from .cli import main

raise SystemExit(main())
