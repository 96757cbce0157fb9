"""The adversarial suite (issue 10): attacks on the real stack, with figures for docs/reliability.md."""
