"""smartpush: a mass multichannel campaign dispatcher for SMS, email and push."""

__version__ = "0.1.0"
