"""The ``smartpush`` command line."""
