"""The machine this process runs on: devices and dtypes, CPU threads, memory, the network,
sizes as people write them, signals, progress bars on its terminal."""
