"""The HTTP API: timeline, session details, log delivery, access audit (Powertools REST resolver)."""
