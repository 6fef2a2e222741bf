"""Small runnable programs using bastion's public API (see each module's docstring)."""
