"""flashlexd: an on-device, durable message cache daemon for IoT things."""

__version__ = "0.2.0"  # a release whose store schema changed changes it (tests/test_packaging.py)
