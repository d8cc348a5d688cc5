"""Namespace for the app's model adapters (Dataloop's `adapters/` convention)."""
