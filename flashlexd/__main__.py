"""`python -m flashlexd` is the `flashlexd` command."""
from flashlexd.hangups import main  # holds SIGHUP for `run` before the CLI's imports

raise SystemExit(main())
