"""SQL shipped inside the wheel: `migrations/` and named `queries/`."""
