"""Allow ``python -m cowclient`` as another name for cowctl."""

from cowclient._cli import main

main()
