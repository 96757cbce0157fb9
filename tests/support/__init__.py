"""Test-only support code shared by the unit, integration and bench trees: builders, fakes,
emulated external systems, the running local stack. Tests import helpers from here only."""
