"""Allow ``python -m cowd``."""

from cowd._main import main

main()
