"""The framework recipes of docs/examples, run under each framework's own test client."""
