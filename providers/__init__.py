"""Provider drivers, found by the core through the ``smartpush.providers`` entry points."""
