"""Size thresholds of the IR layer: read at call time (``limits.TWO_GB``), so a test can lower them
to send a small model down the paths of a large one."""

TWO_GB = 2**31                # protobuf's limit: larger models are saved with external data
CHECK_WEIGHTS_BYTES = 2**26   # larger models are checked on their weight-free skeleton (see files.check)
LAZY_BYTES = 2**28            # models with this much external data keep it on disk (files.load(lazy=True))
