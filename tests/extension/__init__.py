"""ciflow's integration tests against the emulator (issue 3 and later).

A package so that its module names never clash with the emulator suite's
(tests/emulator/) under pytest's default import mode.
"""
