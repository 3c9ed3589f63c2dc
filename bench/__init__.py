"""smartpush's benchmark harness: ``python -m bench --help``. See bench/RESULTS.md for recorded runs."""
