"""Sub-commands of the ``allocation`` CLI; each module defines ``register(subparsers)``."""
