"""companion-runtime."""
