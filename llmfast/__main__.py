"""``python -m llmfast``: the command-line interface (see :mod:`llmfast.cli`)."""
from llmfast.cli import main

raise SystemExit(main())
