"""Command-line tools built on the CLI (e.g. the leave-one-site-out matrix, ``tools.loso``)."""
