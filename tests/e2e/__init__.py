"""Support for the end-to-end tests: the loopback DNS runner and the MX network."""
