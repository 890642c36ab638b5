"""The deployment state machine: fetch, verify, unpack, self-test, activate, probation, rollback."""
