"""Model features."""
