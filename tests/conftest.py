import os

# Value checks (index ranges, tid2eid) on for every device in the test suite.
os.environ.setdefault("V4K_CHECKS", "full")
