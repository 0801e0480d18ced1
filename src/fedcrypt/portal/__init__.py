"""The consortium portal: a FastAPI server that stores and aggregates protected updates."""
