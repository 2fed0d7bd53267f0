"""flashlexd: an on-device, durable message cache daemon for IoT things."""

__version__ = "0.1.0"
