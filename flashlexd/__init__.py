"""flashlexd: an on-device, durable message cache daemon for IoT things."""

# every release changes it: pip installs a wheel over an installed one only when its version
# differs (new code released as 0.2.0 again installed nothing, review "upgrade")
__version__ = "0.3.0"
