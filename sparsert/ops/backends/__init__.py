"""Per-device implementations behind the sparsert ops."""
