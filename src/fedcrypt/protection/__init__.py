"""protection package."""
