"""Running it: the command line, configuration, the daemon's lifecycle, systemd and logs."""
