"""Devices and hosts: `sharding` (the device mesh and the sharding rules by
parameter path) and `distributed` (multi-host initialisation, the
lost-process watchdog and its exit code)."""
