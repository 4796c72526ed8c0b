"""Makes the repository root importable (configs/) for the tests."""
