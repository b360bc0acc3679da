"""The machine this process runs on: devices and dtypes, CPU threads, memory, network addresses, sizes, progress bars on its terminal."""
