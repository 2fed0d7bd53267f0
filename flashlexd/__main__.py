"""`python -m flashlexd` is the `flashlexd` command."""
from flashlexd.cli import main

raise SystemExit(main())
