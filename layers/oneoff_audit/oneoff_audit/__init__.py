"""oneoff-audit: complete, encrypted, tamper-evident audit logs for one-off container sessions."""

__version__ = "0.1.0"
