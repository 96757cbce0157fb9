"""Test-only support code: emulated external systems the integration tests talk to."""
