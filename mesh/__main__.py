"""`python -m mesh` is the `zeromesh` command."""

from .cli._main import main

raise SystemExit(main())
