"""``python -m streamherd_cli`` and the ``streamherd`` console script."""

from __future__ import annotations

from streamherd_cli.app import main

if __name__ == "__main__":
    main()
